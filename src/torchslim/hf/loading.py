"""Load a local Hugging Face model directory (``hf:DIR``) as a torchslim model.

``load_hf(DIR)`` builds the model with ``transformers`` from the directory only (``local_files_only``: the
network is never touched), in float32 with eager attention (exportable to ONNX, traceable by Torch-Pruning),
and wraps it in :class:`HFModel`, whose ``forward(input_ids, attention_mask)`` returns one tensor (the logits of
a model with a head, else the last hidden state), so every torchslim technique, ``measure`` and ONNX export treat
it like any other model. The tokenizer of the directory (if any) is ``model.tokenizer``.

GPT-2 style ``transformers.pytorch_utils.Conv1D`` layers (a Linear with a transposed weight) are converted to
``nn.Linear`` on load, so quantization and pruning see ordinary Linear layers.

The recorded factory is ``{"name": "hf:DIR", "kwargs": {"weights": False, "heads": {...}}}``: a ``.slim`` file
holds every tensor, so ``torchslim.load`` rebuilds the architecture from ``DIR/config.json`` alone (no weight
files needed), sets the per-layer attention head counts recorded under ``heads`` (structural head pruning), and
the artifact's module codecs restore every changed layer shape (pruned FFN and q/k/v widths, quantized layers).
"""

from __future__ import annotations

import contextlib
import copy
import importlib.util
import io
import json
import os
from collections.abc import Sequence
from pathlib import Path
from types import ModuleType
from typing import Any

import torch
from torch import Tensor, nn

from torchslim._utils import first_line
from torchslim.errors import MissingDependencyError, ModelError
from torchslim.hf.layers import kept_layers, layer_list, parse_keep, shorten_, shorten_config_
from torchslim.models.registry import FACTORY_ATTR, register_scheme
from torchslim.onload import register

__all__ = ["HFModel", "attention_modules", "drop_layers", "encode", "load_hf", "require_transformers", "sync_config_"]

HF_PREFIX = "hf:"
# (projection names) of attention modules whose heads are counted, as in torchslim.prune.structural
_QKV = (("query", "q_proj", "q", "q_lin"), ("key", "k_proj", "k", "k_lin"), ("value", "v_proj", "v", "v_lin"))
_HEAD_SIZE_ATTRS = ("attention_head_size", "head_dim")
# config attributes naming the FFN width, by model family
_FFN_CONFIG_ATTRS = ("intermediate_size", "n_inner", "ffn_dim", "hidden_dim")


def require_transformers() -> ModuleType:
    """Import and return ``transformers``.

    Raises:
        MissingDependencyError: it is not installed (the message says ``pip install 'torchslim[hf]'``).
    """
    if importlib.util.find_spec("transformers") is None:
        raise MissingDependencyError(
            "Hugging Face models need transformers: pip install 'torchslim[hf]' (or pip install transformers)"
        )
    import transformers

    return transformers


class HFModel(nn.Module):
    """A Hugging Face model behind a tensor-in, tensor-out ``forward``.

    Args:
        model: the ``transformers`` model (``PreTrainedModel``), available as ``self.model``.
        tokenizer: its tokenizer, or None (not a module; not saved in ``.slim`` files, reloaded from ``source``).
        source: the model directory.

    Attributes:
        output: ``"logits"`` (models with a head) or ``"hidden"`` (base models: the last hidden state).
    """

    def __init__(self, model: nn.Module, tokenizer: Any, source: str) -> None:
        super().__init__()
        self.model = model
        self.tokenizer = tokenizer
        self.source = source
        kind = type(model).__name__
        self.output = "logits" if "For" in kind or "LMHead" in kind else "hidden"
        self._factory_base: dict[str, Any] | None = None
        for module, n in attention_modules(self).values():
            if not isinstance(getattr(module, "num_heads", None), int):
                module.num_heads = n  # the attribute torchslim's structural head pruning reads and updates
        self._heads_at_load = {name: n for name, (_, n) in attention_modules(self).items()}

    @property
    def config(self) -> Any:
        """The ``transformers`` config of the wrapped model."""
        return self.model.config

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        """Run the model, in torchslim's convention or in transformers' own.

        Called with positional tensors only (``model(input_ids)``, ``model(input_ids, attention_mask)``: what
        torchslim's measure, export, distillation and calibration do), returns one tensor: the logits
        ``(batch, tokens, vocab)`` / ``(batch, classes)`` or the last hidden state. Called with any keyword
        argument, as transformers code does (``model(**tokenizer(texts, return_tensors="pt"))``, ``labels=``,
        ``output_hidden_states=``, ``token_type_ids=``), every argument goes to the wrapped model and its own
        output (a ``ModelOutput``) comes back, so code written for the transformers model works unchanged.

        Raises:
            TypeError: no inputs, or more than two positional ones in torchslim's convention.
        """
        if kwargs:
            return self.model(*args, **kwargs)
        if not 1 <= len(args) <= 2:
            raise TypeError(
                f"HFModel takes (input_ids[, attention_mask]) positionally or the model's keyword inputs, got "
                f"{len(args)} positional argument(s)"
            )
        out = self.model(input_ids=args[0], attention_mask=args[1] if len(args) > 1 else None, return_dict=True)
        return out.logits if self.output == "logits" else out.last_hidden_state

    def __getattr__(self, name: str) -> Any:
        # What the wrapper lacks comes from the transformers model: generate, generation_config, can_generate,
        # device, dtype, save_pretrained, get_input_embeddings... so pipelines and generation work on it directly.
        try:
            return super().__getattr__(name)
        except AttributeError:
            inner = self.__dict__.get("_modules", {}).get("model")
            if inner is None or name.startswith("__"):
                raise
            return getattr(inner, name)

    def head_counts(self) -> dict[str, int]:
        """Attention module name (relative to this wrapper) -> number of heads, from the q/k/v widths."""
        return {name: n for name, (_, n) in attention_modules(self).items()}

    @property
    def _torchslim_factory(self) -> dict[str, Any] | None:
        # The recorded factory plus the structure that shapes alone do not tell: per-module head counts.
        if self._factory_base is None:
            return None
        kwargs = dict(self._factory_base["kwargs"])
        heads = {name: n for name, n in self.head_counts().items() if self._heads_at_load.get(name) != n}
        heads = {**dict(kwargs.get("heads") or {}), **heads}
        if heads:
            kwargs["heads"] = heads
        else:
            kwargs.pop("heads", None)
        return {"name": self._factory_base["name"], "kwargs": kwargs}

    @_torchslim_factory.setter
    def _torchslim_factory(self, value: dict[str, Any]) -> None:
        kwargs = dict(value["kwargs"])
        # heads given to the factory are the reference from now on; differences are computed from there
        self._factory_base = {"name": value["name"], "kwargs": kwargs}
        self._heads_at_load = {**self.head_counts(), **dict(kwargs.get("heads") or {})}

    def extra_repr(self) -> str:
        return f"source={self.source!r}, output={self.output!r}"


def attention_modules(model: nn.Module) -> dict[str, tuple[nn.Module, int]]:
    """Attention modules with separate q/k/v ``nn.Linear`` children and a head size attribute.

    Args:
        model: any module (usually an :class:`HFModel`).

    Returns:
        Module name -> (module, current number of heads = q width // head size).
    """
    found = {}
    for name, module in model.named_modules():
        size = next((getattr(module, a) for a in _HEAD_SIZE_ATTRS if isinstance(getattr(module, a, None), int)), None)
        if not size:
            continue
        children = dict(module.named_children())
        projections = [next((children[c] for c in names if isinstance(children.get(c), nn.Linear)), None)
                       for names in _QKV]
        if any(p is None for p in projections):
            continue
        found[name] = (module, projections[0].out_features // size)
    return found


def sync_config_(model: nn.Module) -> dict[str, Any]:
    """Make head counts and FFN widths recorded in modules and config agree with the layer shapes.

    After structural pruning the q/k/v projections of an attention module are narrower: its
    ``num_attention_heads``/``num_heads`` and ``all_head_size`` are set from them. When every FFN of the model
    has the same (new) width, the config's ``intermediate_size`` (``n_inner`` for GPT-2) is set to it, so
    ``model.model.save_pretrained`` writes a config that builds the same FFN shapes. A grouped-query config
    (``num_key_value_heads``: Llama, Mistral, Qwen2, Gemma, Phi) gets the new ``num_attention_heads`` and
    ``num_key_value_heads`` when every attention module has the same counts (``head_dim`` pinned). Other configs
    keep ``num_attention_heads``: Hugging Face derives the head size from it (``hidden_size /
    num_attention_heads``), so fewer heads of the same size cannot be written there; torchslim records per-module
    head counts in the ``.slim`` manifest instead.

    Args:
        model: an :class:`HFModel` (or any module with such attention modules).

    Returns:
        ``{"heads": {module: n}, "ffn": width or None}`` after the update.
    """
    heads = {}
    for name, (module, n) in attention_modules(model).items():
        size = next(getattr(module, a) for a in _HEAD_SIZE_ATTRS if isinstance(getattr(module, a, None), int))
        for attr in ("num_attention_heads", "num_heads"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, n)
        if isinstance(getattr(module, "all_head_size", None), int):
            module.all_head_size = n * size
        heads[name] = n
    _sync_head_config(model)
    ffn = None
    config = getattr(model, "config", None)
    widths = {layer.out_features for layer in ffn_layers(model).values()}
    if config is not None and len(widths) == 1:
        ffn = widths.pop()
        for attr in _FFN_CONFIG_ATTRS:
            if getattr(config, attr, None) is not None or (attr == "n_inner" and hasattr(config, "n_inner")):
                setattr(config, attr, ffn)
                break
    return {"heads": heads, "ffn": ffn}


def _sync_head_config(model: nn.Module) -> None:
    """Write the attention modules' head counts into a grouped-query config when every module has the same.

    Configs with ``num_key_value_heads`` (Llama, Mistral, Qwen2, Gemma, Phi) read the head size from ``head_dim``,
    which is pinned first, so ``num_attention_heads``/``num_key_value_heads`` can hold the pruned counts. A module's
    key/value heads are ``num_heads // num_key_value_groups`` (head pruning removes whole groups).
    """
    config = getattr(model, "config", None)
    if not isinstance(getattr(config, "num_key_value_heads", None), int):
        return
    counts = {
        (module.num_heads, module.num_heads // module.num_key_value_groups, size)
        for module, _ in attention_modules(model).values()
        for size in [next(getattr(module, a) for a in _HEAD_SIZE_ATTRS if isinstance(getattr(module, a, None), int))]
        if isinstance(getattr(module, "num_heads", None), int)
        and isinstance(getattr(module, "num_key_value_groups", None), int)
        and module.num_key_value_groups > 0
    }
    if len(counts) != 1:
        return
    heads, kv_heads, size = counts.pop()
    if getattr(config, "head_dim", None) is None:
        config.head_dim = size
    config.num_attention_heads, config.num_key_value_heads = heads, kv_heads


def ffn_layers(model: nn.Module) -> dict[str, nn.Linear]:
    """The first Linear of each transformer FFN (its outputs are the FFN neurons), by module name.

    Recognised: BERT-style ``intermediate.dense``, GPT-2 ``mlp.c_fc``, and ``mlp.fc1``/``mlp.up_proj``/
    ``ffn.lin1``/``mlp.dense_h_to_4h``.
    """
    suffixes = ("intermediate.dense", "mlp.c_fc", "mlp.fc1", "mlp.up_proj", "ffn.lin1", "mlp.dense_h_to_4h")
    return {
        name: module
        for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name.endswith(suffixes)
    }


def _conv1d_to_linear_(model: nn.Module) -> int:
    """Replace ``transformers.pytorch_utils.Conv1D`` (weight ``(in, out)``) by ``nn.Linear`` in place."""
    from transformers.pytorch_utils import Conv1D

    count = 0
    for name, module in list(model.named_modules()):
        if not isinstance(module, Conv1D):
            continue
        weight = module.weight
        linear = nn.Linear(module.nx, module.nf, bias=module.bias is not None, device=weight.device, dtype=weight.dtype)
        if weight.device.type != "meta":
            with torch.no_grad():
                linear.weight.copy_(weight.t())
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
        count += 1
    return count


def _set_heads(model: HFModel, heads: dict[str, int]) -> None:
    found = attention_modules(model)
    for name, n in heads.items():
        if name not in found:
            raise ModelError(
                f"hf factory: heads names attention module {name!r}, which the model does not have: expected one "
                f"of {', '.join(sorted(found)) or '(none)'}"
            )
        module = found[name][0]
        size = next(getattr(module, a) for a in _HEAD_SIZE_ATTRS if isinstance(getattr(module, a, None), int))
        for attr in ("num_attention_heads", "num_heads"):
            if isinstance(getattr(module, attr, None), int):
                setattr(module, attr, int(n))
        if isinstance(getattr(module, "all_head_size", None), int):
            module.all_head_size = int(n) * size


def model_dir(spec: str | os.PathLike) -> Path:
    """The directory of ``hf:DIR`` (or a plain path), checked to hold a ``config.json``.

    Raises:
        ModelError: not a directory, or no ``config.json`` in it (the message says what was found).
    """
    text = os.fspath(spec)
    path = Path(text[len(HF_PREFIX):] if text.startswith(HF_PREFIX) else text).expanduser()
    if not path.is_dir():
        raise ModelError(
            f"hf model {text!r}: {str(path)!r} is not a directory: expected a local Hugging Face model directory "
            "(with config.json), e.g. one written by save_pretrained; models are never downloaded"
        )
    if not (path / "config.json").is_file():
        raise ModelError(
            f"hf model {text!r}: {str(path)!r} has no config.json: expected a Hugging Face model directory "
            "written by save_pretrained"
        )
    return path.resolve()


def load_hf(
    path: str | os.PathLike,
    *,
    weights: bool = True,
    heads: dict[str, int] | None = None,
    architecture: str | None = None,
    layers: list[int] | None = None,
    lazy: bool = False,
) -> HFModel:
    """Load a local Hugging Face model directory, without network access, as an :class:`HFModel`.

    Args:
        path: the directory (``save_pretrained`` output), optionally written ``hf:DIR``.
        weights: load the weights from the directory; False builds the architecture from ``config.json`` only
            (random weights; ``torchslim.load`` does this and then loads the ``.slim`` tensors).
        heads: attention module name -> head count, for a head-pruned model (set by ``torchslim.load``).
        architecture: a ``transformers`` class name (default: ``config.architectures[0]``, else ``AutoModel``).
        layers: keep only these transformer layers (indices into the directory's model; set by ``torchslim.load``
            for a model made by :func:`~torchslim.hf.layers.drop_layers`).
        lazy: leave each decoder block's weights in the safetensors file until the block first runs (see
            :mod:`torchslim.onload`): ``gptq_`` then holds one float block at a time, so quantizing needs about the
            memory of the quantized model plus one block. Falls back to a whole load where the file's names do not
            map onto the model (renamed checkpoints, GPT-2's ``Conv1D``, no block list, not safetensors).

    Returns:
        The wrapped model in eval mode, float32, with ``model.tokenizer`` (None when the directory has none)
        and its factory recorded for ``torchslim.save``.

    Raises:
        MissingDependencyError: ``transformers`` is not installed.
        ModelError: not a model directory, an unknown architecture, or the weights cannot be loaded.
    """
    transformers = require_transformers()
    directory = model_dir(path)
    try:
        config = transformers.AutoConfig.from_pretrained(directory, local_files_only=True)
    except Exception as exc:  # transformers raises OSError/ValueError/KeyError for bad configs
        raise ModelError(f"hf model {str(directory)!r}: cannot read config.json: {first_line(exc)}") from exc
    name = architecture or next(iter(getattr(config, "architectures", None) or []), None)
    cls = getattr(transformers, name, None) if name else transformers.AutoModel
    if cls is None or not hasattr(cls, "from_pretrained"):
        raise ModelError(
            f"hf model {str(directory)!r}: architecture {name!r} is not a transformers model class: pass "
            "architecture='AutoModel' (or another class name)"
        )
    if getattr(config, "use_cache", None) is not None:
        config.use_cache = False  # no key/value cache: forward returns tensors only (export, tracing)
    if layers is not None:
        layers = parse_keep([int(i) for i in layers], int(getattr(config, "num_hidden_layers", 0) or 0))
        if not weights:
            shorten_config_(config, layers)  # build the shallower model directly
    lazy_model = None
    try:
        with _quiet():
            files = _safetensors_files(directory, config) if lazy and weights and layers is None else None
            if files:
                from torchslim.hf.lazy import build_lazy  # imports quantize.blockwise: not at module load

                config._attn_implementation = "eager"
                lazy_model = build_lazy(cls, config, files)
            state = _read_weights(directory, config) if weights and lazy_model is None else None
            if lazy_model is not None:
                hf = lazy_model[0]
                _load_generation_config(transformers, hf, directory)
            elif state is not None:
                hf = cls.from_pretrained(
                    None, config=config, state_dict=state, dtype=torch.float32, attn_implementation="eager"
                )
                del state
                _load_generation_config(transformers, hf, directory)
            elif weights:
                hf = cls.from_pretrained(
                    directory, config=config, local_files_only=True, dtype=torch.float32, attn_implementation="eager"
                )
            else:
                config._attn_implementation = "eager"
                hf = cls._from_config(config, dtype=torch.float32)
    except Exception as exc:
        raise ModelError(f"hf model {str(directory)!r}: cannot build {cls.__name__}: {first_line(exc)}") from exc
    _conv1d_to_linear_(hf)
    if layers is not None and weights:
        shorten_(hf, layers)
    tokenizer = _load_tokenizer(transformers, directory)
    model = HFModel(hf.eval(), tokenizer, str(directory))
    if heads:
        _set_heads(model, {str(k): int(v) for k, v in heads.items()})
        _sync_head_config(model)
    kwargs: dict[str, Any] = {"weights": False}
    if heads:
        kwargs["heads"] = {str(k): int(v) for k, v in heads.items()}
    if architecture:
        kwargs["architecture"] = architecture
    if layers is not None:
        kwargs["layers"] = list(layers)
    setattr(model, FACTORY_ATTR, {"name": HF_PREFIX + str(directory), "kwargs": kwargs})
    if lazy_model is not None:  # found from the wrapper and from the transformers model alike
        register(model, lazy_model[1])
        register(hf, lazy_model[1])
    return model.eval()


def _read_weights(directory: Path, config: Any) -> dict[str, Tensor] | None:
    """The directory's safetensors weights read into the process's own memory, or None (other formats, or a
    ``quantization_config`` that transformers must apply while loading: it then reads the files itself).

    ``from_pretrained`` memory-maps the files: every weight stays a view of the mapping, whose pages count in the
    process's resident memory once touched and stay there while any weight of the file lives, so replacing
    layers (quantization, pruning) frees nothing. Weights read with ``pread`` are ordinary allocations, freed
    with the layer that held them.
    """
    files = _safetensors_files(directory, config)
    if files is None:
        return None
    from safetensors import safe_open

    state: dict[str, Tensor] = {}
    for file in files:
        try:
            handle = safe_open(str(file), framework="pt", device="cpu", backend="pread")
        except TypeError:  # a safetensors without the pread backend: transformers memory-maps the files
            return None
        except Exception as exc:  # safetensors raises its own error types; the cause is chained
            raise ModelError(f"hf model {str(directory)!r}: cannot read {file.name}: {first_line(exc)}") from exc
        try:
            with handle:
                for key in handle.keys():
                    state[key] = handle.get_tensor(key)
        except Exception as exc:
            raise ModelError(f"hf model {str(directory)!r}: cannot read {file.name}: {first_line(exc)}") from exc
    return state


def _safetensors_files(directory: Path, config: Any) -> list[Path] | None:
    """The directory's safetensors files (one, or the shards of its index), or None (other formats, or a
    ``quantization_config`` that transformers must apply while loading)."""
    if getattr(config, "quantization_config", None) is not None:
        return None
    index = directory / "model.safetensors.index.json"
    if (directory / "model.safetensors").is_file():
        return [directory / "model.safetensors"]
    if not index.is_file():
        return None
    try:
        weight_map = json.loads(index.read_text())["weight_map"]
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise ModelError(f"hf model {str(directory)!r}: cannot read {index.name}: {first_line(exc)}") from exc
    return [directory / name for name in sorted(set(weight_map.values()))]


def _load_generation_config(transformers: ModuleType, hf: nn.Module, directory: Path) -> None:
    """Set ``generation_config`` from the directory's ``generation_config.json``, as ``from_pretrained(DIR)`` does."""
    if not (directory / "generation_config.json").is_file() or not hasattr(hf, "generation_config"):
        return
    with contextlib.suppress(OSError, ValueError):  # from_pretrained(DIR) ignores an unreadable one too
        hf.generation_config = transformers.GenerationConfig.from_pretrained(directory, local_files_only=True)


def hf_factory(spec: str):
    """The factory ``create_model("hf:DIR", **kwargs)`` calls: :func:`load_hf` of that directory.

    The returned model records ``hf:<absolute DIR>``; ``create_model`` then records the spec it was given.
    """
    directory = spec[len(HF_PREFIX):]

    def build(**kwargs: Any) -> HFModel:
        return load_hf(directory, **kwargs)

    return build


def drop_layers(model: nn.Module, keep: str | Sequence[int] = "every-other") -> nn.Module:
    """A copy of ``model`` with only some of its transformer layers, initialised from the kept ones.

    Args:
        model: an :class:`~torchslim.hf.loading.HFModel` (not changed). A model that was already made shallower
            keeps counting in the original teacher's indices (``kept_layers``).
        keep: ``"every-other"`` (layers 0, 2, 4, ...), a string ``"0,2,4"`` or a sequence of indices into the
            model's current layers.

    Returns:
        The new, shallower model (eval mode). Its factory records ``layers`` (indices into the original
        model) so ``torchslim.save``/``torchslim.load`` rebuild it; head counts of pruned attention modules move
        with their layers.

    Raises:
        ConfigError: a bad ``keep``.
        ModelError: the model has no recognisable layer list.
    """
    if not isinstance(model, HFModel):
        raise ModelError(f"drop_layers needs a model loaded with load_hf (HFModel), got {type(model).__name__}")
    name, blocks = layer_list(model)
    indices = parse_keep(keep, len(blocks))
    heads_before = model.head_counts()
    previous = kept_layers(model) or list(range(len(blocks)))
    student = copy.deepcopy(model)
    shorten_(student, indices)
    base = student._factory_base
    if base is not None:
        kwargs = dict(base["kwargs"])
        kwargs["layers"] = [previous[i] for i in indices]
        prefix = name + "."
        new_index = {old: new for new, old in enumerate(indices)}
        # head counts recorded per module name follow their layer to its new index
        heads = {}
        for module, count in {**dict(kwargs.get("heads") or {}), **heads_before}.items():
            if module.startswith(prefix):
                old, _, rest = module[len(prefix):].partition(".")
                if old.isdigit() and int(old) in new_index:
                    heads[f"{prefix}{new_index[int(old)]}.{rest}"] = count
            else:
                heads[module] = count
        default = getattr(model.config, "num_attention_heads", None)
        kwargs["heads"] = {k: v for k, v in heads.items() if v != default}
        if not kwargs["heads"]:
            kwargs.pop("heads")
        student._torchslim_factory = {"name": base["name"], "kwargs": kwargs}
    return student.eval()


def _load_tokenizer(transformers: ModuleType, directory: Path) -> Any:
    names = ("tokenizer.json", "tokenizer_config.json", "vocab.txt", "vocab.json", "spiece.model")
    if not any((directory / n).is_file() for n in names):
        return None
    try:
        with _quiet():
            return transformers.AutoTokenizer.from_pretrained(directory, local_files_only=True)
    except Exception as exc:
        raise ModelError(f"hf model {str(directory)!r}: cannot load its tokenizer: {first_line(exc)}") from exc


def encode(
    model: HFModel, texts: list[str], *, max_length: int = 128, pad_to: int | None = None
) -> tuple[Tensor, Tensor]:
    """Tokenize ``texts`` with the model's tokenizer into a padded batch.

    Args:
        model: an :class:`HFModel` with a tokenizer.
        texts: the strings (one sample each).
        max_length: longer texts are truncated to this many tokens.
        pad_to: pad every sample to exactly this length (default: the longest in the batch).

    Returns:
        ``(input_ids, attention_mask)``, both int64 ``(len(texts), tokens)``.

    Raises:
        ModelError: the model has no tokenizer, or the tokenizer has no padding token and no end token.
    """
    tokenizer = getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ModelError(
            f"hf model {getattr(model, 'source', '?')!r} has no tokenizer: save one in the model directory "
            "(tokenizer.save_pretrained(DIR))"
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ModelError("the tokenizer has no padding token and no end-of-text token to pad with")
        tokenizer.pad_token = tokenizer.eos_token
    padding = "max_length" if pad_to else True
    batch = tokenizer(
        list(texts), padding=padding, truncation=True, max_length=pad_to or max_length, return_tensors="pt"
    )
    return batch["input_ids"].long(), batch["attention_mask"].long()


@contextlib.contextmanager
def _quiet():
    """Keep transformers' load reports and progress bars off the terminal."""
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(io.StringIO()):
        yield


register_scheme(HF_PREFIX.rstrip(":"), hf_factory)  # create_model("hf:DIR") / ts.load of an hf: file
