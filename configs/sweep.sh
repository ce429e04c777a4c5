#!/usr/bin/env bash
# The learning-rate sweep behind configs/compare.sh, judged on the VALIDATION split
# (greedy, 32 questions) only. Everything else is fixed at compare.sh's values.
# Note: the sweep in README ran before train.py spread its evaluation questions over
# the split, so it was judged on the FIRST 32 validation questions (6 countries).
# CPU budget (2 cores): the three runs go side by side, one thread each.
# What was run and why: README "Results".
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
OUT=${OUT:-runs/sweep}
mkdir -p "$OUT"
for lr in 1e-5 3e-5 1e-4; do
  OMP_NUM_THREADS=1 $PY train.py --method mt-grpo --fewshot --lr $lr --steps 12 --group-size 4 \
    --questions-per-step 2 --mu 2 --max-turn-tokens 128 --eval-every 12 --eval-split validation \
    --eval-questions 32 --save-every 100 --output-dir "$OUT/lr$lr" > "$OUT/lr$lr.out" 2>&1 &
done
wait
