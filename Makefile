# Each target sets up .venv on first use, so a fresh clone needs only `make <target>`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= Grüezi! Was ist die Hauptstadt der Schweiz?
MODEL ?=

.PHONY: setup chat test lint format

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@

chat: setup
	$(PY) -m apertus_mlx.generate $(if $(MODEL),--model "$(MODEL)") --prompt "$(PROMPT)"

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .
