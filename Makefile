# The two commands a new user runs. Both create .venv when it is missing and install the
# project with the tested versions (constraints.txt; Python >= 3.11).
# constraints.txt pins torch==2.13.0; which build that is depends on where pip looks. From plain
# PyPI on Linux it is the CUDA build (several GB of nvidia-* packages). For the CPU-only wheel, let
# pip see PyTorch's CPU index too:
#   PIP_EXTRA_INDEX_URL=https://download.pytorch.org/whl/cpu make demo
# it then takes 2.13.0+cpu, which satisfies the pin. An existing .venv keeps the torch it has.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test check lint install clean

demo: $(STAMP)
	$(PY) -m pipelines run --config configs/demo.yaml

# The whole suite (what CI runs), after the linter.
test: lint
	$(PY) -m pytest

# The inner loop, in under 2 minutes: the linter, the formatter's check, and every test that starts no Ray,
# server or subprocess (tests/conftest.py: --check).
check: lint
	$(PY) -m pytest --check -q

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(VENV)/bin/python pyproject.toml constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,export]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) storage/demo mlflow.db mlruns
