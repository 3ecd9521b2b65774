# The README's two commands. Each creates the virtual environment on first use.
#   make tune   run the main job (jobs/tune.py) on its embedded default config
#   make test   run the whole test suite
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed

.PHONY: tune test lint setup clean-runs

tune: $(STAMP)
	$(PY) jobs/tune.py $(ARGS)

test: $(STAMP)
	$(PY) -m pytest $(ARGS)

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
