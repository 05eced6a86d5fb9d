# Label-free scene understanding (CNS). `make help` lists the targets.
SHELL := /bin/bash
PYTHON ?= python3
VENV ?= .venv
BIN := $(VENV)/bin
CLI := $(BIN)/cns-cli

# make labels variables (passed through to `cns-cli labels`)
DATASET ?= nuscenes
DATA_ROOT ?=
SPLIT ?=
CACHE ?= data_cache/stores
STAGES ?= correspond,maskclip,sam,refine
WORKERS ?= 1
SCHEDULER ?=
SHARD_SIZE ?=
CLIP_CKPT ?=
SAM_CKPT ?=
SAM_MODEL ?=
SAM_POINTS ?=
LABELS_ARGS ?=

# make train / make eval variables (passed through to `cns-cli train` / `cns-cli eval`)
STORE ?= $(CACHE)/$(DATASET)-train.zarr
EVAL_STORE ?= $(CACHE)/$(DATASET)-val.zarr
CONFIG ?= $(DATASET)
RUN ?= runs/$(DATASET)
TRAIN_ARGS ?=
EVAL_ARGS ?=

opt = $(if $(strip $(2)),$(1) $(2),)

.PHONY: help install test test-all labels train eval weights bench bench-stages bench-sam clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  labels variables: DATASET=nuscenes|scannet|synthetic DATA_ROOT=... SPLIT=... CACHE=$(CACHE) STAGES=$(STAGES)"
	@echo "                    WORKERS=N SCHEDULER=tcp://host:port SHARD_SIZE=N CLIP_CKPT=... SAM_CKPT=... SAM_MODEL=vit_h|vit_l|vit_b SAM_POINTS=32"
	@echo "  train/eval variables: STORE=... EVAL_STORE=... CONFIG=... RUN=... TRAIN_ARGS='key=value ...' EVAL_ARGS=..."

install:  ## create .venv and install the project with every dependency
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'

test:  ## run the test suite (CPU, a few minutes)
	$(BIN)/python -m pytest -q -ra

test-all:  ## the test suite including tests marked slow
	$(BIN)/python -m pytest -q -ra --run-slow

labels:  ## run the pseudo-label stages into CACHE (see variables above)
	$(CLI) labels --dataset $(DATASET) --cache $(CACHE) --stages $(STAGES) --workers $(WORKERS) \
	  $(call opt,--data-root,$(DATA_ROOT)) $(call opt,--split,$(SPLIT)) $(call opt,--scheduler,$(SCHEDULER)) \
	  $(call opt,--shard-size,$(SHARD_SIZE)) $(call opt,--clip-checkpoint,$(CLIP_CKPT)) \
	  $(call opt,--sam-checkpoint,$(SAM_CKPT)) $(call opt,--sam-model,$(SAM_MODEL)) \
	  $(call opt,--sam-points-per-side,$(SAM_POINTS)) $(LABELS_ARGS)

train:  ## co-train the 2D and 3D networks on STORE (CONFIG=nuscenes|scannet|synthetic_street_cpu|..., RUN=dir)
	$(CLI) train --cache $(STORE) --config $(CONFIG) --out $(RUN) $(TRAIN_ARGS)

eval:  ## mIoU tables of RUN and the baselines on EVAL_STORE
	$(CLI) eval --cache $(EVAL_STORE) --run $(RUN) $(EVAL_ARGS)

weights:  ## download the official CLIP ViT-B/16 and SAM checkpoints into checkpoints/ (needs internet)
	$(BIN)/python -m pipeline.models.weights --dest checkpoints

bench:  ## the quick benchmarks (correspondences, Eq. 4 refine, synthetic scenes); numbers in the README
	$(BIN)/python bench/bench_correspond.py
	$(BIN)/python bench/bench_refine.py
	$(BIN)/python bench/bench_synthetic.py

bench-stages:  ## model-stage throughput and cache bytes per image (real architectures, random weights; slow on CPU)
	$(BIN)/python bench/bench_stages.py

bench-sam:  ## SAM per-image cost, upstream vs batched generator, projected GPU-hours (bench/results/sam.json; ~30 min on CPU)
	$(BIN)/python bench/bench_sam.py

clean:  ## remove caches of Python and pytest
	find . -name __pycache__ -prune -exec rm -rf {} + ; rm -rf .pytest_cache
