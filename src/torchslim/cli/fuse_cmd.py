"""``torchslim fuse``: fuse several same-architecture .slim models with the seed's multi-teacher formula."""

from __future__ import annotations

import copy
from pathlib import Path

import typer

from torchslim.cli.common import console, holdout_accuracy, load_data_for, print_json, table
from torchslim.errors import ConfigError, ModelError


def fuse(
    paths: list[Path] = typer.Argument(..., help="Two or more .slim files of the same model (factory and shapes)."),
    alpha: float = typer.Option(-1.0, "--alpha", help="Exponent factor: 0 averages, < 0 pulls toward the majority."),
    distance: str = typer.Option("abs", "--distance", help="abs (|a - b|) or squared ((a - b)^2)."),
    tol: float = typer.Option(1e-6, "--tol", help="Stop when no weight moves more than this in one iteration."),
    max_iter: int = typer.Option(100, "--max-iter", help="Iteration cap per tensor."),
    out: Path | None = typer.Option(None, "--out", "-o", help="Output .slim file."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    data: str | None = typer.Option(None, "--data", "-d", help="Data spec: each teacher's and the fused accuracy."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Allow a model factory outside torchslim."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Fuse teachers' weights: W_s = sum_k W_k exp(alpha D) / sum_k exp(alpha D), solved by fixed-point iteration."""
    from torchslim.artifact import load, read_manifest, save
    from torchslim.distill.fusion import ParameterFusion, fuse_parameters
    from torchslim.fileio import check_output_path

    config = ParameterFusion(alpha=alpha, distance=distance, tol=tol, max_iter=max_iter)
    if len(paths) < 2:
        raise ConfigError(f"fuse got {len(paths)} input file(s): expected at least 2 .slim files to fuse")
    if out is None:
        raise ConfigError("--out is missing: expected the output .slim path")
    target = check_output_path(out, *paths, force=force)
    manifests = [read_manifest(path) for path in paths]
    for path, manifest in zip(paths[1:], manifests[1:], strict=True):
        if manifest.get("factory") != manifests[0].get("factory"):
            raise ModelError(
                f"{str(path)!r} was built by {manifest.get('factory')} but {str(paths[0])!r} by "
                f"{manifests[0].get('factory')}: expected teachers of the same model"
            )
    teachers = [load(path, trust_factory=trust_factory) for path in paths]
    splits = load_data_for(data, teachers[0]) if data else None
    result = fuse_parameters(teachers, **{k: v for k, v in config.to_dict().items() if k != "type"})
    fused = copy.deepcopy(teachers[0])
    fused.load_state_dict(result.state_dict)
    fused.eval()

    teacher_accuracy = [holdout_accuracy(model, splits) for model in teachers]
    fused_accuracy = holdout_accuracy(fused, splits)
    stage = {
        "stage": "fuse",
        "config": config.to_dict(),
        "sources": [
            {"path": str(path), "recipe": manifest.get("recipe")}
            for path, manifest in zip(paths, manifests, strict=True)
        ],
        **result.summary(),
    }
    measurements = None
    if splits is not None:
        measurements = {"accuracy": fused_accuracy, "teacher_accuracy": teacher_accuracy, "data": data}
    save(fused, target, recipe=[stage], measurements=measurements)

    summary = {
        "inputs": [str(path) for path in paths],
        "output": str(target),
        "output_bytes": target.stat().st_size,
        "config": config.to_dict(),
        **result.summary(),
        "teacher_accuracy": teacher_accuracy,
        "accuracy": fused_accuracy,
    }
    if json_output:
        print_json(summary)
        return
    out_console = console()
    rows = []
    for index, path in enumerate(paths):
        row = [str(path), f"{result.teacher_weights[index]:.3f}"]
        if splits is not None:
            row.append(f"{teacher_accuracy[index]:.2%}")
        rows.append(row)
    fused_row = [f"fused -> {target}", "1.000"]
    if splits is not None:
        fused_row.append(f"{fused_accuracy:.2%}")
    rows.append(fused_row)
    columns = ["model", "share"] + (["accuracy"] if splits is not None else [])
    out_console.print(table(f"fuse (alpha={alpha:g}, distance={distance})", columns, rows))
    state = "converged" if result.converged else f"did NOT converge (tol {tol:g}; raise --max-iter or use alpha <= 0)"
    out_console.print(
        f"{result.iterations} iteration(s), residual {result.residual:.3g}: {state}; saved {target} "
        f"({summary['output_bytes']:,} bytes)"
    )
