"""Hugging Face ``transformers`` models (``hf:DIR``): loading, structural pruning, fidelity on text.

``transformers`` is an optional extra (``pip install 'torchslim[hf]'``), imported only when a function here runs.
"""

from torchslim.hf.data import text_dataset
from torchslim.hf.fidelity import read_texts, reference_model, text_fidelity
from torchslim.hf.layers import hidden_pairs, kept_layers, layer_list, set_dropout_
from torchslim.hf.loading import HFModel, attention_modules, drop_layers, encode, ffn_layers, load_hf, sync_config_
from torchslim.hf.perplexity import Perplexity, perplexity
from torchslim.hf.prune import prune_transformer_

__all__ = [
    "HFModel",
    "Perplexity",
    "attention_modules",
    "drop_layers",
    "encode",
    "ffn_layers",
    "hidden_pairs",
    "kept_layers",
    "layer_list",
    "load_hf",
    "perplexity",
    "prune_transformer_",
    "read_texts",
    "reference_model",
    "set_dropout_",
    "sync_config_",
    "text_dataset",
    "text_fidelity",
]
