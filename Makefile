# The two commands: `make demo` and `make test`. Each creates .venv on a fresh machine.
PYTHON ?= python3
VENV   := .venv
PY     := $(VENV)/bin/python
STAMP  := $(VENV)/.installed-stamp
DEMO   ?= outputs/demo

.PHONY: demo test lint bench clean install

install: $(STAMP)

# CPU torch first, so the resolver never pulls a multi-GB CUDA build; GPU users install
# their CUDA torch into the environment the usual way before `pip install -e .`.
$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

demo: $(STAMP)
	$(VENV)/bin/avsa demo --out $(DEMO)

# Two pytest-xdist workers: the modules that start Ray on one, the rest beside them
# (tests/conftest.py). Plain `pytest` runs the same tests one at a time.
test: $(STAMP)
	$(VENV)/bin/ruff check .
	$(PY) -m pytest -q -n 2

lint: $(STAMP)
	$(VENV)/bin/ruff check .

bench: $(STAMP)
	$(PY) bench/pipeline.py
	$(PY) bench/train_step.py

clean:
	rm -rf $(VENV) outputs mlruns .pytest_cache
