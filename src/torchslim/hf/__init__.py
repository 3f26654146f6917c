"""Hugging Face ``transformers`` models (``hf:DIR``): loading, structural pruning, fidelity on text.

``transformers`` is an optional extra (``pip install 'torchslim[hf]'``), imported only when a function here runs.
"""

from torchslim.hf.loading import HFModel, attention_modules, encode, ffn_layers, load_hf, sync_config_

__all__ = ["HFModel", "attention_modules", "encode", "ffn_layers", "load_hf", "sync_config_"]
