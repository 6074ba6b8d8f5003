# Set-up and checks for a fresh machine. `make demo` runs memplan on a built-in example,
# `make test` runs lint, types and the test suite. Both create .venv on first use.
PYTHON ?= python3
VENV   ?= .venv
# The CPU build keeps CI small; on a GPU machine pass your own, e.g. `make test TORCH=torch`.
TORCH  ?= torch==2.13.0+cpu
# Where the pinned wheel is not to be had, the CPU build from PyTorch's own CPU wheel index.
TORCH_CPU_INDEX ?= https://download.pytorch.org/whl/cpu
EXTRAS ?= dev
BIN    := $(VENV)/bin

.PHONY: demo test lint typecheck pytest clean

$(BIN)/.installed: pyproject.toml Makefile
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet "$(TORCH)" || { \
	  echo "make: $(TORCH) is not available here; installing the CPU build of torch from $(TORCH_CPU_INDEX)"; \
	  $(BIN)/python -m pip install --quiet torch --index-url "$(TORCH_CPU_INDEX)"; }
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	touch $@

demo: $(BIN)/.installed
	$(BIN)/memplan demo

lint: $(BIN)/.installed
	$(BIN)/ruff check memplan tests benchmarks examples tools
	$(BIN)/ruff format --check memplan tests benchmarks examples tools

typecheck: $(BIN)/.installed
	$(BIN)/mypy memplan

# pytest exits 5 when it collected nothing: for this project that is a failure, not a pass.
pytest: $(BIN)/.installed
	$(BIN)/python -m pytest -q; rc=$$?; \
	if [ $$rc -eq 5 ]; then echo "pytest collected no tests: failing"; exit 1; fi; exit $$rc

test: lint typecheck pytest

clean:
	rm -rf $(VENV) .mypy_cache .pytest_cache .ruff_cache
