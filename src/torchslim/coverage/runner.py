"""Run each torchslim operation on each architecture of :mod:`torchslim.coverage.zoo` and tabulate the outcome.

A cell is ``ok`` (the operation ran and its outputs are within the operation's tolerance of the fp32 model),
``error`` (a :class:`~torchslim.errors.TorchSlimError`: the one line a user sees), ``crash`` (any other exception:
a bug) or ``wrong`` (it ran, but outputs moved beyond the tolerance: a bug). ``benchmarks/coverage.py`` runs the
full table; ``tests/test_coverage.py`` a small subset.

Save -> load runs in a new process: every artifact an operation saved (fp32, int8, int4, GPTQ, fp16, pruned) is
loaded there with ``ts.load(path, trust_factory=True)`` and its outputs compared with ``torch.equal``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import os
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.data import TensorDataset

from torchslim._utils import first_line
from torchslim.artifact import save
from torchslim.coverage.zoo import ARCHITECTURES, VOCAB, Arch, example_inputs, make
from torchslim.deployment import deploy
from torchslim.distill import KD, distill
from torchslim.errors import TorchSlimError
from torchslim.export import export
from torchslim.hf import attention_modules, ffn_layers, prune_transformer_
from torchslim.prune import ChannelPruning, MagnitudePruning, finalize_, prune_
from torchslim.prune.api import prunable_layers
from torchslim.quantize import HalfPrecision, IntQuant, quantize_, quantize_dynamic
from torchslim.quantize.gptq import GPTQ, gptq_
from torchslim.train import TrainConfig

__all__ = ["OPERATIONS", "TOLERANCE", "Cell", "run_table", "to_markdown"]

OPERATIONS = ("int8-dynamic", "int4", "gptq", "fp16", "structural", "unstructured", "distill", "onnx", "deploy",
              "save-load")
# Smallest cosine similarity (flattened, float64) of the operation's outputs against the fp32 model's
# (int8-dynamic: it also rounds activations) or, for weight quantization, against the fp32 model holding the decoded
# weights (fp16 layers have none to decode: against fp32): the packed layers must compute what they store; the
# rounding noise itself depends on the random weights (int4 cosine to fp32 0.96-1.00 here), so it is only reported.
TOLERANCE = {"int8-dynamic": 0.99, "int4": 0.9999, "gptq": 0.9999, "fp16": 0.9999}
_GROUP = 32


@dataclasses.dataclass
class Cell:
    """One operation on one architecture.

    Attributes:
        status: ``ok``, ``error`` (a torchslim error), ``crash`` (another exception) or ``wrong`` (bad outputs).
        message: what a user sees: the error's first line, or a short note on success (cosine, route).
        seconds: wall time of the operation.
    """

    status: str
    message: str = ""
    seconds: float = 0.0

    @property
    def ok(self) -> bool:
        return self.status == "ok"


class _Wrong(Exception):
    """Outputs outside the operation's tolerance."""


@dataclasses.dataclass
class _Job:
    """An artifact to reload in a new process: its path, inputs and expected outputs."""

    arch: str
    variant: str
    path: str
    inputs: list[Tensor]
    expected: Tensor


def cosine(got: Tensor, want: Tensor) -> float:
    """Cosine similarity of two outputs, flattened, in float64 (1.0 for two zero tensors)."""
    a, b = got.detach().double().flatten(), want.detach().double().flatten()
    if a.shape != b.shape:
        raise _Wrong(f"output shape {tuple(got.shape)} != fp32 {tuple(want.shape)}")
    denom = a.norm() * b.norm()
    return 1.0 if float(denom) == 0.0 else float(a @ b / denom)


def _run(model: nn.Module, inputs: Sequence[Tensor]) -> Tensor:
    with torch.no_grad():
        out = model(*inputs)
    if not isinstance(out, Tensor):
        raise _Wrong(f"output is a {type(out).__name__}, not a tensor")
    if not torch.isfinite(out).all():
        raise _Wrong("outputs hold NaN/Inf")
    return out


def _close(op: str, model: nn.Module, inputs: Sequence[Tensor], ref: Tensor) -> str:
    cos = cosine(_run(model, inputs), ref)
    if cos < TOLERANCE[op]:
        raise _Wrong(f"cosine {cos:.4f} < {TOLERANCE[op]} against fp32")
    return f"cosine {cos:.4f}"


def _close_to_decoded(op: str, model: nn.Module, ctx: _Context) -> str:
    """Compare ``model`` with the fp32 model holding each quantized layer's decoded weight; note the fp32 cosine."""
    decoded = ctx.copy()
    layers = dict(decoded.named_modules())
    for name, module in model.named_modules():
        if hasattr(module, "dequantize_weight"):
            target = layers[name]
            # a new Parameter: a weight tied to an unquantized module (an embedding) must not change there
            target.weight = nn.Parameter(module.dequantize_weight().reshape(target.weight.shape).detach())
    out = _run(model, ctx.inputs)
    exact = cosine(out, _run(decoded, ctx.inputs))
    if exact < TOLERANCE[op]:
        raise _Wrong(f"cosine {exact:.5f} < {TOLERANCE[op]} against the fp32 model with the decoded weights")
    return f"cosine {cosine(out, ctx.ref):.4f} vs fp32"


def _one_or_tuple(inputs: Sequence[Tensor]) -> Tensor | tuple[Tensor, ...]:
    return inputs[0] if len(inputs) == 1 else tuple(inputs)


class _Context:
    """What the operations of one architecture share: the fp32 model, inputs, reference outputs, saved files."""

    def __init__(self, name: str, workdir: Path) -> None:
        self.name = name
        self.arch: Arch = ARCHITECTURES[name]
        self.workdir = workdir
        self.model = make(name, workdir)
        self.inputs = example_inputs(self.arch)
        self.calib = [example_inputs(self.arch, batch=4, seed=s) for s in range(1, 4)]
        self.ref = _run(self.model, self.inputs)
        self.jobs: list[_Job] = []

    def copy(self) -> nn.Module:
        return copy.deepcopy(self.model)

    def save(self, variant: str, model: nn.Module) -> int:
        """Save ``model`` for the reload check; returns the file's bytes."""
        path = self.workdir / f"{self.name}-{variant}.slim"
        save(model, path)
        self.jobs.append(_Job(self.name, variant, str(path), list(self.inputs), _run(model, self.inputs)))
        return path.stat().st_size


def _int8_dynamic(ctx: _Context) -> str:
    graph = quantize_dynamic(ctx.copy(), example_inputs=_one_or_tuple(ctx.inputs))
    note = _close("int8-dynamic", graph, ctx.inputs, ctx.ref)
    ctx.save("int8", graph)
    return note


def _int4(ctx: _Context) -> str:
    model = ctx.copy()
    quantize_(model, IntQuant(bits=4, granularity="group", group_size=_GROUP))
    note = _close_to_decoded("int4", model, ctx)
    ctx.save("int4", model)
    return note


def _gptq(ctx: _Context) -> str:
    model = ctx.copy()
    gptq_(model, GPTQ(bits=4, group_size=_GROUP), ctx.calib)
    note = _close_to_decoded("gptq", model, ctx)
    ctx.save("gptq", model)
    return note


def _fp16(ctx: _Context) -> str:
    model = ctx.copy()
    quantize_(model, HalfPrecision("fp16"))
    note = _close_to_decoded("fp16", model, ctx)
    ctx.save("fp16", model)
    return note


def _parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def _structural(ctx: _Context) -> str:
    model = ctx.copy()
    heads = attention_modules(model)
    if heads or ffn_layers(model):  # a transformer: heads and FFN neurons (`torchslim prune --structured hf:DIR`)
        config = ChannelPruning(amount=0.3 if ffn_layers(model) else 0.0, heads=0.3 if heads else 0.0)
        prune_transformer_(model, config, _one_or_tuple(ctx.inputs))
    else:
        prune_(model, ChannelPruning(amount=0.3), example_inputs=_one_or_tuple(ctx.inputs))
    out = _run(model, ctx.inputs)
    if out.shape != ctx.ref.shape:
        raise _Wrong(f"output shape {tuple(out.shape)} != fp32 {tuple(ctx.ref.shape)}")
    before, after = _parameters(ctx.model), _parameters(model)
    if after >= before:
        raise _Wrong(f"nothing removed ({after} parameters of {before})")
    ctx.save("structural", model)
    return f"{after / before:.2f}x parameters"


def _unstructured(ctx: _Context) -> str:
    model = ctx.copy()
    prune_(model, MagnitudePruning(scope="layer", amount=0.5))
    finalize_(model)
    _run(model, ctx.inputs)
    layers, _ = prunable_layers(model)
    total = sum(m.weight.numel() for m in layers.values())
    zeros = sum(int((m.weight == 0).sum()) for m in layers.values())
    if not total or zeros / total < 0.49:
        raise _Wrong(f"{zeros} of {total} prunable weights are zero, expected 50%")
    dense = ctx.workdir / f"{ctx.name}-dense.slim"

    save(ctx.model, dense)
    size = ctx.save("unstructured", model)
    if size >= dense.stat().st_size:
        raise _Wrong(f"the 50%-sparse file ({size} B) is not smaller than the dense one ({dense.stat().st_size} B)")
    return f"{zeros / total:.0%} of {len(layers)} layers zero, file {size / dense.stat().st_size:.2f}x"


def _distill(ctx: _Context) -> str:
    student = ctx.copy()
    with torch.no_grad():  # a student that differs from its teacher (an identical one has nothing to learn)
        for param in student.parameters():
            param.add_(torch.randn_like(param) * 0.01)
    n = 4
    inputs = example_inputs(ctx.arch, batch=n, seed=7)
    if ctx.arch.classes:
        targets, kd = torch.arange(n) % ctx.arch.classes, KD(temperature=2.0, alpha=0.5)
    else:  # language model logits (per token KL) or hidden states (MSE): no labels
        targets = torch.zeros(n)
        kd = KD(alpha=1.0, output_loss="kl" if ctx.ref.shape[-1] == VOCAB else "mse")
    data = TensorDataset(*inputs[:1], targets) if ctx.arch.inputs == "tokens" else TensorDataset(*inputs, targets)
    before = [p.detach().clone() for p in student.parameters()]
    distill(student, ctx.model, data, kd, train_config=TrainConfig(epochs=1, batch_size=n, lr=1e-3), progress=False)
    out = _run(student, ctx.inputs)
    if out.shape != ctx.ref.shape:
        raise _Wrong(f"output shape {tuple(out.shape)} != fp32 {tuple(ctx.ref.shape)}")
    if all(torch.equal(a, p) for a, p in zip(before, student.parameters(), strict=True)):
        raise _Wrong("no parameter changed")
    return "1 step"


def _onnx(ctx: _Context) -> str:
    report = export(ctx.copy(), example_inputs=_one_or_tuple(ctx.inputs))
    return f"max abs error {report.parity['max_abs_error']:.1e}"


def _deploy(ctx: _Context) -> str:
    model = ctx.copy()
    quantize_(model, IntQuant(bits=4, granularity="group", group_size=_GROUP))
    report = deploy(model, example_inputs=_one_or_tuple(ctx.inputs), reference=ctx.model, batch_sizes=(1,),
                    min_run_time=0.02)
    if report.chosen is None:
        reasons = "; ".join(f"{r.name}: {r.reason}" for r in report.routes if r.reason)
        raise _Wrong(f"no valid route ({reasons})")
    return f"int4 -> {report.chosen}"


def _save_fp32(ctx: _Context) -> str:
    ctx.save("fp32", ctx.model)
    return ""  # filled in by the reload process


_OPERATIONS: dict[str, Callable[[_Context], str]] = {
    "int8-dynamic": _int8_dynamic,
    "int4": _int4,
    "gptq": _gptq,
    "fp16": _fp16,
    "structural": _structural,
    "unstructured": _unstructured,
    "distill": _distill,
    "onnx": _onnx,
    "deploy": _deploy,
    "save-load": _save_fp32,
}


def run_cell(ctx: _Context, op: str) -> Cell:
    """Run one operation; never raises."""
    start = time.perf_counter()
    try:
        note = _OPERATIONS[op](ctx)
        status = "ok"
    except _Wrong as exc:
        status, note = "wrong", f"wrong outputs: {exc}"
    except TorchSlimError as exc:
        status, note = "error", first_line(exc)
    except Exception as exc:  # noqa: BLE001 - every other exception is a bug the table reports
        status, note = "crash", f"{type(exc).__name__}: {first_line(exc)}"
    return Cell(status, note, time.perf_counter() - start)


def run_arch(name: str, ops: Sequence[str], workdir: Path) -> tuple[dict[str, Cell], list[_Job]]:
    """Run ``ops`` on architecture ``name``; a model that cannot be built fills every cell with that error."""
    start = time.perf_counter()
    try:
        ctx = _Context(name, workdir)
    except Exception as exc:  # noqa: BLE001 - reported in every cell of the row
        cell = Cell("error" if isinstance(exc, TorchSlimError) else "crash",
                    f"build: {type(exc).__name__}: {first_line(exc)}", time.perf_counter() - start)
        return {op: cell for op in ops}, []
    return {op: run_cell(ctx, op) for op in ops}, ctx.jobs


def run_table(
    archs: Sequence[str] | None = None,
    ops: Sequence[str] | None = None,
    *,
    workdir: str | os.PathLike,
    on_cell: Callable[[str, str, Cell], Any] | None = None,
) -> dict[str, dict[str, Cell]]:
    """Run every operation on every architecture, then reload every saved file in one new process.

    Args:
        archs: names from ``ARCHITECTURES`` (default: all).
        ops: names from ``OPERATIONS`` (default: all).
        workdir: an existing directory for model directories and ``.slim`` files.
        on_cell: called as ``on_cell(arch, op, cell)`` after each cell (progress).

    Returns:
        arch -> op -> :class:`Cell`.

    Raises:
        ValueError: an unknown architecture or operation name.
    """
    archs = list(ARCHITECTURES) if archs is None else list(archs)
    ops = list(OPERATIONS) if ops is None else list(ops)
    unknown = [a for a in archs if a not in ARCHITECTURES] + [o for o in ops if o not in OPERATIONS]
    if unknown:
        raise ValueError(f"unknown architectures/operations {unknown}: expected names from {list(ARCHITECTURES)} "
                         f"and {list(OPERATIONS)}")
    workdir = Path(workdir)
    table: dict[str, dict[str, Cell]] = {}
    jobs: list[_Job] = []
    for name in archs:
        row, row_jobs = run_arch(name, ops, workdir)
        table[name] = row
        jobs += row_jobs
        for op, cell in row.items():
            if on_cell and op != "save-load":
                on_cell(name, op, cell)
    if "save-load" in ops:
        _reload(table, jobs, workdir)
        for name in archs:
            if on_cell:
                on_cell(name, "save-load", table[name]["save-load"])
    return table


def _reload(table: dict[str, dict[str, Cell]], jobs: list[_Job], workdir: Path) -> None:
    """Fill the ``save-load`` cells: every saved file is loaded in one new process and compared bit for bit."""
    import safetensors.torch

    rows = {name for name, row in table.items() if row["save-load"].ok}
    jobs = [j for j in jobs if j.arch in rows]
    tensors = {}
    for i, job in enumerate(jobs):
        tensors[f"{i}.expected"] = job.expected.clone(memory_format=torch.contiguous_format)
        for k, t in enumerate(job.inputs):
            tensors[f"{i}.input.{k}"] = t.clone(memory_format=torch.contiguous_format)
    spec = workdir / "reload.safetensors"
    safetensors.torch.save_file(tensors, spec, metadata={"paths": json.dumps([j.path for j in jobs])})
    start = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "torchslim.coverage.reload", str(spec)], capture_output=True,
                          text=True, env={**os.environ}, check=False)
    seconds = (time.perf_counter() - start) / max(len(rows), 1)
    try:
        results = json.loads(proc.stdout.strip().splitlines()[-1])
    except (ValueError, IndexError):
        tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
        for name in rows:
            table[name]["save-load"] = Cell("crash", f"reload process failed: {tail}", seconds)
        return
    for name in rows:
        mine = [(job, results[i]) for i, job in enumerate(jobs) if job.arch == name]
        bad = [(job, r) for job, r in mine if r["status"] != "ok"]
        if not bad:
            variants = ", ".join(job.variant for job, _ in mine)
            table[name]["save-load"] = Cell("ok", f"identical: {variants}", seconds)
        else:
            job, r = bad[0]
            table[name]["save-load"] = Cell(r["status"], f"{job.variant}: {r['message']}", seconds)


SYMBOL = {"ok": "✓", "error": "✗", "crash": "✗ crash", "wrong": "✗ wrong"}


def to_markdown(table: dict[str, dict[str, Cell]]) -> str:
    """The table: a row per architecture, ✓ or ✗ with a numbered footnote holding the error a user sees."""
    ops = list(next(iter(table.values()))) if table else []
    notes: dict[str, int] = {}
    lines = ["| architecture | family | how it is loaded | " + " | ".join(ops) + " |",
             "|---|---|---|" + "---|" * len(ops)]
    for name, row in table.items():
        arch = ARCHITECTURES[name]
        cells = []
        for op in ops:
            cell = row[op]
            if cell.ok:
                cells.append("✓")
                continue
            number = notes.setdefault(cell.message, len(notes) + 1)
            cells.append(f"{SYMBOL[cell.status]} [{number}]")
        lines.append(f"| {name} | {arch.family} | {arch.how} | " + " | ".join(cells) + " |")
    counts = [sum(row[op].ok for row in table.values()) for op in ops]
    lines.append("| **✓ per operation** | | | " + " | ".join(
        f"{c}/{len(table)} ({c / max(len(table), 1):.0%})" for c in counts) + " |")
    if notes:
        lines += ["", "Errors (the one line a user sees; `crash` = not a torchslim error, `wrong` = outputs beyond the "
                  "operation's tolerance):", ""]
        lines += [f"{n}. {message}" for message, n in notes.items()]
    return "\n".join(lines) + "\n"


def to_json(table: dict[str, dict[str, Cell]]) -> dict[str, Any]:
    """JSON-safe form of the table."""
    return {name: {op: dataclasses.asdict(cell) for op, cell in row.items()} for name, row in table.items()}
