"""torchslim: compress and accelerate PyTorch models, and prove it with measurements.

The public API is re-exported here lazily (PEP 562), so ``import torchslim`` stays cheap and never
imports optional runtimes (onnxruntime, transformers, triton).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from torchslim._version import __version__

# public name -> module that defines it
_EXPORTS: dict[str, str] = {
    "Config": "torchslim.config",
    "register_config": "torchslim.config",
    "TorchSlimError": "torchslim.errors",
    "ConfigError": "torchslim.errors",
    "DataError": "torchslim.errors",
    "ModelError": "torchslim.errors",
    "ArtifactError": "torchslim.errors",
    "MissingDependencyError": "torchslim.errors",
    "load_data": "torchslim.data",
    "DataSplits": "torchslim.data",
    "create_model": "torchslim.models",
    "list_models": "torchslim.models",
    "register_model": "torchslim.models",
    "TrainConfig": "torchslim.train",
    "train": "torchslim.train",
    "evaluate": "torchslim.train",
    "save": "torchslim.artifact",
    "load": "torchslim.artifact",
    "read_manifest": "torchslim.artifact",
    "measure": "torchslim.measure",
    "IntQuant": "torchslim.quantize",
    "CodebookQuant": "torchslim.quantize",
    "HalfPrecision": "torchslim.quantize",
    "StaticInt8": "torchslim.quantize",
    "DynamicInt8": "torchslim.quantize",
    "quantize_": "torchslim.quantize",
    "quantize_static": "torchslim.quantize",
    "quantize_dynamic": "torchslim.quantize",
    "sensitivity": "torchslim.quantize",
    "prepare_qat_": "torchslim.quantize",
    "convert_": "torchslim.quantize",
    "qat": "torchslim.quantize.qat",
    "MagnitudePruning": "torchslim.prune",
    "NMSparsity": "torchslim.prune",
    "prune_": "torchslim.prune",
    "finalize_": "torchslim.prune",
    "ChannelPruning": "torchslim.prune",
    "PruneSchedule": "torchslim.prune",
    "prune_with_schedule": "torchslim.prune",
    "sweep_thresholds": "torchslim.prune",
    "sweep_bits": "torchslim.quantize",
    "export_onnx": "torchslim.export",
    "check_parity": "torchslim.export",
    "export": "torchslim.export",
    "ExportConfig": "torchslim.export",
    "ExportReport": "torchslim.export",
    "export_hf": "torchslim.export.hf",
    "HFExportReport": "torchslim.export.hf",
    "bench": "torchslim.benchmarking",
    "BenchReport": "torchslim.benchmarking",
    "OnnxGraph": "torchslim.models.onnx_graph",
    "GPTQ": "torchslim.quantize.gptq",
    "gptq_": "torchslim.quantize.gptq",
    "AWQ": "torchslim.quantize.awq",
    "awq_": "torchslim.quantize.awq",
    "load_hf": "torchslim.hf",
    "prune_transformer_": "torchslim.hf",
    "text_fidelity": "torchslim.hf",
    "perplexity": "torchslim.hf",
    "drop_layers": "torchslim.hf",
    "hidden_pairs": "torchslim.hf",
    "text_dataset": "torchslim.hf",
    "Measurement": "torchslim.measure",
    "KD": "torchslim.distill",
    "SyntheticData": "torchslim.distill",
    "distill": "torchslim.distill",
    "distillation_loss": "torchslim.distill",
    "synthesize": "torchslim.distill",
    "lowbit_linear": "torchslim.kernels",
    "fuse_parameters": "torchslim.distill.fusion",
    "FusionResult": "torchslim.distill.fusion",
    "ParameterFusion": "torchslim.distill.fusion",
    "compress": "torchslim.pipeline.compress",
    "load_recipe": "torchslim.pipeline.recipe",
    "parse_recipe": "torchslim.pipeline.recipe",
    "Recipe": "torchslim.pipeline.recipe",
    "plan": "torchslim.pipeline.planner",
    "PlannerConfig": "torchslim.pipeline.planner",
    "holdout_split": "torchslim.pipeline.planner",
    "write_report": "torchslim.pipeline.report",
    "deploy": "torchslim.deployment",
    "set_runtime_": "torchslim.quantize.runtime",
    "runtime_report": "torchslim.quantize.runtime",
    "DeployReport": "torchslim.deployment",
    "DeployConfig": "torchslim.deployment",
}

__all__ = ["__version__", *sorted(_EXPORTS)]


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module 'torchslim' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(_EXPORTS))


if TYPE_CHECKING:  # pragma: no cover - for type checkers and IDEs only
    from torchslim.artifact import load, read_manifest, save  # noqa: F401
    from torchslim.benchmarking import BenchReport, bench  # noqa: F401
    from torchslim.config import Config, register_config  # noqa: F401
    from torchslim.data import DataSplits, load_data  # noqa: F401
    from torchslim.deployment import DeployConfig, DeployReport, deploy  # noqa: F401
    from torchslim.distill import KD, SyntheticData, distill, distillation_loss, synthesize  # noqa: F401
    from torchslim.distill.fusion import FusionResult, ParameterFusion, fuse_parameters  # noqa: F401
    from torchslim.errors import (  # noqa: F401
        ArtifactError,
        ConfigError,
        DataError,
        MissingDependencyError,
        ModelError,
        TorchSlimError,
    )
    from torchslim.export import ExportConfig, ExportReport, check_parity, export, export_onnx  # noqa: F401
    from torchslim.export.hf import HFExportReport, export_hf  # noqa: F401
    from torchslim.hf import (  # noqa: F401
        drop_layers,
        hidden_pairs,
        load_hf,
        perplexity,
        prune_transformer_,
        text_dataset,
        text_fidelity,  # noqa: F401
    )
    from torchslim.measure import Measurement, measure  # noqa: F401
    from torchslim.models import create_model, list_models, register_model  # noqa: F401
    from torchslim.models.onnx_graph import OnnxGraph  # noqa: F401
    from torchslim.pipeline.compress import compress  # noqa: F401
    from torchslim.pipeline.planner import PlannerConfig, holdout_split, plan  # noqa: F401
    from torchslim.pipeline.recipe import Recipe, load_recipe, parse_recipe  # noqa: F401
    from torchslim.pipeline.report import write_report  # noqa: F401
    from torchslim.prune import (  # noqa: F401
        ChannelPruning,
        MagnitudePruning,
        NMSparsity,
        PruneSchedule,
        finalize_,
        prune_,
        prune_with_schedule,
        sweep_thresholds,
    )
    from torchslim.quantize import (  # noqa: F401
        CodebookQuant,
        DynamicInt8,
        HalfPrecision,
        IntQuant,
        StaticInt8,
        convert_,
        prepare_qat_,
        quantize_,
        quantize_dynamic,
        quantize_static,
        sensitivity,
        sweep_bits,
    )
    from torchslim.quantize.awq import AWQ, awq_  # noqa: F401
    from torchslim.quantize.gptq import GPTQ, gptq_  # noqa: F401
    from torchslim.quantize.qat import qat  # noqa: F401
    from torchslim.quantize.runtime import runtime_report, set_runtime_  # noqa: F401
    from torchslim.train import TrainConfig, evaluate, train  # noqa: F401
