# Two commands set up everything on a fresh machine:
#   make run    creates .venv if missing, installs fastmae, runs the main job on the built-in default
#   make test   creates .venv if missing, installs fastmae with its test tools, runs the CPU test suite
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
# torch first, pinned to a version whose CPU wheel installs without CUDA packages; any torch >= 2.5 works
TORCH_SPEC ?= torch==2.13.0

.PHONY: run test venv clean

$(VENV)/.installed: setup.py
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q "$(TORCH_SPEC)" || $(PY) -m pip install -q "torch>=2.5"
	$(PY) -m pip install -q -e ".[dev]"
	touch $@

venv: $(VENV)/.installed

run: $(VENV)/.installed
	$(PY) -m fastmae demo

test: $(VENV)/.installed
	$(PY) -m pytest tests -q

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache
