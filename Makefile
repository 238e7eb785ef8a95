# `make serve` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-quick test-label-studio test-browser lint weights bench

install: $(STAMP)

$(STAMP): requirements.txt requirements-nodeps.txt requirements-dev.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet -r requirements.txt -r requirements-dev.txt
	# --no-deps: the Grounding DINO package's declared deps pull a second OpenCV (see README)
	$(BIN)/pip install --quiet --no-deps -r requirements-nodeps.txt
	touch $(STAMP)

weights: install
	$(BIN)/python weights.py

serve: weights
	$(BIN)/gunicorn _wsgi:app

test: install
	$(BIN)/python -m pytest

# Everything but the end-to-end tests against a real Label Studio (those install it once per machine).
test-quick: install
	$(BIN)/python -m pytest -m "not label_studio"

# Real Label Studio through its API and in headless Chromium (Debian's chromium package: see .ci/run).
test-label-studio: install
	$(BIN)/python -m pytest -m label_studio

test-browser: install
	$(BIN)/python -m pytest -m browser

lint: install
	$(BIN)/ruff check .
	# The Docker files, without a Docker engine: hadolint, and Compose's own schema check of each variant.
	$(BIN)/hadolint Dockerfile
	$(BIN)/docker-compose -f docker-compose.yml config --quiet
	$(BIN)/docker-compose -f docker-compose.yml --profile with-label-studio config --quiet
	$(BIN)/docker-compose -f docker-compose.yml -f docker-compose.cpu.yml config --quiet

bench: install
	$(BIN)/python benchmarks/bench_regions.py
