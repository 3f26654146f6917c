"""Base class for method configs: frozen dataclasses validated on construction.

Each compression method has one config class (``IntQuant``, ``MagnitudePruning``, ``KD`` ...)
registered by name so recipes and ``.slim`` manifests can round-trip it with
``to_dict``/``from_dict``. Validation errors name the field, the value and what is allowed.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Iterable
from typing import Any, ClassVar, TypeVar

from torchslim.errors import ConfigError

_CONFIGS: dict[str, type[Config]] = {}

C = TypeVar("C", bound="type[Config]")


def register_config(name: str):
    """Class decorator: register a config class under ``name`` for ``Config.from_dict``.

    Args:
        name: the ``type`` string used in dicts, recipes and manifests.

    Returns:
        The decorator, which returns the class unchanged apart from ``config_name``.

    Raises:
        ValueError: if ``name`` is already taken by another class.
    """

    def decorate(cls):
        if name in _CONFIGS and _CONFIGS[name] is not cls:
            raise ValueError(f"config name {name!r} is already registered by {_CONFIGS[name].__name__}")
        cls.config_name = name
        _CONFIGS[name] = cls
        return cls

    return decorate


def stage_methods(kind: str) -> tuple[str, ...]:
    """Names of the registered configs that are methods of the recipe stage ``kind``, the default first.

    A config class says it is one by its ``stage`` class attribute (``stage_default`` marks the default); the
    modules that define configs must be imported first (``torchslim.pipeline.recipe`` imports them).
    """
    names = [name for name, cls in _CONFIGS.items() if cls.stage == kind]
    return tuple(sorted(names, key=lambda name: not _CONFIGS[name].stage_default))


def stage_modes(kind: str) -> dict[str, type[Config]]:
    """CLI mode name -> config class for the registered methods of the recipe stage ``kind``, the default first.

    Each class offers the names of its ``cli_modes`` (default: its config name), e.g. ``torchslim quantize --mode``.
    """
    modes: dict[str, type[Config]] = {}
    for name in stage_methods(kind):
        cls = _CONFIGS[name]
        for mode in cls.mode_presets():
            modes.setdefault(mode, cls)
    return modes


def registered_configs() -> dict[str, type[Config]]:
    """Return a copy of the name -> config class registry."""
    return dict(_CONFIGS)


@dataclasses.dataclass(frozen=True)
class Config:
    """Base for all method configs. Subclasses override :meth:`validate`."""

    config_name: ClassVar[str] = "config"
    # What the rest of the library needs to know about a method (class attributes, not fields):
    stage: ClassVar[str | None] = None  # the recipe stage it is a method of ("prune", "quantize", ...)
    stage_default: ClassVar[bool] = False  # the stage's method when a recipe names none
    needs_calibration: ClassVar[bool] = False  # needs calibration inputs (quantize_ refuses it; recipes pass data)
    produces_graph: ClassVar[bool] = False  # replaces the torch model by an ONNX Runtime graph
    trains: ClassVar[bool] = False  # a quantize stage of it may train (quantization-aware training)
    structural: ClassVar[bool] = False  # a prune method that changes layer shapes (runs once, no schedule)
    # CLI ``--mode`` names -> the fields each presets (None: the config name, no preset), e.g. fp16/bf16
    cli_modes: ClassVar[dict[str, dict[str, Any]] | None] = None

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""

    def fail(self, field: str, value: Any, allowed: str) -> ConfigError:
        """Build the standard error for ``field`` (the caller raises it)."""
        return ConfigError(f"{type(self).__name__}.{field} = {value!r} is invalid: expected {allowed}")

    # --- validators -------------------------------------------------------------------------
    def check_int(self, field: str, lo: int | None = None, hi: int | None = None) -> None:
        """Require an int (not bool) in ``[lo, hi]`` (either bound optional)."""
        value = getattr(self, field)
        ok = isinstance(value, int) and not isinstance(value, bool)
        ok = ok and (lo is None or value >= lo) and (hi is None or value <= hi)
        if not ok:
            raise self.fail(field, value, _describe_range("an integer", lo, hi, True, True))

    def check_float(
        self,
        field: str,
        lo: float | None = None,
        hi: float | None = None,
        *,
        lo_inclusive: bool = True,
        hi_inclusive: bool = True,
    ) -> None:
        """Require a finite real number within the given bounds."""
        value = getattr(self, field)
        ok = isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        if ok and lo is not None:
            ok = value >= lo if lo_inclusive else value > lo
        if ok and hi is not None:
            ok = value <= hi if hi_inclusive else value < hi
        if not ok:
            raise self.fail(field, value, _describe_range("a number", lo, hi, lo_inclusive, hi_inclusive))

    def check_choice(self, field: str, choices: Iterable[Any]) -> None:
        """Require the field's value to be one of ``choices``."""
        choices = tuple(choices)
        value = getattr(self, field)
        if value not in choices:
            raise self.fail(field, value, "one of " + ", ".join(repr(c) for c in choices))

    # --- serialisation ----------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """Return a JSON/YAML-safe dict with a ``type`` key; inverse of :meth:`from_dict`."""
        out: dict[str, Any] = {"type": self.config_name}
        for f in dataclasses.fields(self):
            out[f.name] = _to_plain(getattr(self, f.name))
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Config:
        """Build a config from a dict made by :meth:`to_dict` (or written in a recipe).

        Args:
            data: mapping with the field values; ``type`` picks the class when called on
                ``Config`` itself and must match the class otherwise.

        Returns:
            A validated config instance.

        Raises:
            ConfigError: unknown ``type``, unknown field, or an invalid value.
        """
        if not isinstance(data, dict):
            raise ConfigError(f"config must be a mapping, got {type(data).__name__}: {data!r}")
        data = dict(data)
        name = data.pop("type", None)
        target = cls
        if cls is Config:
            if name not in _CONFIGS:
                raise ConfigError(f"config type = {name!r} is invalid: expected one of {', '.join(sorted(_CONFIGS))}")
            target = _CONFIGS[name]
        elif name is not None and name != cls.config_name:
            raise ConfigError(f"config type = {name!r} is invalid: expected {cls.config_name!r}")
        fields = {f.name: f for f in dataclasses.fields(target)}
        unknown = sorted(set(data) - set(fields))
        if unknown:
            raise ConfigError(
                f"{target.__name__}.{unknown[0]} is not a field: expected one of {', '.join(sorted(fields))}"
            )
        missing = [n for n, f in fields.items() if f.init and n not in data and _required(f)]
        if missing:
            raise ConfigError(f"{target.__name__}.{missing[0]} is required: expected a value for each of "
                              f"{', '.join(missing)}")
        kwargs = {}
        for key, value in data.items():
            default = fields[key].default
            # YAML/JSON give lists where the dataclass uses tuples.
            if isinstance(value, list) and isinstance(default, tuple):
                value = tuple(value)
            kwargs[key] = value
        return target(**kwargs)

    @classmethod
    def mode_presets(cls) -> dict[str, dict[str, Any]]:
        """CLI mode name -> the field values that mode sets (``{config_name: {}}`` unless ``cli_modes`` says)."""
        return dict(cls.cli_modes) if cls.cli_modes is not None else {cls.config_name: {}}

    @classmethod
    def from_options(cls, mode: str, options: dict[str, Any]) -> Config:
        """Build the config of CLI mode ``mode`` from the options a user gave (named like this class's fields).

        Args:
            mode: one of :meth:`mode_presets` (its preset fields are applied first).
            options: field name -> value, only for the options given (the rest keep the field defaults).

        Returns:
            The validated config.

        Raises:
            ConfigError: an unknown mode, an option that is not a field (named as the ``--flag``), or a bad value.
        """
        presets = cls.mode_presets()
        if mode not in presets:
            raise ConfigError(f"--mode = {mode!r} is invalid for {cls.__name__}: expected one of {', '.join(presets)}")
        fields = sorted(f.name for f in dataclasses.fields(cls) if f.init and f.name not in presets[mode])
        unused = sorted(set(options) - set(fields))
        if unused:
            flag = "--" + unused[0].replace("_", "-")
            allowed = ", ".join("--" + name.replace("_", "-") for name in fields) or "none"
            raise ConfigError(f"{flag} is invalid with --mode {mode}: expected only options of {cls.__name__} "
                              f"({allowed})")
        return cls(**presets[mode], **options)

    def replace(self, **changes: Any) -> Config:
        """Return a validated copy with some fields changed."""
        return dataclasses.replace(self, **changes)


def _required(field: dataclasses.Field) -> bool:
    return field.default is dataclasses.MISSING and field.default_factory is dataclasses.MISSING


def _describe_range(kind: str, lo, hi, lo_inclusive: bool, hi_inclusive: bool) -> str:
    if lo is None and hi is None:
        return kind
    if hi is None:
        return f"{kind} {'>=' if lo_inclusive else '>'} {lo}"
    if lo is None:
        return f"{kind} {'<=' if hi_inclusive else '<'} {hi}"
    return f"{kind} in {'[' if lo_inclusive else '('}{lo}, {hi}{']' if hi_inclusive else ')'}"


def _to_plain(value: Any) -> Any:
    if isinstance(value, Config):
        return value.to_dict()
    if isinstance(value, (list, tuple)):
        return [_to_plain(v) for v in value]
    if isinstance(value, dict):
        return {str(k): _to_plain(v) for k, v in value.items()}
    return value
