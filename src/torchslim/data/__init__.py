"""Train/test tensors from a data spec: ``digits``, ``mnist:DIR``, ``npz:FILE``, ``imagefolder:DIR``."""

from __future__ import annotations

from torchslim.data.spec import DataSplits, load_data, parse_spec

__all__ = ["DataSplits", "load_data", "parse_spec"]
