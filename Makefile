# near2 — the two commands of the README's Quick start, and what they are made of.
#   make demo   set everything up, then run the retraining pipeline end to end on the synthetic catalog
#   make test   set everything up, then run the test suite against a real local Elasticsearch
# Everything a run writes goes under NEAR2_HOME (default ./.near2), nothing outside the checkout
# except the local Elasticsearch's runtime directory (see near2_tasks/serving/elasticsearch_install.py).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum requirements.lock pyproject.toml | sha1sum | cut -c1-12)
export NEAR2_HOME ?= $(CURDIR)/.near2
export PYTHONUNBUFFERED := 1

.PHONY: demo test screenshots install browser es-start es-stop lock bench clean

demo: install es-start
	$(BIN)/near2 demo

test: install browser
	$(BIN)/python -m pytest -q tests

# The README's screenshots (docs/img/) from the state `make demo` left (docs/screenshots.py).
screenshots: install browser es-start
	$(BIN)/python docs/screenshots.py

# The storefront page's browser tests drive the system Chromium with selenium (tests/browser_support.py):
# Debian's chromium + chromium-driver, installed here when we are root with apt-get, else a one-line error.
# CHROMIUM_BINARY / CHROMEDRIVER point at another install.
browser:
	@if { [ -n "$$CHROMIUM_BINARY" ] || command -v chromium || command -v chromium-browser || command -v google-chrome; } >/dev/null \
	    && { [ -n "$$CHROMEDRIVER" ] || command -v chromedriver; } >/dev/null; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null; then \
	    echo "installing chromium and chromium-driver (apt-get) for the browser tests"; \
	    apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; \
	else \
	    echo "make test: the browser tests need Chromium and its driver: sudo apt-get install -y chromium chromium-driver"; \
	    exit 1; \
	fi

install: $(STAMP)

$(STAMP): requirements.lock pyproject.toml
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	@$(BIN)/python -m pip --version >/dev/null 2>&1 || $(BIN)/python -m ensurepip >/dev/null
	$(BIN)/python -m pip install -q --disable-pip-version-check uv==0.13.8
	$(BIN)/uv pip install -q --python $(BIN)/python --compile-bytecode -r requirements.lock
	$(BIN)/uv pip install -q --python $(BIN)/python --no-deps -e .
	@rm -f $(VENV)/.installed-* && touch $@

es-start: install
	$(BIN)/near2 es start

es-stop:
	$(BIN)/near2 es stop

# Re-resolve the pins after editing requirements.in (needs the registries).
lock: install
	$(BIN)/uv pip compile -q requirements.in -o requirements.lock --python-version 3.11

clean:
	-$(BIN)/near2 es stop
	rm -rf $(NEAR2_HOME)
