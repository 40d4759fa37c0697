# The two commands a new user runs. Both create .venv when it is missing and install the
# project with the tested versions (constraints.txt pins torch to the CPU wheel).
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
	$(PY) -m pip install --quiet -c constraints.txt -e ".[dev]"
	touch $(STAMP)

clean:
	rm -rf $(VENV) storage/demo mlflow.db mlruns
