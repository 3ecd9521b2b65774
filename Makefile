# The README's two commands. Each creates the virtual environment on first use.
#   make tune   run the main job (jobs/tune.py) on its embedded default config
#   make test   run the whole test suite
#   make gpu-check   on a GPU machine: GPU tests + measurements in one go (OUT=folder)
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: tune test lint setup clean-runs gpu-check

tune: $(STAMP)
	$(PY) jobs/tune.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

OUT ?= gpu_check
gpu-check: $(STAMP)
	$(PY) benchmarks/gpu_check.py --out $(OUT) $(ARGS)

lint: $(STAMP)
	$(VENV)/bin/ruff check . && $(VENV)/bin/ruff format --check .

setup: $(STAMP)

# torch 2.14.1 / torchvision 0.29.1 are pinned in pyproject.toml; installing takes a few minutes.
$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -e ".[dev]"
	touch $(STAMP)

clean-runs:
	rm -rf outputs mlruns mlflow.db ray_results
