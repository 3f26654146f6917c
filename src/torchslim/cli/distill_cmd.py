"""``torchslim distill``: train a student (.slim or a registered model) to imitate a .slim teacher."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import TYPE_CHECKING, Any

import typer

from torchslim.cli.common import (
    PROGRESS_OPT,
    console,
    holdout_accuracy,
    is_hf_model,
    load_data_for,
    load_model_source,
    print_json,
    table,
    token_inputs,
)
from torchslim.config import Config
from torchslim.errors import ConfigError

if TYPE_CHECKING:
    from torchslim.distill import KD, SyntheticData
    from torchslim.prune.structural import ChannelPruning
    from torchslim.train import TrainConfig

# Epochs over a synthetic set of shifted views (quick preset: 512 images x 25 views = 12,800 samples, 200 steps an
# epoch at batch 64). Measured on digits with the demo's resnet teacher (100%): lenet300 91.7% after 10 epochs.
SYNTHETIC_VIEW_EPOCHS = 10


def distill(  # noqa: PLR0913 - Typer: each parameter is one command-line option
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
    options = DistillOptions(
        teacher=teacher, student=student, out=out, data=data, temperature=temperature, alpha=alpha,
        features=tuple(features), feature_loss=feature_loss, feature_weight=feature_weight, synthetic=synthetic,
        synthetic_n=synthetic_n, synthetic_preset=synthetic_preset, source_samples=source_samples, epochs=epochs,
        lr=lr, batch_size=batch_size, augment_shift=augment_shift, cache_logits=cache_logits, cache_dir=cache_dir,
        seed=seed, text=text, seq_len=seq_len, ffn=ffn, heads=heads, output_loss=output_loss,
        match_layers=match_layers, dropout=dropout,
    )  # every flag is checked here, before anything is loaded or trained
    run = _distill_hf if options.hf_teacher else _distill_images
    run(options, force=force, trust_factory=trust_factory, progress=progress, json_output=json_output)


@dataclasses.dataclass(frozen=True)
class DistillOptions(Config):
    """What ``torchslim distill`` was asked to do, checked as a whole on construction.

    Fields are the command's options (``--feature-loss`` is ``feature_loss``). A Hugging Face teacher (``hf:DIR``,
    or any teacher with ``--text``) learns from unlabelled text and refuses the image-data options; an image
    teacher refuses the Hugging Face student options. Errors name the flag, the value and what is allowed; the
    configs built from the flags (``KD``, ``SyntheticData``, ``TrainConfig``, ``ChannelPruning``) name their field.
    """

    teacher: Path
    student: str
    out: Path
    data: str = "digits"
    temperature: float = 4.0
    alpha: float | None = None
    features: tuple[str, ...] = ()
    feature_loss: str = "mse"
    feature_weight: float = 1.0
    synthetic: str | None = None
    synthetic_n: int | None = None
    synthetic_preset: str = "quick"
    source_samples: int = 20
    epochs: int | None = None
    lr: float | None = None
    batch_size: int | None = None
    augment_shift: int | None = None
    cache_logits: bool = False
    cache_dir: Path | None = None
    seed: int = 0
    text: Path | None = None
    seq_len: int = 128
    ffn: float = 0.0
    heads: float = 0.0
    output_loss: str | None = None
    match_layers: bool = True
    dropout: float = 0.0

    @property
    def hf_teacher(self) -> bool:
        """True when the teacher is a Hugging Face model distilled on text (``hf:DIR`` or ``--text``)."""
        return str(self.teacher).startswith("hf:") or self.text is not None

    @property
    def student_file(self) -> bool:
        """True when ``--student`` names a ``.slim`` file rather than a registered model or a layer choice."""
        if self.hf_teacher:
            return _layer_spec(self.student) is None and not self.student.startswith("hf:")
        return self.student.endswith(".slim") or Path(self.student).is_file()

    def validate(self) -> None:
        """Check the flags together; raise :class:`ConfigError` naming the first bad one."""
        if self.hf_teacher:
            self._check_text_flags()
            self.text_train_config()
            return
        if self.ffn or self.heads:
            raise ConfigError("--ffn/--heads are for a Hugging Face teacher (hf:DIR): prune other students with "
                              "torchslim prune --structured first")
        self.kd()
        self.synthetic_data()
        if self.source_samples < 2:
            raise ConfigError(f"--source-samples = {self.source_samples} is invalid: expected an integer >= 2")
        self.train_config()

    # --- image teachers ---
    def kd(self) -> KD:
        """The KD config of an image teacher (``--alpha`` defaults to 0.9; ``--cache-dir`` implies caching)."""
        from torchslim.distill import KD

        return KD(temperature=self.temperature, alpha=0.9 if self.alpha is None else self.alpha,
                  features=self.features, feature_weight=self.feature_weight, feature_loss=self.feature_loss,
                  cache_logits=self.caches_logits, output_loss=self.output_loss or "kl")

    @property
    def caches_logits(self) -> bool:
        """``--cache-logits``, or ``--cache-dir`` given."""
        return self.cache_logits or self.cache_dir is not None

    def synthetic_data(self) -> SyntheticData | None:
        """The synthetic set of ``--synthetic`` (None: train on the real images)."""
        from torchslim.distill import SyntheticData
        from torchslim.distill.synthetic import PRESETS

        if self.synthetic_preset not in PRESETS:
            raise ConfigError(f"--synthetic-preset = {self.synthetic_preset!r} is invalid: expected one of "
                              f"{', '.join(PRESETS)}")
        if self.synthetic is None:
            return None
        sizes = {} if self.synthetic_n is None else {"n": self.synthetic_n}
        return SyntheticData.preset(self.synthetic_preset, method=self.synthetic, seed=self.seed, **sizes)

    def train_config(self) -> TrainConfig:
        """The student's training settings: its recommended ones (defaults for a ``.slim`` student) plus the flags.

        Synthetic sets are small, so shifted views of them teach more: the quick preset holds every shifted view,
        labelled once (``SyntheticData.shift_views``), so the loop does not shift and runs at most
        :data:`SYNTHETIC_VIEW_EPOCHS` epochs; otherwise the live teacher labels the loop's randomly shifted batches
        (how ``benchmarks/distillation.py`` trains its data-free student).
        """
        from torchslim.train import TrainConfig, recommended_config

        base = TrainConfig() if self.student_file else recommended_config(self.student)
        synth = self.synthetic_data()
        views = synth is not None and synth.shift_views > 0
        shift = self.augment_shift
        if shift is None:
            shift = 0 if self.caches_logits or views else base.augment_shift
        epochs = self.epochs
        if epochs is None and views:  # 25x the samples per epoch: fewer passes (measured: see SYNTHETIC_VIEW_EPOCHS)
            epochs = min(base.epochs, SYNTHETIC_VIEW_EPOCHS)
        changes = {"epochs": epochs, "lr": self.lr, "batch_size": self.batch_size, "augment_shift": shift,
                   "seed": self.seed}
        return base.replace(**{k: v for k, v in changes.items() if v is not None})

    # --- Hugging Face teachers ---
    def _check_text_flags(self) -> None:
        for flag, given in (("--data", self.data != "digits"), ("--synthetic", self.synthetic is not None),
                            ("--cache-logits", self.caches_logits), ("--augment-shift", bool(self.augment_shift))):
            if given:
                raise ConfigError(f"{flag} is invalid with a Hugging Face teacher: it learns from unlabelled text "
                                  "(--text FILE)")
        if self.text is None:
            raise ConfigError("--text is missing: a Hugging Face teacher (hf:DIR) needs unlabelled training text, "
                              "one text per line")
        if self.alpha is not None and self.alpha != 1.0:
            raise ConfigError(f"--alpha = {self.alpha} is invalid with --text: unlabelled text has no labels for the "
                              "(1 - alpha) cross-entropy term: expected 1.0")
        self.text_kd(self.features, self.output_loss or "kl")
        self.pruning()
        if isinstance(self.dropout, bool) or not 0.0 <= self.dropout < 1.0:
            raise ConfigError(f"--dropout = {self.dropout} is invalid: expected a number in [0, 1)")
        _layer_spec(self.student)

    def text_kd(self, features: tuple[str, ...], output_loss: str) -> KD:
        """The KD config of a Hugging Face teacher: soft targets only (``alpha`` 1), ``features`` hint pairs."""
        from torchslim.distill import KD

        return KD(temperature=self.temperature, alpha=1.0, features=features, feature_loss=self.feature_loss,
                  feature_weight=self.feature_weight, output_loss=output_loss)

    def pruning(self) -> ChannelPruning | None:
        """The FFN/head pruning of a Hugging Face student (``--ffn``, ``--heads``), or None."""
        from torchslim.prune.structural import ChannelPruning

        return ChannelPruning(amount=self.ffn, heads=self.heads) if self.ffn or self.heads else None

    def text_train_config(self) -> TrainConfig:
        """A Hugging Face student's training settings: 3 epochs of AdamW at 1e-4, batch 16, plus the flags."""
        from torchslim.train import TrainConfig

        changes = {"epochs": self.epochs, "lr": self.lr, "batch_size": self.batch_size, "seed": self.seed}
        base = TrainConfig(epochs=3, lr=1e-4, optimizer="adamw", batch_size=16)
        return base.replace(**{k: v for k, v in changes.items() if v is not None})


# --- image teachers -----------------------------------------------------------------------------------------
def _distill_images(options: DistillOptions, *, force: bool, trust_factory: bool, progress: bool | None,
                    json_output: bool) -> None:
    """``distill`` from a ``.slim`` image teacher on labelled images or a synthetic set; save and report."""
    import torch

    from torchslim.artifact import load, read_manifest
    from torchslim.distill import distill as run_distill
    from torchslim.distributed import is_main_process, save_on_main, world_size
    from torchslim.fileio import check_output_path
    from torchslim.models.compat import check_model_data, create_model_for_data

    teacher, student, data = options.teacher, options.student, options.data
    inputs = [teacher] + ([Path(student)] if options.student_file else [])
    target = check_output_path(options.out, *inputs, force=force)
    kd, synth, train_config = options.kd(), options.synthetic_data(), options.train_config()
    teacher_model = load(teacher, trust_factory=trust_factory)
    splits = load_data_for(data, teacher_model)
    if options.augment_shift is None and len(splits.input_shape) != 3:
        train_config = train_config.replace(augment_shift=0)  # the recommended shifts are for images only
    recipe = []
    if options.student_file:
        student_model = load(Path(student), trust_factory=trust_factory)
        recipe = list(read_manifest(Path(student)).get("recipe") or [])
    else:
        torch.manual_seed(options.seed)
        student_model = create_model_for_data(student, splits.input_shape, splits.num_classes)
    check_model_data(student_model, splits.example_inputs(1), splits.num_classes, data)
    accuracy = {"teacher": holdout_accuracy(teacher_model, splits), "before": holdout_accuracy(student_model, splits)}
    source = None
    if synth is not None and synth.method != "bn-inversion":
        source = splits.train.tensors[0][:options.source_samples]  # images only: the labels are never read
    run_distill(student_model, teacher_model, synth if synth is not None else splits.train, kd,
                train_config=train_config, eval_data=splits.test, progress=progress, cache_dir=options.cache_dir,
                source=source, input_shape=splits.input_shape)
    accuracy["after"] = holdout_accuracy(student_model, splits)
    stage = {
        "stage": "distill",
        "config": kd.to_dict(),
        "train": train_config.to_dict(),
        "teacher": str(teacher),
        "data": data,
        "synthetic": None if synth is None else {**synth.to_dict(),
                                                 "source_samples": 0 if source is None else len(source)},
    }
    measurements = {"accuracy": accuracy["after"], "teacher_accuracy": accuracy["teacher"], "data": data}
    if world_size() > 1:  # batch_size is per process: the global batch is world_size * batch_size
        stage["world_size"] = world_size()
    # Under torchrun every rank trained the same weights; rank 0 alone writes and reports.
    save_on_main(student_model, target, recipe=recipe + [stage], measurements=measurements)
    if is_main_process():
        _report_images(options, target, teacher_model, student_model, accuracy, json_output)


def _report_images(options: DistillOptions, target: Path, teacher_model, student_model, accuracy: dict[str, float],
                   json_output: bool) -> None:
    """Print what an image distillation did (JSON, or a table of parameters, bytes and accuracies)."""
    from torchslim.measure import parameter_stats

    teacher, data, synthetic = options.teacher, options.data, options.synthetic
    summary = {
        "teacher": str(teacher),
        "student": options.student,
        "output": str(target),
        "teacher_parameters": parameter_stats(teacher_model)["parameters"],
        "student_parameters": parameter_stats(student_model)["parameters"],
        "teacher_accuracy": accuracy["teacher"],
        "student_accuracy_before": accuracy["before"],
        "student_accuracy": accuracy["after"],
        "teacher_bytes": teacher.stat().st_size,
        "output_bytes": target.stat().st_size,
        "synthetic": synthetic,
    }
    if json_output:
        print_json(summary)
        return
    rows = [
        ["teacher", f"{summary['teacher_parameters']:,}", f"{summary['teacher_bytes']:,}",
         f"{accuracy['teacher']:.2%}"],
        ["student before", f"{summary['student_parameters']:,}", "", f"{accuracy['before']:.2%}"],
        ["student distilled", f"{summary['student_parameters']:,}", f"{summary['output_bytes']:,}",
         f"{accuracy['after']:.2%}"],
    ]
    how = f"synthetic {synthetic}" if synthetic else data
    alpha = options.kd().alpha
    console().print(table(f"distill {teacher} -> {target} ({how}, T={options.temperature:g}, alpha={alpha:g})",
                          ["", "parameters", "file bytes", f"accuracy ({data} test)"], rows))


# --- Hugging Face teachers ----------------------------------------------------------------------------------
def _distill_hf(options: DistillOptions, *, force: bool, trust_factory: bool, progress: bool | None,
                json_output: bool) -> None:
    """``distill`` from a Hugging Face teacher on unlabelled text (see :func:`distill`); save and report."""
    import torch

    from torchslim.artifact import save
    from torchslim.distill import distill as run_distill
    from torchslim.fileio import check_output_path
    from torchslim.hf import hidden_pairs, read_texts, set_dropout_, text_dataset
    from torchslim.measure import parameter_stats

    teacher, text = options.teacher, options.text
    train_config = options.text_train_config()
    student_file = [Path(options.student)] if options.student_file else []
    inputs = ([] if str(teacher).startswith("hf:") else [teacher]) + student_file
    target = check_output_path(options.out, *inputs, force=force)
    texts = read_texts(text)
    teacher_model, _, teacher_bytes = load_model_source(teacher, trust_factory=trust_factory)
    if not is_hf_model(teacher_model):
        raise ConfigError(f"--text is for a Hugging Face teacher (hf:DIR or a .slim made from one); {str(teacher)!r} "
                          "is not one: expected --data for image models")
    student_model, recipe = _hf_student(options, teacher_model, texts, trust_factory)
    set_dropout_(student_model, options.dropout)
    pairs = options.features + (hidden_pairs(student_model, teacher_model) if options.match_layers else ())
    kind = options.output_loss or ("mse" if teacher_model.output == "hidden" else "kl")
    kd = options.text_kd(pairs, kind)
    dataset = text_dataset(teacher_model, texts, seq_len=options.seq_len)
    before = _output_gap(student_model, teacher_model, dataset.tensors[0])
    torch.manual_seed(options.seed)
    run_distill(student_model, teacher_model, dataset, kd, train_config=train_config, progress=progress)
    after = _output_gap(student_model, teacher_model, dataset.tensors[0])
    pruning = options.pruning()
    stage = {
        "stage": "distill",
        "config": kd.to_dict(),
        "train": train_config.to_dict(),
        "teacher": str(teacher),
        "student": options.student,
        "pruning": None if pruning is None else pruning.to_dict(),
        "dropout": options.dropout,
        "text": str(text),
        "windows": int(dataset.tensors[0].shape[0]),
        "seq_len": int(dataset.tensors[0].shape[1]),
    }
    measurements = {"text_fidelity_to_teacher": {"before": before, "after": after, "text": str(text)}}
    save(student_model, target, recipe=recipe + [stage], measurements=measurements)
    summary = {
        "teacher": str(teacher),
        "student": options.student,
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
    _report_hf(summary, target, text, json_output)


def _hf_student(options: DistillOptions, teacher_model, texts: list[str], trust_factory: bool) -> tuple[Any, list]:
    """The Hugging Face student (teacher layers kept, ``hf:DIR`` or a ``.slim``), pruned by ``--ffn/--heads``.

    Returns:
        ``(student, its recipe so far)``.
    """
    from torchslim.artifact import load, read_manifest
    from torchslim.hf import drop_layers, load_hf, prune_transformer_

    student, keep, recipe = options.student, _layer_spec(options.student), []
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
    pruning = options.pruning()
    if pruning is not None:
        prune_transformer_(student_model, pruning, token_inputs(student_model, texts))
    return student_model, recipe


def _report_hf(summary: dict[str, Any], target: Path, text: Path, json_output: bool) -> None:
    """Print what a text distillation did (JSON, or a table of parameters, bytes and fidelity to the teacher)."""
    if json_output:
        print_json(summary)
        return
    before, after = summary["before"], summary["after"]
    rows = [
        ["teacher", f"{summary['teacher_parameters']:,}", f"{summary['teacher_bytes']:,}", "", ""],
        ["student before", f"{summary['student_parameters']:,}", "", f"{before['cosine']:.4f}", f"{before['mse']:.4g}"],
        ["student distilled", f"{summary['student_parameters']:,}", f"{summary['output_bytes']:,}",
         f"{after['cosine']:.4f}", f"{after['mse']:.4g}"],
    ]
    console().print(table(f"distill {summary['teacher']} -> {target} ({summary['windows']} windows of {text}, "
                          f"{summary['output_loss']})",
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
