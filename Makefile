# The two commands of the README: `make demo` and `make test`. Both set everything up first.
PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
RUN_DIR ?= runs/demo
DATA_DIR ?= data/demo
NPROC ?= 2

.PHONY: setup demo test bench clean

# Creates or updates .venv with the package installed editable (re-runs when pyproject changes).
setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	$(BIN)/python -m pip install --quiet -e '.[dev]'
	touch $@

demo: setup
	$(BIN)/polytask data demo --out $(DATA_DIR)
	$(BIN)/polytask launch configs/demo_cpu.yaml --nproc-per-node $(NPROC) run.dir=$(RUN_DIR)

test: setup
	$(BIN)/python -m pytest -q tests

# The quick benches; each is a module of bench/ (`python -m bench.<name> --help`).
bench: setup
	$(BIN)/python -m bench.step_overhead
	$(BIN)/python -m bench.data_pipeline
	$(BIN)/python -m bench.checkpoint_save

clean:
	rm -rf runs $(DATA_DIR)
