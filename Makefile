# Every target creates .venv when it is missing, so a fresh clone needs nothing else.
# `make demo` installs resweep's runtime dependencies only; the other targets add the dev
# extras (tests and linters). Each install leaves a stamp, so it runs again only when
# pyproject.toml changes.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUNTIME := $(VENV)/.installed
STAMP := $(VENV)/.installed-dev

.PHONY: demo test test-all lint format bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip

# An install with extras installs the runtime too, so it renews the runtime stamp as well.
$(RUNTIME): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e .
	touch $(RUNTIME)

$(STAMP): pyproject.toml | $(BIN)/python
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $(STAMP) $(RUNTIME)

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

clean:
	rm -rf $(VENV) results .pytest_cache .mypy_cache .ruff_cache
