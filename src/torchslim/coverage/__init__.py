"""Architecture coverage: which architectures each torchslim operation takes (``benchmarks/coverage.py``)."""
