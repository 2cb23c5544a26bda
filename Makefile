# dsv3 — the DeepSeek-V3 recipe, end to end.  `make setup`, `make test`, then `make pipeline`.
PYTHON  ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
RECIPE  ?= recipes/tiny.yaml
RUNS    ?= runs
SET     ?=
NAME    ?=
SEEDS   ?=
PROBE_SEEDS ?= 1
MODEL   ?= $(RUNS)/$(basename $(notdir $(RECIPE)))/latest/sft/model
LIMIT   ?=
DSV3    := $(BIN)/dsv3
export PREFECT_HOME ?= $(abspath $(RUNS))/prefect
LOCK    := requirements.lock
TORCH   ?= $(shell grep -E '^torch==' $(LOCK))
# gpu-check's python: the venv's, else the machine's own (a lent GPU machine has torch but no venv)
PY      ?= $(if $(wildcard $(BIN)/python),$(BIN)/python,python3)
# the stages, in order, from the recipe schema (dsv3.config.STAGE_ORDER: pydantic and yaml, no torch); none before setup
STAGES  := $(shell $(PY) -c 'from dsv3.config import STAGE_ORDER; print(*STAGE_ORDER)' 2>/dev/null)

# Ctrl-C (or SIGTERM) in `make ui` / `make serve`: stop the servers started in the background ($$pids: they ignore
# SIGINT, as background jobs of a script do), wait for them, exit 130 (143).
STOP_ON_SIGNAL = trap 'kill $$pids 2>/dev/null; wait; exit 130' INT; trap 'kill $$pids 2>/dev/null; wait; exit 143' TERM

.PHONY: setup lock test lint pipeline ablations probes eval ui serve clean-runs help gpu-check $(STAGES)

help:  ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-10s %s\n", $$1, $$2}'
	@echo "  make STAGE      run the flow up to STAGE, one of: $(STAGES)"
	@echo "  variables (now): RECIPE=$(RECIPE) RUNS=$(RUNS) SET='$(SET)' NAME='$(NAME)'"

setup: $(VENV)/.installed  ## create .venv and install the locked versions (requirements.lock; torch CPU build here)

# Every package comes from the lock at its exact version: pip, torch first (TORCH= picks another build of the same
# version, e.g. make setup TORCH=torch==2.13.0 for PyPI's CUDA build), then the rest with --no-deps, then dsv3
# itself, built with the locked setuptools. `pip check` proves the set is complete and consistent.
$(VENV)/.installed: pyproject.toml $(LOCK)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet "$$(grep -E '^pip==' $(LOCK))"
	grep -vE '^(pip|torch)==' $(LOCK) > $(VENV)/constraints.txt
	$(BIN)/pip install --quiet "$(TORCH)" -c $(VENV)/constraints.txt
	$(BIN)/pip install --quiet --no-deps -r $(VENV)/constraints.txt
	$(BIN)/pip install --quiet --no-deps --no-build-isolation -e .
	$(BIN)/pip check
	touch $@

lock:  ## re-resolve requirements.lock: the newest versions pyproject.toml allows, from a clean venv (then make test)
	rm -rf .lock-venv
	$(PYTHON) -m venv .lock-venv
	.lock-venv/bin/pip install --quiet --upgrade pip setuptools
	.lock-venv/bin/pip install --quiet "torch==$$(sed -n 's/.*"torch==\([^"]*\)".*/\1/p' pyproject.toml)"
	.lock-venv/bin/pip install --quiet -e '.[dev]'
	{ echo "# Exact versions of every Python package dsv3 installs (direct and transitive), for pip:"; \
	  echo "# written by 'make lock' on $$(date -u +%Y-%m-%d) ($$(.lock-venv/bin/python --version)); 'make setup' installs them."; \
	  .lock-venv/bin/pip freeze --all --exclude-editable; } > $(LOCK).partial
	mv $(LOCK).partial $(LOCK)
	rm -rf .lock-venv
	@echo "wrote $(LOCK); now: rm -rf $(VENV) && make setup && make test"

test:  ## run the test suite (fast: a few minutes on 2 cores)
	$(BIN)/pytest

gpu-check:  ## on a CUDA GPU (< 8 min): CUDA tests, FP8 vs BF16, small.yaml MFU, 4K decode -> OUT=dir or runs/gpu-check
	@$(PY) benchmarks/gpu_check.py $(if $(OUT),--out $(OUT))

lint:  ## ruff
	$(BIN)/ruff check dsv3 flows tests benchmarks

pipeline:  ## run every stage of RECIPE through the Prefect flow (SET='--set k=v' changes it, NAME= names the variant, SEEDS=3 runs 3 seeds and tabulates them)
	@mkdir -p $(RUNS)
	$(DSV3) run --recipe $(RECIPE) --runs-dir $(RUNS) $(if $(NAME),--name $(NAME)) $(if $(SEEDS),--seeds $(SEEDS)) $(SET)

ablations:  ## ablation pretrainings over SEEDS seeds (recipes/ablations): FP8, balancing, MTP vs the papers -> RUNS/ablations/
	@mkdir -p $(RUNS)
	$(DSV3) ablations --recipes recipes/ablations --runs-dir $(RUNS) --seeds $(or $(SEEDS),3)

probes:  ## the probes (recipes/probes): copying, retrieval and YaRN on synthetic rows; GRPO on a task SFT gets partly right
	@mkdir -p $(RUNS)
	$(DSV3) probes --recipes recipes/probes --runs-dir $(RUNS) --seeds $(PROBE_SEEDS)

eval:  ## lm-evaluation-harness on MODEL (default: RECIPE's latest sft model) with the project's tasks, LIMIT= examples each
	$(DSV3) eval $(MODEL) $(if $(LIMIT),--limit $(LIMIT))

$(STAGES):
	@mkdir -p $(RUNS)
	$(DSV3) run --recipe $(RECIPE) --runs-dir $(RUNS) --until $@ $(if $(NAME),--name $(NAME)) $(SET)

ui:  ## start the Prefect UI and the MLflow UI on 127.0.0.1 (Ctrl-C stops both)
	@mkdir -p $(RUNS)
	@$(DSV3) runs --runs-dir $(RUNS)  # lists the runs; a copied runs folder's MLflow store is moved with it
	@echo "Prefect UI: http://127.0.0.1:4200"
	@echo "MLflow UI:  http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	@$(BIN)/prefect server start --host 127.0.0.1 --port 4200 > $(RUNS)/prefect-server.log 2>&1 & pids=$$!; \
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(RUNS))/mlflow.db --host 127.0.0.1 --port 5000 \
		> $(RUNS)/mlflow-ui.log 2>&1 & pids="$$pids $$!"; \
	$(STOP_ON_SIGNAL); wait

serve:  ## the Prefect UI (127.0.0.1:4200) serving the pipeline as a deployment to run from there, and MLflow (5000)
	@mkdir -p $(RUNS)
	@$(DSV3) runs --runs-dir $(RUNS)  # lists the runs; a copied runs folder's MLflow store is moved with it
	@echo "Prefect UI: http://127.0.0.1:4200  (Deployments -> dsv3-pipeline / dsv3 -> Run)"
	@echo "MLflow UI:  http://127.0.0.1:5000/#/experiments?workflowType=machine_learning"
	@$(BIN)/prefect server start --host 127.0.0.1 --port 4200 > $(RUNS)/prefect-server.log 2>&1 & pids=$$!; \
	$(BIN)/mlflow ui --backend-store-uri sqlite:///$(abspath $(RUNS))/mlflow.db --host 127.0.0.1 --port 5000 \
		> $(RUNS)/mlflow-ui.log 2>&1 & pids="$$pids $$!"; \
	PREFECT_API_URL=http://127.0.0.1:4200/api $(DSV3) serve --runs-dir $(RUNS) & pids="$$pids $$!"; \
	$(STOP_ON_SIGNAL); wait

clean-runs:  ## delete every run, the MLflow database and the Prefect state under RUNS
	rm -rf $(RUNS)
