"""The Triton low-bit kernel against a float64 reference of the dequantized matmul.

On CPU the kernel runs in Triton's interpreter (``interpret=True``; it does not depend on
``TRITON_INTERPRET`` being set before triton was imported, and one test checks the env-var route in a
fresh process). The same cases run compiled on CUDA when a GPU is present.
"""

from __future__ import annotations

import os
import subprocess
import sys

import pytest
import torch
from torch import nn

import torchslim as ts
from torchslim.errors import ConfigError
from torchslim.quantize.layers import IntQuantLayer
from torchslim.testing import tiny_mlp

pytest.importorskip("triton")

from torchslim.kernels import lowbit  # noqa: E402 - after the triton skip
from torchslim.kernels.lowbit import KernelConfig, dispatch_reason, lowbit_linear, unsupported_reason  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
UNIT_ROUNDOFF = {torch.float16: 2.0**-11, torch.bfloat16: 2.0**-8, torch.float32: 2.0**-24}
INTERPRETER_BF16_ROUNDOFF = 2.0**-7  # triton 3.9's interpreter truncates fp32 -> bf16 instead of rounding

# (bits, granularity, group_size, symmetric, N, K, bias): every bit width and granularity, the three
# supported group sizes, odd K (padded last group; 4-bit rows starting mid-byte) and odd N.
LAYERS = [
    (4, "group", 32, False, 48, 96, True),
    (4, "group", 64, True, 48, 160, False),
    (4, "group", 128, False, 48, 131, True),
    (4, "channel", None, False, 47, 97, True),
    (4, "channel", None, True, 48, 96, False),
    (4, "tensor", None, False, 48, 97, True),
    (8, "group", 32, True, 48, 96, True),
    (8, "group", 64, False, 47, 131, False),
    (8, "group", 128, False, 48, 160, True),
    (8, "channel", None, False, 48, 97, True),
    (8, "tensor", None, True, 48, 96, False),
]
BATCHES = [(1, torch.bfloat16), (3, torch.float16), (8, torch.bfloat16), (17, torch.float16)]


@pytest.fixture(autouse=True)
def _untuned(monkeypatch):
    """Heuristic launch configs on CUDA: tuning every small test shape would compile dozens of variants."""
    monkeypatch.setenv("TORCHSLIM_KERNEL_TUNE", "0")


def make_layer(bits, granularity, group_size, symmetric, n, k, bias, seed=0) -> IntQuantLayer:
    torch.manual_seed(seed)
    linear = nn.Linear(k, n, bias=bias)
    with torch.no_grad():
        linear.weight[:, :5] = 0.0  # pruned weights are stored as zero codes
        if bias:
            linear.bias.normal_()
    return IntQuantLayer.from_float(linear, bits, granularity, group_size or 128, symmetric)


def reference(x: torch.Tensor, layer: IntQuantLayer) -> tuple[torch.Tensor, torch.Tensor]:
    """float64 ``x @ dequant(W).T + b`` and the scale ``|x| @ |W|.T`` of its rounding errors."""
    weight = layer.dequantize_weight(torch.float64).to(x.device)
    exact = x.double() @ weight.T
    if layer.bias is not None:
        exact = exact + layer.bias.double()
    return exact, x.double().abs() @ weight.abs().T


def assert_close_to_reference(y: torch.Tensor, x: torch.Tensor, layer: IntQuantLayer) -> None:
    """Error bound of fp32 accumulation plus one rounding of the result to the output dtype."""
    exact, magnitude = reference(x, layer)
    unit = UNIT_ROUNDOFF[y.dtype]
    if y.dtype == torch.bfloat16 and not y.is_cuda:
        unit = INTERPRETER_BF16_ROUNDOFF
    bound = unit * exact.abs() + 1e-5 * magnitude + 1e-6
    error = (y.double() - exact).abs().detach()
    assert y.dtype == x.dtype and y.shape == exact.shape
    assert bool((error <= bound).all()), (
        f"max error {float(error.max()):.3g}, worst ratio {float((error / bound).max()):.3g}"
    )


def run(x: torch.Tensor, layer: IntQuantLayer, config: KernelConfig | None = None) -> torch.Tensor:
    return lowbit_linear(x, layer, interpret=not x.is_cuda, config=config)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "spec", LAYERS, ids=lambda s: f"{s[0]}bit-{s[1]}{s[2] or ''}-{'sym' if s[3] else 'asym'}-N{s[4]}K{s[5]}"
)
def test_kernel_matches_float64_reference(spec, device):
    layer = make_layer(*spec).to(device)
    for rows, dtype in BATCHES:  # GEMV path (rows <= 4) and tiled tl.dot path
        x = torch.randn(rows, spec[5]).to(dtype).to(device)
        assert_close_to_reference(run(x, layer), x, layer)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize(
    "config",
    [KernelConfig(1, 16, 32, split_k=3), KernelConfig(4, 32, 32, split_k=5), KernelConfig(16, 16, 32, split_k=4)],
    ids=["gemv-split3", "gemv-split5", "tiled-split4"],
)
def test_split_k_partials_reduce_to_the_same_result(config, device):
    layer = make_layer(4, "group", 32, False, 40, 160, True).to(device)
    x = torch.randn(min(config.block_m, 3) if config.block_m < 16 else 9, 160).to(torch.float16).to(device)
    y_split = run(x, layer, config)
    y_single = run(x, layer, KernelConfig(config.block_m, config.block_n, config.block_k, split_k=1))
    assert_close_to_reference(y_split, x, layer)
    torch.testing.assert_close(y_split, y_single, rtol=2.0**-10, atol=1e-4)


def test_batched_input_shape_and_float32_in_the_interpreter():
    layer = make_layer(4, "group", 32, False, 48, 96, True)
    x = torch.randn(2, 3, 96)
    y = run(x, layer)
    assert y.shape == (2, 3, 48)
    assert_close_to_reference(y.reshape(6, 48), x.reshape(6, 96), layer)
    torch.testing.assert_close(y, layer(x), rtol=1e-5, atol=1e-5)  # the CPU forward is the PyTorch path


def test_quantized_model_saved_and_loaded_runs_through_the_kernel(tmp_path):
    torch.manual_seed(0)
    model = tiny_mlp(features=64, hidden=96)
    ts.quantize_(model, ts.IntQuant(bits=4, granularity="group", group_size=32))
    path = ts.save(model, tmp_path / "mlp.slim")
    loaded = ts.load(path)
    layers = [(n, m) for n, m in loaded.named_modules() if isinstance(m, IntQuantLayer)]
    assert layers and all(m.packed.dtype == torch.uint8 for _, m in layers)
    originals = dict(model.named_modules())
    for name, layer in layers:
        x = torch.randn(3, layer.weight_shape[1]).to(torch.bfloat16)
        y = run(x, layer)
        assert torch.equal(y, run(x, originals[name]))  # the stored bytes are what the kernel reads
        assert_close_to_reference(y, x, layer)


def test_gradients_flow_to_input_and_bias():
    layer = make_layer(8, "channel", None, False, 48, 96, True)
    x = torch.randn(3, 96, dtype=torch.float32, requires_grad=True)
    run(x, layer).square().sum().backward()
    x_ref = x.detach().clone().requires_grad_(True)
    bias_grad = layer.bias.grad.clone()
    layer.bias.grad = None
    nn.functional.linear(x_ref, layer.dequantize_weight(), layer.bias).square().sum().backward()
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(bias_grad, layer.bias.grad, rtol=1e-4, atol=1e-4)


def test_dispatch_reasons_name_what_keeps_the_pytorch_path(monkeypatch):
    layer = make_layer(4, "group", 32, False, 48, 96, True)
    assert dispatch_reason(layer, torch.randn(1, 96)) == "input is not on CUDA"
    linear = nn.Linear(96, 48)
    assert "bits = 2" in unsupported_reason(IntQuantLayer.from_float(linear, 2, "group", 32, False))
    assert "group_size = 48" in unsupported_reason(IntQuantLayer.from_float(linear, 4, "group", 48, False))
    conv = IntQuantLayer.from_float(nn.Conv2d(3, 8, 3), 4, "channel", 128, False)
    assert "op = 'conv2d'" in unsupported_reason(conv)
    assert unsupported_reason(layer) is None
    meta_x = torch.empty(1, 96, device="meta")
    monkeypatch.setattr(torch.Tensor, "is_cuda", property(lambda self: True))
    assert "float32" in dispatch_reason(layer, meta_x)
    monkeypatch.setenv("TORCHSLIM_DISABLE_KERNELS", "1")
    assert "TORCHSLIM_DISABLE_KERNELS" in dispatch_reason(layer, meta_x.to(torch.bfloat16))
    monkeypatch.setenv("TORCHSLIM_DISABLE_KERNELS", "0")
    assert dispatch_reason(layer, meta_x.to(torch.bfloat16)) is None


def test_bad_calls_fail_before_launching():
    layer = make_layer(4, "group", 32, False, 48, 96, True)
    with pytest.raises(ConfigError, match="expected 96"):
        run(torch.randn(2, 95), layer)
    with pytest.raises(ConfigError, match="needs CUDA tensors"):
        lowbit_linear(torch.randn(2, 96), layer, interpret=False)
    with pytest.raises(ConfigError, match="bits = 2"):
        run(torch.randn(2, 96), IntQuantLayer.from_float(nn.Linear(96, 48), 2, "group", 32, False))
    with pytest.raises(ConfigError, match="block_k = 64 is invalid.*group_size = 32"):
        run(torch.randn(2, 96), layer, KernelConfig(1, 16, 64))
    with pytest.raises(
        ConfigError, match=r"KernelConfig.block_n = 24 is invalid: expected a power of two in \[16, 256\]"
    ):
        KernelConfig(1, 24, 32)


def test_triton_interpret_env_var_selects_the_interpreter_in_a_fresh_process():
    code = (
        "import torch; from torch import nn\n"
        "from torchslim.quantize.layers import IntQuantLayer\n"
        "from torchslim.kernels import lowbit_linear\n"
        "torch.manual_seed(0); layer = IntQuantLayer.from_float(nn.Linear(64, 32), 4, 'group', 32, False)\n"
        "x = torch.randn(2, 64).half()\n"
        "y = lowbit_linear(x, layer)\n"
        "ref = x.double() @ layer.dequantize_weight(torch.float64).T + layer.bias.double()\n"
        "print(float((y.double() - ref).abs().max()))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    result = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    assert float(result.stdout.strip().splitlines()[-1]) < 1e-2


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_forward_dispatches_to_the_kernel_on_packed_weights(monkeypatch):
    model = nn.Sequential(nn.Linear(256, 512, bias=False), nn.SiLU(), nn.Linear(512, 256, bias=False))
    ts.quantize_(model, ts.IntQuant(bits=4, granularity="group", group_size=128))
    model = model.cuda()
    assert all(m.packed.is_cuda and m.packed.dtype == torch.uint8 for m in model if isinstance(m, IntQuantLayer))
    calls = []
    original = lowbit._forward
    monkeypatch.setattr(lowbit, "_forward", lambda *a, **k: calls.append(1) or original(*a, **k))
    for rows in (1, 4, 16, 64):
        x = torch.randn(rows, 256, device="cuda", dtype=torch.bfloat16)
        with torch.inference_mode():
            y = model(x)
        layer = model[0]
        assert_close_to_reference(model[0](x), x, layer)
        exact = (
            model[2].dequantize_weight(torch.float32)
            @ torch.nn.functional.silu(x.float() @ layer.dequantize_weight(torch.float32).T).T
        )
        torch.testing.assert_close(y.float(), exact.T, rtol=3e-2, atol=3e-2)
    assert len(calls) >= 8


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_tuner_picks_a_config_once_and_reuses_it(monkeypatch):
    monkeypatch.setenv("TORCHSLIM_KERNEL_TUNE", "1")
    layer = make_layer(4, "group", 128, False, 1024, 512, False).cuda()
    x = torch.randn(1, 512, device="cuda", dtype=torch.bfloat16)
    tuned_before = len(lowbit._TUNED)
    assert_close_to_reference(lowbit_linear(x, layer), x, layer)
    assert len(lowbit._TUNED) == tuned_before + 1
    assert_close_to_reference(lowbit_linear(x, layer), x, layer)
    assert len(lowbit._TUNED) == tuned_before + 1


COMPILE_CASES = [  # (dtype, bits, symmetric, nibble_pairs, use_dot, block_m, block_n, block_k, partial)
    ("bf16", 4, False, True, False, 1, 32, 128, False),
    ("fp16", 4, True, True, False, 4, 32, 128, True),
    ("bf16", 8, False, False, False, 1, 64, 64, False),
    ("bf16", 4, False, False, False, 2, 32, 64, False),
    ("bf16", 4, False, True, True, 16, 64, 64, True),
    ("fp16", 8, True, False, True, 32, 64, 64, False),
]


@pytest.mark.parametrize("case", COMPILE_CASES, ids=lambda c: "-".join(map(str, c)))
def test_kernel_compiles_for_hopper_without_a_gpu(case):
    """The interpreter is lenient; the real compiler (down to PTX for sm_90) must accept every variant."""
    try:
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource
    except ImportError as exc:  # pragma: no cover - other triton layouts
        pytest.skip(f"triton compiler API not available: {exc}")
    import triton

    from torchslim.kernels._triton_lowbit import kernels

    dtype, bits, symmetric, nibbles, use_dot, block_m, block_n, block_k, partial = case
    matmul = kernels(False)[0]
    signature = {"x_ptr": f"*{dtype}", "w_ptr": "*u8", "scale_ptr": "*fp16", "zp_ptr": "*u8", "bias_ptr": "*fp32"}
    signature["out_ptr"] = "*fp32" if partial else f"*{dtype}"
    constants = dict(
        BITS=bits, SYMMETRIC=symmetric, NIBBLE_PAIRS=nibbles, EVEN_K=True, HAS_BIAS=True, PARTIAL=partial,
        USE_DOT=use_dot, DOT_FP32=False, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        LANES_K=block_k // 2 if nibbles else block_k,
    )  # fmt: skip
    for name in matmul.arg_names:
        signature.setdefault(name, "constexpr" if name in constants else "i32")
    aligned = [matmul.arg_names.index(n) for n in ("x_ptr", "w_ptr", "out_ptr", "K", "row_bytes", "row_elems")]
    source = ASTSource(matmul, signature, constants, {(i,): [["tt.divisibility", 16]] for i in aligned})
    try:
        compiled = triton.compile(source, target=GPUTarget("cuda", 90, 32), options={"num_warps": 4, "num_stages": 2})
    except (RuntimeError, FileNotFoundError) as exc:
        if "ptxas" in str(exc).lower():  # pragma: no cover - wheels without the bundled ptxas
            pytest.skip(f"no ptxas: {exc}")
        raise
    ptx = compiled.asm["ptx"]
    assert ".entry" in ptx
    if nibbles and not use_dot:  # the packed bytes load as 16-byte vectors, codes never go through int->float cvt
        assert "ld.global.v4.b32" in ptx and "cvt.rn.f32.s32" not in ptx
