"""Budget-aware planner: the smallest (or fastest) model within an accuracy budget, found by measured search.

Steps, all deterministic for a seed:

1. Split the training data into a fine-tuning part and a held-out part (:func:`holdout_split`); candidates are
   fine-tuned, distilled and calibrated on the fine-tuning part only and every decision is made on the held-out
   part, never on the test split (which is only used to report the chosen model). The held-out part stands in for
   unseen data only if the input model was trained without it: train it on ``holdout_split(...)[0]`` (the headline
   benchmark does); a model trained on the whole training split scores ~100% there and the budget is optimistic.
2. Per-layer sensitivity of the input model: each layer quantized alone at each bit width, and each layer's weights
   magnitude-pruned alone at each sparsity (no fine-tuning), scored on the held-out data.
3. Search over structural ratio (``ChannelPruning.amount``, largest first, with or without distillation from the
   input model, or from a stronger ``teacher`` when one is given, during every recovery: after the structural step,
   between sparsity steps and in QAT), global sparsity (gradual magnitude pruning with fine-tuning) and bit width
   (quantization-aware training that keeps pruned weights at zero). Per-layer choices come from the sensitivities: a
   layer whose accuracy drop alone exceeds half the budget at a width gets the next wider one, and a small layer (<
   2% of the weights) that loses more than the budget alone at a sparsity stays dense. Intermediate models are
   cached and reused; along the sparsity and bit axes the search stops at the first candidate that misses the budget
   by more than ``search_slack`` points (a sparser one or fewer bits would only lose more; the slack absorbs the
   one-image noise of a small held-out split), and a structural ratio that misses it so is not refined further.
4. Every candidate is saved as a ``.slim`` file (its bytes are the file's) and scored; the chosen one is the best
   by ``target`` (file bytes, MACs or batch-1 latency) among those within the budget. A candidate is within the
   budget when its held-out drop is at most ``max_accuracy_drop`` minus ``margin_samples`` held-out images' worth
   (a margin against the one-image noise of a small held-out split; the floor never rises above the input model's
   own accuracy) and, for image data, its accuracy over the held-out images shifted by up to ``shift_check``
   pixels (every shift, so ~9x as many, correlated, evaluations) loses at most the same: a compressed model that
   keeps the exact held-out images but loses their neighbours would lose unseen images too. The search stops when
   the time budget is spent and keeps the best so far. With ``target="latency"`` each candidate within the budget
   is deployed (:func:`torchslim.deploy`: PyTorch, ONNX Runtime and OpenVINO routes, calibrated on the fine-tuning
   part, checked on the held-out part with no route below the accuracy floor) and ranked by the batch-1 latency of
   the route deploy picks, timed against the input model in the same run.
"""

from __future__ import annotations

import copy
import dataclasses
import itertools
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data import Subset, TensorDataset

from torchslim.config import Config, register_config
from torchslim.errors import TorchSlimError

__all__ = ["PlanResult", "PlannerConfig", "holdout_split", "holdout_warning", "plan", "parse_duration"]

TARGETS = ("size", "latency", "macs")
_METRIC = {"size": "file_bytes", "latency": "latency_b1_ms", "macs": "macs"}


@register_config("planner")
@dataclasses.dataclass(frozen=True)
class PlannerConfig(Config):
    """Settings of :func:`plan`.

    Args:
        max_accuracy_drop: the budget, in accuracy points (percent) below the input model on the held-out split.
        target: what to minimise within the budget: ``"size"`` (``.slim`` bytes), ``"latency"`` (batch 1, on the
            route :func:`torchslim.deploy` picks) or ``"macs"``.
        time_budget: seconds of search (> 0); the best candidate found so far is returned when it is spent.
        seed: seed of the held-out split and of every training run.
        holdout_fraction: fraction of the training split held out for decisions, in (0, 0.5].
        channel_amounts: structural ratios tried (``ChannelPruning.amount``), each in [0, 1).
        sparsities: global unstructured sparsities tried after the structural step, each in [0, 1).
        bits: weight bit widths tried (quantization-aware training), each in [2, 8].
        distill: also try recovery from structural pruning by distillation from the input model.
        recovery_epochs: fine-tuning epochs after structural pruning (and the final epochs of each sparsity step).
        qat_epochs: quantization-aware training epochs per bit width.
        search_slack: a branch of the search is abandoned only when a candidate misses the budget by more than this
            many points (>= 0).
        margin_samples: held-out images' worth of accuracy kept in reserve: a candidate must lose at most
            ``max_accuracy_drop - margin_samples / holdout_size`` points (never less than 0) to count (>= 0).
        shift_check: image data: a candidate must also lose at most that much accuracy over the held-out images
            shifted by every offset of up to this many pixels (0 switches the check off; >= 0).
    """

    max_accuracy_drop: float = 0.5
    target: str = "size"
    time_budget: float = 600.0
    seed: int = 0
    holdout_fraction: float = 0.2
    channel_amounts: tuple[float, ...] = (0.0, 0.25, 0.5, 0.7)
    sparsities: tuple[float, ...] = (0.8, 0.9, 0.95)
    bits: tuple[int, ...] = (4, 3, 2)
    distill: bool = True
    recovery_epochs: int = 24
    qat_epochs: int = 6
    search_slack: float = 1.0
    margin_samples: int = 1
    shift_check: int = 1

    def validate(self) -> None:
        """Check every field; raise :class:`ConfigError` naming the first bad one."""
        self.check_float("max_accuracy_drop", 0, 100)
        self.check_choice("target", TARGETS)
        self.check_float("time_budget", 0, lo_inclusive=False)
        self.check_int("seed", 0)
        self.check_float("holdout_fraction", 0, 0.5, lo_inclusive=False)
        for field, lo, hi in (("channel_amounts", 0.0, 1.0), ("sparsities", 0.0, 1.0)):
            values = getattr(self, field)
            if not isinstance(values, tuple) or not values or not all(
                    isinstance(v, (int, float)) and not isinstance(v, bool) and lo <= v < hi for v in values):
                raise self.fail(field, values, f"a non-empty tuple of numbers in [{lo}, {hi})")
        if not isinstance(self.bits, tuple) or not self.bits or not all(
                isinstance(b, int) and not isinstance(b, bool) and 2 <= b <= 8 for b in self.bits):
            raise self.fail("bits", self.bits, "a non-empty tuple of integers in [2, 8]")
        self.check_choice("distill", (True, False))
        self.check_int("recovery_epochs", 0)
        self.check_int("qat_epochs", 1)
        self.check_float("search_slack", 0)
        self.check_int("margin_samples", 0)
        self.check_int("shift_check", 0)


@dataclasses.dataclass
class PlanResult:
    """What :func:`plan` found.

    Attributes:
        model: the chosen model (None when no candidate met the budget).
        chosen: index of the chosen point in ``points`` (None if none met the budget).
        points: every evaluated candidate: ``label``, ``settings``, ``accuracy`` (held-out), ``file_bytes``,
            ``macs``, ``latency_b1_ms``, ``deployed_route`` and ``deployed_speedup_b1`` (target latency, candidates
            within the budget only: the deployed route's latency), ``shift_accuracy`` (held-out, shifted views; image
            data), ``ok`` (within budget), ``seconds``.
        front: indices of the Pareto-optimal points (file bytes vs held-out accuracy).
        sensitivity: ``{"bits": {bits: {layer: drop}}, "sparsity": {s: {layer: drop}}}`` (accuracy drops, points).
        baseline_accuracy: the input model's held-out accuracy.
        accuracy_floor: the held-out accuracy a candidate needed (budget minus the margin).
        shift_accuracy_floor: the accuracy over the shifted held-out views a candidate needed (None: no check).
        holdout_size: images in the held-out part.
        stopped_early: the time budget ran out before the search finished.
        seconds: wall time of the search.
    """

    model: nn.Module | None
    chosen: int | None
    points: list[dict[str, Any]]
    front: list[int]
    sensitivity: dict[str, Any]
    baseline_accuracy: float
    accuracy_floor: float
    shift_accuracy_floor: float | None
    holdout_size: int
    stopped_early: bool
    seconds: float

    def to_dict(self, config: PlannerConfig) -> dict[str, Any]:
        """The report's ``planner`` section (JSON-safe)."""
        chosen = None if self.chosen is None else self.points[self.chosen]
        floor = self.accuracy_floor
        summary = (f"Held-out split: {config.holdout_fraction:.0%} of the training data ({self.holdout_size} images, "
                   f"seed {config.seed}), unused for fine-tuning; input model {self.baseline_accuracy:.2%} there; "
                   f"budget {config.max_accuracy_drop} points less a margin of {config.margin_samples} image(s) "
                   f"(>= {floor:.2%}"
                   + ("" if self.shift_accuracy_floor is None else
                      f"; shifted by up to {config.shift_check} px: >= {self.shift_accuracy_floor:.2%}")
                   + f"); target {config.target}; {len(self.points)} candidates in {self.seconds:.0f} s"
                   f"{' (time budget spent: best so far)' if self.stopped_early else ''}. Chosen: "
                   f"{chosen['label'] if chosen else 'none met the budget'}"
                   + (f" (deployed: {chosen['deployed_route']}, {chosen['deployed_speedup_b1']:.2f}x the input model's "
                      "eager latency at batch 1)." if chosen and "deployed_route" in chosen else "."))
        return {"summary": summary, "points": self.points, "front": self.front, "chosen": self.chosen,
                "accuracy_floor": floor, "metric": config.target, "sensitivity": self.sensitivity,
                "config": config.to_dict(), "stopped_early": self.stopped_early}


def parse_duration(text: str) -> float:
    """Parse ``"90"``, ``"90s"``, ``"10m"`` or ``"1h"`` into seconds.

    Args:
        text: a positive number with an optional unit s, m or h.

    Returns:
        Seconds (> 0).

    Raises:
        ConfigError: an unparsable or non-positive duration.
    """
    from torchslim.errors import ConfigError

    value = str(text).strip().lower()
    scale = {"s": 1.0, "m": 60.0, "h": 3600.0}.get(value[-1:], None)
    number = value[:-1] if scale is not None else value
    try:
        seconds = float(number) * (scale or 1.0)
    except ValueError:
        seconds = -1.0
    if not seconds > 0 or seconds != seconds:
        raise ConfigError(f"--time-budget = {text!r} is invalid: expected a positive duration such as 90s, 10m, 1h")
    return seconds


def holdout_split(train_data: Any, *, fraction: float = 0.2, seed: int = 0) -> tuple[Subset, Subset]:
    """The planner's split of a training set into a fine-tuning part and a held-out part.

    The same ``fraction`` and ``seed`` always give the same split, so a model can be trained on the fine-tuning part
    before it is planned (then the held-out part is data it has never seen).

    Args:
        train_data: the training dataset (e.g. ``splits.train``).
        fraction: the held-out fraction, in (0, 0.5] (``PlannerConfig.holdout_fraction``).
        seed: the split's seed (``PlannerConfig.seed``).

    Returns:
        ``(fit, holdout)`` subsets of ``train_data`` (indices sorted, disjoint, covering it).

    Raises:
        ConfigError: ``fraction`` is outside (0, 0.5] or ``seed`` is negative.
    """
    PlannerConfig(holdout_fraction=fraction, seed=seed)  # validates both, naming the field
    generator = torch.Generator().manual_seed(seed)
    order = torch.randperm(len(train_data), generator=generator).tolist()
    cut = max(1, int(round(len(order) * fraction)))
    return Subset(train_data, sorted(order[cut:])), Subset(train_data, sorted(order[:cut]))


def holdout_warning(model: nn.Module, splits: Any, config: PlannerConfig) -> str | None:
    """One line of warning when the input model makes no mistake on the planner's held-out part, else None.

    A model that scores 100% there has most likely been trained on those images (e.g. on the whole training split),
    so the budget is judged on data it has seen and the test split may lose more than the budget.

    Args:
        model: the input model.
        splits: ``DataSplits`` (the held-out part is carved from ``splits.train``).
        config: the planner settings (``holdout_fraction``, ``seed``, ``max_accuracy_drop``).

    Returns:
        The warning text, or None.
    """
    from torchslim.measure import accuracy

    _, held = holdout_split(splits.train, fraction=config.holdout_fraction, seed=config.seed)
    if accuracy(model, held) < 1.0:
        return None
    return (f"the input model scores 100% on the planner's held-out part ({len(held)} training images, seed "
            f"{config.seed}), so it has probably been trained on them: held-out accuracy is optimistic and the test "
            f"split may lose more than {config.max_accuracy_drop:g} points; for an unbiased budget train it on "
            "torchslim.pipeline.planner.holdout_split(...)[0]")


class _Search:
    """The state of one planner run: data parts, cached intermediate models, explored points."""

    def __init__(self, model: nn.Module, splits: Any, config: PlannerConfig, progress: Callable[[str], None],
                 teacher: nn.Module | None = None):
        from torchslim.train import recommended_config

        self.config = config
        self.splits = splits
        self.say = progress
        self.started = time.perf_counter()
        self.baseline = copy.deepcopy(model).eval()
        # the model the distilled branch learns from: the input model unless a stronger one is given
        self.teacher = self.baseline if teacher is None else teacher
        self.train, self.holdout = holdout_split(splits.train, fraction=config.holdout_fraction, seed=config.seed)
        from torchslim.models import factory_of

        self.train_config = recommended_config(str((factory_of(model) or {}).get("name", ""))).replace(
            seed=config.seed)
        self.example = splits.example_inputs(1)
        self.points: list[dict[str, Any]] = []
        self.models: dict[int, nn.Module] = {}
        self.best: tuple[float, int] | None = None
        self.stopped = False
        self.base_accuracy = self.accuracy(self.baseline)
        allowed = max(0.0, config.max_accuracy_drop / 100 - config.margin_samples / len(self.holdout))
        self.floor = self.base_accuracy - allowed - 1e-9
        self.shifted = _shifted_views(self.holdout, config.shift_check)
        self.shift_floor = None if self.shifted is None else self.shift_accuracy(self.baseline) - allowed - 1e-9
        self.tmp = tempfile.TemporaryDirectory(prefix="torchslim-plan-")
        self.deploy_data = _deploy_data(splits, self.train, self.holdout) if config.target == "latency" else None
        self.reference_ms: float | None = None

    def deployed_latency(self, path: Path, accuracy: float) -> dict[str, Any]:
        """Deploy the candidate's file (routes checked on the held-out part, none below the floor); its b1 latency.

        Latencies are ratios to the input model timed in the same deploy run, scaled by the input model's first
        measured latency, so candidates deployed minutes apart compare without the machine's drift.
        """
        from torchslim.deployment import deploy

        budget = max(0.0, (accuracy - self.floor) * 100 - 1e-6)
        report = deploy(path, None, data=self.deploy_data, reference=self.baseline, batch_sizes=(1,),
                        max_accuracy_drop=budget)
        if self.reference_ms is None:
            self.reference_ms = report.baseline_ms[1]
        speedup = report.best.speedup[1]
        return {"latency_b1_ms": self.reference_ms / speedup, "deployed_route": report.chosen,
                "deployed_speedup_b1": speedup}

    def accuracy(self, model: nn.Module) -> float:
        from torchslim.measure import accuracy

        return accuracy(model, self.holdout)

    def shift_accuracy(self, model: nn.Module) -> float:
        from torchslim.measure import accuracy

        return accuracy(model, self.shifted)

    def out_of_time(self) -> bool:
        if time.perf_counter() - self.started > self.config.time_budget:
            self.stopped = True
        return self.stopped

    def evaluate(self, model: nn.Module, label: str, settings: dict[str, Any], started: float) -> dict[str, Any]:
        """Save, score and record one candidate; keep the model if it is the best so far."""
        from torchslim.artifact import save
        from torchslim.measure.macs import count_macs

        path = Path(self.tmp.name) / "candidate.slim"
        save(model, path)
        point = {"label": label, "settings": settings, "accuracy": self.accuracy(model),
                 "file_bytes": path.stat().st_size, "macs": count_macs(model, self.example)}
        point["ok"] = point["accuracy"] >= self.floor
        if self.shifted is not None:
            point["shift_accuracy"] = self.shift_accuracy(model)
            point["ok"] = point["ok"] and point["shift_accuracy"] >= self.shift_floor
        if self.config.target == "latency" and point["ok"]:  # only candidates within the budget can be chosen
            point.update(self.deployed_latency(path, point["accuracy"]))
        point["explore"] = point["accuracy"] >= self.floor - self.config.search_slack / 100
        point["seconds"] = round(time.perf_counter() - started, 2)
        index = len(self.points)
        self.points.append(point)
        shifted = f" (shifted {point['shift_accuracy']:.2%})" if "shift_accuracy" in point else ""
        self.say(f"[{index}] {label}: held-out {point['accuracy']:.2%}{shifted}, {point['file_bytes']:,} B"
                 f"{'' if point['ok'] else ' (over budget)'}")
        if point["ok"]:
            score = point[_METRIC[self.config.target]]
            if self.best is None or score < self.best[0]:
                self.best = (score, index)
                self.models = {index: copy.deepcopy(model)}
        return point


def _deploy_data(splits: Any, train: Subset, holdout: Subset) -> Any:
    """``splits`` with the fine-tuning part as its training split and the held-out part as its test split.

    What the planner's deploy runs calibrate on and check accuracy on: the test split stays unseen.

    Raises:
        TorchSlimError: the data are not tensors (``target="latency"`` deploys every candidate).
    """
    from torchslim.train import _tensors_of

    parts = _tensors_of(train), _tensors_of(holdout)
    if any(p is None for p in parts) or not dataclasses.is_dataclass(splits):
        raise TorchSlimError("planner target='latency' needs DataSplits of tensors (from torchslim.data.load_data)")
    return dataclasses.replace(splits, train=TensorDataset(*parts[0]), test=TensorDataset(*parts[1]))


def _shifted_views(data: Any, radius: int) -> TensorDataset | None:
    """``data``'s images shifted by every offset in ``[-radius, radius]^2`` (edges replicated), or None.

    None when ``radius`` is 0 or the samples are not ``(C, H, W)`` images in tensors.
    """
    from torchslim.train import _tensors_of

    tensors = _tensors_of(data)
    if radius == 0 or tensors is None or tensors[0].ndim != 4 or min(tensors[0].shape[2:]) <= 2 * radius:
        return None
    x, y = tensors[0], tensors[1]
    _, _, h, w = x.shape
    padded = F.pad(x, (radius,) * 4, mode="replicate")
    offsets = range(-radius, radius + 1)
    views = [padded[:, :, radius + dy:radius + dy + h, radius + dx:radius + dx + w] for dy in offsets for dx in offsets]
    return TensorDataset(torch.cat(views), y.repeat(len(views)))


def plan(
    model: nn.Module,
    splits: Any,
    config: PlannerConfig | None = None,
    *,
    progress: Callable[[str], None] | None = None,
    teacher: nn.Module | None = None,
) -> PlanResult:
    """Search compressed versions of ``model`` for the best one within an accuracy budget.

    Args:
        model: the trained float model (unchanged), built by ``create_model``.
        splits: ``DataSplits``; the held-out part is carved from ``splits.train``.
        config: a :class:`PlannerConfig` (default ``PlannerConfig()``).
        progress: called with one line per step (None: silent).
        teacher: the model the distilled candidates learn from (frozen, unchanged; any architecture with the same
            classes), e.g. a larger model trained on the same fine-tuning part; None: the input model. The budget
            is still measured against the input model.

    Returns:
        A :class:`PlanResult` (``model`` is None when no candidate met the budget).

    Raises:
        ConfigError: a ``teacher`` while ``config.distill`` is False.
        ModelError: a ``teacher`` whose outputs do not match the model's classes.
    """
    config = config or PlannerConfig()
    if teacher is not None:
        _check_teacher_settings(model, teacher, config)
    search = _Search(model, splits, config, progress or (lambda _line: None), teacher)
    teacher_was_training = teacher is not None and teacher.training
    try:
        if teacher is not None:
            teacher.eval()  # a BatchNorm teacher in train mode would give batch statistics and change its own
            _check_teacher_outputs(search.baseline, teacher, splits)
        sensitivity = _sensitivity(search)
        _explore(search, sensitivity)
    finally:
        search.tmp.cleanup()
        if teacher is not None:
            teacher.train(teacher_was_training)
    from torchslim.measure.plots import pareto_front

    front = pareto_front([(p["file_bytes"], p["accuracy"]) for p in search.points])
    chosen = None if search.best is None else search.best[1]
    return PlanResult(model=None if chosen is None else search.models[chosen], chosen=chosen, points=search.points,
                      front=front, sensitivity=sensitivity, baseline_accuracy=search.base_accuracy,
                      accuracy_floor=search.floor + 1e-9,
                      shift_accuracy_floor=None if search.shift_floor is None else search.shift_floor + 1e-9,
                      holdout_size=len(search.holdout),
                      stopped_early=search.stopped, seconds=round(time.perf_counter() - search.started, 1))


def _sensitivity(search: _Search) -> dict[str, Any]:
    """Per-layer accuracy drops (points) on the held-out data: quantized alone per width, pruned alone per sparsity."""
    from torchslim.prune import MagnitudePruning, finalize_, prune_
    from torchslim.quantize import IntQuant
    from torchslim.quantize import sensitivity as quant_sensitivity

    result: dict[str, Any] = {"bits": {}, "sparsity": {}, "parameters": {}}
    for bits in sorted(set(search.config.bits)):
        rows = quant_sensitivity(search.baseline, search.holdout, IntQuant(bits=bits, granularity="channel"))
        result["bits"][str(bits)] = {r.layer: round(100 * r.accuracy_drop, 3) for r in rows}
    from torchslim.prune.api import prunable_layers

    layers = prunable_layers(search.baseline)[0]
    result["parameters"] = {name: module.weight.numel() for name, module in layers.items()}
    for sparsity in sorted(set(search.config.sparsities)):
        drops = {}
        for name in layers:
            trial = copy.deepcopy(search.baseline)
            prune_(trial, MagnitudePruning(scope="layer", amount=sparsity),
                   filter_fn=lambda _m, layer, target=name: layer == target)
            finalize_(trial)
            drops[name] = round(100 * (search.base_accuracy - search.accuracy(trial)), 3)
        result["sparsity"][str(sparsity)] = drops
    search.say(f"sensitivity of {len(layers)} layers at bits {list(result['bits'])} and sparsities "
               f"{list(result['sparsity'])} done")
    return result


def _layer_bits(sensitivity: dict[str, Any], bits: int, budget: float) -> dict[str, int]:
    """Per-layer widths: ``bits``, or the next wider width whose drop alone is within half the budget (else 8)."""
    widths = sorted(int(b) for b in sensitivity["bits"])
    chosen = {}
    for layer in sensitivity["bits"][str(bits)]:
        wider = [b for b in widths if b >= bits] + [8]
        chosen[layer] = next((b for b in wider if b == 8 or sensitivity["bits"][str(b)][layer] <= budget / 2), 8)
    return chosen


def _dense_layers(sensitivity: dict[str, Any], sparsity: float, budget: float) -> list[str]:
    """Small layers (< 2% of the weights) that lose more than the budget when pruned alone: kept dense."""
    total = sum(sensitivity["parameters"].values())
    drops = sensitivity["sparsity"][str(sparsity)]
    return sorted(name for name, count in sensitivity["parameters"].items()
                  if count < 0.02 * total and drops[name] > budget)


def _explore(search: _Search, sensitivity: dict[str, Any]) -> None:
    from torchslim.prune import ChannelPruning, MagnitudePruning, PruneSchedule, prune_, prune_with_schedule
    from torchslim.quantize import IntQuant
    from torchslim.train import train

    config = search.config
    budget = config.max_accuracy_drop
    # distilled recovery first: it usually holds the budget further, so it gets the time budget first
    recoveries = [True, False] if config.distill else [False]
    # the narrowest structure first: it gives the smallest (and fastest) candidates if it holds the budget
    for amount, distilled in itertools.product(sorted(set(config.channel_amounts), reverse=True), recoveries):
        if search.out_of_time():
            return
        started = time.perf_counter()
        structural = copy.deepcopy(search.baseline)
        settings: dict[str, Any] = {"channel_amount": amount, "distill": distilled}
        teacher = search.teacher if distilled else None
        loss_fn = None
        if distilled:
            from torchslim.distill.api import KD, kd_loss_fn

            loss_fn = kd_loss_fn(teacher, KD())
        if amount > 0:
            torch.manual_seed(config.seed)
            prune_(structural, ChannelPruning(amount=amount), example_inputs=search.example, data=search.train)
            recovery = search.train_config.replace(epochs=max(1, config.recovery_epochs))
            train(structural, search.train, recovery, loss_fn=loss_fn, progress=False)
            structural.eval()
            point = search.evaluate(structural, _label(settings), dict(settings), started)
            if not point["explore"]:
                continue  # narrower + sparser + fewer bits would only lose more
        for sparsity in sorted(set(config.sparsities)):
            if search.out_of_time():
                return
            started = time.perf_counter()
            sparse = copy.deepcopy(structural)
            dense = _dense_layers(sensitivity, sparsity, budget)
            settings_s = {**settings, "sparsity": sparsity, "dense_layers": dense}
            prune_with_schedule(
                sparse, MagnitudePruning(scope="global", amount=sparsity),
                PruneSchedule(kind="gradual", steps=3, epochs_per_step=2,
                              finetune_epochs=max(1, config.recovery_epochs // 2)),
                search.train, train_config=search.train_config.replace(lr=search.train_config.lr / 2),
                filter_fn=lambda _m, name, skip=tuple(dense): name not in skip, progress=False, loss_fn=loss_fn)
            point = search.evaluate(sparse, _label(settings_s), dict(settings_s), started)
            if not point["explore"]:
                break
            for bits in sorted(set(config.bits), reverse=True):
                if search.out_of_time():
                    return
                started = time.perf_counter()
                layer_bits = _layer_bits(sensitivity, bits, budget)
                overrides = {name: IntQuant(bits=b, granularity="channel") for name, b in layer_bits.items()
                             if b != bits}
                quantized = copy.deepcopy(sparse)
                from torchslim.pipeline.compress import sparse_qat_

                qat_config = search.train_config.replace(epochs=config.qat_epochs, lr=search.train_config.lr / 10)
                existing = {name for name, _ in quantized.named_modules()}
                sparse_qat_(quantized, IntQuant(bits=bits, granularity="channel"), search.train, qat_config,
                            overrides={k: v for k, v in overrides.items() if k in existing}, progress=False,
                            loss_fn=loss_fn)
                settings_q = {**settings_s, "bits": bits,
                              "wider_layers": {k: v.bits for k, v in overrides.items() if k in existing}}
                point = search.evaluate(quantized, _label(settings_q), settings_q, started)
                if not point["explore"]:
                    break


def _check_teacher_settings(model: nn.Module, teacher: nn.Module, config: PlannerConfig) -> None:
    from torchslim.errors import ConfigError, ModelError

    if not config.distill:
        raise ConfigError("plan teacher= needs PlannerConfig.distill = True: the teacher is only used to distill")
    if not isinstance(teacher, nn.Module) or teacher is model:
        raise ModelError("plan teacher= must be a separate nn.Module (a trained model with the same classes)")


def _check_teacher_outputs(baseline: nn.Module, teacher: nn.Module, splits: Any) -> None:
    """Both models in eval mode: the teacher's outputs must have the baseline's shape."""
    from torchslim.errors import ModelError

    with torch.no_grad():
        example = splits.example_inputs(2)
        got, want = teacher(example), baseline(example)
    if not isinstance(got, torch.Tensor) or got.shape != want.shape:
        raise ModelError(f"plan teacher= outputs {tuple(getattr(got, 'shape', ()))} for 2 samples: expected "
                         f"{tuple(want.shape)} like the model")


def _label(settings: dict[str, Any]) -> str:
    parts = [f"ch{settings['channel_amount']:g}" + ("+kd" if settings.get("distill") else "")]
    if "sparsity" in settings:
        parts.append(f"sp{settings['sparsity']:g}")
    if "bits" in settings:
        parts.append(f"{settings['bits']}b" + (f"({len(settings['wider_layers'])} wider)"
                                                if settings.get("wider_layers") else ""))
    return " ".join(parts)


def planned_recipe(point: dict[str, Any]) -> list[dict[str, Any]]:
    """The manifest record of a planner candidate: the stages it ran, in order."""
    from torchslim.prune import ChannelPruning, MagnitudePruning
    from torchslim.quantize import IntQuant

    settings = point["settings"]
    recovery = "distill" if settings.get("distill") else "finetune"
    stages: list[dict[str, Any]] = []
    if settings.get("channel_amount"):
        stages.append({"stage": "prune", "config": ChannelPruning(amount=settings["channel_amount"]).to_dict(),
                       "recovery": recovery})
    if "sparsity" in settings:
        stages.append({"stage": "prune",
                       "config": MagnitudePruning(scope="global", amount=settings["sparsity"]).to_dict(),
                       "schedule": "gradual", "dense_layers": settings.get("dense_layers", []), "recovery": recovery})
    if "bits" in settings:
        stages.append({"stage": "quantize", "config": IntQuant(bits=settings["bits"], granularity="channel").to_dict(),
                       "overrides": settings.get("wider_layers", {}), "qat": True, "recovery": recovery})
    return stages


def check_model(model: Any) -> None:
    """Refuse inputs the planner cannot search (an int8 graph, an already quantized model)."""
    from torchslim.quantize.layers import _WeightOnlyLayer

    if not isinstance(model, nn.Module) or any(isinstance(m, _WeightOnlyLayer) for m in model.modules()) or \
            type(model).__name__ == "OnnxGraph":
        raise TorchSlimError("planner: the input model must be a float model (not quantized): expected the .slim of "
                             "a trained model, e.g. from torchslim train")


def run_planner(
    model: nn.Module,
    splits: Any,
    config: PlannerConfig,
    out_dir: str | Path,
    *,
    input_recipe: list | None = None,
    progress: Callable[[str], None] | None = None,
    latency: bool = True,
    teacher: nn.Module | None = None,
    teacher_name: str | None = None,
) -> dict[str, Any]:
    """Run :func:`plan`, save the chosen model as ``DIR/model.slim`` and write the report (explored points included).

    Args:
        model: the trained float model (unchanged).
        splits: ``DataSplits``.
        config: the planner settings.
        out_dir: the output directory (created).
        input_recipe: how the input model was made (kept in the manifest).
        progress: called with one line per step.
        latency: measure the latency of the input and chosen models, eager and deployed (``DIR/deployed/input``,
            ``DIR/deployed/planned``: :func:`torchslim.deploy` against the input model, checked on the test split).
        teacher: the distilled candidates' teacher (see :func:`plan`); None: the input model.
        teacher_name: how the manifest and report name the teacher (e.g. its file).

    Returns:
        ``{"report": report data, "chosen": point or None, "final": path or None}``.

    Raises:
        TorchSlimError: no candidate met the budget (the report of the explored points is still written).
    """
    from torchslim.pipeline.compress import deploy_args, save_and_measure
    from torchslim.pipeline.report import write_report

    check_model(model)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    result = plan(model, splits, config, progress=progress, teacher=teacher)
    teacher_label = "the input model" if teacher is None else (teacher_name or type(teacher).__name__)
    records = list(input_recipe or [])
    results = [save_and_measure("input", model, out / "input.slim", splits, recipe=records, latency=latency,
                                **deploy_args(out, "input", model, latency))]
    final = None
    if result.model is not None:
        point = result.points[result.chosen]
        final = out / "model.slim"
        entry = save_and_measure(f"planned ({point['label']})", result.model, final, splits,
                                 recipe=records + [{"stage": "plan", "config": config.to_dict(),
                                                    "teacher": teacher_label,
                                                    "stages": planned_recipe(point)}], latency=latency,
                                 **deploy_args(out, "planned", model, latency))
        results.append(entry)
    planner = result.to_dict(config)
    planner["summary"] += f" Distillation teacher: {teacher_label}."
    data = {"title": f"torchslim compress: planner ({config.target}, max drop {config.max_accuracy_drop} points)",
            "intro": ["Decisions use the held-out part of the training split (never used for fine-tuning); the table "
                      "reports the test split. "
                      "Every row is measured on the reloaded `.slim` file; ratio and speedup are against the input "
                      "model."],
            "baseline": "input", "results": results, "planner": planner}
    write_report(out, data)
    if result.model is None:
        raise TorchSlimError(f"planner: no candidate kept the held-out accuracy at or above "
                             f"{result.accuracy_floor:.2%} (input {result.baseline_accuracy:.2%}, budget "
                             f"{config.max_accuracy_drop} points less "
                             f"{config.margin_samples} image(s)) ({len(result.points)} explored); see "
                             f"{out / 'report.md'}")
    return {"report": data, "chosen": result.points[result.chosen], "final": str(final)}
