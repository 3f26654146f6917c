"""Write a Hugging Face model made with torchslim back as a Hugging Face directory.

``export_hf(model, DIR)`` takes an :class:`~torchslim.hf.loading.HFModel` (``load_hf("hf:DIR")`` or ``load`` of
a ``.slim`` made from one) and writes ``config.json``, ``model.safetensors``, the generation config and the
tokenizer, loadable with ``transformers.AutoModelFor...from_pretrained(DIR)``:

- torchslim's 4- and 8-bit weight-only Linear layers (``IntQuantLayer``, per channel or per group) go in the
  ``compressed-tensors`` format (the ``compressed-tensors`` library writes it; vLLM and transformers read it),
  from torchslim's own codes and scales: the format's signed code is torchslim's ``q - zero_point`` and its scale is
  torchslim's scale, so the weights the file decodes to are the ones torchslim computes with. Symmetric layers use
  ``pack-quantized`` (8 four-bit codes per int32, what vLLM's weight-only kernels read); asymmetric layers use
  ``naive-quantized`` (one int8 per code): an asymmetric ``pack-quantized`` file does not reload in transformers
  5.24 with compressed-tensors 0.20 (its packed zero points fail the shape check), so it is not written.
- every other layer is written dense in ``dtype``: pruned models (narrower FFN, fewer layers) get a config that
  builds their shapes; 2/3/5/6/7-bit, tensor-granularity, codebook and fp16 layers are decoded to dense weights
  (listed in the report). GPT-2 ``Conv1D`` layers, which torchslim turns into ``nn.Linear``, are turned back.

Before the directory appears it is loaded back with transformers and its outputs compared with the torchslim
model's on the example tokens; a disagreement beyond the limits raises and nothing is written.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from collections import defaultdict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn

from torchslim._utils import first_line
from torchslim.errors import ConfigError, MissingDependencyError, ModelError, TorchSlimError
from torchslim.export.int4 import dequantized_copy
from torchslim.hf.loading import HFModel, _quiet, encode, sync_config_
from torchslim.onload import materialize_
from torchslim.onnx.convert import compare_outputs

__all__ = ["HF_DTYPES", "HFExportReport", "export_hf"]

HF_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}
# (min cosine, min top-1 agreement) of the reloaded model against torchslim's, by written dtype
_PARITY = {"float32": (0.9999, 0.99), "float16": (0.999, 0.95), "bfloat16": (0.995, 0.9)}
_PACKABLE_BITS = (4, 8)


@dataclass
class HFExportReport:
    """What :func:`export_hf` wrote.

    Attributes:
        directory: the written directory.
        bytes: total size of its files.
        formats: compressed-tensors format -> number of layers written in it (``{}`` for a dense model).
        dtype: dtype of the dense tensors and of the scales.
        dense_layers: torchslim layers decoded to dense weights (not expressible in the format), by name.
        parity: ``{"max_abs_error", "top1_agreement", "cosine", "samples"}`` of the reloaded model.
        notes: anything the user should know.
    """

    directory: str
    bytes: int
    formats: dict[str, int]
    dtype: str
    dense_layers: list[str]
    parity: dict[str, float]
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe dict."""
        return asdict(self)


def export_hf(
    model: nn.Module,
    directory: str | os.PathLike,
    *,
    dtype: str = "float16",
    example_inputs: Tensor | tuple[Tensor, ...] | None = None,
    force: bool = False,
) -> HFExportReport:
    """Write ``model`` as a Hugging Face directory (compressed-tensors for its int4/int8 layers), checked on reload.

    Args:
        model: an ``HFModel`` (not changed).
        directory: the output directory (written atomically: a sibling temporary directory renamed at the end).
        dtype: ``"float16"`` (default: torchslim's scales are float16, so the codes are kept exactly),
            ``"bfloat16"`` or ``"float32"``: the dtype of dense tensors and scales.
        example_inputs: token ids ``(batch, tokens)`` or ``(input_ids, attention_mask)`` for the reload check
            (default: the tokenizer's encoding of a short sentence, else 2 x 16 random ids).
        force: replace an existing ``directory``.

    Returns:
        An :class:`HFExportReport`.

    Raises:
        ConfigError: unknown ``dtype``.
        ModelError: not an ``HFModel``, or a structure a transformers config cannot describe (attention modules
            with different head counts after head pruning).
        MissingDependencyError: transformers or compressed-tensors is missing (the latter only for quantized
            layers).
        TorchSlimError: ``directory`` exists and ``force`` is false (checked first), or the reloaded model
            disagrees with torchslim's beyond the limits (the message has the numbers; nothing is written).
    """
    if dtype not in HF_DTYPES:
        raise ConfigError(f"dtype = {dtype!r} is invalid: expected one of {', '.join(HF_DTYPES)}")
    materialize_(model)  # a lazily loaded model's blocks still in their file
    if not isinstance(model, HFModel):
        raise ModelError(
            f"export_hf needs a Hugging Face model (load_hf('hf:DIR') or a .slim made from one), got "
            f"{type(model).__name__}: export other models with export(model, 'model.onnx')"
        )
    target = Path(directory)
    if target.exists() and not force:
        raise TorchSlimError(f"output {str(target)!r} already exists: pass --force (force=True) to replace it")
    _check_heads(model)
    clone, packed = _writable_copy(model, HF_DTYPES[dtype])
    groups, dense = _quantization_groups(clone, packed)
    formats: dict[str, int] = {}
    notes: list[str] = []
    if groups:
        formats = _apply_compressed_tensors(clone, groups, packed)
    if dense:
        notes.append(f"{len(dense)} torchslim layer(s) written dense (compressed-tensors here takes 4/8-bit "
                     f"per-channel/group Linear weights): {', '.join(dense[:5])}{' ...' if len(dense) > 5 else ''}")
    ragged = sorted({packed[n].group_size for n in dense if packed[n].granularity == "group"
                     and packed[n].op == "linear" and packed[n].weight_shape[1] % packed[n].group_size})
    if ragged:
        notes.append(f"group size {ragged} does not divide some layers' input width, which compressed-tensors "
                     "requires: those layers are written dense; choose a group size that divides every width "
                     "(e.g. 64 for a 576-wide model) to keep them packed")
    if formats.get("naive-quantized"):
        notes.append("asymmetric layers are written naive-quantized (one int8 per code); vLLM's weight-only kernels "
                     "read pack-quantized: quantize with symmetric=True for a file vLLM serves")
    staging = target.with_name(f".{target.name}.tmp-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    try:
        _save(clone, model, staging, groups)
        del clone  # the reload check holds a second model: let the written copy go first
        parity = _reload_parity(model, staging, example_inputs, dtype)
        _replace_directory(staging, target)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    return HFExportReport(str(target), size, formats, dtype, dense, parity, notes)


def _check_heads(model: nn.Module) -> None:
    counts = set(model.head_counts().values())
    configured = getattr(model.config, "num_attention_heads", None)
    if len(counts) > 1 or (counts and configured is not None and counts != {configured}):
        raise ModelError(
            f"export_hf: the attention modules have {sorted(counts)} heads but a transformers config records one "
            f"count for all ({configured}): head-pruned models cannot be written as a Hugging Face directory; "
            "save them as .slim or export them to ONNX"
        )


def _writable_copy(model: nn.Module, dtype: torch.dtype) -> tuple[nn.Module, dict[str, nn.Module]]:
    """The transformers model with float layers (GPT-2 Conv1D restored), config synced, in ``dtype``."""
    clone, packed = dequantized_copy(model.model)
    sync_config_(clone)
    restored = _restore_conv1d_(clone)
    packed = {name: layer for name, layer in packed.items() if name not in restored}
    if "lm_head" in packed and getattr(clone.config, "tie_word_embeddings", False):
        clone.config.tie_word_embeddings = False  # the quantized head no longer shares the embedding's weight
    return clone.to(dtype), packed


def _restore_conv1d_(model: nn.Module) -> set[str]:
    """Turn the ``nn.Linear`` layers that the architecture builds as ``Conv1D`` (GPT-2) back into ``Conv1D``."""
    from transformers.pytorch_utils import Conv1D

    with torch.device("meta"):
        skeleton = type(model)._from_config(model.config)
    restored = set()
    for name, module in skeleton.named_modules():
        current = model.get_submodule(name) if name else model
        if isinstance(module, Conv1D) and isinstance(current, nn.Linear):
            conv = Conv1D(current.out_features, current.in_features)
            with torch.no_grad():
                conv.weight.copy_(current.weight.t())
                conv.bias.copy_(current.bias if current.bias is not None else torch.zeros(current.out_features))
            model.set_submodule(name, conv)
            restored.add(name)
    return restored


def _quantization_groups(
    clone: nn.Module, packed: dict[str, nn.Module]
) -> tuple[dict[tuple, list[str]], list[str]]:
    """Packed layers the format takes, grouped by (bits, strategy, group size, symmetric); the rest, by name."""
    groups: dict[tuple, list[str]] = defaultdict(list)
    dense = []
    for name, layer in packed.items():
        fits = (
            layer.op == "linear"
            and isinstance(clone.get_submodule(name), nn.Linear)
            and layer.bits in _PACKABLE_BITS
            and layer.granularity in ("channel", "group")
            and (layer.granularity == "channel" or layer.weight_shape[1] % layer.group_size == 0)
        )
        if fits:
            size = layer.group_size if layer.granularity == "group" else None
            groups[(layer.bits, layer.granularity, size, layer.symmetric)].append(name)
        else:
            dense.append(name)
    return dict(groups), dense


def _require_compressed_tensors() -> None:
    if importlib.util.find_spec("compressed_tensors") is None:
        raise MissingDependencyError(
            "writing quantized layers in the compressed-tensors format needs compressed-tensors: "
            "pip install 'torchslim[hf]' (or pip install compressed-tensors)"
        )


def _apply_compressed_tensors(
    clone: nn.Module, groups: dict[tuple, list[str]], packed: dict[str, nn.Module]
) -> dict[str, int]:
    """Attach compressed-tensors schemes with torchslim's scales and zero points, then compress in place."""
    _require_compressed_tensors()
    from compressed_tensors.quantization import (
        QuantizationArgs,
        QuantizationConfig,
        QuantizationScheme,
        QuantizationStatus,
        apply_quantization_config,
    )

    schemes, ignore = {}, []
    if len(groups) == 1:  # the usual file: targets "Linear", float Linear layers in ignore (llm-compressor's way)
        quantized = next(iter(groups.values()))
        ignore = [n for n, m in clone.named_modules() if isinstance(m, nn.Linear) and n not in set(quantized)]
    for index, ((bits, strategy, size, symmetric), names) in enumerate(groups.items()):
        fmt = "pack-quantized" if symmetric else "naive-quantized"
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=symmetric, strategy=strategy, group_size=size)
        targets = ["Linear"] if len(groups) == 1 else list(names)
        schemes[f"group_{index}"] = QuantizationScheme(targets=targets, weights=args, format=fmt)
    config = QuantizationConfig(
        config_groups=schemes, ignore=ignore, quantization_status=QuantizationStatus.INITIALIZED
    )
    apply_quantization_config(clone, config, show_progress=False)
    formats: dict[str, int] = defaultdict(int)
    with torch.no_grad():
        for (bits, _, _, symmetric), names in groups.items():
            for name in names:
                linear, layer = clone.get_submodule(name), packed[name]
                linear.weight_scale.copy_(layer.scale.to(linear.weight_scale.dtype).reshape(linear.weight_scale.shape))
                # the format's signed codes are q - 2**(bits-1); torchslim's q - zero_point is kept
                zero = layer.zero_points() - (1 << (bits - 1))
                linear.weight_zero_point.copy_(zero.reshape(linear.weight_zero_point.shape))
                formats["pack-quantized" if symmetric else "naive-quantized"] += 1
    return dict(formats)


def _save(clone: nn.Module, model: nn.Module, staging: Path, groups: dict[tuple, list[str]]) -> None:
    with _quiet():
        if groups:
            from compressed_tensors.compressors import ModelCompressor

            compressor = ModelCompressor.from_pretrained_model(clone)
            compressor.compress_model(clone)
            clone.save_pretrained(staging)
            compressor.update_config(str(staging))
        else:
            clone.save_pretrained(staging)
        if getattr(model, "tokenizer", None) is not None:
            model.tokenizer.save_pretrained(staging)


def _example(model: nn.Module, example_inputs: Any) -> tuple[Tensor, Tensor | None]:
    if example_inputs is not None:
        parts = tuple(example_inputs) if isinstance(example_inputs, (tuple, list)) else (example_inputs,)
        return parts[0], parts[1] if len(parts) > 1 else None
    if getattr(model, "tokenizer", None) is not None:
        return encode(model, ["the quick brown fox jumps over the lazy dog", "a second, shorter line"])
    vocab = int(getattr(model.config, "vocab_size", 100) or 100)
    return torch.randint(0, vocab, (2, 16), generator=torch.Generator().manual_seed(0)), None


def _reload_parity(model: nn.Module, staging: Path, example_inputs: Any, dtype: str) -> dict[str, float]:
    """Load ``staging`` with transformers (float32) and compare its outputs with ``model``'s."""
    import transformers

    ids, mask = _example(model, example_inputs)
    # the model's own class; a class transformers does not export (remote code) loads through the Auto classes
    cls = getattr(transformers, type(model.model).__name__, None) or (
        transformers.AutoModelForCausalLM if model.output == "logits" else transformers.AutoModel)
    try:
        with _quiet():
            reloaded = cls.from_pretrained(staging, dtype=torch.float32, attn_implementation="eager").eval()
    except Exception as exc:  # transformers raises many kinds for a directory it cannot load
        raise TorchSlimError(f"export_hf: transformers cannot load the written directory: {first_line(exc)}") from exc
    with torch.no_grad(), _quiet():  # the first forward of a compressed-tensors model decompresses it, with bars
        expected = model(ids) if mask is None else model(ids, mask)
        out = reloaded(input_ids=ids, attention_mask=mask, return_dict=True)
    got = out.logits if model.output == "logits" else out.last_hidden_state
    cosine, agreement = _PARITY[dtype]
    try:
        return compare_outputs(expected, got, atol=None, min_agreement=agreement, min_cosine=cosine)
    except TorchSlimError as exc:
        raise TorchSlimError(f"export_hf: the reloaded model disagrees with torchslim's: {exc}") from exc


def _replace_directory(staging: Path, target: Path) -> None:
    old = target.with_name(f".{target.name}.old-{os.getpid()}")
    if target.exists():
        target.rename(old)
    staging.rename(target)
    shutil.rmtree(old, ignore_errors=True)
