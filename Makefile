# Every target creates .venv when it is missing, so a fresh clone needs nothing else.
# `make demo` installs resweep's runtime dependencies only; the other targets add the extras
# they need (dev: tests and linters; docs: the site builder). Each install leaves a stamp, so
# it runs again only when pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed
STAMP := $(VENV)/.installed-dev
DOCS := $(VENV)/.installed-docs

.PHONY: demo test test-all lint format bench docs clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# --no-compile: byte-compiling all of pandas and numpy up front took longer than the demo
# itself; Python compiles each module when it is first imported instead.
$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet --no-compile -e .
	touch $(RUNTIME)

# An install with extras installs the runtime too, so it renews the runtime stamp as well.
$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUNTIME)

$(DOCS): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[docs]'
	touch $(DOCS) $(RUNTIME)

demo: $(RUNTIME)
	rm -rf results/quickstart
	$(BIN)/python experiments/quickstart.py run --max-workers 2 || true
	@echo "--- running it again runs nothing:"
	$(BIN)/python experiments/quickstart.py run --max-workers 2 || true
	$(BIN)/python experiments/quickstart.py status
	$(BIN)/python -c "import resweep; print(resweep.load_summary('results/quickstart').head(10).to_string())"

test: $(STAMP)
	$(BIN)/python -m pytest -q -m "not slow"

test-all: $(STAMP)
	$(BIN)/python -m pytest -q

lint: $(STAMP)
	$(BIN)/ruff check src tests benchmarks experiments
	$(BIN)/ruff format --check src tests benchmarks experiments
	$(BIN)/mypy
	$(BIN)/lint-imports

format: $(STAMP)
	$(BIN)/ruff check --fix src tests benchmarks experiments
	$(BIN)/ruff format src tests benchmarks experiments

bench: $(STAMP)
	$(BIN)/python -m pip install --quiet -e '.[dev,bench]'
	$(BIN)/python benchmarks/run_all.py

# The site from docs/ into site/; --strict fails on a broken link, anchor or API reference.
# NO_MKDOCS_2_WARNING silences a banner Material for MkDocs prints on every build.
docs: $(DOCS)
	NO_MKDOCS_2_WARNING=1 $(BIN)/mkdocs build --strict

clean:
	rm -rf $(VENV) results site .pytest_cache .mypy_cache .ruff_cache
