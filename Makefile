# Each target sets up .venv on first use, so a fresh clone needs only `make <target>`.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
PROMPT ?= Grüezi! Was ist die Hauptstadt der Schweiz?
MODEL ?=

.PHONY: setup setup-app chat ask test lint format quality screenshot

# The app needs only the package; the tests add torch (the reference), ruff and the app's test tools.
setup-app: $(VENV)/.installed-app
setup: $(VENV)/.installed-test

$(VENV)/.created:
	$(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	touch $@

$(VENV)/.installed-app: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e .
	touch $@

$(VENV)/.installed-test: pyproject.toml $(VENV)/.created
	$(PY) -m pip install --quiet -e ".[test]"
	touch $@ $(VENV)/.installed-app

chat: setup-app
	$(VENV)/bin/apertus-chat $(if $(MODEL),--model "$(MODEL)")

ask: setup-app
	$(PY) -m apertus_mlx.generate $(if $(MODEL),--model "$(MODEL)") --prompt "$(PROMPT)"

# The README's picture of the chat app, drawn by the app itself on the bundled demo model.
screenshot: setup-app
	$(PY) docs/screenshot.py docs/tui.svg

test: setup
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .
	$(PY) -m pytest

lint: setup
	$(VENV)/bin/ruff check .

format: setup
	$(VENV)/bin/ruff format .
	$(VENV)/bin/ruff check --fix .

# The quantization comparison on the yardstick `small` model (docs/quality.md); the corpus needs Debian's apt.
SAMPLES := bench/yardstick/data/samples
quality: setup
	test -f bench/yardstick/data/corpus/train.jsonl || $(PY) -m bench.yardstick.corpus --update
	$(PY) -m bench.yardstick.samples --out $(SAMPLES)
	$(PY) -m bench.quality --model bench/yardstick/models/small --calibration-text $(SAMPLES)/calibration.txt \
		--eval-text $(SAMPLES)/evaluation.txt --out docs/quality.md
