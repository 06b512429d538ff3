PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test

.PHONY: serve test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first, pinned: on these machines it resolves to the local CPU wheel; an unpinned torch pulls CUDA.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e .
	touch $@

$(TEST_STAMP): $(STAMP)
	$(BIN)/pip install -q -e '.[test]'
	touch $@

install: $(STAMP)

serve: $(STAMP)
	$(BIN)/torpor serve --model-repository examples/models --devices cpu

test: $(TEST_STAMP)
	$(BIN)/python -m pytest -q -x --durations=10 $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) *.egg-info
