#!/usr/bin/env bash
# MT-GRPO vs GRPO-OR vs GRPO-MR at small scale (issue 5, README "Results").
# One command per method; all three share every setting but --method, and run with
# the same seeds. The learning rate comes from configs/sweep.sh (validation only);
# evaluation is greedy on 32 TEST questions spread over the split (22 of its 23
# held-out countries), before training and every 5 steps. Sized for a 2-core CPU:
# the three methods of a seed run side by side with one thread each (up to 4 GB of
# memory each), seeds one after the other. At the end each run's log, config and
# evaluations are copied to results/runs/; `make results` then rebuilds the table
# (results/compare.md) and the plot (results/compare.png) from them.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/compare}
SEEDS=${SEEDS:-"0 1"}
STEPS=${STEPS:-10}
COMMON="--fewshot --lr 1e-4 --steps $STEPS --group-size 4 --questions-per-step 2 --mu 2 --max-turn-tokens 128
        --eval-every 5 --eval-split test --eval-questions 32 --save-every 5"
mkdir -p "$OUT"
for seed in $SEEDS; do
  for method in mt-grpo grpo-or grpo-mr; do
    run="$OUT/$method-s$seed"
    resume=""; [ -f "$run/checkpoint/trainer_state.pt" ] && resume="--resume"  # continue after a kill
    OMP_NUM_THREADS=1 $PY train.py --method $method $COMMON --seed $seed --output-dir "$run" $resume > "$run.out" 2>&1 &
  done
  wait
done
for seed in $SEEDS; do
  for method in mt-grpo grpo-or grpo-mr; do
    mkdir -p "results/runs/$method-s$seed"
    cp -r "$OUT/$method-s$seed/log.jsonl" "$OUT/$method-s$seed/config.json" "$OUT/$method-s$seed/evals" "results/runs/$method-s$seed/"
  done
done
