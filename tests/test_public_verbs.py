"""ts.export, ts.distill, ts.measure, ts.train stay callable whatever was imported first (a fresh process each)."""

import subprocess
import sys

import pytest

VERBS = ("export", "distill", "measure", "train")

# what each process runs before calling the verbs
ORDERS = {
    "verbs first": "import torchslim as ts\nfns = [getattr(ts, v) for v in VERBS]\n"
    + "".join(f"import torchslim.{v}\n" for v in VERBS),
    "modules first": "".join(f"import torchslim.{v}\n" for v in VERBS) + "import torchslim as ts\n",
    "from-imports first": "from torchslim.export import ExportConfig\nfrom torchslim.distill import KD\n"
    "from torchslim.measure import Measurement\nfrom torchslim.train import TrainConfig\nimport torchslim as ts\n",
}

CHECK = """
for verb in VERBS:
    function = getattr(ts, verb)
    assert callable(function), verb
    try:
        function()
    except TypeError as exc:  # the function itself was reached: it names its missing arguments
        assert "missing" in str(exc) and "not callable" not in str(exc), (verb, exc)
import torch
from torchslim.export import ExportConfig
report = ts.export(ts.create_model("lenet5").eval(), None, ExportConfig(), example_inputs=torch.rand(1, 1, 28, 28))
assert report.bytes > 0
"""


@pytest.mark.parametrize("order", ORDERS)
def test_public_verbs_are_callable_in_every_import_order(order):
    code = f"VERBS = {VERBS!r}\n" + ORDERS[order] + CHECK
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
