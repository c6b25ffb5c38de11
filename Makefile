# `make demo` and `make test` each set everything up from a fresh clone, then run.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed-$(TORCH_VERSION)
EVAL_STAMP := $(VENV)/.installed-eval

.PHONY: setup demo test bench ui clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "torch==$(TORCH_VERSION)"
	$(PY) -m pip install -q -e ".[dev,train,sweep]"
	touch $(STAMP)

setup: $(STAMP)

# lm-evaluation-harness (the `eval` extra): `hybrids eval` runs its tasks; the tests run them offline
$(EVAL_STAMP): $(STAMP)
	$(PY) -m pip install -q -e ".[eval]"
	touch $(EVAL_STAMP)

# The main job: the attention-spacing study at tiny scale (4 matched arms x 3 learning rates x 2 seeds) on two
# local workers (one per core; they share a journal file), then its report.
demo: setup
	$(VENV)/bin/hybrids sweep study=attention-spacing workers=2
	$(VENV)/bin/hybrids report study=attention-spacing storage=journal:runs/optuna.journal

test: setup $(EVAL_STAMP)
	$(VENV)/bin/ruff check blocks hybrids search analysis recipes tests benchmarks
	$(PY) -m pytest -q

ui: setup
	$(VENV)/bin/hybrids ui

bench: setup
	$(PY) benchmarks/scan_speed.py

clean:
	rm -rf $(VENV) .pytest_cache .hypothesis .ruff_cache
