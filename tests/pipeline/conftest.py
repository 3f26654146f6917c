"""Shared by the pipeline tests: a quickly trained small model, and a check that a report.html is self-contained."""

import base64
from html.parser import HTMLParser
from pathlib import Path

import pytest
import torch

import torchslim as ts

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


@pytest.fixture(scope="session")
def small_model(digits):
    """lenet300 trained for 3 epochs (about 97% on digits): small enough for fast recipe and planner runs."""
    torch.manual_seed(0)
    model = ts.create_model("lenet300")
    ts.train(model, digits.train, ts.TrainConfig(epochs=3, augment_shift=0), progress=False)
    return model.eval()


@pytest.fixture
def quick_deploy(monkeypatch):
    """The real ``deploy`` on two routes with short timing; the list of every call's keyword arguments."""
    import torchslim.deployment as deployment

    calls = []
    real = deployment.deploy

    def quick(model, out_dir=None, **kwargs):
        calls.append(kwargs)
        return real(model, out_dir, **{**kwargs, "routes": ("torch", "onnxruntime-fp32"), "min_run_time": 0.02})

    monkeypatch.setattr(deployment, "deploy", quick)
    return calls


class _Images(HTMLParser):
    def __init__(self):
        super().__init__()
        self.sources = []

    def handle_starttag(self, tag, attrs):
        if tag == "img":
            self.sources.append(dict(attrs)["src"])


def _check_html(path: Path, expected_images: int) -> None:
    """Parse report.html: every <img> is an inline data:image/png;base64 URI that decodes to a PNG."""
    parser = _Images()
    parser.feed(path.read_text(encoding="utf-8"))
    assert len(parser.sources) == expected_images
    for source in parser.sources:
        prefix = "data:image/png;base64,"
        assert source.startswith(prefix)
        assert base64.b64decode(source[len(prefix):], validate=True).startswith(PNG_MAGIC)


@pytest.fixture
def check_html():
    """``check_html(path, expected_images)``: report.html holds exactly that many inline PNG images."""
    return _check_html
