# near2 — the two commands of the README's Quick start, and what they are made of.
#   make demo   set everything up, then run the retraining pipeline end to end on the synthetic catalog
#   make test   set everything up, then run the test suite against a real local Elasticsearch
# Everything a run writes goes under NEAR2_HOME (default ./.near2), nothing outside the checkout
# except the local Elasticsearch's runtime directory (see near2_tasks/elasticsearch_local.py).

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   := .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed-$(shell sha1sum requirements.lock pyproject.toml | sha1sum | cut -c1-12)
export NEAR2_HOME ?= $(CURDIR)/.near2
export PYTHONUNBUFFERED := 1

.PHONY: demo test install es-start es-stop lock bench clean

demo: install es-start
	$(BIN)/near2 demo

test: install
	$(BIN)/python -m pytest -q tests

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
