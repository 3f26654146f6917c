"""``torchslim bench``: latency, throughput and peak memory beside the fp32 baseline, in torch and ONNX Runtime."""

from __future__ import annotations

from pathlib import Path

import typer

from torchslim.cli.common import console, parse_int_list, print_json, table


def bench(
    paths: list[Path] = typer.Argument(..., help=".slim or .onnx files (the baseline is made from the first)."),
    runtime: str = typer.Option("torch,onnxruntime", "--runtime", help="Comma-separated: torch, onnxruntime."),
    batch: str = typer.Option("1,32", "--batch", help="Comma-separated batch sizes."),
    threads: int | None = typer.Option(None, "--threads", help="Intra-op threads for every runtime."),
    baseline: Path | None = typer.Option(None, "--baseline", help="fp32 .onnx/.slim baseline (needed for int8 .onnx)."),
    input_shape: str | None = typer.Option(None, "--input-shape", help="One sample's shape, e.g. 1,28,28."),
    data: str | None = typer.Option(None, "--data", "-d", help="Data spec giving the input shape (e.g. digits)."),
    warmup: int = typer.Option(3, "--warmup", help="Untimed runs before timing."),
    min_run_time: float = typer.Option(0.2, "--min-run-time", help="Seconds of timed runs per row."),
    memory: bool = typer.Option(True, "--memory/--no-memory", help="Also measure peak memory."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Time models and their fp32 baseline in the same run; print speedups."""
    from torchslim.benchmarking import bench as run_bench
    from torchslim.errors import ConfigError

    runtimes = tuple(item.strip() for item in runtime.split(",") if item.strip())
    sizes = parse_int_list("--batch", batch)
    if threads is not None and threads < 1:
        raise ConfigError(f"--threads = {threads} is invalid: expected an integer >= 1")
    example = None
    shape = parse_int_list("--input-shape", input_shape) if input_shape else None
    if data is not None and shape is None:
        from torchslim.data import load_data

        example = load_data(data).example_inputs(1)
    report = run_bench(
        list(paths), example_inputs=example, input_shape=shape, runtimes=runtimes, batch_sizes=sizes,
        threads=threads, warmup=warmup, min_run_time=min_run_time, baseline=baseline, memory=memory,
    )  # fmt: skip
    if json_output:
        print_json(report.to_dict())
        return
    body = [
        [
            row.name, row.runtime, row.batch, f"{row.median_ms:.3f}", f"{row.p90_ms:.3f}",
            f"{row.throughput_per_s:,.0f}",
            "-" if row.peak_memory_bytes is None else f"{row.peak_memory_bytes / 2**20:.1f} MiB",
            "-" if row.speedup_vs_baseline is None else f"{row.speedup_vs_baseline:.2f}x",
            "-" if row.speedup_vs_torch_fp32 is None else f"{row.speedup_vs_torch_fp32:.2f}x",
        ]
        for row in report.rows
    ]  # fmt: skip
    columns = ["model", "runtime", "batch", "median ms", "p90 ms", "samples/s", "peak memory", "vs baseline",
               "vs fp32 torch"]  # fmt: skip
    out_console = console()
    out_console.print(table(f"bench ({report.threads} thread(s), input {tuple(report.input_shape)})", columns, body))
    out_console.print(f"baseline: {report.baseline['how']}")
    for key, reason in report.skipped.items():
        out_console.print(f"skipped {key}: {reason}")
