# Two commands a fresh clone needs: `make demo` and `make test`.
# Both create .venv when it is missing, upgrade pip and install, then run.

PYTHON ?= python3.11
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: demo test test-fast lint format check bench serve demo-submit clean browser schema

$(PY):
	$(PYTHON) -m venv $(VENV) || python3 -m venv $(VENV)

$(STAMP): $(PY) requirements.txt requirements-dev.txt
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $(STAMP)

demo: $(STAMP)
	$(PY) -m notebookops run examples/messages/local.json --out out/demo

# CI runs `make test`, so the format check a user meets in `make lint` runs there too.
test: lint browser
	$(PY) -m pytest -q

# tests/test_browser.py drives Debian's Chromium through chromedriver; installed here when
# missing and this is root (elsewhere the test says how, and is skipped outside CI).
browser:
	@command -v chromium >/dev/null && command -v chromedriver >/dev/null || \
	{ [ "$$(id -u)" = 0 ] && apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null; } || \
	echo "no Chromium: apt-get install chromium chromium-driver for tests/test_browser.py"

test-fast: $(STAMP)
	$(PY) -m pytest -q -m "not slow"

lint: $(STAMP)
	$(PY) -m ruff check .
	$(PY) -m ruff format --check .

format: $(STAMP)
	$(PY) -m ruff format .
	$(PY) -m ruff check --fix .

# The message's JSON Schema, generated from notebookops/message.py (a test fails when stale).
schema: $(STAMP)
	$(PY) -m notebookops.message > schemas/message.schema.json

bench: $(STAMP)
	$(PY) -m bench

# On this machine only (127.0.0.1), so the demo's local repository is allowed.
serve: $(STAMP)
	$(PY) -m notebookops serve --allow-local-repos

# With `make serve` running: start the demo's run there and print its status page.
demo-submit: $(STAMP)
	$(PY) -m notebookops submit examples/messages/local.json

clean:
	rm -rf out .devhost .pytest_cache .ruff_cache
