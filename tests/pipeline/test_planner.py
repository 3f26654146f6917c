"""Budget planner on a small model: chooses the smallest candidate within the budget, honours the time budget."""

import pytest

from torchslim.errors import ConfigError
from torchslim.pipeline.planner import PlannerConfig, holdout_split, parse_duration, plan

FAST = dict(channel_amounts=(0.0,), sparsities=(0.5, 0.8), bits=(4,), distill=False, recovery_epochs=1,
            qat_epochs=1, max_accuracy_drop=5.0)


def test_planner_picks_the_smallest_candidate_within_budget(small_model, digits):
    result = plan(small_model, digits, PlannerConfig(**FAST))
    assert result.model is not None and not result.stopped_early
    ok = [p for p in result.points if p["ok"]]
    chosen = result.points[result.chosen]
    assert chosen["file_bytes"] == min(p["file_bytes"] for p in ok)
    assert chosen["accuracy"] >= result.baseline_accuracy - 0.05
    assert chosen["settings"]["bits"] == 4  # a quantized candidate is smaller than any float one
    assert set(result.sensitivity["bits"]) == {"4"} and set(result.sensitivity["sparsity"]) == {"0.5", "0.8"}
    assert result.front and all(0 <= i < len(result.points) for i in result.front)
    # the budget less one held-out image's worth (287 held-out images)
    assert result.holdout_size == 287
    assert result.accuracy_floor == pytest.approx(result.baseline_accuracy - (0.05 - 1 / 287))
    assert all(p["ok"] == (p["accuracy"] >= result.accuracy_floor - 1e-9
                           and p["shift_accuracy"] >= result.shift_accuracy_floor - 1e-9) for p in result.points)


def test_holdout_split_is_deterministic_disjoint_and_covers_train(digits):
    fit, held = holdout_split(digits.train)
    assert (len(fit), len(held)) == (1150, 287)
    assert not set(fit.indices) & set(held.indices)
    assert sorted(fit.indices + held.indices) == list(range(len(digits.train)))
    assert holdout_split(digits.train)[1].indices == held.indices
    assert holdout_split(digits.train, seed=1)[1].indices != held.indices
    with pytest.raises(ConfigError, match=r"PlannerConfig.holdout_fraction = 0.6 is invalid"):
        holdout_split(digits.train, fraction=0.6)


def test_planner_stops_within_the_time_budget(small_model, digits):
    result = plan(small_model, digits, PlannerConfig(**{**FAST, "time_budget": 1e-6}))
    assert result.stopped_early and result.model is None and result.points == []


def test_planner_config_and_duration_errors():
    with pytest.raises(ConfigError, match=r"PlannerConfig.target = 'speed' is invalid: expected one of 'size'"):
        PlannerConfig(target="speed")
    with pytest.raises(ConfigError, match=r"PlannerConfig.bits = \(1,\) is invalid"):
        PlannerConfig(bits=(1,))
    with pytest.raises(ConfigError, match=r"PlannerConfig.margin_samples = -1 is invalid"):
        PlannerConfig(margin_samples=-1)
    assert parse_duration("10m") == 600 and parse_duration("90s") == 90 and parse_duration("2") == 2
    with pytest.raises(ConfigError, match="--time-budget = '-1m' is invalid"):
        parse_duration("-1m")


def test_distilled_branch_distills_in_every_recovery_step(small_model, digits, monkeypatch):
    import torchslim.distill.api as kd_api
    from torchslim.pipeline.planner import planned_recipe
    from torchslim.quantize.qat import QATLayer

    calls = {"sparse": 0, "qat": 0}
    real = kd_api.kd_loss_fn

    def counting_kd_loss_fn(teacher, config):
        loss_fn = real(teacher, config)

        def wrapped(model, *args):
            calls["qat" if any(isinstance(m, QATLayer) for m in model.modules()) else "sparse"] += 1
            return loss_fn(model, *args)

        return wrapped

    monkeypatch.setattr(kd_api, "kd_loss_fn", counting_kd_loss_fn)
    config = PlannerConfig(**{**FAST, "distill": True, "sparsities": (0.5,)})
    result = plan(small_model, digits, config)
    labels = [p["label"] for p in result.points]
    assert labels == ["ch0+kd sp0.5", "ch0+kd sp0.5 4b", "ch0 sp0.5", "ch0 sp0.5 4b"]
    assert calls["sparse"] > 0 and calls["qat"] > 0
    stages = planned_recipe(result.points[1])
    assert [s["recovery"] for s in stages] == ["distill", "distill"]
    assert [s["recovery"] for s in planned_recipe(result.points[3])] == ["finetune", "finetune"]


def test_a_given_teacher_is_the_one_distilled_from_and_is_checked(small_model, digits, monkeypatch):
    import torch
    from torch import nn

    import torchslim as ts
    import torchslim.distill.api as kd_api
    from torchslim.errors import ModelError

    torch.manual_seed(0)
    teacher = ts.create_model("resnet", widths=(16, 32), blocks=(1, 1))  # BatchNorm statistics must not move
    teacher.train()  # plan() runs it in eval mode and gives the mode back
    before = {k: v.clone() for k, v in teacher.state_dict().items()}
    seen = []
    real = kd_api.kd_loss_fn
    monkeypatch.setattr(kd_api, "kd_loss_fn", lambda t, config: seen.append(t) or real(t, config))
    config = PlannerConfig(**{**FAST, "distill": True, "sparsities": (0.5,)})
    plan(small_model, digits, config, teacher=teacher)
    assert seen and all(t is teacher for t in seen)
    assert all(torch.equal(before[k], v) for k, v in teacher.state_dict().items())
    assert teacher.training
    with pytest.raises(ConfigError, match="plan teacher= needs PlannerConfig.distill = True"):
        plan(small_model, digits, PlannerConfig(**FAST), teacher=teacher)
    with pytest.raises(ModelError, match=r"plan teacher= outputs \(2, 3\) for 2 samples: expected \(2, 10\)"):
        plan(small_model, digits, config, teacher=nn.Sequential(nn.Flatten(), nn.Linear(784, 3)))


def test_shifted_views_are_every_offset_with_edges_replicated():
    import torch
    from torch.utils.data import TensorDataset

    from torchslim.pipeline.planner import _shifted_views

    x = torch.zeros(2, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0  # one bright pixel in the middle
    x[1, 0, 0, :] = 7.0  # a bright top row: replicated when shifted down
    views = _shifted_views(TensorDataset(x, torch.tensor([3, 4])), 1)
    images, labels = views.tensors
    assert images.shape == (18, 1, 5, 5) and labels.tolist() == [3, 4] * 9
    bright = {tuple(torch.nonzero(images[2 * k, 0])[0].tolist()) for k in range(9)}
    assert bright == {(r, c) for r in (1, 2, 3) for c in (1, 2, 3)}
    assert torch.equal(images[1, 0, :2], torch.full((2, 5), 7.0))  # offset (-1, -1): the top row shifted down
    assert _shifted_views(TensorDataset(x, torch.tensor([3, 4])), 0) is None
    assert _shifted_views(TensorDataset(torch.zeros(2, 8), torch.tensor([0, 1])), 1) is None  # not images


def test_a_candidate_that_loses_the_shifted_views_is_over_budget(small_model, digits, monkeypatch):
    from torchslim.pipeline import planner

    real = planner._Search.shift_accuracy
    monkeypatch.setattr(planner._Search, "shift_accuracy",
                        lambda self, model: real(self, model) - (0 if model is self.baseline else 0.2))
    result = plan(small_model, digits, PlannerConfig(**FAST))
    assert result.points and result.model is None
    assert all(p["accuracy"] >= result.accuracy_floor - 1e-9 for p in result.points[:1])  # held-out alone passed
    assert not any(p["ok"] for p in result.points)
    assert plan(small_model, digits, PlannerConfig(**{**FAST, "shift_check": 0})).model is not None


def test_target_latency_ranks_candidates_by_their_deployed_route(small_model, digits, quick_deploy):
    calls = quick_deploy
    config = PlannerConfig(**{**FAST, "sparsities": (0.5,), "target": "latency"})
    result = plan(small_model, digits, config)
    ok = [p for p in result.points if p["ok"]]
    assert ok and len(calls) == len(ok)  # only candidates within the budget are deployed
    assert all(p["deployed_route"] in ("torch", "onnxruntime-fp32") and p["deployed_speedup_b1"] > 0 for p in ok)
    assert all("deployed_route" not in p for p in result.points if not p["ok"])
    chosen = result.points[result.chosen]
    assert chosen["latency_b1_ms"] == min(p["latency_b1_ms"] for p in ok)
    # decisions never see the test split: deploy checks on the held-out part and calibrates on the fine-tuning part
    fit, held = holdout_split(digits.train)
    for call, point in zip(calls, ok, strict=True):
        assert len(call["data"].test) == len(held) and len(call["data"].train) == len(fit)
        assert call["max_accuracy_drop"] == pytest.approx((point["accuracy"] - result.accuracy_floor) * 100, abs=1e-4)
    assert "deployed:" in result.to_dict(config)["summary"]


def test_run_planner_deploys_the_input_and_the_chosen_model(small_model, digits, quick_deploy, tmp_path):
    from torchslim.pipeline.planner import run_planner
    from torchslim.pipeline.report import row_cells, with_ratios

    config = PlannerConfig(**{**FAST, "sparsities": (0.5,), "bits": (4,)})
    result = run_planner(small_model, digits, config, tmp_path)
    rows = with_ratios(result["report"]["results"])
    assert [r["deploy"]["route"] in ("torch", "onnxruntime-fp32") for r in rows] == [True, True]
    assert (tmp_path / "deployed" / "planned" / "deploy.md").is_file()
    assert all(cell != "-" for cell in row_cells(rows[1])[-3:-1])  # deployed route and b1 speedup shown
