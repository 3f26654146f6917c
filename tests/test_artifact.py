"""The .slim artifact: lossless round trips, sparse encodings, changed shapes, codecs, safety, atomicity."""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.torch
import torch
import torch.nn.functional as F
import torch.nn.utils.prune as prune
from hypothesis import given, settings
from hypothesis import strategies as st
from torch import nn

import torchslim.artifact as artifact
from torchslim.artifact import FORMAT_VERSION, load, read_manifest, register_module_codec, save, tensor_table
from torchslim.artifact.encodings import ENCODINGS, decode_tensor, encode_tensor, tensor_info
from torchslim.artifact.io import read_header
from torchslim.errors import ArtifactError
from torchslim.fileio import _host_tag
from torchslim.models import create_model, factory_of, list_models

# --- helpers ------------------------------------------------------------------------------------


def _model(name: str, seed: int = 0, **kwargs) -> nn.Module:
    torch.manual_seed(seed)
    model = create_model(name, **kwargs)
    for module in model.modules():  # non-trivial BatchNorm statistics, so buffers matter
        if isinstance(module, nn.BatchNorm2d):
            module.running_mean.normal_()
            module.running_var.uniform_(0.5, 2.0)
            module.num_batches_tracked.fill_(7)
            module.weight.data.normal_()
            module.bias.data.normal_()
    return model.eval()


def _inputs(seed: int = 1) -> torch.Tensor:
    return torch.randn(3, 1, 28, 28, generator=torch.Generator().manual_seed(seed))


def _outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return model(x)


def _assert_same_state(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert list(sa) == list(sb)
    for key in sa:
        assert sa[key].dtype == sb[key].dtype, key
        assert torch.equal(_bits(sa[key]), _bits(sb[key])), key


def _bits(t: torch.Tensor) -> torch.Tensor:
    """The raw bit pattern (so -0.0 != +0.0 and NaN payloads compare exactly)."""
    view = {1: torch.uint8, 2: torch.int16, 4: torch.int32, 8: torch.int64}[t.element_size()]
    return t.contiguous().view(view)


def _rewrite(path: Path, *, manifest=None, tensors=None, metadata: dict | None | str = "keep") -> None:
    """Edit a .slim file's manifest and/or stored arrays, keeping it a valid safetensors file."""
    stored = safetensors.torch.load(path.read_bytes())
    with safetensors.safe_open(str(path), framework="pt") as handle:
        meta = handle.metadata()
    data = json.loads(meta["torchslim"])
    data.pop("manifest_sha256", None)  # an edited manifest is written like a file from before checksums
    if manifest is not None:
        manifest(data)
    if tensors is not None:
        tensors(stored)
    new_meta = {"torchslim": json.dumps(data)} if metadata == "keep" else metadata
    path.write_bytes(safetensors.torch.save(stored, metadata=new_meta))


# --- round trips --------------------------------------------------------------------------------


@pytest.mark.parametrize("name", sorted(set(list_models()) - {"onnx_graph"}))  # onnx_graph: tests/quantize/test_int8.py
def test_every_registered_model_round_trips_bit_exactly(tmp_path, name):
    model = _model(name)
    x = _inputs()
    expected = _outputs(model, x)
    recipe = [{"stage": "train", "epochs": 2}]
    path = tmp_path / f"{name}.slim"
    assert save(model, path, recipe=recipe, measurements={"accuracy": 0.97}, extra={"n": 1}) == path

    loaded = load(path)

    assert not loaded.training
    assert torch.equal(_outputs(loaded, x), expected)
    _assert_same_state(model, loaded)
    manifest = read_manifest(path)
    assert manifest["format"] == "torchslim.slim" and manifest["format_version"] == 1  # 1 unless tensors are shared
    assert FORMAT_VERSION == 2
    assert manifest["torchslim_version"] == "0.1.0"
    assert manifest["factory"] == {"name": f"torchslim.models:{name}", "kwargs": {}}
    assert manifest["modules"] == {}
    assert manifest["recipe"] == recipe and manifest["measurements"] == {"accuracy": 0.97}
    assert manifest["extra"] == {"n": 1}
    assert set(manifest["tensors"]) == set(model.state_dict())
    assert factory_of(loaded) == factory_of(model)  # can be saved again


def test_integer_buffers_keep_their_dtype_and_values(tmp_path):
    model = _model("resnet", widths=[8, 16], blocks=[1, 1])
    loaded = load(save(model, tmp_path / "r.slim"))
    counter = loaded.stem[1].num_batches_tracked
    assert counter.dtype == torch.int64 and int(counter) == 7
    assert read_manifest(tmp_path / "r.slim")["tensors"]["stem.1.num_batches_tracked"]["dtype"] == "int64"


def test_half_precision_model_keeps_its_dtype(tmp_path):
    model = _model("lenet300").half()
    loaded = load(save(model, tmp_path / "h.slim"))
    assert loaded[1].weight.dtype == torch.float16
    _assert_same_state(model, loaded)


def test_save_and_load_leave_the_global_rng_alone(tmp_path):
    model = _model("lenet5")
    state = torch.get_rng_state()
    load(save(model, tmp_path / "m.slim"))
    assert torch.equal(torch.get_rng_state(), state)


def test_tied_weights_are_saved(tmp_path):
    torch.manual_seed(0)
    model = create_model("student_mlp", in_channels=4, image_size=1, hidden=4, num_classes=4)
    model[3].weight = model[1].weight  # tie: both 4x4 (safetensors refuses shared memory by itself)
    loaded = load(save(model, tmp_path / "t.slim"))
    _assert_same_state(model, loaded)
    x = torch.randn(2, 4, 1, 1)
    assert torch.equal(_outputs(loaded, x), _outputs(model.eval(), x))


def test_load_in_a_fresh_process_reproduces_outputs(tmp_path):
    names = {"lenet5": {}, "resnet": {"widths": [8, 16], "blocks": [1, 1]}}
    x = _inputs()
    expected = {}
    for name, kwargs in names.items():
        model = _model(name, **kwargs)
        save(model, tmp_path / f"{name}.slim")
        expected[name] = _outputs(model, x)
    safetensors.torch.save_file({"x": x}, str(tmp_path / "inputs.safetensors"))
    script = textwrap.dedent(
        """
        import sys, torch, safetensors.torch
        from torchslim.artifact import load
        folder = sys.argv[1]
        x = safetensors.torch.load_file(folder + "/inputs.safetensors")["x"]
        out = {}
        for name in sys.argv[2:]:
            with torch.no_grad():
                out[name] = load(folder + "/" + name + ".slim")(x)
        safetensors.torch.save_file(out, folder + "/outputs.safetensors")
        """
    )
    result = subprocess.run(
        [sys.executable, "-c", script, str(tmp_path), *names], capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    got = safetensors.torch.load_file(str(tmp_path / "outputs.safetensors"))
    for name in names:
        assert torch.equal(got[name], expected[name]), name


# --- no pickle ----------------------------------------------------------------------------------


def test_file_is_plain_safetensors_without_pickle(tmp_path):
    path = save(_model("lenet5"), tmp_path / "m.slim")
    data = path.read_bytes()
    header_len = int.from_bytes(data[:8], "little")
    header = data[8 : 8 + header_len]
    assert header.startswith(b"{") and json.loads(header)["__metadata__"]["torchslim"]
    assert b"\x80\x04" not in header and b"\x80\x02" not in header
    # the reader never unpickles or evaluates: no torch.load / pickle / eval / exec in the package
    source = "".join(p.read_text() for p in Path(artifact.__file__).parent.glob("*.py"))
    forbidden = r"(?<![.\w])torch\.load\(|\bimport pickle\b|\bpickle\.\w|(?<![.\w])eval\(|(?<![.\w])exec\("
    assert re.findall(forbidden, source) == []
    assert re.findall(forbidden, "x = torch.load(f)\nimport pickle\neval(s)") != []  # the check can fail


@pytest.mark.parametrize("zipfile", [True, False])
def test_pickle_checkpoint_renamed_to_slim_is_refused(tmp_path, zipfile):
    path = tmp_path / "evil.slim"
    torch.save(_model("lenet300").state_dict(), path, _use_new_zipfile_serialization=zipfile)
    with pytest.raises(ArtifactError, match="pickle") as info:
        load(path)
    assert "evil.slim" in str(info.value) and "truncated or corrupted" in str(info.value)


# --- sparse encodings ---------------------------------------------------------------------------


def _prune(model: nn.Module, sparsity: float) -> nn.Module:
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, nn.Linear):
                w = module.weight
                k = int(round(sparsity * w.numel()))
                threshold = w.abs().flatten().kthvalue(k).values
                w.copy_(torch.where(w.abs() > threshold, w, torch.zeros_like(w)))
    return model


def test_sparse_model_file_shrinks_and_decodes_bit_exactly(tmp_path):
    dense = _model("lenet300")
    sparse = _prune(_model("lenet300"), 0.9)
    with torch.no_grad():  # kept -0.0 must stay -0.0; a subnormal and an inf must survive too
        kept = sparse[1].weight.flatten().nonzero()[:3, 0]
        sparse[1].weight.view(-1)[kept] = torch.tensor([-0.0, 1e-45, float("inf")])
    dense_path = save(dense, tmp_path / "dense.slim")
    sparse_path = save(sparse, tmp_path / "sparse.slim", allow_nonfinite=True)  # the inf is on purpose

    assert sparse_path.stat().st_size < 0.25 * dense_path.stat().st_size
    loaded = load(sparse_path)
    _assert_same_state(sparse, loaded)
    assert torch.signbit(loaded[1].weight.view(-1)[kept[0]]) and loaded[1].weight.view(-1)[kept[0]] == 0

    rows = {row["name"]: row for row in tensor_table(sparse_path)}
    header_len = int.from_bytes(sparse_path.read_bytes()[:8], "little")
    assert sum(r["stored_bytes"] for r in rows.values()) == sparse_path.stat().st_size - 8 - header_len
    for name in ("1.weight", "3.weight", "5.weight"):
        row = rows[name]
        tensor = sparse.state_dict()[name]
        present = int((_bits(tensor) != 0).sum())
        assert row["encoding"] == "bitmask"
        assert row["numel"] == tensor.numel() and row["nonzero"] == int(torch.count_nonzero(tensor))
        assert row["stored_bytes"] == row["bytes"] == 4 * present + math.ceil(tensor.numel() / 8)
    assert rows["1.bias"]["encoding"] == "dense" and rows["1.bias"]["stored_bytes"] == 4 * 300
    stored = read_manifest(sparse_path)["tensors"]["1.weight"]["stored"]
    assert stored == ["1.weight.values", "1.weight.mask"]


def test_very_sparse_tensor_uses_coo(tmp_path):
    model = _prune(_model("lenet300"), 0.99)
    path = save(model, tmp_path / "coo.slim")
    row = next(r for r in tensor_table(path) if r["name"] == "1.weight")
    nnz = int(torch.count_nonzero(model[1].weight))
    assert row["encoding"] == "coo" and row["stored_bytes"] == nnz * (4 + 4)  # float32 values + int32 indices
    _assert_same_state(model, load(path))


def test_packed_low_bit_codes_of_a_pruned_layer_are_stored_deflated(tmp_path):
    """2-bit codes pack four weights a byte: 85% zero weights leave only ~52% zero bytes for the bitmask."""
    import zlib

    from torchslim.quantize import IntQuant, quantize_

    model = _prune(_model("lenet300"), 0.85)
    quantize_(model, IntQuant(bits=2, granularity="channel"))
    path = save(model, tmp_path / "q2.slim")
    row = next(r for r in tensor_table(path) if r["name"] == "1.packed")
    packed = model.state_dict()["1.packed"]
    zero_bytes = int((packed == 0).sum())
    bitmask_bytes = packed.numel() - zero_bytes + math.ceil(packed.numel() / 8)
    assert row["encoding"] == "deflate"
    assert row["stored_bytes"] == len(zlib.compress(packed.numpy().tobytes(), 9)) < 0.8 * bitmask_bytes
    loaded = load(path)
    _assert_same_state(model, loaded)
    x = _inputs()
    assert torch.equal(_outputs(model, x), _outputs(loaded, x))


def test_deflate_data_that_is_corrupt_or_inflates_too_far_is_refused_without_expanding_it():
    import zlib

    def decode(data: bytes, shape=(100,), dtype=torch.uint8):
        parts = {"data": torch.frombuffer(bytearray(data), dtype=torch.uint8)}
        return decode_tensor("deflate", parts, dtype, shape, "m.slim: tensor 'w'")

    good = zlib.compress(bytes(range(100)))
    assert decode(good).tolist() == list(range(100))
    with pytest.raises(ArtifactError, match=r"m.slim: tensor 'w': deflate data does not decompress"):
        decode(b"not zlib at all")
    import tracemalloc

    bomb = zlib.compress(bytes(50_000_000))  # 50 MB of zeros in ~50 KB
    tracemalloc.start()
    try:
        with pytest.raises(ArtifactError, match=r"deflate data inflates past the 100 bytes expected \(corrupt"):
            decode(bomb)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 5_000_000  # the 50 MB were never inflated
    with pytest.raises(ArtifactError, match=r"deflate data holds 99 bytes, expected 100"):
        decode(zlib.compress(bytes(99)))
    with pytest.raises(ArtifactError, match=r"deflate stores 1-byte dtypes only, not float32"):
        decode(good, shape=(25,), dtype=torch.float32)
    with pytest.raises(ArtifactError, match=r"deflate data stream is truncated"):
        decode(good[:-5])
    with pytest.raises(ArtifactError, match=r"deflate data has bytes after its end"):
        decode(good + b"\x00")


def test_all_zero_and_empty_tensors_round_trip(tmp_path):
    model = _model("lenet300")
    with torch.no_grad():
        model[3].weight.zero_()
        model[3].bias.zero_()
    path = save(model, tmp_path / "z.slim")
    rows = {r["name"]: r for r in tensor_table(path)}
    assert rows["3.weight"]["nonzero"] == 0 and rows["3.weight"]["stored_bytes"] < 300 * 100 // 8 + 1
    _assert_same_state(model, load(path))


_SPECIALS = [0.0, -0.0, 1.0, -2.5, float("inf"), float("-inf"), float("nan"), 1e-40]


@settings(max_examples=60, deadline=None)
@given(
    dtype=st.sampled_from(
        [torch.float32, torch.float16, torch.bfloat16, torch.float64]
        + [torch.int8, torch.uint8, torch.int64, torch.bool]
    ),
    shape=st.lists(st.integers(0, 9), min_size=0, max_size=3),
    density=st.floats(0.0, 1.0),
    seed=st.integers(0, 2**16),
)
def test_every_encoding_decodes_bit_exactly(dtype, shape, density, seed):
    generator = torch.Generator().manual_seed(seed)
    numel = math.prod(shape)
    if dtype.is_floating_point:
        pool = torch.tensor(_SPECIALS + [3.25, -7.0], dtype=torch.float64)
        values = pool[torch.randint(len(pool), (numel,), generator=generator)].to(dtype)
    elif dtype == torch.bool:
        values = torch.ones(numel, dtype=torch.bool)
    else:
        values = torch.randint(1, 100, (numel,), generator=generator).to(dtype)
    keep = torch.rand(numel, generator=generator) < density
    tensor = torch.where(keep, values, torch.zeros_like(values)).reshape(shape)
    info = tensor_info(tensor)
    for encoding in ENCODINGS.values():
        if encoding.cost(info) is None:
            continue
        parts = encode_tensor(encoding, info)
        stored_bytes = sum(p.numel() * p.element_size() for p in parts.values())
        assert stored_bytes == encoding.cost(info)
        decoded = decode_tensor(encoding.name, parts, dtype, tuple(shape), "t")
        assert decoded.dtype == dtype and tuple(decoded.shape) == tuple(shape)
        if numel:
            assert torch.equal(_bits(decoded), _bits(tensor)), encoding.name


# --- changed modules ----------------------------------------------------------------------------


def test_structurally_pruned_linear_layers_round_trip(tmp_path):
    model = _model("lenet300")
    torch.manual_seed(3)
    model[1] = nn.Linear(784, 120)
    model[3] = nn.Linear(120, 100)
    x = _inputs()
    path = save(model, tmp_path / "pruned.slim")
    modules = read_manifest(path)["modules"]
    assert modules == {
        "1": {"codec": "nn.Linear", "spec": {"in_features": 784, "out_features": 120, "bias": True}},
        "3": {"codec": "nn.Linear", "spec": {"in_features": 120, "out_features": 100, "bias": True}},
    }
    loaded = load(path)
    assert loaded[1].out_features == 120
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))
    assert path.stat().st_size < 0.6 * save(_model("lenet300"), tmp_path / "full.slim").stat().st_size


def test_shrunk_resnet_block_conv_and_batchnorm_round_trip(tmp_path):
    model = _model("resnet", widths=[8, 16], blocks=[1, 1])
    block = model.stages[0][0]
    torch.manual_seed(5)
    block.conv1 = nn.Conv2d(8, 4, 3, padding=1, bias=False)
    block.bn1 = nn.BatchNorm2d(4)
    block.conv2 = nn.Conv2d(4, 8, 3, padding=1, bias=False)
    block.bn1.running_mean.normal_()
    block.bn1.running_var.uniform_(0.5, 2)
    model.eval()
    x = _inputs()
    path = save(model, tmp_path / "r.slim")
    modules = read_manifest(path)["modules"]
    assert sorted(modules) == ["stages.0.0.bn1", "stages.0.0.conv1", "stages.0.0.conv2"]
    assert modules["stages.0.0.conv1"]["spec"]["out_channels"] == 4
    assert modules["stages.0.0.bn1"] == {
        "codec": "nn.BatchNorm2d",
        "spec": {"num_features": 4, "eps": 1e-5, "momentum": 0.1, "affine": True,
                 "track_running_stats": True},
    }
    loaded = load(path)
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))
    _assert_same_state(model, loaded)


def test_layer_replaced_by_identity_round_trips(tmp_path):
    model = _model("student_cnn")
    model[2] = nn.Identity()  # e.g. a pooling layer removed
    model[7] = nn.Linear(16 * 14 * 14, 10)
    x = _inputs()
    loaded = load(save(model, tmp_path / "i.slim"))
    assert isinstance(loaded[2], nn.Identity)
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))


def test_changed_multihead_attention_round_trips_through_its_codec(tmp_path):
    factory = {"name": "torch.nn:MultiheadAttention", "kwargs": {"embed_dim": 16, "num_heads": 4}}
    torch.manual_seed(0)
    unchanged = nn.MultiheadAttention(16, 4)
    assert read_manifest(save(unchanged, tmp_path / "same.slim", factory=factory))["modules"] == {}
    # every constructor argument differs from the factory's module (e.g. widths left by embed_dim pruning)
    model = nn.MultiheadAttention(
        8, 2, dropout=0.1, bias=False, add_bias_kv=True, add_zero_attn=True, kdim=6, vdim=10, batch_first=True
    ).eval()
    path = save(model, tmp_path / "mha.slim", factory=factory)
    assert read_manifest(path)["modules"] == {
        "": {
            "codec": "nn.MultiheadAttention",
            "spec": {
                "embed_dim": 8, "num_heads": 2, "dropout": 0.1, "bias": False, "add_bias_kv": True,
                "add_zero_attn": True, "kdim": 6, "vdim": 10, "batch_first": True,
            },
        }
    }
    loaded = load(path, trust_factory=True).eval()
    assert type(loaded) is nn.MultiheadAttention and loaded.head_dim == 4 and loaded.in_proj_weight is None
    _assert_same_state(model, loaded)
    generator = torch.Generator().manual_seed(2)
    query, key, value = (torch.randn(3, 5, width, generator=generator) for width in (8, 6, 10))
    with torch.no_grad():
        expected, expected_weights = model(query, key, value)
        got, got_weights = loaded(query, key, value)
    assert torch.equal(got, expected) and torch.equal(got_weights, expected_weights)


class Int8Linear(nn.Module):
    """A packed layer of the kind quantization adds: uint8 weights plus float scales."""

    def __init__(self, in_features: int, out_features: int) -> None:
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.register_buffer("qweight", torch.zeros(out_features, in_features, dtype=torch.uint8))
        self.register_buffer("scale", torch.ones(out_features))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, (self.qweight.float() - 128) * self.scale[:, None])


register_module_codec(
    Int8Linear,
    "test.Int8Linear",
    lambda m: {"in_features": m.in_features, "out_features": m.out_features},
    lambda spec: Int8Linear(**spec),
)


class Mystery(nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * 2


def test_custom_codec_round_trips_packed_uint8_layer(tmp_path):
    model = _model("lenet300")
    packed = Int8Linear(100, 10)
    packed.qweight.random_(0, 256, generator=torch.Generator().manual_seed(0))
    packed.scale.uniform_(0.001, 0.01)
    model[5] = packed
    x = _inputs()
    path = save(model, tmp_path / "q.slim")
    assert read_manifest(path)["modules"] == {
        "5": {"codec": "test.Int8Linear", "spec": {"in_features": 100, "out_features": 10}}
    }
    assert read_manifest(path)["tensors"]["5.qweight"]["dtype"] == "uint8"
    loaded = load(path)
    assert type(loaded[5]) is Int8Linear and loaded[5].qweight.dtype == torch.uint8
    assert torch.equal(_outputs(loaded, x), _outputs(model, x))


def test_codec_name_taken_by_another_class_is_refused():
    with pytest.raises(ValueError, match="nn.Linear"):
        register_module_codec(Mystery, "nn.Linear", lambda m: {}, lambda s: Mystery())


@pytest.mark.parametrize("replacement", [Mystery(), nn.Tanh()])
def test_unregistered_changed_module_is_refused_on_save(tmp_path, replacement):
    model = _model("lenet300")
    model[2] = replacement
    with pytest.raises(ArtifactError, match="register a codec") as info:
        save(model, tmp_path / "m.slim")
    assert "'2'" in str(info.value) and type(replacement).__name__ in str(info.value)
    assert not (tmp_path / "m.slim").exists()


def test_pruning_reparametrization_is_refused_naming_the_tensor(tmp_path):
    model = _model("lenet300")
    prune.l1_unstructured(model[1], "weight", amount=0.5)
    with pytest.raises(ArtifactError, match="1.weight_orig"):
        save(model, tmp_path / "m.slim")


def test_deleted_module_is_refused_on_save(tmp_path):
    model = _model("lenet300")
    del model[5]
    with pytest.raises(ArtifactError, match="'5'.*missing"):
        save(model, tmp_path / "m.slim")


# --- errors -------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def good_file(tmp_path_factory) -> bytes:
    path = tmp_path_factory.mktemp("good") / "m.slim"
    model = _model("lenet300")
    model[1] = nn.Linear(784, 50)
    model[3] = nn.Linear(50, 100)
    save(_prune(model, 0.9), path)
    return path.read_bytes()


@pytest.fixture
def slim(tmp_path, good_file) -> Path:
    path = tmp_path / "m.slim"
    path.write_bytes(good_file)
    return path


def test_missing_file(tmp_path):
    for reader in (load, read_manifest, tensor_table):
        with pytest.raises(ArtifactError, match="nope.slim: no such file"):
            reader(tmp_path / "nope.slim")


def test_truncated_file_is_reported_at_every_cut(tmp_path, good_file):
    header_end = 8 + int.from_bytes(good_file[:8], "little")
    rng = random.Random(0)
    cuts = {0, 1, 7, 8, 9, 100, header_end - 1, header_end, header_end + 1, len(good_file) - 1}
    cuts |= {rng.randrange(len(good_file)) for _ in range(10)}
    path = tmp_path / "cut.slim"
    for cut in sorted(cuts):
        path.write_bytes(good_file[:cut])
        for reader in (load, tensor_table):
            with pytest.raises(ArtifactError, match="truncated or corrupted"):
                reader(path)


@pytest.mark.parametrize(
    "content",
    [b"", b"hello world, not a model", bytes(random.Random(1).randrange(256) for _ in range(4096)),
     (20).to_bytes(8, "little") + b"not json at all!!!!!"],
)
def test_garbage_is_reported(tmp_path, content):
    path = tmp_path / "junk.slim"
    path.write_bytes(content)
    with pytest.raises(ArtifactError, match="junk.slim.*truncated or corrupted"):
        load(path)


def test_safetensors_file_without_manifest(slim):
    _rewrite(slim, metadata=None)
    with pytest.raises(ArtifactError, match="'torchslim' manifest"):
        load(slim)
    with pytest.raises(ArtifactError, match="'torchslim' manifest"):
        read_manifest(slim)


def test_newer_format_version_asks_to_upgrade(slim):
    _rewrite(slim, manifest=lambda m: m.update(format_version=FORMAT_VERSION + 1, torchslim_version="9.0"))
    for reader in (load, read_manifest):
        with pytest.raises(ArtifactError, match=r"format_version 3 was written by a newer torchslim.*up"):
            reader(slim)


@pytest.mark.parametrize(
    ("edit", "message"),
    [
        (lambda m: m.update(format="other"), "format = 'other'"),
        (lambda m: m.update(format_version="1"), "format_version = '1'"),
        (lambda m: m.pop("factory"), "factory = None"),
        (lambda m: m["tensors"]["1.bias"].update(shape=[-1]), r"tensors\['1.bias'\]"),
        (lambda m: m["tensors"]["1.bias"].update(dtype="load"), "dtype 'load'"),
        (lambda m: m["tensors"]["1.bias"].update(encoding="zstd"), "encoding 'zstd' is unknown"),
        (lambda m: m["modules"]["1"].update(codec="nn.Quantum"), "codec 'nn.Quantum'"),
        (lambda m: m["modules"]["1"].update(codec="torchslim.nope:Layer"), "'torchslim.nope' cannot be"),
        (lambda m: m["modules"]["1"].update(codec="os.path:Layer"), "trust_factory=True to let"),
        (lambda m: m["modules"]["1"]["spec"].update(out_features="x"), "cannot rebuild module '1'"),
    ],
)
def test_malformed_manifest_names_the_field(slim, edit, message):
    _rewrite(slim, manifest=edit)
    with pytest.raises(ArtifactError, match=message):
        load(slim)


def test_manifest_shape_disagreeing_with_stored_tensor(slim):
    _rewrite(slim, manifest=lambda m: m["tensors"]["1.bias"].update(shape=[49]))
    with pytest.raises(ArtifactError, match=r"tensor '1.bias'.*shape \[50\], expected float32 and \[49\]"):
        load(slim)


def test_stored_shape_disagreeing_with_rebuilt_model(slim):
    _rewrite(slim, manifest=lambda m: m["modules"].pop("3"))  # layer 3 would be rebuilt as 300 -> 100
    with pytest.raises(ArtifactError, match=r"tensor '3.weight' has shape \[100, 50\].*\[100, 300\]"):
        load(slim)


def test_stored_array_missing(slim):
    _rewrite(slim, tensors=lambda t: t.pop("1.weight.mask"))
    with pytest.raises(ArtifactError, match="tensor '1.weight'.*'1.weight.mask' is missing"):
        load(slim)
    with pytest.raises(ArtifactError, match="'1.weight.mask' is missing"):
        tensor_table(slim)


def test_unlisted_stored_array(slim):
    _rewrite(slim, tensors=lambda t: t.update(smuggled=torch.zeros(3)))
    with pytest.raises(ArtifactError, match="'smuggled' is not listed"):
        load(slim)


def test_model_tensor_missing_from_manifest(slim):
    def drop(m):
        m["tensors"].pop("5.bias")

    _rewrite(slim, manifest=drop, tensors=lambda t: t.pop("5.bias"))
    with pytest.raises(ArtifactError, match="tensor '5.bias' of the model .* not in the saved tensors"):
        load(slim)


def test_corrupted_sparse_values_count(slim):
    _rewrite(slim, tensors=lambda t: t.update({"1.weight.values": t["1.weight.values"][:-1].clone()}))
    with pytest.raises(ArtifactError, match="tensor '1.weight': stored values"):
        load(slim)


def test_untrusted_factory_is_refused_and_never_run(slim, tmp_path):
    marker = tmp_path / "pwned"
    evil = {"name": "os:system", "kwargs": {"command": f"touch {marker}"}}
    _rewrite(slim, manifest=lambda m: m.update(factory=evil))
    with pytest.raises(ArtifactError, match="'os:system' is outside the allowlist.*trust_factory=True"):
        load(slim)
    assert not marker.exists()


def test_user_factory_needs_trust_factory(tmp_path):
    torch.manual_seed(0)
    model = nn.Linear(4, 3)
    factory = {"name": "torch.nn:Linear", "kwargs": {"in_features": 4, "out_features": 3}}
    path = save(model, tmp_path / "user.slim", factory=factory)
    with pytest.raises(ArtifactError, match="'torch.nn:Linear' is outside the allowlist"):
        load(path)
    loaded = load(path, trust_factory=True)
    x = torch.randn(2, 4)
    assert torch.equal(loaded(x), model(x))
    assert factory_of(loaded) == factory


def test_model_without_factory_is_refused(tmp_path):
    with pytest.raises(ArtifactError, match="no recorded factory.*create_model"):
        save(nn.Linear(2, 2), tmp_path / "m.slim")
    assert not (tmp_path / "m.slim").exists()


def test_factory_that_cannot_rebuild_is_refused_on_save(tmp_path):
    with pytest.raises(ArtifactError, match="cannot rebuild"):
        save(nn.Linear(2, 2), tmp_path / "m.slim", factory={"name": "torch.nn:Linear", "kwargs": {"x": 1}})


def test_manifest_values_must_be_json_safe(tmp_path):
    model = _model("student_mlp")
    with pytest.raises(ArtifactError, match=r"extra.run.when = .*object"):
        save(model, tmp_path / "m.slim", extra={"run": {"when": object()}})
    with pytest.raises(ArtifactError, match=r"measurements\[1\]"):
        save(model, tmp_path / "m.slim", measurements=[1.0, {1, 2}])
    path = save(
        model, tmp_path / "m.slim", measurements={"acc": np.float32(0.5), "latency": {1: 2.0}, "dims": (1, 2)}
    )
    assert read_manifest(path)["measurements"] == {"acc": 0.5, "latency": {"1": 2.0}, "dims": [1, 2]}


# --- atomic writes ------------------------------------------------------------------------------


def test_failed_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = save(_model("lenet300", seed=1), tmp_path / "m.slim")
    before = path.read_bytes()
    new = _model("lenet300", seed=2)

    def refuse(tensors, filename, metadata=None):  # fails half-way through its file
        with open(filename, "wb") as handle:
            handle.write(b"partial")
        raise RuntimeError("serialiser exploded")

    monkeypatch.setattr(safetensors.torch, "save_file", refuse)
    with pytest.raises(ArtifactError, match="serialiser exploded"):
        save(new, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.slim"]

    def disk_error(fd):  # fails after the temporary file was fully written
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(os, "fsync", disk_error)
    with pytest.raises(ArtifactError, match="No space left"):
        save(new, path)
    monkeypatch.undo()
    assert path.read_bytes() == before
    assert os.listdir(tmp_path) == ["m.slim"]


_KILL_CHILD = textwrap.dedent(
    """
    import sys, torch
    from torchslim.artifact import save
    from torchslim.models import create_model

    def variant(seed):
        torch.manual_seed(seed)
        return create_model("lenet300")

    models = [variant(seed) for seed in range(3)]
    print("ready", flush=True)
    i = 0
    while True:
        save(models[i % 3], sys.argv[1], extra={"seed": i % 3})
        i += 1
    """
)


def test_killed_save_never_leaves_a_partial_file(tmp_path):
    variants = {}
    for seed in range(3):
        torch.manual_seed(seed)
        variants[seed] = create_model("lenet300")
    rng = random.Random(0)
    children = []
    for index in range(6):
        folder = tmp_path / f"run{index}"
        folder.mkdir()
        save(variants[0], folder / "model.slim", extra={"seed": 0})  # the old file
        child = subprocess.Popen(
            [sys.executable, "-c", _KILL_CHILD, str(folder / "model.slim")],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        )
        children.append((folder, child))
    try:
        for folder, child in children:
            assert child.stdout.readline().strip() == "ready", child.stderr.read()
            time.sleep(rng.uniform(0.02, 0.4))
            child.send_signal(signal.SIGKILL)
            child.wait(timeout=30)
            assert child.returncode == -signal.SIGKILL
            path = folder / "model.slim"
            seed = read_manifest(path)["extra"]["seed"]
            _assert_same_state(variants[seed], load(path))
            leftovers = [name for name in os.listdir(folder) if name != "model.slim"]
            # SIGKILL can leave a temporary file behind, never a partial model.slim ...
            assert all(n.startswith(f".model.slim.{_host_tag()}-{child.pid}.") and n.endswith(".tmp")
                       for n in leftovers), leftovers
            # ... and the next save of the same file removes it
            save(variants[1], path)
            assert os.listdir(folder) == ["model.slim"]
    finally:
        for _, child in children:
            if child.poll() is None:
                child.kill()
                child.wait()
            child.stdout.close()
            child.stderr.close()


# --- checksums ----------------------------------------------------------------------------------


def _data_start(data: bytes) -> int:
    return 8 + int.from_bytes(data[:8], "little")


def _flip(data: bytes, offset: int) -> bytes:
    return data[:offset] + bytes([data[offset] ^ 0x01]) + data[offset + 1 :]


def test_every_tensor_records_the_sha256_of_its_stored_bytes(slim, good_file):
    manifest = read_manifest(slim)
    header = read_header(slim)
    start = _data_start(good_file)
    encodings = set()
    for name, entry in manifest["tensors"].items():
        raw = b"".join(
            good_file[start + header[k]["data_offsets"][0] : start + header[k]["data_offsets"][1]]
            for k in entry["stored"]
        )
        assert entry["sha256"] == hashlib.sha256(raw).hexdigest(), name
        encodings.add(entry["encoding"])
    assert encodings == {"dense", "bitmask"}  # several stored arrays per tensor are covered
    text = header["__metadata__"]["torchslim"]  # ends with the checksum of the text before it
    body, _, tail = text.rpartition(', "manifest_sha256": "')
    assert tail == hashlib.sha256((body + "}").encode()).hexdigest() + '"}'
    assert "manifest_sha256" not in manifest  # read_manifest returns the manifest proper


def test_flipped_byte_in_tensor_data_is_caught_naming_the_tensor(slim, good_file):
    header = read_header(slim)
    start = _data_start(good_file)
    for key, info in header.items():
        if key == "__metadata__" or info["data_offsets"][0] == info["data_offsets"][1]:
            continue
        begin, end = info["data_offsets"]
        name = next(n for n, e in read_manifest(slim)["tensors"].items() if key in e["stored"])
        slim.write_bytes(_flip(good_file, start + (begin + end) // 2))
        # a flipped mask bit changes the number of values (caught by decoding); any other flip by the checksum
        detail = "stored" if key.endswith(".mask") else "stored bytes do not match the manifest's sha256 checksum"
        for reader in (load, tensor_table):
            with pytest.raises(ArtifactError, match=rf"tensor {re.escape(repr(name))}: {detail}"):
                reader(slim)


def test_edited_manifest_fails_its_checksum(slim, good_file):
    version = b'\\"torchslim_version\\": \\"'
    at = good_file.index(version) + len(version)
    changed = good_file[:at] + (b"9" if good_file[at : at + 1] != b"9" else b"8") + good_file[at + 1 :]
    slim.write_bytes(changed)
    for reader in (load, read_manifest, tensor_table):
        with pytest.raises(ArtifactError, match="manifest does not match its sha256 checksum"):
            reader(slim)


def test_files_without_checksums_still_load(slim, good_file):
    reference = load(slim)

    def strip(m):
        for entry in m["tensors"].values():
            entry.pop("sha256")

    _rewrite(slim, manifest=strip)  # also drops the manifest checksum: a file from before checksums
    assert "manifest_sha256" not in read_header(slim)["__metadata__"]["torchslim"]
    _assert_same_state(reference, load(slim))
    assert len(tensor_table(slim)) == len(reference.state_dict())


@pytest.mark.parametrize("bad", ["ABC", 7, "0" * 63, "G" * 64])
def test_malformed_tensor_checksum_names_the_field(slim, bad):
    _rewrite(slim, manifest=lambda m: m["tensors"]["1.bias"].update(sha256=bad))
    with pytest.raises(ArtifactError, match=r"tensors\['1.bias'\].*optional 'sha256': 64 lowercase hex"):
        load(slim)


def test_identical_models_give_identical_files(tmp_path):
    model = _model("lenet5")
    files = {save(model, tmp_path / f"m{i}.slim").read_bytes() for i in range(6)}
    assert len(files) == 1  # one metadata entry: safetensors writes several in random order


def test_newer_format_version_asks_to_upgrade_even_with_another_checksum(slim, good_file):
    text = read_header(slim)["__metadata__"]["torchslim"].replace(
        '"format_version": 1', f'"format_version": {FORMAT_VERSION + 1}'
    )
    stored = safetensors.torch.load(good_file)
    slim.write_bytes(safetensors.torch.save(stored, metadata={"torchslim": text}))  # checksum now stale
    with pytest.raises(ArtifactError, match="was written by a newer torchslim"):
        load(slim)
