"""``torchslim distill``: train a student (.slim or a registered model) to imitate a .slim teacher."""

from __future__ import annotations

from pathlib import Path

import typer

from torchslim.cli.common import console, holdout_accuracy, load_data_for, print_json, table
from torchslim.errors import ConfigError


def distill(
    teacher: Path = typer.Option(..., "--teacher", "-t", help="Teacher .slim file."),
    student: str = typer.Option(..., "--student", "-s", help="Student: a registered model name or a .slim file."),
    data: str = typer.Option("digits", "--data", "-d", help="Data spec (training data, and the test split scored)."),
    temperature: float = typer.Option(4.0, "--temperature", help="Softmax temperature T (> 0)."),
    alpha: float = typer.Option(0.9, "--alpha", help="Weight of the soft-target loss in [0, 1]."),
    features: list[str] = typer.Option(
        [], "--features", help="Feature hint TEACHER.MODULE:STUDENT.MODULE, e.g. stages.2:3 (repeatable)."
    ),
    feature_loss: str = typer.Option("mse", "--feature-loss", help="mse, cosine or attention."),
    feature_weight: float = typer.Option(1.0, "--feature-weight", help="Weight of each feature hint loss."),
    synthetic: str | None = typer.Option(
        None, "--synthetic", help="Use no real training images: bn-inversion, mixup or noise."
    ),
    synthetic_n: int = typer.Option(2048, "--synthetic-n", help="Number of synthetic samples."),
    source_samples: int = typer.Option(
        20, "--source-samples", help="--synthetic mixup/noise: unlabelled training images used as seeds."
    ),
    epochs: int | None = typer.Option(None, "--epochs", help="Epochs (default: the student's recommended)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: the student's recommended)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size."),
    augment_shift: int | None = typer.Option(
        None, "--augment-shift", help="Random +-pixel shifts (default: recommended; 0 with --cache-logits/--synthetic)."
    ),
    cache_logits: bool = typer.Option(False, "--cache-logits", help="Run the teacher once per training image."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Keep cached teacher logits here across runs."),
    seed: int = typer.Option(0, "--seed", help="Random seed (student init, data order)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .slim file of the student."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Allow model factories outside torchslim."),
    progress: bool | None = typer.Option(None, "--progress/--no-progress", help="Progress bars (default: terminal)."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Knowledge distillation (Hinton KD, FitNets hints, or data-free from synthetic inputs); saves the student."""
    import torch

    from torchslim.distill import KD, SyntheticData
    from torchslim.fileio import check_output_path
    from torchslim.train import TrainConfig, recommended_config

    # Every flag is checked before anything is loaded or trained.
    if cache_dir is not None:
        cache_logits = True
    kd = KD(temperature=temperature, alpha=alpha, features=tuple(features), feature_weight=feature_weight,
            feature_loss=feature_loss, cache_logits=cache_logits)
    synth = SyntheticData(method=synthetic, n=synthetic_n, seed=seed) if synthetic is not None else None
    if source_samples < 2:
        raise ConfigError(f"--source-samples = {source_samples} is invalid: expected an integer >= 2")
    student_file = student.endswith(".slim") or Path(student).is_file()
    inputs = [teacher] + ([Path(student)] if student_file else [])
    target = check_output_path(out, *inputs, force=force)
    base = TrainConfig() if student_file else recommended_config(student)
    shift = augment_shift if augment_shift is not None else (0 if cache_logits or synth else base.augment_shift)
    changes = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "augment_shift": shift, "seed": seed}
    train_config = base.replace(**{k: v for k, v in changes.items() if v is not None})

    from torchslim.artifact import load, read_manifest, save
    from torchslim.distill import distill as run_distill
    from torchslim.measure import parameter_stats
    from torchslim.models.compat import check_model_data, create_model_for_data

    teacher_model = load(teacher, trust_factory=trust_factory)
    splits = load_data_for(data, teacher_model)
    recipe = []
    if student_file:
        student_model = load(Path(student), trust_factory=trust_factory)
        recipe = list(read_manifest(Path(student)).get("recipe") or [])
    else:
        torch.manual_seed(seed)
        student_model = create_model_for_data(student, splits.input_shape, splits.num_classes)
    check_model_data(student_model, splits.example_inputs(1), splits.num_classes, data)
    teacher_accuracy = holdout_accuracy(teacher_model, splits)
    accuracy_before = holdout_accuracy(student_model, splits)
    train_data = synth if synth is not None else splits.train
    source = None
    if synth is not None and synth.method != "bn-inversion":
        source = splits.train.tensors[0][:source_samples]  # images only: the labels are never read
    run_distill(student_model, teacher_model, train_data, kd, train_config=train_config, eval_data=splits.test,
                progress=progress, cache_dir=cache_dir, source=source, input_shape=splits.input_shape)
    accuracy_after = holdout_accuracy(student_model, splits)
    stage = {
        "stage": "distill",
        "config": kd.to_dict(),
        "train": train_config.to_dict(),
        "teacher": str(teacher),
        "data": data,
        "synthetic": None if synth is None else {**synth.to_dict(), "source_samples": len(source or [])},
    }
    measurements = {"accuracy": accuracy_after, "teacher_accuracy": teacher_accuracy, "data": data}
    save(student_model, target, recipe=recipe + [stage], measurements=measurements)
    summary = {
        "teacher": str(teacher),
        "student": student,
        "output": str(target),
        "teacher_parameters": parameter_stats(teacher_model)["parameters"],
        "student_parameters": parameter_stats(student_model)["parameters"],
        "teacher_accuracy": teacher_accuracy,
        "student_accuracy_before": accuracy_before,
        "student_accuracy": accuracy_after,
        "teacher_bytes": teacher.stat().st_size,
        "output_bytes": target.stat().st_size,
        "synthetic": synthetic,
    }
    if json_output:
        print_json(summary)
        return
    rows = [
        ["teacher", f"{summary['teacher_parameters']:,}", f"{summary['teacher_bytes']:,}", f"{teacher_accuracy:.2%}"],
        ["student before", f"{summary['student_parameters']:,}", "", f"{accuracy_before:.2%}"],
        ["student distilled", f"{summary['student_parameters']:,}", f"{summary['output_bytes']:,}",
         f"{accuracy_after:.2%}"],
    ]
    how = f"synthetic {synthetic}" if synthetic else data
    console().print(table(f"distill {teacher} -> {target} ({how}, T={temperature:g}, alpha={alpha:g})",
                          ["", "parameters", "file bytes", f"accuracy ({data} test)"], rows))
