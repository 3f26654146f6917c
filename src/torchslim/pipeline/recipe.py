"""Recipes: an ordered list of compression stages, written in YAML, validated whole before any work.

A recipe file::

    name: lenet5-50x
    stages:
      - prune: {method: channel, amount: 0.5, epochs: 8}
      - distill: {teacher: baseline, temperature: 4, alpha: 0.9, epochs: 5}
      - prune: {method: magnitude, scope: global, amount: 0.9, schedule: {kind: gradual, steps: 3}}
      - quantize: {method: int, bits: 4, granularity: channel, epochs: 3}
      - export: {format: onnx, quant: int8-static}

Each stage is a one-key mapping ``kind: {fields}``. ``method`` picks the config class through the config
registry (``torchslim.config.registered_configs``); the remaining keys are that config's fields, the training
loop's fields (``epochs``, ``lr``, ``batch_size`` ... of :class:`~torchslim.train.TrainConfig`, used for the
stage's fine-tuning, QAT or distillation) and the stage's own keys (``schedule``, ``teacher``, ``student``).
:func:`parse_recipe` builds every config before returning, so a bad field fails with a message naming the
stage, the field and the value, and nothing has run yet.
"""

from __future__ import annotations

import dataclasses
import os
from pathlib import Path
from typing import Any

from torchslim.config import Config, register_config
from torchslim.errors import ConfigError

__all__ = ["KINDS", "DeployStep", "ExportStep", "Recipe", "Stage", "load_recipe", "methods", "parse_recipe"]

# stage kinds, in the order they are described; each kind's methods are the configs registered with that ``stage``
KINDS = ("prune", "quantize", "distill", "finetune", "export", "deploy")
# stage keys that are neither the method config's nor the training loop's fields
_STAGE_KEYS = {"prune": ("schedule",), "distill": ("teacher", "student"), "quantize": (), "finetune": (), "export": (),
               "deploy": ()}
# stage kinds with a single method (no ``method`` key)
_ONE_METHOD = ("finetune", "export", "deploy")
# stage kinds that write a file beside the model and leave the model as it is
OUTPUT_KINDS = ("export", "deploy")
_TOP_KEYS = ("name", "description", "stages")


@register_config("recipe-export")
@dataclasses.dataclass(frozen=True)
class ExportStep(Config):
    """The ``export`` stage: write the current model as an ONNX file next to the ``.slim``.

    Args:
        format: ``"onnx"`` (the only format so far).
        quant: ``"none"`` (fp32 graph, or the int8 graph of an earlier int8 stage), ``"int8-static"``,
            ``"int8-dynamic"`` or ``"int4-weight"`` (quantized through ONNX Runtime by :func:`torchslim.export`,
            parity-checked; the ``.slim`` is unchanged).
        opset: ONNX opset in [13, 21], or None for the exporter's default.
    """

    stage = "export"
    stage_default = True

    format: str = "onnx"
    quant: str = "none"
    opset: int | None = None

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        self.check_choice("format", ("onnx",))
        from torchslim.export.api import QUANT_MODES

        self.check_choice("quant", QUANT_MODES)
        if self.opset is not None:
            self.check_int("opset", 13, 21)


@register_config("recipe-deploy")
@dataclasses.dataclass(frozen=True)
class DeployStep(Config):
    """The ``deploy`` stage: :func:`torchslim.deploy` the current model into ``DIR/deploy/``.

    Args:
        target: ``"cpu"``.
        batch_sizes: batch sizes to time.
        max_accuracy_drop: points a route may lose vs the model on the test split.
        routes: routes to try (None: ``torchslim.deployment.DEFAULT_ROUTES``).
    """

    stage = "deploy"
    stage_default = True

    target: str = "cpu"
    batch_sizes: tuple[int, ...] = (1, 32)
    max_accuracy_drop: float = 0.5
    routes: tuple[str, ...] | None = None

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        from torchslim.deployment import ROUTES, TARGETS

        self.check_choice("target", TARGETS)
        batches = self.batch_sizes
        if not isinstance(batches, (list, tuple)) or not batches or not all(
                isinstance(b, int) and not isinstance(b, bool) and b >= 1 for b in batches):
            raise self.fail("batch_sizes", batches, "a list of integers >= 1")
        self.check_float("max_accuracy_drop", 0.0, 100.0)
        if self.routes is not None and (not isinstance(self.routes, (list, tuple)) or not self.routes
                                        or any(r not in ROUTES for r in self.routes)):
            raise self.fail("routes", self.routes, "a list of " + ", ".join(ROUTES))


@dataclasses.dataclass(frozen=True)
class Stage:
    """One validated recipe stage.

    Attributes:
        index: 1-based position in the recipe.
        kind: ``prune``, ``distill``, ``quantize``, ``finetune`` or ``export``.
        config: the method's config (``ChannelPruning``, ``IntQuant``, ``KD``, ``TrainConfig``, ``ExportStep`` ...).
        train: training-loop overrides (validated ``TrainConfig`` fields); empty means no training for prune and
            quantize stages, the model's recommended settings for distill and finetune.
        schedule: the ``PruneSchedule`` of a magnitude/N:M prune stage, or None.
        teacher: distill: ``"baseline"`` (the model given to compress, before any stage), a registered model
            name (trained first with its recommended settings) or a ``.slim`` path.
        student: distill: a registered model name to distill into instead of the current model, or None.
        spec: the stage as written (``{kind: {...}}``), for manifests and resume checks.
    """

    index: int
    kind: str
    config: Config
    train: dict[str, Any]
    schedule: Config | None = None
    teacher: str | None = None
    student: str | None = None
    spec: dict[str, Any] = dataclasses.field(default_factory=dict)

    @property
    def label(self) -> str:
        """``"3-quantize"``: the stage's file stem."""
        return f"{self.index}-{self.kind}"

    def train_config(self, base: Config) -> Config:
        """``base`` (a ``TrainConfig``, e.g. the model's recommended one) with this stage's overrides applied."""
        return base.replace(**self.train) if self.train else base

    def describe(self) -> str:
        """One line: ``prune(channel amount=0.5, epochs=8)``."""
        fields = {k: v for k, v in self.spec[self.kind].items() if k != "method"}
        method = self.config.config_name if self.kind not in _ONE_METHOD else ""
        inner = ", ".join(f"{k}={v}" for k, v in fields.items())
        return f"{self.kind}({' '.join(p for p in (method, inner) if p)})"


@dataclasses.dataclass(frozen=True)
class Recipe:
    """A validated recipe: a name and its ordered stages."""

    name: str
    stages: tuple[Stage, ...]
    description: str = ""

    def to_dict(self) -> dict[str, Any]:
        """The recipe as written (YAML/JSON-safe); ``parse_recipe(r.to_dict())`` rebuilds it."""
        out: dict[str, Any] = {"name": self.name}
        if self.description:
            out["description"] = self.description
        out["stages"] = [s.spec for s in self.stages]
        return out

    def describe(self) -> str:
        """``prune(...) -> distill(...) -> ...``."""
        return " -> ".join(s.describe() for s in self.stages)


def load_recipe(path: str | os.PathLike) -> Recipe:
    """Read and validate a YAML (or JSON) recipe file.

    Args:
        path: the recipe file.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        FileNotFoundError: the file does not exist.
        ConfigError: the YAML does not parse, or a stage is invalid (the message names the stage, the field
            and the value).
    """
    import yaml

    source = Path(path)
    text = source.read_text(encoding="utf-8")
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        detail = " ".join(str(exc).split())
        raise ConfigError(f"recipe {str(source)!r} is not valid YAML: {detail}") from exc
    return parse_recipe(data, source=str(source))


def parse_recipe(data: Any, *, source: str = "recipe") -> Recipe:
    """Validate a recipe mapping and build every stage's configs (no work is done).

    Args:
        data: ``{"name": ..., "stages": [{kind: {...}}, ...]}`` as loaded from YAML.
        source: where it came from, for error messages.

    Returns:
        The validated :class:`Recipe`.

    Raises:
        ConfigError: naming the stage (index and kind), the field and the value.
    """
    _load_config_modules()
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping with 'name' and 'stages', got {type(data).__name__}")
    unknown = sorted(set(data) - set(_TOP_KEYS))
    if unknown:
        raise ConfigError(f"{source}: {unknown[0]!r} is not a recipe key: expected one of {', '.join(_TOP_KEYS)}")
    name = data.get("name", "recipe")
    if not isinstance(name, str) or not name.strip():
        raise ConfigError(f"{source}: name = {name!r} is invalid: expected a non-empty string")
    description = data.get("description", "")
    if not isinstance(description, str):
        raise ConfigError(f"{source}: description = {description!r} is invalid: expected a string")
    raw_stages = data.get("stages")
    if not isinstance(raw_stages, list) or not raw_stages:
        raise ConfigError(f"{source}: stages = {raw_stages!r} is invalid: expected a non-empty list of stages")
    stages = tuple(_parse_stage(index, raw, source) for index, raw in enumerate(raw_stages, start=1))
    _check_order(stages, source)
    return Recipe(name=name, stages=stages, description=description)


def _parse_stage(index: int, raw: Any, source: str) -> Stage:
    if not isinstance(raw, dict) or len(raw) != 1:
        raise ConfigError(f"{source}: stage {index} = {raw!r} is invalid: expected a one-key mapping "
                          f"{{kind: {{fields}}}} with kind one of {', '.join(KINDS)}")
    kind, fields = next(iter(raw.items()))
    where = f"{source}: stage {index} ({kind})"
    if kind not in KINDS:
        raise ConfigError(f"{source}: stage {index} kind = {kind!r} is invalid: expected one of {', '.join(KINDS)}")
    fields = {} if fields is None else fields
    if not isinstance(fields, dict):
        raise ConfigError(f"{where}: fields = {fields!r} is invalid: expected a mapping of field: value")
    fields = dict(fields)
    allowed_methods = methods()[kind]
    method = fields.pop("method", allowed_methods[0]) if kind not in _ONE_METHOD else allowed_methods[0]
    if method not in allowed_methods:
        raise ConfigError(f"{where}: method = {method!r} is invalid: expected one of {', '.join(allowed_methods)}")
    registry = _registry()
    config_cls = registry[method]
    train_cls = registry["train"]
    config_fields = {f.name for f in dataclasses.fields(config_cls)}
    train_fields = {f.name for f in dataclasses.fields(train_cls)} - config_fields
    own = _STAGE_KEYS[kind]
    unknown = sorted(set(fields) - config_fields - train_fields - set(own))
    if unknown:
        allowed = sorted(config_fields) + sorted(own) + sorted(train_fields)
        if kind not in _ONE_METHOD:
            allowed.insert(0, "method")
        raise ConfigError(f"{where}: {unknown[0]!r} is not a field of this stage: expected one of {', '.join(allowed)}")
    config_args = {k: v for k, v in fields.items() if k in config_fields}
    train_args = {k: v for k, v in fields.items() if k in train_fields}
    try:
        config = config_cls.from_dict(config_args)
        if train_args:
            train_cls(**train_args)
    except ConfigError as exc:
        raise ConfigError(f"{where}: {exc}") from exc
    except TypeError as exc:  # a value of the wrong type deep inside a validator
        raise ConfigError(f"{where}: {exc}") from exc
    schedule = teacher = student = None
    if "schedule" in fields:
        if "epochs" in train_args:
            raise ConfigError(f"{where}: epochs = {train_args['epochs']!r} is invalid with a schedule: expected the "
                              "schedule's epochs_per_step and finetune_epochs instead")
        schedule = _schedule(fields["schedule"], method, config, train_args, where, registry)
    if kind == "distill":
        teacher = fields.get("teacher", "baseline")
        student = fields.get("student")
        for key, value in (("teacher", teacher), ("student", student)):
            if value is not None and (not isinstance(value, str) or not value.strip()):
                raise ConfigError(f"{where}: {key} = {value!r} is invalid: expected 'baseline', a registered "
                                  "model name or a .slim path")
    if kind == "quantize" and train_args and not config_cls.trains:
        trainers = ", ".join(repr(m) for m in allowed_methods if registry[m].trains)
        raise ConfigError(f"{where}: {sorted(train_args)[0]} = {train_args[sorted(train_args)[0]]!r} is invalid "
                          f"with method = {method!r}: only method {trainers} trains (quantization-aware training)")
    spec = {kind: ({"method": method} if kind not in _ONE_METHOD else {}) | dict(fields)}
    return Stage(index=index, kind=kind, config=config, train=train_args, schedule=schedule, teacher=teacher,
                 student=student, spec=spec)


def _schedule(value: Any, method: str, config: Config, train_args: dict, where: str, registry) -> Config:
    if config.structural:
        raise ConfigError(f"{where}: schedule = {value!r} is invalid with method = {method!r}: structural pruning "
                          "runs once; give epochs for its fine-tuning instead")
    if not isinstance(value, dict):
        raise ConfigError(f"{where}: schedule = {value!r} is invalid: expected a mapping of PruneSchedule fields")
    try:
        schedule = registry["prune-schedule"].from_dict(value)
        from torchslim.prune.schedule import schedule_targets

        schedule_targets(config, schedule)  # e.g. gradual needs amount=...; checked now, not mid-run
    except ConfigError as exc:
        raise ConfigError(f"{where}: schedule: {exc}") from exc
    return schedule


def _check_order(stages: tuple[Stage, ...], source: str) -> None:
    """Stages that train or prune need float Linear/Conv layers: they must come before quantization."""
    quantized_at: Stage | None = None
    onnx_at: Stage | None = None
    for stage in stages:
        if stage.kind == "deploy":
            continue
        if stage.kind == "export":
            if onnx_at is not None and stage.config.quant != "none":
                raise ConfigError(f"{source}: stage {stage.index} (export): quant = {stage.config.quant!r} is invalid "
                                  f"after stage {onnx_at.index} ({onnx_at.describe()}): the model is already an int8 "
                                  "graph; expected quant = 'none'")
            continue
        if onnx_at is not None:
            raise ConfigError(f"{source}: stage {stage.index} ({stage.kind}) comes after stage {onnx_at.index} "
                              f"(int8 through ONNX Runtime): only export stages may follow it")
        if quantized_at is not None and (stage.kind != "quantize" or not stage.config.produces_graph):
            raise ConfigError(f"{source}: stage {stage.index} ({stage.kind}) comes after stage {quantized_at.index} "
                              f"({quantized_at.describe()}): expected pruning, distillation and fine-tuning before "
                              "weight quantization (quantized layers have no float weights to train)")
        if stage.kind == "quantize":
            if stage.config.produces_graph:
                onnx_at = stage
            else:
                quantized_at = stage


def _registry() -> dict[str, type[Config]]:
    from torchslim.config import registered_configs

    return registered_configs()


def methods() -> dict[str, tuple[str, ...]]:
    """Stage kind -> the ``method`` names a recipe may give (registered configs with that ``stage``; default first).

    A config registered with ``register_config`` whose class sets ``stage = "quantize"`` (and a handler for
    ``quantize_``) is a recipe method without any change here.
    """
    from torchslim.config import stage_methods

    _load_config_modules()
    return {kind: stage_methods(kind) for kind in KINDS}


def _load_config_modules() -> None:
    """Import the modules that register the stage configs."""
    import torchslim.distill.api  # noqa: F401  (registers "kd")
    import torchslim.prune  # noqa: F401
    import torchslim.quantize  # noqa: F401
    import torchslim.train  # noqa: F401
