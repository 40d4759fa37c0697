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

.PHONY: demo test install clean

demo: $(STAMP)
	$(PY) -m pipelines run --config configs/demo.yaml

test: $(STAMP)
	$(PY) -m pytest

install: $(STAMP)

$(VENV)/bin/python:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip

$(STAMP): $(VENV)/bin/python pyproject.toml constraints.txt
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev,export]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) storage/demo mlflow.db mlruns
