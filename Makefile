# Two commands on a fresh machine: `make demo` and `make test`. Both create .venv and install
# the CPU build of PyTorch first (a plain `pip install torch` would pull a multi-GB CUDA build).
PYTHON ?= python3
VENV   ?= .venv
PY      = $(VENV)/bin/python
TORCH_PIN ?= torch==2.13.0

.PHONY: demo test lint clean chromium

$(VENV)/.stamp-run: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q $(TORCH_PIN)
	$(PY) -m pip install -q -e .
	touch $@

$(VENV)/.stamp-dev: $(VENV)/.stamp-run
	$(PY) -m pip install -q -e '.[dev]'
	touch $@

demo: $(VENV)/.stamp-run
	$(VENV)/bin/torchslim demo

# The html report's render test needs a headless browser: Debian's chromium, installed when missing and apt-get
# can run (root); otherwise that one test skips and says why.
chromium:
	@[ -x /usr/bin/chromium ] || { command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	  { apt-get install -y -q chromium >/dev/null 2>&1 || { apt-get update -q >/dev/null && \
	    apt-get install -y -q chromium >/dev/null 2>&1; }; }; } || \
	  echo "chromium is not installed (needs root and apt-get): the html render test will skip"

test: $(VENV)/.stamp-dev chromium
	$(PY) -m pytest -q

lint: $(VENV)/.stamp-dev
	$(VENV)/bin/ruff check src tests

clean:
	rm -rf $(VENV) torchslim-demo .pytest_cache
