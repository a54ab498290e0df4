# `make setup` then `make test`: the two commands the README gives.
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
# The CPU build of torch that this project is tested with; GPU machines keep their own
# (set TORCH_SPEC= to skip the pin, e.g. `make setup TORCH_SPEC=`).
TORCH_SPEC ?= torch==2.13.0

.PHONY: setup test test-all lint tiny clean

setup:
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --upgrade pip
	$(if $(TORCH_SPEC),$(BIN)/pip install "$(TORCH_SPEC)")
	$(BIN)/pip install -e client
	$(BIN)/pip install -e ".[dev]"

test: lint
	$(BIN)/pytest -m "not slow and not gpu"

test-all:
	$(BIN)/pytest

lint:
	$(BIN)/ruff check vdiff client tools tests perf model_repository deploy
	$(BIN)/ruff format --check vdiff client tools tests perf model_repository deploy
	$(BIN)/mypy

tiny:
	$(BIN)/python tools/make_tiny_model.py --arch llada --out build/tiny-llada
	$(BIN)/python tools/make_tiny_model.py --arch dream --out build/tiny-dream

clean:
	rm -rf $(VENV) build .pytest_cache .mypy_cache .ruff_cache
