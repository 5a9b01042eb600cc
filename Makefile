# Two commands do everything on a fresh clone: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
STAMP  := $(VENV)/.installed
OUT    ?= xai-out

.PHONY: install demo test test-fast test-browser lint docs bench bench-quick clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install -q -e '.[test,peers,ray]'
	touch $(STAMP)

install: $(STAMP)  ## create .venv and install xaicli with test extras

demo: $(STAMP)  ## explain sample_images/ with the embedded default model; the report is $(OUT)/report/index.html
	$(BIN)/xai explain --config configs/demo.yaml --out $(OUT) --report

concept-data: $(STAMP)  ## concept folders cut from sample_images/ (striped fur, ceramic, random, cat, coffee) in concept_data/
	$(BIN)/python -m xaicli.concepts.sample_data concept_data

concepts: concept-data  ## TCAV and concept extraction on them (configs/concepts.yaml); results in xai-out-concepts/concepts/
	$(BIN)/xai concepts tcav --config configs/concepts.yaml
	$(BIN)/xai concepts extract --config configs/concepts.yaml

test: $(STAMP)  ## run the whole test suite (CPU; CUDA tests skip without a GPU)
	$(BIN)/python -m pytest -q -rs

test-fast: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-browser: $(STAMP)  ## the report in headless Chromium (installs Debian's chromium with apt-get when missing)
	command -v chromium >/dev/null 2>&1 || { apt-get update && apt-get install -y chromium; } || \
		{ echo "could not install chromium (needs root/sudo and apt-get)"; exit 1; }
	$(BIN)/python -m pytest -q -rs tests/test_report.py -k browser

lint: $(STAMP)
	$(BIN)/ruff check xaicli tests bench
	$(BIN)/ruff format --check xaicli tests bench

docs: $(STAMP)  ## regenerate the method table of docs/methods.md from the registry
	$(BIN)/python -m xaicli.catalog

bench: $(STAMP)  ## the full benchmark (methods, peers, end-to-end, Ray): rewrites the generated table of docs/benchmarks.md
	$(BIN)/python -m pip install -q -e '.[bench]'
	$(BIN)/python bench/bench_methods.py --write-doc docs/benchmarks.md

bench-quick: $(STAMP)  ## the same rows with smaller settings (a few minutes on 2 cores), printed only
	$(BIN)/python bench/bench_methods.py --quick

clean:
	rm -rf $(OUT) .pytest_cache
