# make test   -- create .venv, install mamba-ir with its dev tools, lint, run the tests
# make demo   -- create .venv, compile a small hybrid model and serve a chat-like workload
# make wheel-check -- build the wheel, install it outside the repository, run a user's first steps
# make test-hf-oldest -- the transformers tests and doc examples on the oldest transformers
#                        the hf extra accepts (make test runs them on the newest)
VENV   ?= .venv
PYTHON ?= python3
# The CPU build of torch; on a CUDA machine use e.g. `make test TORCH=torch`.
TORCH  ?= torch==2.13.0
PY     := $(VENV)/bin/python
# The lower bound of the hf extra's transformers requirement (tests/test_packaging.py checks
# they agree), installed beside the venv's newer one and put first on PYTHONPATH.
HF_OLDEST     ?= 5.23.0
HF_OLDEST_DIR := $(VENV)/transformers-$(HF_OLDEST)

.PHONY: test test-hf-oldest demo lint gpu-test bench wheel-check clean

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -c "import torch" 2>/dev/null || $(PY) -m pip install -q "$(TORCH)"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

lint: $(VENV)/.installed
	$(VENV)/bin/ruff check .

test: lint
	$(PY) -m pytest -q -n auto

# Only transformers itself: the venv's huggingface_hub, tokenizers, ... meet its requirements
# too. One intra-op thread per test worker: the tests' tensors are tiny, and two workers of
# two threads each on a two-core runner wait on each other's thread teams.
$(HF_OLDEST_DIR)/.installed: $(VENV)/.installed
	rm -rf $(HF_OLDEST_DIR)
	$(PY) -m pip install -q --no-deps --target $(HF_OLDEST_DIR) "transformers==$(HF_OLDEST)"
	touch $@

test-hf-oldest: $(HF_OLDEST_DIR)/.installed
	PYTHONPATH=$(abspath $(HF_OLDEST_DIR)) $(PY) -c "import transformers as t; \
	assert t.__version__ == '$(HF_OLDEST)', f'transformers {t.__version__} imported'"
	PYTHONPATH=$(abspath $(HF_OLDEST_DIR)) OMP_NUM_THREADS=1 $(PY) -m pytest -q -n auto \
	    tests/test_transformers_patch.py tests/test_transformers_compile.py \
	    "tests/test_docs.py::test_examples_run[docs/transformers.md]"

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
