"""Run a recipe: apply its stages in order, save and measure after each one, resume after an interruption.

Layout of the output directory::

    DIR/input.slim             the model given to compress (the "baseline" teacher on resume)
    DIR/stage-1-prune.slim     the model after each stage (reloaded and measured)
    DIR/model.slim             the final model; its manifest holds the recipe and the final measurement
    DIR/model.onnx ...         files of export stages
    DIR/compress.json          the recipe, the input and every stage's measurement (written after each stage)
    DIR/report.md / .html      the report (``torchslim report DIR`` rebuilds it from compress.json)

``resume=True`` reloads the last completed stage's ``.slim`` and skips the stages already done; the recipe's
completed stages must be the ones recorded in ``compress.json``.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from torchslim.errors import TorchSlimError
from torchslim.fileio import atomic_write_text
from torchslim.pipeline.recipe import OUTPUT_KINDS, Recipe, Stage

__all__ = ["CompressResult", "compress", "deploy_args", "save_and_measure", "sparse_qat_"]

STATE_FILE = "compress.json"


@dataclasses.dataclass
class CompressResult:
    """What :func:`compress` did.

    Attributes:
        recipe: the recipe that ran.
        out_dir: the output directory.
        input: the measured entry of the input model (``name``, ``artifact``, ``measurement`` ...).
        stages: one entry per stage: ``index``, ``kind``, ``description``, ``artifact``, ``measurement``,
            ``details`` (what the stage reported), ``seconds``, ``resumed`` (skipped because already done).
        final: path of ``model.slim``.
        exports: paths of the files written by export stages.
    """

    recipe: Recipe
    out_dir: Path
    input: dict[str, Any]
    stages: list[dict[str, Any]]
    final: Path
    exports: list[Path]

    @property
    def final_measurement(self) -> dict[str, Any]:
        """The measurement of the last stage (the final model)."""
        return self.stages[-1]["measurement"]


@dataclasses.dataclass
class _Context:
    splits: Any
    baseline: nn.Module
    out_dir: Path
    progress: bool | None
    teachers: dict[str, nn.Module] = dataclasses.field(default_factory=dict)
    artifact: str = ""  # the .slim of the current model (what a deploy stage deploys)


def compress(
    model: nn.Module,
    data: Any,
    recipe: Recipe,
    out_dir: str | Path,
    *,
    resume: bool = False,
    force: bool = False,
    progress: bool | None = None,
    latency: bool = True,
    input_recipe: list | None = None,
    report: bool = True,
) -> CompressResult:
    """Apply ``recipe`` to a copy of ``model``, saving and measuring the model after every stage.

    Args:
        model: the trained model (unchanged), built by ``create_model`` so it can be saved.
        data: the ``DataSplits`` (training for fine-tuning/QAT/distillation and calibration; test for accuracy).
        recipe: a validated :class:`~torchslim.pipeline.recipe.Recipe`.
        out_dir: the output directory (created).
        resume: continue a run in ``out_dir``: stages recorded as done are skipped.
        force: start over in an ``out_dir`` that already holds a run.
        progress: progress bars of the training loop (None: only on a terminal).
        latency: measure latency (batch 1 and 32) of every stage's artifact.
        input_recipe: how the input model was made (e.g. its manifest's recipe), kept in the final manifest.
        report: write ``report.md``/``report.html``/plots at the end.

    Returns:
        A :class:`CompressResult`.

    Raises:
        TorchSlimError: ``out_dir`` holds another run (without ``resume``/``force``), or the recipe differs from
            the run being resumed, or a reloaded artifact does not reproduce the model's outputs.
    """
    from torchslim.artifact import load

    out = Path(out_dir)
    state_path = out / STATE_FILE
    previous = _previous_state(state_path, recipe, resume=resume, force=force)
    out.mkdir(parents=True, exist_ok=True)
    splits = data
    baseline = copy.deepcopy(model).eval()
    input_recipe = list(input_recipe or [])
    state: dict[str, Any] = {
        "kind": "compress",
        "recipe": recipe.to_dict(),
        "description": recipe.describe(),
        "data": getattr(splits, "spec", None),
        "input": None,
        "stages": [],
    }
    if previous is not None:
        state["input"] = previous["input"]
        state["stages"] = previous["stages"]
    else:
        state["input"] = save_and_measure("input", baseline, out / "input.slim", splits, recipe=input_recipe,
                                          latency=latency, **deploy_args(out, "input", baseline, latency))
    _write_state(state_path, state)

    context = _Context(splits=splits, baseline=baseline, out_dir=out, progress=progress)
    current: nn.Module = copy.deepcopy(baseline)
    done = len(state["stages"])
    if done:
        current = load(state["stages"][-1]["model_artifact"])
    records = input_recipe + [_stage_record(s) for s in recipe.stages[:done]]
    exports = [Path(p) for entry in state["stages"] for p in entry.get("details", {}).get("files", [])]
    model_artifact = state["stages"][-1]["model_artifact"] if done else str(out / "input.slim")
    for stage in recipe.stages[done:]:
        started = time.perf_counter()
        context.artifact = model_artifact
        current, details = _run_stage(stage, current, context)
        records.append(_stage_record(stage))
        if stage.kind in OUTPUT_KINDS:
            entry = _measure_output(stage, details, splits, latency=latency, baseline=baseline)
        else:
            path = out / f"stage-{stage.label}.slim"
            entry = save_and_measure(stage.label, current, path, splits, recipe=records, latency=latency,
                                     **deploy_args(out, stage.label, baseline, latency))
            model_artifact = str(path)
        entry.update(index=stage.index, kind=stage.kind, description=stage.describe(), details=details,
                     seconds=round(time.perf_counter() - started, 2), model_artifact=model_artifact)
        exports += [Path(p) for p in details.get("files", [])]
        state["stages"].append(entry)
        _write_state(state_path, state)

    final_entry = next((e for e in reversed(state["stages"]) if e["kind"] not in OUTPUT_KINDS), state["input"])
    final = out / "model.slim"
    from torchslim.artifact import save

    final_model = load(state["stages"][-1]["model_artifact"])
    save(final_model, final, recipe=input_recipe + [{"stage": "compress", "name": recipe.name,
                                                     "recipe": recipe.to_dict(),
                                                     "stages": [_stage_record(s) for s in recipe.stages]}],
         measurements=final_entry["measurement"])
    state["final"] = str(final)
    _write_state(state_path, state)
    if report:
        from torchslim.pipeline.report import write_report

        write_report(out)
    return CompressResult(recipe=recipe, out_dir=out, input=state["input"], stages=state["stages"], final=final,
                          exports=exports)


def _previous_state(path: Path, recipe: Recipe, *, resume: bool, force: bool) -> dict[str, Any] | None:
    if not path.exists():
        return None
    if not resume:
        if force:
            return None
        raise TorchSlimError(f"{str(path.parent)!r} already holds a compress run ({path.name}): pass --resume "
                             "(resume=True) to continue it or --force (force=True) to start over")
    try:
        state = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, json.JSONDecodeError) as exc:
        raise TorchSlimError(f"cannot resume from {str(path)!r}: {exc}; remove it or pass --force") from exc
    done = state.get("stages", [])
    written = state.get("recipe", {}).get("stages", [])
    for entry in done:
        index = entry["index"]
        if index > len(recipe.stages) or written[index - 1] != recipe.stages[index - 1].spec:
            raise TorchSlimError(f"cannot resume {str(path.parent)!r}: stage {index} of the recipe differs from the "
                                 "one already run there; pass --force to start over")
    # keep only the stages whose artifact is still there (a later one may have been interrupted)
    kept = []
    for entry in done:
        if not (Path(entry["artifact"]).is_file() and Path(entry["model_artifact"]).is_file()):
            break
        kept.append(entry)
    state["stages"] = kept
    return state


def _write_state(path: Path, state: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(state, indent=2) + "\n")


def _stage_record(stage: Stage) -> dict[str, Any]:
    record: dict[str, Any] = {"stage": stage.kind, "config": stage.config.to_dict()}
    if stage.train:
        record["train"] = dict(stage.train)
    if stage.schedule is not None:
        record["schedule"] = stage.schedule.to_dict()
    if stage.teacher is not None:
        record["teacher"] = stage.teacher
    if stage.student is not None:
        record["student"] = stage.student
    return record


def save_and_measure(
    name: str,
    model: nn.Module,
    path: Path,
    splits: Any,
    *,
    recipe: list | None = None,
    latency: bool = True,
    deploy_to: Path | None = None,
    reference: nn.Module | None = None,
) -> dict[str, Any]:
    """Save ``model``, reload it, check the reload computes the same outputs, and measure the reloaded file.

    Args:
        name: the entry's name (a row of the report).
        model: the model to save.
        path: the ``.slim`` destination (written atomically).
        splits: ``DataSplits``; accuracy is measured on the test split.
        recipe: recorded in the manifest.
        latency: measure latency at batch 1 and 32.
        deploy_to: also deploy the saved file there (:func:`torchslim.deploy`: every route checked and timed
            against ``reference``) and keep the summary as the entry's ``deploy``.
        reference: the fp32 model the deployed routes are timed against (default: deploy's own rule).

    Returns:
        ``{"name", "artifact", "runtime", "recipe", "measurement"}`` (measurement as a dict), plus ``deploy``
        (:meth:`DeployReport.summary`) with ``deploy_to``.

    Raises:
        TorchSlimError: if the reloaded model's outputs differ from the saved model's.
    """
    from torchslim.artifact import input_signature, load, save
    from torchslim.measure import measure

    save(model, path, recipe=recipe, input_signature=input_signature(splits.example_inputs(1)))
    reloaded = load(path)
    test_x = splits.test.tensors[0]
    with torch.inference_mode():
        if not torch.equal(model.eval()(test_x), reloaded(test_x)):
            raise TorchSlimError(f"{path}: the reloaded model's outputs differ from the saved model's")
    measurement = measure(reloaded, splits, artifact_path=path, latency=latency)
    entry = {
        "name": name,
        "artifact": str(path),
        "runtime": getattr(reloaded, "runtime", "torch"),
        "recipe": recipe,
        "measurement": measurement.to_dict(),
    }
    if deploy_to is not None:
        from torchslim.deployment import deploy

        entry["deploy"] = deploy(path, deploy_to, data=splits, reference=reference, force=True).summary()
    return entry


def deploy_args(out: Path, label: str, reference: nn.Module, latency: bool) -> dict[str, Any]:
    """``save_and_measure``'s deploy arguments for one report row: ``DIR/deployed/LABEL``, timed against
    ``reference``; none without ``latency``."""
    return {"deploy_to": out / "deployed" / label, "reference": reference} if latency else {}


def _measure_output(stage: Stage, details: dict[str, Any], splits: Any, *, latency: bool,
                    baseline: nn.Module) -> dict[str, Any]:
    """Measure the file an export/deploy stage wrote (an ONNX graph under ONNX Runtime, or a ``.slim``).

    With ``latency``, an exported graph is also timed as deployed (as stored, against ``baseline``); a deploy
    stage's entry keeps the route it chose.
    """
    from torchslim.artifact import load
    from torchslim.measure import measure
    from torchslim.models.onnx_graph import OnnxGraph

    path = Path(details["files"][0])
    model = OnnxGraph.from_bytes(path.read_bytes()) if path.suffix == ".onnx" else load(path)
    measurement = measure(model, splits, latency=latency).to_dict()
    measurement["artifact_bytes"] = path.stat().st_size
    entry = {"name": f"{stage.label} ({path.name})", "artifact": str(path), "recipe": None,
             "runtime": details.get("route", getattr(model, "runtime", "torch")), "measurement": measurement}
    if stage.kind == "deploy":
        entry["deploy"] = {key: details[key] for key in ("route", "speedup", "latency_ms")}
    elif latency:
        from torchslim.deployment import deploy

        entry["deploy"] = deploy(path, None, data=splits, reference=baseline).summary()
    return entry


# --- stages ----------------------------------------------------------------------------------------
def _train_base(model: nn.Module):
    from torchslim.models import factory_of
    from torchslim.train import recommended_config

    factory = factory_of(model) or {}
    return recommended_config(str(factory.get("name", "")))


def _run_stage(stage: Stage, model: nn.Module, ctx: _Context) -> tuple[nn.Module, dict[str, Any]]:
    handler = {"prune": _prune, "distill": _distill, "quantize": _quantize, "finetune": _finetune,
               "export": _export, "deploy": _deploy}[stage.kind]
    return handler(stage, model, ctx)


def _prune(stage: Stage, model: nn.Module, ctx: _Context) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.prune import PruneSchedule, finalize_, prune_, prune_with_schedule
    from torchslim.train import train

    splits = ctx.splits
    if stage.config.structural:
        report = prune_(model, stage.config, example_inputs=splits.example_inputs(1), data=splits.train)
        details: dict[str, Any] = {"report": _plain(report)}
        if stage.train:
            run = train(model, splits.train, stage.train_config(_train_base(model)), progress=ctx.progress)
            details["train_history"] = run.history
        return model.eval(), details
    schedule = stage.schedule
    if schedule is None and stage.train.get("epochs"):
        schedule = PruneSchedule(kind="oneshot", steps=1, finetune_epochs=stage.train["epochs"])
    if schedule is None:
        report = prune_(model, stage.config, data=splits.train)
        finalize_(model)
        return model.eval(), {"report": report.to_dict()}
    result = prune_with_schedule(model, stage.config, schedule, splits.train,
                                 train_config=stage.train_config(_train_base(model)), progress=ctx.progress)
    return model.eval(), {"schedule": result.to_dict()}


def _teacher(name: str, ctx: _Context) -> nn.Module:
    if name == "baseline":
        return ctx.baseline
    if name not in ctx.teachers:
        if name.endswith(".slim"):
            from torchslim.artifact import load

            ctx.teachers[name] = load(name)
        else:
            ctx.teachers[name] = _train_new(name, ctx)
    return ctx.teachers[name]


def _train_new(name: str, ctx: _Context) -> nn.Module:
    from torchslim.models.compat import create_model_for_data
    from torchslim.train import recommended_config, set_seed, train

    config = recommended_config(name)
    set_seed(config.seed)
    model = create_model_for_data(name, ctx.splits.input_shape, ctx.splits.num_classes)
    train(model, ctx.splits.train, config, progress=ctx.progress)
    return model.eval()


def _distill(stage: Stage, model: nn.Module, ctx: _Context) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.distill.api import distill
    from torchslim.models.compat import create_model_for_data
    from torchslim.train import set_seed

    teacher = _teacher(stage.teacher or "baseline", ctx)
    student = model
    if stage.student is not None:
        set_seed(0)
        student = create_model_for_data(stage.student, ctx.splits.input_shape, ctx.splits.num_classes)
    train_config = stage.train_config(_train_base(student))
    result = distill(student, teacher, ctx.splits.train, stage.config, train_config=train_config,
                     progress=ctx.progress)
    student = result if isinstance(result, nn.Module) else student
    return student.eval(), {"teacher": stage.teacher, "student": stage.student or "current model"}


def sparse_qat_(model: nn.Module, config, train_data: Any, train_config, *, progress: bool | None = None,
                overrides: dict | None = None, loss_fn=None) -> dict:
    """Quantization-aware training that keeps the model's exact zeros at zero, then packed layers.

    Weights that are zero before QAT (pruned) stay zero: each QAT layer's weight is masked (``torch.nn.utils.prune``)
    while training, and an integer zero point makes a zero weight the code ``zero_point`` (stored as 0), so the
    artifact still stores those codes sparse.

    Args:
        model: the (pruned, finalized) float model; changed in place.
        config: the ``IntQuant`` config.
        train_data: labelled training data.
        train_config: the ``TrainConfig`` of the QAT epochs.
        progress: progress bars of the training loop.
        overrides: per-layer ``IntQuant`` configs by module name (mixed precision), as in ``prepare_qat_``.
        loss_fn: the training loss, as in :func:`torchslim.train.train` (e.g.
            :func:`torchslim.distill.kd_loss_fn` of the uncompressed model); None: cross-entropy.

    Returns:
        The converted layers and the layers skipped (``QuantizeReport`` as a dict).
    """
    from torch.nn.utils import prune as torch_prune

    from torchslim.prune import finalize_
    from torchslim.prune.api import PRUNABLE
    from torchslim.quantize.qat import QATLayer, convert_, prepare_qat_
    from torchslim.train import train

    masks = {name: module.weight.detach() != 0 for name, module in model.named_modules()
             if isinstance(module, PRUNABLE)}
    prepared = prepare_qat_(model, config, overrides=overrides)
    for name, module in model.named_modules():
        if isinstance(module, QATLayer) and name in masks and not bool(masks[name].all()):
            torch_prune.custom_from_mask(module, "weight", masks[name])
    train(model, train_data, train_config, loss_fn=loss_fn, progress=progress)
    finalize_(model)
    report = convert_(model)
    report.skipped.update(prepared.skipped)
    model.eval()
    return {"quantized": report.quantized, "skipped": report.skipped}


def _quantize(stage: Stage, model: nn.Module, ctx: _Context) -> tuple[nn.Module, dict[str, Any]]:
    """Dispatch on what the config says of itself: an ONNX graph, QAT, or ``quantize_`` (calibrated: GPTQ)."""
    from torchslim.quantize import quantize_, quantize_to_graph

    splits, config = ctx.splits, stage.config
    if config.produces_graph:
        graph = quantize_to_graph(model, config, splits)
        return graph, {"parity": _plain(getattr(graph, "parity", None)), "skipped": dict(graph.skipped or {})}
    if stage.train:
        details = sparse_qat_(model, config, splits.train, stage.train_config(_train_base(model)),
                              progress=ctx.progress)
        return model, {"qat": True, **details}
    report = quantize_(model, config, calib_inputs=splits if config.needs_calibration else None)
    return model.eval(), {"quantized": report.quantized, "skipped": report.skipped}


def _finetune(stage: Stage, model: nn.Module, ctx: _Context) -> tuple[nn.Module, dict[str, Any]]:
    from torchslim.train import train

    config = _train_base(model).replace(**stage.spec["finetune"])  # the model's recommended settings, overridden
    run = train(model, ctx.splits.train, config, progress=ctx.progress)
    return model.eval(), {"train_history": run.history}


def _export(stage: Stage, model: nn.Module, ctx: _Context) -> tuple[nn.Module, dict[str, Any]]:
    """Write the model as an ONNX graph through :func:`torchslim.export` (its parity check included)."""
    from torchslim.export import ExportConfig, export

    config = stage.config
    splits = ctx.splits
    path = ctx.out_dir / f"model{'' if config.quant == 'none' else '-' + config.quant}.onnx"
    export_config = ExportConfig(quant=config.quant, opset=config.opset)
    report = export(model, path, export_config, example_inputs=splits.example_inputs(1),
                    calib_data=splits.train if config.quant == "int8-static" else None,
                    parity_inputs=splits.test.tensors[0][:64])
    details: dict[str, Any] = {"quant": config.quant, "parity": _plain(report.parity), "notes": list(report.notes),
                               "files": [str(path)], "onnx_bytes": report.bytes}
    return model, details


def _deploy(stage: Stage, model: nn.Module, ctx: _Context) -> tuple[nn.Module, dict[str, Any]]:
    """Deploy the current model's ``.slim`` into ``DIR/deploy/`` (every route checked and timed)."""
    from torchslim.deployment import deploy

    config = stage.config
    report = deploy(ctx.artifact, ctx.out_dir / "deploy", target=config.target, batch_sizes=config.batch_sizes,
                    data=ctx.splits, reference=ctx.baseline, routes=config.routes,
                    max_accuracy_drop=config.max_accuracy_drop, force=True)
    return model, {**report.summary(), "files": [report.path]}


def _plain(value: Any) -> Any:
    """A JSON-safe version of a report object (``to_dict`` if it has one)."""
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    if hasattr(value, "to_dict"):
        return _plain(value.to_dict())
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return _plain(dataclasses.asdict(value))
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    return str(value)
