"""Issue 24 §3: does K-turn credit help on the two-hop task? MT-GRPO vs GRPO-OR vs GRPO-MR,
seeds 0 and 1, on --task factbook-2hop (two searches: the bridge country, then the answer;
TWO_HOP_RUBRIC gives each search its own turn reward), --max-tool-calls 2.

The recipe is recipe v3 (configs/sweep_recipe.py's RECIPE, as configs/compare.py), with 40
steps and the cosine decay over those 40. Evaluation is greedy on the whole two-hop TEST split (53 questions) before training
and every 10 steps. It runs after configs/compare.py, one run at a time, and resumes what
is unfinished (queue_runs.py). Logs, configs and evaluations are copied to results/runs_2hop/.

    python configs/compare_2hop.py              # the 6 runs, skipping those in results/runs_2hop/
    python configs/compare_2hop.py --print      # the commands
"""

import sys

import queue_runs
from sweep_recipe import RECIPE

METHODS = ("mt-grpo", "grpo-or", "grpo-mr")
SEEDS = (0, 1)
STEPS = 40
# Every run in one precision, bf16, as configs/compare.py (queue_runs.main stops on a
# machine where bf16 is not the fast precision rather than mix precisions in one table).
PRECISION = "bf16"
COMMON = RECIPE + ["--precision", PRECISION, "--task", "factbook-2hop", "--max-tool-calls", "2", "--steps", str(STEPS),
                   "--lr-decay-steps", str(STEPS),  # the cosine over these 40 steps, not recipe v3's 60
                   "--eval-every", "10", "--eval-split", "test", "--eval-questions", "0", "--save-every", "5"]


def jobs() -> list[tuple[str, list[str]]]:
    return [(f"{m}-s{s}", COMMON + ["--method", m, "--seed", str(s), "--output-dir", f"runs/compare_2hop/{m}-s{s}"])
            for s in SEEDS for m in METHODS]


if __name__ == "__main__":
    sys.exit(queue_runs.main(__doc__, jobs(), "results/runs_2hop", precision=PRECISION))
