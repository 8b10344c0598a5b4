# Two commands a user needs: `make demo` and `make test`. Both create .venv from nothing,
# install torch first and pinned (the CPU build), then this package with its dev extra.
PYTHON ?= python3
VENV ?= .venv
TORCH_VERSION ?= 2.13.0
BIN := $(VENV)/bin

.PHONY: venv demo test bench clean

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q torch==$(TORCH_VERSION)
	$(BIN)/pip install -q -e ".[dev]"
	touch $@

venv: $(BIN)/.installed

demo: venv
	WANDB_MODE=$${WANDB_MODE:-offline} $(BIN)/python examples/digits_mlp.py

test: venv
	WANDB_MODE=offline $(BIN)/python -m pytest -q tests

bench: venv
	$(BIN)/python benchmarks/compress.py

clean:
	rm -rf $(VENV) build *.egg-info
