# Development and CI entry points on a CPU machine (Python 3.11). See README.md.
VENV ?= .venv
PYTHON := $(VENV)/bin/python
NPROC ?= 4

.PHONY: install run test benchmarks

$(VENV)/.installed: pyproject.toml
	python3 -m venv $(VENV)
	$(PYTHON) -m pip install -q torch==2.13.0
	$(PYTHON) -m pip install -q -e '.[test]'
	touch $@

install: $(VENV)/.installed

# The main job on its embedded default: tiny DeepSeek-V3 preset, mock data, 4 CPU ranks = PP2 x EP2 (x DP2).
run: install
	TORCHDYNAMO_DISABLE=1 $(VENV)/bin/torchrun --standalone --nproc-per-node $(NPROC) pretrain_dsv3.py \
		--pipeline-model-parallel-size 2 --expert-model-parallel-size 2 --use-distributed-optimizer

test: install
	TORCHDYNAMO_DISABLE=1 $(PYTHON) -m pytest -q
