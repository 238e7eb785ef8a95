# `make serve` and `make test` do all set-up themselves on a fresh machine.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed

.PHONY: install serve test test-quick test-label-studio test-browser lint weights bench constraints \
	constraints-label-studio test-docker test-docker-ls docs docs-serve

# pip's progress bars on a terminal; without one (CI, a log file) or with CI set, a line per package and no bars.
PIP_PROGRESS := $(if $(and $(MAKE_TERMOUT),$(if $(CI),,on)),on,off)

# $(call pip-install,BIN,OPTIONS): the requirements files into the virtualenv of BIN.
# --no-deps: the Grounding DINO package's declared deps pull a second OpenCV (docs/how-it-works.md).
# --no-build-isolation: sam2 is a source distribution whose build needs torch: the one installed, not a second.
# --no-compile: Python compiles a module's bytecode when it is first imported (a fraction of the 20,000 files pip
# would compile one by one: about a minute of a first install here).
define pip-install
	@echo "make: installing requirements.txt, requirements-dev.txt and requirements-ray.txt into $(patsubst %/bin,%,$(1))" \
	  "(the first time: about 3.2 GB to download, mostly PyTorch and its CUDA libraries; 6.6 GB on disk)"
	$(1)/pip install --progress-bar $(PIP_PROGRESS) --no-compile $(2) -r requirements.txt -r requirements-dev.txt \
	  -r requirements-ray.txt
	@echo "make: installing requirements-nodeps.txt (Grounding DINO, SAM 2.1 and SAM 3's packages) with --no-deps"
	SAM2_BUILD_CUDA=0 $(1)/pip install --progress-bar $(PIP_PROGRESS) $(2) --no-deps --no-build-isolation \
	  -r requirements-nodeps.txt
endef

install: $(STAMP)

# constraints.txt pins every transitive dependency at the version CI last tested.
$(STAMP): requirements.txt requirements-nodeps.txt requirements-dev.txt requirements-ray.txt constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(call pip-install,$(BIN),-c constraints.txt)
	touch $(STAMP)

# After editing a requirements file: resolve again in a fresh virtualenv, free of the old pins, and pin the result.
constraints:
	rm -rf .venv-constraints
	$(PYTHON) -m venv .venv-constraints
	$(call pip-install,.venv-constraints/bin,)
	{ echo "# Every package that make install installs, as make constraints resolved them (pip freeze; Linux x86_64, Python 3.11)."; \
	  echo "# Used with -c by make install and the Dockerfile. Regenerate after editing a requirements file."; \
	  .venv-constraints/bin/pip freeze --all --exclude pip --exclude-editable | grep -v '^#'; } > constraints.txt
	rm -rf .venv-constraints

# The end-to-end tests' Label Studio and moto S3 server (their versions: LS_VERSION and MOTO_VERSION in
# tests/label_studio_harness.py) are installed with -c tests/label-studio-constraints.txt, and rebuilt when that file
# changes. To move them to newer dependencies (or after changing a version): resolve afresh in a temporary virtualenv
# and pin the result, then commit the file.
LS_VERSION = $(shell sed -n 's/^LS_VERSION = "\(.*\)"$$/\1/p' tests/label_studio_harness.py)
MOTO_VERSION = $(shell sed -n 's/^MOTO_VERSION = "\([^"]*\)".*/\1/p' tests/label_studio_harness.py)
LS_CONSTRAINTS := tests/label-studio-constraints.txt
constraints-label-studio:
	@test -n "$(LS_VERSION)" || { echo "no LS_VERSION in tests/label_studio_harness.py" >&2; exit 1; }
	@echo "make: resolving label-studio==$(LS_VERSION) and moto[server]==$(MOTO_VERSION) in a fresh virtualenv (about 1.2 GB; a few minutes)"
	tmp=$$(mktemp -d) && trap 'rm -rf "$$tmp"' EXIT && \
	  $(PYTHON) -m venv "$$tmp/venv" && \
	  "$$tmp/venv/bin/pip" install --progress-bar $(PIP_PROGRESS) label-studio==$(LS_VERSION) "moto[server]==$(MOTO_VERSION)" && \
	  { echo "# Every package of the end-to-end tests' server virtualenv (Label Studio and moto's S3-compatible server), as"; \
	    echo "# make constraints-label-studio resolved label-studio==$(LS_VERSION) and moto[server]==$(MOTO_VERSION) (pip freeze; Linux x86_64,"; \
	    echo "# Python 3.11). Used with -c by tests/label_studio_harness.py, which rebuilds the virtualenv when this file changes."; \
	    "$$tmp/venv/bin/pip" freeze --all --exclude pip | grep -v '^#'; } > $(LS_CONSTRAINTS).new && \
	  mv $(LS_CONSTRAINTS).new $(LS_CONSTRAINTS)

weights: install
	$(BIN)/python weights.py

serve: weights
	$(BIN)/gunicorn _wsgi:app

# Everything but the image's with-label-studio run (make test-docker-ls; it doesn't fit CI's 30 minutes on a fresh
# machine: docs/docker.md "Checked in CI"). The image tests run beside the others while the Label Studio virtualenv builds
# (tests/run_suite.sh).
test: install
	bash tests/run_suite.sh $(BIN)

# Everything but the end-to-end tests against a real Label Studio (those install it once per machine) and the
# Docker image tests.
test-quick: install
	$(BIN)/python -m pytest -m "not label_studio and not docker"

# Real Label Studio through its API and in headless Chromium (Debian's chromium package: see .ci/run).
test-label-studio: install
	$(BIN)/python -m pytest -m label_studio

test-browser: install
	$(BIN)/python -m pytest -m browser

# The real image (Dockerfile, docker-compose*.yml) built and run with a Docker engine: tests/test_docker.py
# installs Debian's docker.io and debootstrap when missing and starts and stops its own dockerd (docs/docker.md).
test-docker: install
	$(BIN)/python -m pytest tests/test_docker.py

# Only its with-label-studio part (a stand-in Label Studio image built from PyPI).
test-docker-ls: install
	$(BIN)/python -m pytest tests/test_docker.py -m docker_ls

lint: install docs
	$(BIN)/ruff check .
	# The Docker files, without a Docker engine: hadolint, and Compose's own schema check of each variant.
	$(BIN)/hadolint Dockerfile Dockerfile.sam3 tests/docker/base.Dockerfile tests/docker/label-studio.Dockerfile
	$(BIN)/docker-compose -f docker-compose.yml config --quiet
	$(BIN)/docker-compose -f docker-compose.yml --profile with-label-studio config --quiet
	$(BIN)/docker-compose -f docker-compose.yml -f docker-compose.cpu.yml config --quiet

bench: install
	$(BIN)/python benchmarks/bench_regions.py

# The documentation site (mkdocs.yml, docs/) into site/ (git-ignored). --strict: a broken link or anchor, or a page
# of docs/ missing from mkdocs.yml's nav, fails the build (make lint, and so CI, runs it).
# NO_MKDOCS_2_WARNING: silences Material's notice about its successor, printed on every build.
docs: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict --site-dir site

# The same site served on http://127.0.0.1:8000, rebuilt as docs/ changes.
docs-serve: install
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs serve --strict
