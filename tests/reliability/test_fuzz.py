"""Fuzzing: hostile or random input reaches users only as the documented error types.

* ``ts.load`` / ``read_manifest`` / ``tensor_table`` on random bytes, random headers, single-byte changes of a
  good file and random manifest edits raise ``ArtifactError`` (or load the identical model), nothing else;
* ``Config.from_dict`` on random dicts raises ``ConfigError`` or returns a valid config;
* quantized layers of random shapes, bit widths and granularities survive save/load bit for bit and are
  stored at their bit width; random prune masks survive finalize/save/load as exact zeros.
"""

from __future__ import annotations

import copy
import json
import math
from pathlib import Path

import pytest
import safetensors.torch
import torch
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from torch import nn

import torchslim as ts
from torchslim.artifact import tensor_table
from torchslim.config import Config, registered_configs
from torchslim.errors import ArtifactError, ConfigError, ModelError
from torchslim.testing import tiny_mlp

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
READERS = (ts.load, ts.read_manifest, tensor_table)


@pytest.fixture(scope="module")
def good(tmp_path_factory) -> tuple[bytes, nn.Module]:
    """A small file with dense, sparse and quantized tensors and a codec-rebuilt module."""
    torch.manual_seed(0)
    model = tiny_mlp()
    ts.prune_(model, ts.MagnitudePruning(amount=0.9, scope="layer"), filter_fn=lambda m, name: name == "1")
    ts.finalize_(model)
    ts.quantize_(model, ts.IntQuant(bits=3, granularity="group", group_size=8), overrides={"1": None})
    path = tmp_path_factory.mktemp("fuzz") / "good.slim"
    ts.save(model, path, extra={"note": "fuzz"})
    return path.read_bytes(), ts.load(path)


def _bits(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous().view({1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()])


def _identical(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sorted(sa) == sorted(sb) and all(
        sa[k].dtype == sb[k].dtype and sa[k].shape == sb[k].shape and torch.equal(_bits(sa[k]), _bits(sb[k]))
        for k in sa
    )


def _only_artifact_errors(path: Path, reference: nn.Module | None = None) -> None:
    """Every reader raises ArtifactError, or (``reference`` given) load returns an identical model."""
    for reader in READERS:
        try:
            result = reader(path)
        except ArtifactError:
            continue
        if reader is ts.load:
            assert reference is not None and _identical(reference, result), "a changed file loaded a different model"


@FUZZ
@given(data=st.binary(max_size=4096))
def test_random_bytes_raise_only_artifact_error(tmp_path, data):
    path = tmp_path / "random.slim"
    path.write_bytes(data)
    for reader in READERS:
        with pytest.raises(ArtifactError):
            reader(path)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**70), 2**70) | st.floats(allow_nan=False) | st.text(max_size=12),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=12,
)


@FUZZ
@given(header=st.dictionaries(st.text(max_size=20), json_values, max_size=5), tail=st.binary(max_size=64))
def test_random_safetensors_headers_raise_only_artifact_error(tmp_path, header, tail):
    text = json.dumps(header).encode()
    path = tmp_path / "header.slim"
    path.write_bytes(len(text).to_bytes(8, "little") + text + tail)
    for reader in READERS:
        with pytest.raises(ArtifactError):
            reader(path)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(offset=st.integers(0, 10**9), xor=st.integers(1, 255))
def test_any_changed_byte_is_caught_or_harmless(tmp_path, good, offset, xor):
    data, reference = good
    offset %= len(data)
    changed = bytearray(data)
    changed[offset] ^= xor
    path = tmp_path / "changed.slim"
    path.write_bytes(bytes(changed))
    _only_artifact_errors(path, reference)


def _paths(value, prefix=()):
    """Every (key path) into a JSON value."""
    yield prefix
    if isinstance(value, dict):
        for key, item in value.items():
            yield from _paths(item, (*prefix, key))
    elif isinstance(value, list):
        for index, item in enumerate(value):
            yield from _paths(item, (*prefix, index))


@FUZZ
@given(choice=st.integers(0, 10**6), replacement=json_values)
def test_random_manifest_edits_raise_only_artifact_error(tmp_path, good, choice, replacement):
    data, reference = good
    path = tmp_path / "edited.slim"
    path.write_bytes(data)
    manifest = ts.read_manifest(path)
    paths = [p for p in _paths(manifest) if p]
    where = paths[choice % len(paths)]
    target = manifest
    for key in where[:-1]:
        target = target[key]
    assume(target[where[-1]] != replacement)
    target[where[-1]] = replacement
    stored = safetensors.torch.load(data)
    # written without the manifest checksum (as an older torchslim would), so the content checks are reached
    path.write_bytes(safetensors.torch.save(stored, metadata={"torchslim": json.dumps(manifest)}))
    _only_artifact_errors(path, reference)


@FUZZ
@given(
    name=st.sampled_from(sorted(n for n, c in registered_configs().items() if c.__module__.startswith("torchslim."))),
    fields=st.dictionaries(st.text(max_size=16), json_values, max_size=4),
    known=st.dictionaries(
        st.sampled_from(
            [
                "bits",
                "amount",
                "n",
                "m",
                "epochs",
                "lr",
                "temperature",
                "alpha",
                "group_size",
                "granularity",
                "threshold",
                "scope",
            ]
        ),
        json_values,
        max_size=3,
    ),
)
def test_config_from_dict_raises_only_config_error(name, fields, known):
    data = {"type": name, **known, **fields}
    try:
        config = Config.from_dict(data)
    except ConfigError:
        return
    assert Config.from_dict(config.to_dict()) == config


@FUZZ
@given(
    out_features=st.integers(1, 12),
    in_features=st.integers(1, 40),
    bits=st.integers(2, 8),
    granularity=st.sampled_from(["tensor", "channel", "group"]),
    group_size=st.integers(2, 16),
    symmetric=st.booleans(),
    rounding=st.sampled_from(["nearest", "floor"]),
    dtype=st.sampled_from([torch.float32, torch.float16, torch.bfloat16]),
    seed=st.integers(0, 2**16),
)
def test_quantized_layers_round_trip_at_their_bit_width(
    tmp_path, out_features, in_features, bits, granularity, group_size, symmetric, rounding, dtype, seed
):
    torch.manual_seed(seed)
    model = ts.create_model("student_mlp", num_classes=out_features, image_size=1, in_channels=in_features, hidden=8)
    model = model.to(dtype)
    config = ts.IntQuant(
        bits=bits, granularity=granularity, group_size=group_size, symmetric=symmetric, rounding=rounding
    )
    ts.quantize_(model, config)
    path = ts.save(model, tmp_path / "q.slim")
    loaded = ts.load(path)
    assert _identical(model, loaded)
    x = torch.randn(3, in_features, 1, 1).to(dtype)
    with torch.no_grad():
        assert torch.equal(model(x), loaded(x))
    rows = {row["name"]: row for row in tensor_table(path)}
    for name, (outs, ins) in {"1": (8, in_features), "3": (out_features, 8)}.items():
        width = group_size if granularity == "group" else ins
        codes = outs * math.ceil(ins / width) * width
        assert rows[f"{name}.packed"]["stored_bytes"] <= math.ceil(codes * bits / 8)


@FUZZ
@given(seed=st.integers(0, 2**16), amount=st.floats(0.0, 0.99), scope=st.sampled_from(["global", "layer", "neuron"]))
def test_random_prune_masks_survive_finalize_save_and_load(tmp_path, seed, amount, scope):
    torch.manual_seed(seed)
    model = tiny_mlp()
    ts.prune_(model, ts.MagnitudePruning(scope=scope, amount=amount))
    masks = {name: m.weight_mask.clone() for name, m in model.named_modules() if hasattr(m, "weight_mask")}
    ts.finalize_(model)
    loaded = ts.load(ts.save(model, tmp_path / "p.slim"))
    assert _identical(model, loaded)
    for name, mask in masks.items():
        weight = loaded.get_submodule(name).weight
        assert bool((weight[mask == 0] == 0).all())
        assert not torch.signbit(weight[mask == 0]).any()  # +0.0, so the sparse encodings apply


def test_nan_weights_in_a_random_layer_are_refused_everywhere(tmp_path):
    torch.manual_seed(3)
    for layer in ("1", "3"):
        model = copy.deepcopy(tiny_mlp())
        with torch.no_grad():
            model.get_submodule(layer).weight[0, 0] = math.nan
        for stage in (
            lambda m: ts.quantize_(m, ts.IntQuant()),
            lambda m: ts.prune_(m, ts.NMSparsity()),
            lambda m: ts.save(m, tmp_path / "nan.slim"),
        ):
            with pytest.raises(ModelError, match=rf"'{layer}\.weight' holds 1 NaN/Inf"):
                stage(model)
    assert not (tmp_path / "nan.slim").exists()
