# All set-up happens here: `make demo` and `make test` create and reuse .venv/.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
DEMO_DIR ?= demo_run

.PHONY: venv test lint demo clean

$(STAMP): pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e '.[dev]'
	touch $(STAMP)

venv: $(STAMP)

lint: $(STAMP)
	$(VENV)/bin/ruff check reid_jax tools configs tests

test: $(STAMP)
	$(VENV)/bin/ruff check reid_jax tools configs tests
	$(PY) -m pytest -q -n 2 --durations=20 tests

demo: $(STAMP)
	$(PY) tools/demo.py --workdir=$(DEMO_DIR)

clean:
	rm -rf $(VENV)
