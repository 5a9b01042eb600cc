# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= xai-out

.PHONY: install demo test test-fast lint docs bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,peers]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install xaicli with test extras

demo: $(STAMP)  ## explain sample_images/ with the embedded default model
	$(BIN)/xai explain --config configs/demo.yaml --out $(OUT)

test: $(STAMP)  ## run the whole test suite (CPU; CUDA tests skip without a GPU)
	$(BIN)/python -m pytest -q -rs

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

lint: $(STAMP)
	$(BIN)/ruff check xaicli tests bench
	$(BIN)/ruff format --check xaicli tests bench

docs: $(STAMP)  ## regenerate the method table of docs/methods.md from the registry
	$(BIN)/python -m xaicli.catalog

bench: $(STAMP)  ## time methods vs plain inference and vs peers (see docs/benchmarks.md)
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/bench_methods.py --peers --e2e 48 --out docs/benchmarks-latest.md

clean:
	rm -rf $(OUT) .pytest_cache
