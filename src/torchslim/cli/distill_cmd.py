"""``torchslim distill``: train a student (.slim or a registered model) to imitate a .slim teacher."""

from __future__ import annotations

from pathlib import Path

import typer

from torchslim.cli.common import PROGRESS_OPT, console, holdout_accuracy, load_data_for, print_json, table
from torchslim.errors import ConfigError

# Epochs over a synthetic set of shifted views (quick preset: 512 images x 25 views = 12,800 samples, 200 steps an
# epoch at batch 64). Measured on digits with the demo's resnet teacher (100%): lenet300 91.7% after 10 epochs.
SYNTHETIC_VIEW_EPOCHS = 10


def distill(
    teacher: Path = typer.Option(..., "--teacher", "-t", help="Teacher .slim file, or hf:DIR (Hugging Face)."),
    student: str = typer.Option(
        ..., "--student", "-s", help="Student: a registered model name or a .slim file; for a Hugging Face teacher "
        "also every-other or layers:0,2,4 (the teacher's layers kept) or hf:DIR."
    ),
    data: str = typer.Option("digits", "--data", "-d", help="Data spec (training data, and the test split scored)."),
    temperature: float = typer.Option(4.0, "--temperature", help="Softmax temperature T (> 0)."),
    alpha: float | None = typer.Option(
        None, "--alpha", help="Weight of the soft-target loss in [0, 1] (default 0.9; 1 with --text: no labels)."
    ),
    features: list[str] = typer.Option(
        [], "--features", help="Feature hint TEACHER.MODULE:STUDENT.MODULE, e.g. stages.2:3 (repeatable)."
    ),
    feature_loss: str = typer.Option("mse", "--feature-loss", help="mse, cosine or attention."),
    feature_weight: float = typer.Option(1.0, "--feature-weight", help="Weight of each feature hint loss."),
    synthetic: str | None = typer.Option(
        None, "--synthetic", help="Use no real training images: bn-inversion, mixup or noise."
    ),
    synthetic_n: int | None = typer.Option(None, "--synthetic-n", help="Number of synthetic samples (default: the "
                                           "preset's, 512 for quick)."),
    synthetic_preset: str = typer.Option(
        "quick", "--synthetic-preset", help="quick (minutes on 2 cores) or thorough (4x the images, 2x the "
        "inversion steps at full resolution: ~16x the bn-inversion work)."),
    source_samples: int = typer.Option(
        20, "--source-samples", help="--synthetic mixup/noise: unlabelled training images used as seeds."
    ),
    epochs: int | None = typer.Option(
        None, "--epochs", help="Epochs (default: the student's recommended; at most 10 over a quick synthetic set)."),
    lr: float | None = typer.Option(None, "--lr", help="Learning rate (default: the student's recommended)."),
    batch_size: int | None = typer.Option(None, "--batch-size", help="Batch size."),
    augment_shift: int | None = typer.Option(
        None, "--augment-shift", help="Random +-pixel shifts (default: recommended; 0 with --cache-logits)."
    ),
    cache_logits: bool = typer.Option(False, "--cache-logits", help="Run the teacher once per training image."),
    cache_dir: Path | None = typer.Option(None, "--cache-dir", help="Keep cached teacher logits here across runs."),
    seed: int = typer.Option(0, "--seed", help="Random seed (student init, data order)."),
    out: Path = typer.Option(..., "--out", "-o", help="Output .slim file of the student."),
    force: bool = typer.Option(False, "--force", help="Replace an existing output file."),
    trust_factory: bool = typer.Option(False, "--trust-factory", help="Allow model factories outside torchslim."),
    progress: bool | None = PROGRESS_OPT,
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
    text: Path | None = typer.Option(
        None, "--text", help="Hugging Face teacher: unlabelled training text, one text per line."
    ),
    seq_len: int = typer.Option(128, "--seq-len", help="--text: tokens per training window."),
    ffn: float = typer.Option(0.0, "--ffn", help="Hugging Face student: fraction of FFN neurons removed first."),
    heads: float = typer.Option(0.0, "--heads", help="Hugging Face student: fraction of attention heads removed."),
    output_loss: str | None = typer.Option(
        None, "--output-loss", help="kl, mse or cosine (default: kl for logits, mse for hidden states)."
    ),
    match_layers: bool = typer.Option(
        True, "--match-layers/--no-match-layers", help="Hugging Face student: match every layer's hidden states too."
    ),
    dropout: float = typer.Option(0.0, "--dropout", help="Hugging Face student: dropout while distilling."),
) -> None:
    """Knowledge distillation (Hinton KD, FitNets hints, or data-free from synthetic inputs); saves the student.

    With a Hugging Face teacher (hf:DIR) the student learns from unlabelled text (--text): a copy of the teacher
    with fewer layers (every-other, layers:0,2,4) and/or narrower FFNs (--ffn), matching its outputs and, per
    layer, its hidden states.
    """
    import torch

    if str(teacher).startswith("hf:") or text is not None:
        _distill_hf(
            teacher, student, text, seq_len, ffn, heads, output_loss, match_layers, dropout, data=data,
            temperature=temperature,
            alpha=alpha, features=features, feature_loss=feature_loss, feature_weight=feature_weight,
            synthetic=synthetic, cache_logits=cache_logits or cache_dir is not None, epochs=epochs, lr=lr,
            batch_size=batch_size, augment_shift=augment_shift, seed=seed, out=out, force=force,
            trust_factory=trust_factory, progress=progress, json_output=json_output,
        )
        return
    if ffn or heads:
        raise ConfigError("--ffn/--heads are for a Hugging Face teacher (hf:DIR): prune other students with "
                          "torchslim prune --structured first")
    alpha = 0.9 if alpha is None else alpha

    from torchslim.distill import KD, SyntheticData
    from torchslim.fileio import check_output_path
    from torchslim.train import TrainConfig, recommended_config

    # Every flag is checked before anything is loaded or trained.
    if cache_dir is not None:
        cache_logits = True
    kd = KD(temperature=temperature, alpha=alpha, features=tuple(features), feature_weight=feature_weight,
            feature_loss=feature_loss, cache_logits=cache_logits, output_loss=output_loss or "kl")
    from torchslim.distill.synthetic import PRESETS

    if synthetic_preset not in PRESETS:
        raise ConfigError(f"--synthetic-preset = {synthetic_preset!r} is invalid: expected one of {', '.join(PRESETS)}")
    synth = None
    if synthetic is not None:
        sizes = {} if synthetic_n is None else {"n": synthetic_n}
        synth = SyntheticData.preset(synthetic_preset, method=synthetic, seed=seed, **sizes)
    if source_samples < 2:
        raise ConfigError(f"--source-samples = {source_samples} is invalid: expected an integer >= 2")
    student_file = student.endswith(".slim") or Path(student).is_file()
    inputs = [teacher] + ([Path(student)] if student_file else [])
    target = check_output_path(out, *inputs, force=force)
    base = TrainConfig() if student_file else recommended_config(student)
    # synthetic sets are small: shifted views of them teach more. The quick preset holds every shifted view,
    # labelled once (SyntheticData.shift_views), so the loop does not shift; otherwise the live teacher labels the
    # loop's randomly shifted batches (how benchmarks/distillation.py trains its data-free student)
    views = synth is not None and synth.shift_views > 0
    shift = augment_shift if augment_shift is not None else (0 if cache_logits or views else base.augment_shift)
    if epochs is None and views:  # 25x the samples per epoch: fewer passes (measured: see SYNTHETIC_VIEW_EPOCHS)
        epochs = min(base.epochs, SYNTHETIC_VIEW_EPOCHS)
    changes = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "augment_shift": shift, "seed": seed}
    train_config = base.replace(**{k: v for k, v in changes.items() if v is not None})

    from torchslim.artifact import load, read_manifest
    from torchslim.distill import distill as run_distill
    from torchslim.distributed import is_main_process, save_on_main, world_size
    from torchslim.measure import parameter_stats
    from torchslim.models.compat import check_model_data, create_model_for_data

    teacher_model = load(teacher, trust_factory=trust_factory)
    splits = load_data_for(data, teacher_model)
    if augment_shift is None and len(splits.input_shape) != 3:
        train_config = train_config.replace(augment_shift=0)  # the recommended shifts are for images only
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
        "synthetic": None if synth is None else {**synth.to_dict(),
                                                 "source_samples": 0 if source is None else len(source)},
    }
    measurements = {"accuracy": accuracy_after, "teacher_accuracy": teacher_accuracy, "data": data}
    if world_size() > 1:  # batch_size is per process: the global batch is world_size * batch_size
        stage["world_size"] = world_size()
    # Under torchrun every rank trained the same weights; rank 0 alone writes and reports.
    save_on_main(student_model, target, recipe=recipe + [stage], measurements=measurements)
    if not is_main_process():
        return
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


def _distill_hf(teacher: Path, student: str, text: Path | None, seq_len: int, ffn: float, heads: float,
                output_loss: str | None, match_layers: bool, dropout: float, *, data: str, temperature: float,
                alpha: float | None,
                features: list[str], feature_loss: str, feature_weight: float, synthetic: str | None,
                cache_logits: bool, epochs: int | None, lr: float | None, batch_size: int | None,
                augment_shift: int | None, seed: int, out: Path, force: bool, trust_factory: bool,
                progress: bool | None, json_output: bool) -> None:
    """``distill`` from a Hugging Face teacher on unlabelled text (see :func:`distill`)."""
    import torch

    from torchslim.distill import KD
    from torchslim.fileio import check_output_path
    from torchslim.prune.structural import ChannelPruning
    from torchslim.train import TrainConfig

    # Every flag is checked before anything is loaded or trained.
    for flag, given in (("--data", data != "digits"), ("--synthetic", synthetic is not None),
                        ("--cache-logits", cache_logits), ("--augment-shift", bool(augment_shift))):
        if given:
            raise ConfigError(f"{flag} is invalid with a Hugging Face teacher: it learns from unlabelled text "
                              "(--text FILE)")
    if text is None:
        raise ConfigError("--text is missing: a Hugging Face teacher (hf:DIR) needs unlabelled training text, "
                          "one text per line")
    if alpha is not None and alpha != 1.0:
        raise ConfigError(f"--alpha = {alpha} is invalid with --text: unlabelled text has no labels for the "
                          "(1 - alpha) cross-entropy term: expected 1.0")
    KD(temperature=temperature, features=tuple(features), feature_loss=feature_loss, feature_weight=feature_weight,
       output_loss=output_loss or "kl")
    pruning = ChannelPruning(amount=ffn, heads=heads) if ffn or heads else None
    if isinstance(dropout, bool) or not 0.0 <= dropout < 1.0:
        raise ConfigError(f"--dropout = {dropout} is invalid: expected a number in [0, 1)")
    keep = _layer_spec(student)
    train_config = TrainConfig(epochs=3, lr=1e-4, optimizer="adamw", batch_size=16)
    changes = {"epochs": epochs, "lr": lr, "batch_size": batch_size, "seed": seed}
    train_config = train_config.replace(**{k: v for k, v in changes.items() if v is not None})
    student_file = keep is None and not student.startswith("hf:")
    inputs = ([] if str(teacher).startswith("hf:") else [teacher]) + ([Path(student)] if student_file else [])
    target = check_output_path(out, *inputs, force=force)
    from torchslim.hf import read_texts

    texts = read_texts(text)

    from torchslim.artifact import load, read_manifest, save
    from torchslim.cli.common import is_hf_model, load_model_source, token_inputs
    from torchslim.distill import distill as run_distill
    from torchslim.hf import drop_layers, hidden_pairs, load_hf, prune_transformer_, set_dropout_, text_dataset
    from torchslim.measure import parameter_stats

    teacher_model, _, teacher_bytes = load_model_source(teacher, trust_factory=trust_factory)
    if not is_hf_model(teacher_model):
        raise ConfigError(f"--text is for a Hugging Face teacher (hf:DIR or a .slim made from one); {str(teacher)!r} "
                          "is not one: expected --data for image models")
    recipe = []
    if keep is not None:
        student_model = drop_layers(teacher_model, keep)
    elif student.startswith("hf:"):
        student_model = load_hf(student)
    else:
        student_model = load(Path(student), trust_factory=trust_factory)
        recipe = list(read_manifest(Path(student)).get("recipe") or [])
    if not is_hf_model(student_model):
        raise ConfigError(f"--student = {student!r} is invalid with a Hugging Face teacher: expected every-other, "
                          "layers:0,2,4, hf:DIR or a .slim made from a Hugging Face model")
    if pruning is not None:
        prune_transformer_(student_model, pruning, token_inputs(student_model, texts))
    set_dropout_(student_model, dropout)
    pairs = tuple(features) + (hidden_pairs(student_model, teacher_model) if match_layers else ())
    kind = output_loss or ("mse" if teacher_model.output == "hidden" else "kl")
    kd = KD(temperature=temperature, alpha=1.0, features=pairs, feature_loss=feature_loss,
            feature_weight=feature_weight, output_loss=kind)
    dataset = text_dataset(teacher_model, texts, seq_len=seq_len)
    before = _output_gap(student_model, teacher_model, dataset.tensors[0])
    torch.manual_seed(seed)
    run_distill(student_model, teacher_model, dataset, kd, train_config=train_config, progress=progress)
    after = _output_gap(student_model, teacher_model, dataset.tensors[0])
    stage = {
        "stage": "distill",
        "config": kd.to_dict(),
        "train": train_config.to_dict(),
        "teacher": str(teacher),
        "student": student,
        "pruning": None if pruning is None else pruning.to_dict(),
        "dropout": dropout,
        "text": str(text),
        "windows": int(dataset.tensors[0].shape[0]),
        "seq_len": int(dataset.tensors[0].shape[1]),
    }
    measurements = {"text_fidelity_to_teacher": {"before": before, "after": after, "text": str(text)}}
    save(student_model, target, recipe=recipe + [stage], measurements=measurements)
    summary = {
        "teacher": str(teacher),
        "student": student,
        "output": str(target),
        "teacher_parameters": parameter_stats(teacher_model)["parameters"],
        "student_parameters": parameter_stats(student_model)["parameters"],
        "teacher_bytes": teacher_bytes,
        "output_bytes": target.stat().st_size,
        "windows": stage["windows"],
        "output_loss": kind,
        "features": list(pairs),
        "before": before,
        "after": after,
    }
    if json_output:
        print_json(summary)
        return
    rows = [
        ["teacher", f"{summary['teacher_parameters']:,}", f"{teacher_bytes:,}", "", ""],
        ["student before", f"{summary['student_parameters']:,}", "", f"{before['cosine']:.4f}", f"{before['mse']:.4g}"],
        ["student distilled", f"{summary['student_parameters']:,}", f"{summary['output_bytes']:,}",
         f"{after['cosine']:.4f}", f"{after['mse']:.4g}"],
    ]
    console().print(table(f"distill {teacher} -> {target} ({stage['windows']} windows of {text}, {kind})",
                          ["", "parameters", "file bytes", "cosine to teacher", "mse to teacher"], rows))


def _layer_spec(student: str) -> str | None:
    """``every-other`` / ``layers:0,2,4`` -> the layers to keep (checked later against the depth), else None."""
    if student == "every-other":
        return student
    if student.startswith("layers:"):
        spec = student[len("layers:"):]
        if not spec or not all(p.strip().isdigit() for p in spec.split(",")):
            raise ConfigError(f"--student = {student!r} is invalid: expected layers:I,J,... with layer indices, "
                              "e.g. layers:0,2,4")
        return spec
    return None


def _output_gap(student, teacher, ids) -> dict[str, float]:
    """Per-token cosine similarity and mean squared error of the student's outputs vs the teacher's."""
    import torch
    import torch.nn.functional as F

    with torch.no_grad():
        got = torch.cat([student(ids[i:i + 16]).float() for i in range(0, ids.shape[0], 16)])
        want = torch.cat([teacher(ids[i:i + 16]).float() for i in range(0, ids.shape[0], 16)])
    return {"cosine": float(F.cosine_similarity(got, want, dim=-1).mean()), "mse": float(F.mse_loss(got, want))}
