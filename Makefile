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
SAM_MODEL ?=  # vit_h|vit_l|vit_b, sam2.1_hiera_tiny|small|base_plus|large, hq_vit_b|l|h
SAM_POINTS ?=
DENSE ?=   # the dense 2D teacher: maskclip (default) | sclip | clearclip | naclip (docs/teachers.md)
SIMULATE ?=
LABELS_ARGS ?=
FRAMES ?=  # make bench-scale: copies of the nuScenes keyframe (default 2000)
FULL ?=    # make bench-cns FULL=1: every Table 2 row, 3 seeds (hours on CPU)
DEVICE ?= cpu  # make bench-cns DEVICE=cuda: train the benchmark's networks on a GPU
JOBS ?= 2      # make bench-cns: training processes side by side, one (dataset, seed) pair each at a time

# make train / make eval variables (passed through to `cns-cli train` / `cns-cli eval`)
STORE ?= $(CACHE)/$(DATASET)-train.zarr
EVAL_STORE ?= $(CACHE)/$(DATASET)-val.zarr
CONFIG ?= $(DATASET)
RUN ?= runs/$(DATASET)
TRAIN_ARGS ?=
EVAL_ARGS ?=

opt = $(if $(strip $(2)),$(1) $(2),)

.PHONY: help install demo test test-all labels train eval weights bench bench-stages bench-scale bench-sam bench-cns bench-rooms16 bench-gates bench-teachers gpu-check clean

help:  ## list the targets
	@grep -E '^[a-zA-Z_-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  labels variables: DATASET=nuscenes|nuimages|scannet|synthetic|folder DATA_ROOT=... SPLIT=... CACHE=$(CACHE) STAGES=$(STAGES)"
	@echo "                    WORKERS=N SCHEDULER=tcp://host:port SHARD_SIZE=N CLIP_CKPT=... SAM_CKPT=... SAM_MODEL=vit_h|vit_l|vit_b|sam2.1_hiera_*|hq_vit_* SAM_POINTS=32"
	@echo "                    DENSE=maskclip|sclip|clearclip|naclip (the dense CLIP teacher, docs/teachers.md)"
	@echo "                    SIMULATE=default|file.yaml (BENCHMARK ONLY: simulated CLIP/SAM from the ground truth)"
	@echo "  train/eval variables: STORE=... EVAL_STORE=... CONFIG=... RUN=... TRAIN_ARGS='key=value ...' EVAL_ARGS=..."

install:  ## create .venv and install the project with every dependency
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install -e '.[test]'
	@# SAM 2.1 (the [sam2] extra) for the tests of every SAM family: a source package; built against the torch
	@# just installed (no isolated build environment, which would download torch a second time), CPU only
	SAM2_BUILD_CUDA=0 $(BIN)/python -m pip install --no-build-isolation 'sam2==1.1.0'
	touch $(VENV)/.installed

# make test / make demo on a fresh clone: install first when nothing is installed yet
$(VENV)/.installed:
	$(MAKE) install

# make demo: the whole system offline on synthetic streets, in DEMO (about 11 minutes on 2 CPU cores, the
# install included). The streets of the controlled-noise benchmark (bench/bench_cns.py: 16 train / 4 val, rare
# objects boosted, objects in their class's colour), so its stores are the benchmark's street stores.
DEMO ?= runs/demo
DEMO_SCENES ?= 16
DEMO_VAL_SCENES ?= 4
DEMO_STREETS = --dataset-option kind=street --dataset-option rare_boost=4 --dataset-option class_colours=1
DEMO_LABELS = $(if $(and $(CLIP_CKPT),$(SAM_CKPT)),--clip-checkpoint $(CLIP_CKPT) --sam-checkpoint $(SAM_CKPT),--simulate default)

# no prerequisite: the first line of output says where the labels come from, before a fresh clone's install
demo:  ## the whole system offline: synthetic data, labels, CNS training, eval, HTML report
	@if [ -n "$(CLIP_CKPT)" ] && [ -n "$(SAM_CKPT)" ]; then \
	  echo "make demo: pseudo-labels from the real CLIP ($(CLIP_CKPT)) and SAM ($(SAM_CKPT)) checkpoints"; \
	else \
	  echo "make demo: no CLIP_CKPT/SAM_CKPT given -- pseudo-labels from the SIMULATED foundation models (a benchmark component, docs/simulate.md), not from CLIP/SAM"; \
	fi
	@test -f $(VENV)/.installed || $(MAKE) --no-print-directory install
	@echo "[1/5] synthetic street scenes, correspondences and pseudo-labels -> $(DEMO)/cache"
	@$(CLI) labels --dataset synthetic --cache $(DEMO)/cache --split train --workers 0 $(DEMO_LABELS) \
	  $(DEMO_STREETS) --dataset-option num_scenes=$(DEMO_SCENES) --dataset-option cache_size=$(DEMO_SCENES)
	@$(CLI) labels --dataset synthetic --cache $(DEMO)/cache --split val --workers 0 $(DEMO_LABELS) \
	  $(DEMO_STREETS) --dataset-option num_scenes=$(DEMO_VAL_SCENES) --dataset-option cache_size=$(DEMO_VAL_SCENES)
	@echo "[2/5] co-training the 2D and 3D networks on CPU (stage 1, then label switching) -> $(DEMO)/run"
	@$(CLI) train --cache $(DEMO)/cache/synthetic-train.zarr --eval-cache $(DEMO)/cache/synthetic-val.zarr \
	  --config demo_street_cpu --out $(DEMO)/run $(if $(wildcard $(DEMO)/run/checkpoints/last.pth),--resume,) > /dev/null
	@echo "[3/5] evaluation on the val scenes against the baselines"
	@$(CLI) eval --cache $(DEMO)/cache/synthetic-val.zarr --run $(DEMO)/run
	@echo "[4/5] HTML report (pseudo-labels, predictions, training curves, mIoU table)"
	@$(CLI) inspect report $(DEMO)/cache/synthetic-val.zarr --run $(DEMO)/run --out $(DEMO)/report --frames 3
	@echo "[5/5] done. Report: $(DEMO)/report/report.html"

test: $(VENV)/.installed  ## run the test suite (CPU; installs first on a fresh clone)
	$(BIN)/python -m pytest -q -ra --durations=10

test-all: $(VENV)/.installed  ## the test suite including tests marked slow
	$(BIN)/python -m pytest -q -ra --durations=10 --run-slow

labels:  ## run the pseudo-label stages into CACHE (see variables above)
	$(CLI) labels --dataset $(DATASET) --cache $(CACHE) --stages $(STAGES) --workers $(WORKERS) \
	  $(call opt,--data-root,$(DATA_ROOT)) $(call opt,--split,$(SPLIT)) $(call opt,--scheduler,$(SCHEDULER)) \
	  $(call opt,--shard-size,$(SHARD_SIZE)) $(call opt,--clip-checkpoint,$(CLIP_CKPT)) \
	  $(call opt,--sam-checkpoint,$(SAM_CKPT)) $(call opt,--sam-model,$(SAM_MODEL)) \
	  $(call opt,--sam-points-per-side,$(SAM_POINTS)) $(call opt,--simulate,$(SIMULATE)) \
	  $(call opt,--stage-option,$(if $(strip $(DENSE)),maskclip.dense=$(strip $(DENSE)))) $(LABELS_ARGS)

train:  ## co-train the 2D and 3D networks on STORE (CONFIG=nuscenes|scannet|synthetic_street_cpu|..., RUN=dir)
	$(CLI) train --cache $(STORE) --config $(CONFIG) --out $(RUN) $(call opt,--eval-cache,$(wildcard $(EVAL_STORE))) $(TRAIN_ARGS)

eval:  ## mIoU tables of RUN and the baselines on EVAL_STORE
	$(CLI) eval --cache $(EVAL_STORE) --run $(RUN) $(EVAL_ARGS)

weights:  ## download the official CLIP ViT-B/16 and SAM checkpoints (SAM_MODEL=..., default vit_h; 'all') into checkpoints/ (needs internet)
	$(BIN)/python -m pipeline.models.weights --dest checkpoints $(call opt,--sam,$(SAM_MODEL))

BENCH_ARGS ?=  # make bench: --full (SAM 32x32 prompts, longer runs), --parts refine,stages,...

bench:  ## the performance suite: every figure beside its reference -> bench/results/perf.json (~10 min on 2 cores)
	$(BIN)/python bench/perf.py $(BENCH_ARGS)

bench-stages:  ## model-stage throughput and cache bytes per image (real architectures, random weights; slow on CPU)
	$(BIN)/python bench/bench_stages.py

bench-scale:  ## scale rehearsal: the nuScenes keyframe x FRAMES (2000): planning, correspond 1 vs 2 workers, pairs commit
	$(BIN)/python bench/bench_scale.py $(call opt,--frames,$(FRAMES))

bench-cns: $(VENV)/.installed  ## controlled-noise Table 2 on simulated labels (quick rows, 1 seed; FULL=1: all rows, 3 seeds; times measured in docs/benchmark.md)
	$(BIN)/python bench/bench_cns.py --device $(DEVICE) --jobs $(JOBS) $(if $(strip $(FULL)),--full,)

ROOMS16_ROWS ?= Baseline,w/o CNS,Ours,w/o SCT,Ours, first pair
bench-rooms16: $(VENV)/.installed  ## rooms at the paper's 16 images a step: Ours, w/o SCT, w/o CNS, Ours with first-pair targets; 3 seeds (hours on CPU; docs/benchmark.md)
	$(BIN)/python bench/bench_cns.py --device $(DEVICE) --jobs $(JOBS) --datasets rooms16 --seeds 3 \
		--rows "$(ROOMS16_ROWS)" --tag cns_rooms16

GATE_ROWS ?= Ours,w/o SCT,Ours, gate confidence,Ours, gate agree SAM
GATE_DATASETS ?= street,rooms16
GATE_TAG ?= cns_gates
bench-gates: $(VENV)/.installed  ## stage-2 gates (labels.switch_gate) against Ours and w/o SCT on streets and 16-image rooms; 3 seeds (hours on CPU; docs/benchmark.md)
	$(BIN)/python bench/bench_cns.py --device $(DEVICE) --jobs $(JOBS) --datasets $(GATE_DATASETS) --seeds 3 \
		--oracle-seeds 1 --rows "$(GATE_ROWS)" --tag $(GATE_TAG)

bench-sam:  ## SAM per-image cost, upstream vs batched generator, projected GPU-hours (bench/results/sam.json; ~30 min on CPU)
	$(BIN)/python bench/bench_sam.py

# make gpu-check: PREPARE=1 here (wheels for the GPU machine in .whl/, CPU references in .gpu_ref/, prints what to
# carry and the command), then the check on the GPU machine (bench/results/gpu.json); DRY=1: the same on CPU, tiny
PREPARE ?=
DRY ?=
GPU_OUT ?=
GPU_CHECK = bench/gpu_check.py $(if $(strip $(PREPARE)),--prepare,) $(if $(strip $(DRY)),--dry,) $(call opt,--out,$(strip $(GPU_OUT)))

gpu-check:  ## CUDA correctness + speed (docs/performance-gpu.md): PREPARE=1 here, then on the GPU; DRY=1 on CPU
	$(if $(or $(strip $(PREPARE)),$(strip $(DRY))),$(BIN)/python,$(PYTHON)) $(GPU_CHECK)

bench-teachers:  ## CPU cost per image of every 2D teacher side by side (bench/results/teachers.json; docs/teachers.md)
	$(BIN)/python bench/bench_teachers.py

clean:  ## remove caches of Python and pytest
	find . -name __pycache__ -prune -exec rm -rf {} + ; rm -rf .pytest_cache
