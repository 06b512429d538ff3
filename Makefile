PY ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TEST_STAMP := $(VENV)/.installed-test
# PyTorch's CPU build: the +cpu pin can only be met by it. pip takes it from wherever it is
# already configured to look (these machines: a local wheel folder), else from PyTorch's CPU
# wheel index, so an ordinary Linux machine gets no CUDA libraries either. Another build, e.g.
# on macOS (whose wheels have no +cpu): make install TORCH_VERSION=2.13.0
TORCH_VERSION ?= 2.13.0+cpu
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

.PHONY: serve test install clean

$(BIN)/python:
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip

# torch first: the project does not list it (pyproject.toml says why). The first try is quiet
# because on an ordinary machine it fails (PyPI has no +cpu builds) and the second one installs.
$(STAMP): $(BIN)/python pyproject.toml
	$(BIN)/pip install -q 'torch==$(TORCH_VERSION)' 2>/dev/null \
		|| $(BIN)/pip install -q --extra-index-url $(TORCH_INDEX) 'torch==$(TORCH_VERSION)'
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

# .pytest_cache holds the test caches too (the KServe client venv, tests/compat/conftest.py)
clean:
	rm -rf $(VENV) *.egg-info build .pytest_cache
