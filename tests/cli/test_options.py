"""The options configs of the CLI commands: every flag cross-check runs on construction, before any file is read
(the paths below do not exist), and the configs they build for the library are the ones the flags describe."""

from __future__ import annotations

from pathlib import Path

import pytest

from torchslim.cli.compress_cmd import CompressOptions
from torchslim.cli.deploy_cmd import DeployOptions
from torchslim.cli.distill_cmd import SYNTHETIC_VIEW_EPOCHS, DistillOptions
from torchslim.cli.export_cmd import ExportOptions
from torchslim.cli.prune_cmd import PruneOptions
from torchslim.errors import ConfigError

MISSING = Path("no/such/dir/model.slim")
OUT = Path("no/such/dir/out.slim")


@pytest.mark.parametrize(
    ("cls", "kwargs", "message"),
    [
        (PruneOptions, {"nm": "2:4", "amount": 0.5}, "--nm cannot be combined with --amount"),
        (PruneOptions, {"structured": True}, "--structured needs --amount"),
        (PruneOptions, {"amount": 0.5, "out": None}, "--out is missing"),
        (PruneOptions, {"sweep_threshold": "0.1", "amount": 0.5, "out": None}, "cannot be combined with --amount"),
        (DistillOptions, {"ffn": 0.5}, "--ffn/--heads are for a Hugging Face teacher"),
        (DistillOptions, {"teacher": Path("hf:x"), "text": Path("t.txt"), "data": "mnist:d"}, "--data is invalid"),
        (DistillOptions, {"teacher": Path("hf:x"), "text": Path("t.txt"), "alpha": 0.5}, "--alpha = 0.5"),
        (DistillOptions, {"source_samples": 1}, "--source-samples = 1 is invalid"),
        (CompressOptions, {}, "expected exactly one of --recipe"),
        (CompressOptions, {"max_accuracy_drop": 0.5, "resume": True}, "--resume is for recipe runs"),
        (CompressOptions, {"max_accuracy_drop": 0.5, "time_budget": "soon"}, "--time-budget = 'soon' is invalid"),
        (ExportOptions, {"quant": "int8-static"}, "--quant int8-static needs --calib"),
        (ExportOptions, {"fmt": "hf", "quant": "int8-dynamic"}, "--quant is invalid with --format hf"),
        (ExportOptions, {"input_shape": "1,x"}, "--input-shape = '1,x' is invalid"),
        (DeployOptions, {"threads": 0}, "--threads = 0 is invalid: expected an integer >= 1"),
        (DeployOptions, {"batch": "1,0"}, "--batch = '1,0' is invalid"),
        (DeployOptions, {"routes": "torch,tensorrt"}, "DeployConfig.routes contains 'tensorrt'"),
    ],
)
def test_flag_clashes_fail_on_construction_naming_the_flag(cls, kwargs, message):
    base = {PruneOptions: {"path": MISSING, "out": OUT}, CompressOptions: {"model": MISSING, "out": OUT},
            DistillOptions: {"teacher": MISSING, "student": "lenet5", "out": OUT},
            ExportOptions: {"path": MISSING, "out": OUT}, DeployOptions: {"model": MISSING, "out": OUT}}[cls]
    with pytest.raises(ConfigError, match=message):
        cls(**{**base, **kwargs})


def test_prune_options_plan_the_configs_the_flags_name():
    from torchslim.prune import MagnitudePruning
    from torchslim.prune.structural import ChannelPruning

    plan = PruneOptions(path=MISSING, out=OUT, structured=True, amount=0.5, scope="global").plan()
    assert plan["config"] == ChannelPruning(amount=0.5, global_ranking=True) and plan["schedule"] is None
    plan = PruneOptions(path=MISSING, out=OUT, amount=0.8, schedule="gradual", data="digits").plan()
    assert plan["config"] == MagnitudePruning(amount=0.8) and plan["trains"]
    assert (plan["schedule"].kind, plan["schedule"].steps) == ("gradual", 3)
    assert PruneOptions(path=MISSING, sweep_threshold="0.01, 0.05", data="digits").thresholds() == [0.01, 0.05]


def test_distill_options_build_kd_and_training_settings():
    quick = DistillOptions(teacher=MISSING, student="lenet300", out=OUT, synthetic="bn-inversion")
    assert quick.kd().alpha == 0.9 and quick.synthetic_data().method == "bn-inversion"
    train = quick.train_config()  # the quick preset holds shifted views: no loop shifts, fewer epochs
    assert train.augment_shift == 0 and train.epochs == SYNTHETIC_VIEW_EPOCHS
    assert DistillOptions(teacher=MISSING, student="lenet300", out=OUT, cache_dir=Path("c")).kd().cache_logits
    text = DistillOptions(teacher=Path("hf:x"), student="every-other", out=OUT, text=Path("t.txt"), lr=3e-4)
    assert text.hf_teacher and not text.student_file
    assert (text.text_train_config().optimizer, text.text_train_config().lr) == ("adamw", 3e-4)


def test_deploy_and_export_options_build_library_configs():
    config = DeployOptions(model=MISSING, out=OUT, batch="1, 8", routes="torch, onnxruntime-fp32",
                           threads=2).deploy_config()
    assert (config.batch_sizes, config.routes, config.num_threads) == ((1, 8), ("torch", "onnxruntime-fp32"), 2)
    export = ExportOptions(path=MISSING, out=OUT, quant="int4-weight", block_size=64).export_config()
    assert (export.quant, export.block_size) == ("int4-weight", 64)
    planner = CompressOptions(model=MISSING, out=OUT, max_accuracy_drop=0.5, time_budget="90s").planner_config()
    assert planner.time_budget == 90
