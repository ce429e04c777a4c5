"""MT-GRPO vs GRPO-OR vs GRPO-MR with recipe v3 (README "Recipe v3"): 3 methods x seeds 0, 1, 2.

Recipe v3 (configs/sweep_recipe.py's RECIPE, chosen on the validation split: results/README.md)
is G = 8, 4 questions per step, mu = 1, lr 3e-5 with 5 steps of warm-up and a cosine decay
to 0.1 x lr, 64 tokens per turn, the demonstration, and contains_answer only for answers at
most one word longer than the gold; 60 steps, 1920 rollouts per run (recipe v1: 960), in
bf16 (PRECISION, below). The three methods share every setting but --method, and run with
the same seeds.
Evaluation is greedy on the whole TEST split before training and every 10 steps, so the
curves are whole. Runs take hours on a 2-core CPU: this driver starts what is missing and
resumes what is unfinished, so run it again after a kill or in a later sitting, one run at
a time (queue_runs.py says why). Each run's log, config and evaluations are copied to
results/runs/ as they grow; `make results` then rebuilds the table (results/compare.md)
and the plot (results/compare.png). Earlier recipes: configs/compare_v1.py (results/v1/),
configs/compare_v2.py (results/v2/).

    python configs/compare.py              # the 9 runs, skipping those in results/runs/
    python configs/compare.py --print      # the commands
    python configs/compare.py --only mt-grpo-s1,grpo-or-s1   # these runs, in this order
"""

import sys

import queue_runs
from sweep_recipe import RECIPE

METHODS = ("mt-grpo", "grpo-or", "grpo-mr")
SEEDS = (0, 1, 2)
STEPS = 60
# Every run in one precision, bf16 (recipe v2's seed 0 ran in it): a CPU without bf16 units would
# emulate it ~20x slower, and --precision auto would mix precisions in one table, so the
# driver stops there (queue_runs.main). results/v2_fp32_partial/ is seed 0 in float32.
PRECISION = "bf16"
COMMON = ["--precision", PRECISION, "--eval-every", "10", "--eval-split", "test",
          "--eval-questions", "0", "--save-every", "5"]


def jobs(recipe: list[str] = RECIPE, runs: str = "runs/compare_v3", steps: int = STEPS) -> list[tuple[str, list[str]]]:
    """The runs of one recipe (configs/compare_v2.py passes recipe v2's, compare_v4.py
    more steps), output under `runs`."""
    # seeds in the outer loop: the comparison of a seed is complete before the next starts
    return [(f"{m}-s{s}", recipe + COMMON + ["--steps", str(steps), "--method", m, "--seed", str(s),
                                             "--output-dir", f"{runs}/{m}-s{s}"])
            for s in SEEDS for m in METHODS]

if __name__ == "__main__":
    sys.exit(queue_runs.main(__doc__, jobs(), "results/runs", precision=PRECISION))
