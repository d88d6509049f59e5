# The one command surface. `make serve` and `make test` work on a fresh clone: they create .venv first.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
ARGS ?=

.PHONY: serve test lint install install-dev bench clean

$(BIN)/python:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip

install: $(BIN)/python
	$(BIN)/pip install .

install-dev: $(BIN)/python
	$(BIN)/pip install ".[dev]"

serve: install
	$(BIN)/mlx-flash serve $(ARGS)

test: install-dev
	cargo test --workspace
	$(BIN)/pytest $(ARGS)

lint: install-dev
	$(BIN)/ruff check python tests bench
	$(BIN)/ruff format --check python tests bench
	$(BIN)/mypy
	cargo fmt --all -- --check
	cargo clippy --all-targets -- -D warnings

bench: install-dev
	$(BIN)/python bench/single_stream.py $(ARGS)
	$(BIN)/python bench/demo_skills.py
	$(BIN)/python bench/sidecar_overhead.py
	$(BIN)/python bench/report.py --write README.md

clean:
	rm -rf $(VENV) target dist build
