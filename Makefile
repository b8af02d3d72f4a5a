# Set-up and checks. `make install` creates .venv in the repository root with the runtime (and
# matplotlib for plots); `make install-train` adds the training extra; `make test` installs
# everything and runs the suite; `make demo` runs the node on a rendered clip and scores it.
# Each reuses .venv when it already exists. Activate it afterwards: `. .venv/bin/activate`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python

.PHONY: install install-train test demo lint clean

$(VENV)/.runtime: pyproject.toml
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --upgrade pip
	$(PY) -m pip install -e ".[plot]"
	touch $@

$(VENV)/.full: $(VENV)/.runtime pyproject.toml
	$(PY) -m pip install -e ".[train,dev]"
	touch $@

install: $(VENV)/.runtime

install-train: $(VENV)/.full

test: $(VENV)/.full
	$(PY) -m pytest -q

demo: $(VENV)/.runtime
	$(PY) -m node demo --out runs/demo

lint: $(VENV)/.full
	$(PY) -m ruff check node export calib tests

clean:
	rm -rf runs build *.egg-info
