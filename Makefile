# Two commands: `make test` (whole suite) and `make demo` (synthetic clip through the node).
# Both create .venv in the repo root on first use and reuse it afterwards.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: test demo lint clean

$(VENV)/.runtime:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e .
	touch $@

$(VENV)/.full: $(VENV)/.runtime pyproject.toml
	$(PY) -m pip install -e ".[train,dev]"
	touch $@

test: $(VENV)/.full
	$(PY) -m pytest -q

demo: $(VENV)/.runtime
	$(PY) -m node demo --out runs/demo

lint: $(VENV)/.full
	$(PY) -m ruff check node export calib tests

clean:
	rm -rf runs build *.egg-info
