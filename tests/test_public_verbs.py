"""ts.export, ts.distill, ts.measure, ts.train stay callable whatever was imported first (a fresh process each)."""

import subprocess
import sys

import pytest

VERBS = ("export", "distill", "measure", "train")


@pytest.mark.parametrize("first", VERBS)
def test_public_verbs_are_callable_in_every_import_order(first):
    code = (
        "import torchslim as ts\n"
        f"import torchslim.{first}\n"
        "from torchslim.export import ExportConfig\n"
        "import torchslim.distill, torchslim.measure, torchslim.train\n"
        f"assert all(callable(getattr(ts, v)) for v in {VERBS!r})\n"
        "import torch\n"
        "m = ts.create_model('lenet5').eval()\n"
        "report = ts.export(m, None, ExportConfig(), example_inputs=torch.rand(1, 1, 28, 28))\n"
        "assert report.bytes > 0\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
