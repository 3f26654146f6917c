"""Every registered config refuses bad values with a ConfigError naming the field, the value and the range.

Generic over ``torchslim.config.registered_configs()``: every module of the package is imported first, so
a config added anywhere is covered. Per field: a value of no sensible type is refused, and where the error
states a numeric range, values just outside each stated bound are refused too (the message is truthful).
"""

from __future__ import annotations

import dataclasses
import importlib
import math
import pkgutil
import re

import pytest
import torch

import torchslim
from torchslim.cli.main import main
from torchslim.config import Config, registered_configs
from torchslim.errors import ConfigError
from torchslim.testing import tiny_mlp

for _info in pkgutil.walk_packages(torchslim.__path__, "torchslim."):
    if not _info.name.startswith("torchslim.cli"):
        importlib.import_module(_info.name)

# the package's configs (tests may register toys of their own)
CONFIGS = {n: c for n, c in registered_configs().items() if c.__module__.startswith("torchslim.")}

# Configs without all-default construction: a valid example (add one here for a new such config).
VALID = {
    "magnitude": {"amount": 0.5},
    "lowbit_kernel": {"block_m": 32, "block_n": 32, "block_k": 32},
}
# Fields that only make sense together with others: the base used when probing that field.
FIELD_BASE = {
    ("magnitude", "threshold"): {},
    ("magnitude", "amount"): {},
    ("magnitude", "std_multiplier"): {"scope": "neuron"},
}

_RANGE = re.compile(
    r"expected (?P<kind>an integer|a number|a power of two)"
    r"(?: in (?P<lo_b>[\[(])(?P<lo>[-\d.e+]+), (?P<hi>[-\d.e+]+)(?P<hi_b>[\])])"
    r"| (?P<op>>=|>|<=|<) (?P<bound>[-\d.e+]+))"
)


class _Strange:
    """A value of no type any config field expects."""

    def __repr__(self) -> str:
        return "<strange value>"


def _base(name: str, field: str) -> dict:
    return dict(FIELD_BASE.get((name, field), VALID.get(name, {})))


def _numeric_fields(cls: type[Config]) -> list[str]:
    out = []
    for f in dataclasses.fields(cls):
        default = f.default
        if default is dataclasses.MISSING or default is None or isinstance(default, (int, float)):
            if not isinstance(default, bool):
                out.append(f.name)
    return out


def _outside(match: re.Match) -> list[float]:
    """Values just outside each finite bound the message states."""
    integer = match["kind"] != "a number"
    step = (lambda v, d: v + d) if integer else (lambda v, d: math.nextafter(v, math.copysign(math.inf, d)))
    values = []
    if match["op"]:
        bound = float(match["bound"])
        if match["op"] in (">=", ">"):
            values.append(step(bound, -1) if match["op"] == ">=" else bound)
        else:
            values.append(step(bound, 1) if match["op"] == "<=" else bound)
    elif match["lo"]:
        lo, hi = float(match["lo"]), float(match["hi"])
        values.append(step(lo, -1) if match["lo_b"] == "[" else lo)
        values.append(step(hi, 1) if match["hi_b"] == "]" else hi)
    return [int(v) if integer and float(v).is_integer() else v for v in values]


def _range_cases(name: str) -> list[tuple[str, object]]:
    """(field, out-of-range value) pairs derived from what the validation says the range is."""
    cls = CONFIGS[name]
    cases = []
    for field in _numeric_fields(cls):
        for probe in (math.nan, -(10**12), 10**12, 0.5):
            try:
                cls(**{**_base(name, field), field: probe})
            except ConfigError as exc:
                match = _RANGE.search(str(exc)) if f".{field} = " in str(exc) else None
                if match:
                    cases += [(field, value) for value in _outside(match)]
                    break
    return cases


def test_every_module_registers_its_configs():
    assert {"int", "codebook", "half", "magnitude", "nm", "channel", "train"} <= set(CONFIGS)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_constructs_with_defaults_or_a_listed_example(name):
    cls = CONFIGS[name]
    config = cls(**VALID.get(name, {}))
    assert cls.from_dict(config.to_dict()) == config


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_every_field_refuses_a_value_of_the_wrong_type(name):
    cls = CONFIGS[name]
    for f in dataclasses.fields(cls):
        with pytest.raises(ConfigError) as info:
            cls(**{**_base(name, f.name), f.name: _Strange()})
        message = str(info.value)
        assert f.name in message and "<strange value>" in message, (f.name, message)
        assert f"{cls.__name__}." in message, message


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_values_just_outside_the_stated_range_are_refused(name):
    cls = CONFIGS[name]
    cases = _range_cases(name)
    for field, value in cases:
        with pytest.raises(ConfigError) as info:
            cls(**{**_base(name, field), field: value})
        message = str(info.value)
        assert f"{cls.__name__}.{field} = {value!r} is invalid: expected " in message, message


def test_range_derivation_finds_the_ranges_we_know():
    assert {("bits", 1), ("bits", 9)} <= set(_range_cases("int"))
    assert ("amount", 1.0) in _range_cases("channel")
    assert len(_range_cases("train")) >= 8


# --- the cases named in the reliability issue ---------------------------------------------------------
def _config(name: str, **kwargs) -> Config:
    return CONFIGS[name](**{**VALID.get(name, {}), **kwargs})


ISSUE_CASES = [
    ("int", {"bits": 1}, "IntQuant.bits = 1", "[2, 8]"),
    ("int", {"bits": 9}, "IntQuant.bits = 9", "[2, 8]"),
    ("codebook", {"bits": 9}, "CodebookQuant.bits = 9", "8"),
    ("gptq", {"bits": 1}, "bits = 1", "2"),
    ("magnitude", {"amount": 1.0}, "MagnitudePruning.amount = 1.0", "[0, 1)"),
    ("magnitude", {"amount": -0.1}, "MagnitudePruning.amount = -0.1", "[0, 1)"),
    ("channel", {"amount": 1.0}, "ChannelPruning.amount = 1.0", "1)"),
    ("magnitude", {"amount": None, "threshold": -0.1}, "MagnitudePruning.threshold = -0.1", ">= 0"),
    ("nm", {"n": 4, "m": 4}, "NMSparsity.n = 4", "3"),
    ("nm", {"n": 5, "m": 4}, "NMSparsity.n = 5", "3"),
    ("kd", {"temperature": 0.0}, "KD.temperature = 0.0", "> 0"),
    ("kd", {"temperature": -1.0}, "KD.temperature = -1.0", "> 0"),
    ("kd", {"alpha": 1.5}, "KD.alpha = 1.5", "[0, 1]"),
    ("kd", {"alpha": -0.1}, "KD.alpha = -0.1", "[0, 1]"),
    ("train", {"lr": 0.0}, "TrainConfig.lr = 0.0", "> 0"),
    ("train", {"epochs": 0}, "TrainConfig.epochs = 0", ">= 1"),
]


@pytest.mark.parametrize(("name", "kwargs", "names", "allowed"), ISSUE_CASES)
def test_issue_cases_name_field_value_and_range(name, kwargs, names, allowed):
    if name not in CONFIGS:
        pytest.fail(f"config {name!r} is not registered")
    with pytest.raises(ConfigError) as info:
        _config(name, **kwargs)
    message = str(info.value)
    stated = re.sub(r"(\d)\.0\b", r"\1", message.split("expected", 1)[-1])  # [0.0, 1.0) reads as [0, 1)
    assert names in message and "expected" in message and allowed in stated, message


def test_group_size_that_does_not_divide_needs_pad():
    model = tiny_mlp(features=20)  # layer 1 has 20 inputs, layer 3 has 32
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with pytest.raises(
        ConfigError,
        match=r"IntQuant.group_size = 8 is invalid for layer '1' with input dimension "
        r"20: expected a divisor of 20, or pad=True",
    ):
        torchslim.quantize_(model, torchslim.IntQuant(granularity="group", group_size=8, pad=False))
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # untouched
    torchslim.quantize_(model, torchslim.IntQuant(granularity="group", group_size=8, pad=True))


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["quantize", "{model}", "--bits", "9"], "IntQuant.bits = 9 is invalid: expected an integer in [2, 8]"),
        (["prune", "{model}", "--amount", "1.5"], "amount = 1.5 is invalid"),
        (["train", "--lr", "-1", "--epochs", "1"], "TrainConfig.lr = -1.0 is invalid"),
    ],
)
def test_cli_turns_config_errors_into_one_line_exit_2(tmp_path, capsys, args, expected):
    model = torchslim.save(tiny_mlp(), tmp_path / "in.slim")
    out = tmp_path / "out.slim"
    argv = [a.replace("{model}", str(model)) for a in args] + ["--out", str(out)]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and expected in err and len(err.strip().splitlines()) == 1, err
    assert not out.exists()


def test_from_dict_without_a_required_field_is_a_config_error():
    with pytest.raises(ConfigError, match=r"KernelConfig.block_n is required: expected a value for each of block_n, "):
        Config.from_dict({"type": "lowbit_kernel", "block_m": 32})
