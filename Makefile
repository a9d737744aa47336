# make test   -- create .venv, install mamba-ir with its dev tools, lint, run the tests
# make demo   -- create .venv, compile a small hybrid model and serve a chat-like workload
# make wheel-check -- build the wheel, install it outside the repository, run a user's first steps
VENV   ?= .venv
PYTHON ?= python3
# The CPU build of torch; on a CUDA machine use e.g. `make test TORCH=torch`.
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python

.PHONY: test demo lint gpu-test bench wheel-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -n auto

demo: $(VENV)/.installed
	$(PY) -m mamba_ir demo

wheel-check: $(VENV)/.installed
	PY=$(abspath $(PY)) scripts/check_wheel.sh

gpu-test: $(VENV)/.installed
	$(PY) -m pytest -q -m gpu

bench: $(VENV)/.installed
	$(PY) -m benchmarks.ssu && $(PY) -m benchmarks.conv1d && $(PY) -m mamba_ir bench

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis build *.egg-info
