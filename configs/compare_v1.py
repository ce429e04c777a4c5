"""Recipe v1 (history): MT-GRPO vs GRPO-OR vs GRPO-MR, 3 methods x seeds 0, 1, 2.

The first comparison, kept as it ran (results/v1/; recipe v2's is configs/compare.py).

One train.py command per run (`--print` lists them); the three methods share every
setting but --method, and run with the same seeds. The configuration comes from an lr
sweep and a pilot on the validation split (results/README.md, "Choosing the
configuration"); configs/sweep.py is the wider sweep, not yet run on the cleaned task.
Evaluation is greedy on the whole TEST split before training, midway and at the end.
Runs take hours on a 2-core CPU: this driver starts what is missing and resumes what
is unfinished, so run it again after a kill or in a later sitting; one run at a time
with every core (queue_runs.py says why). Each run's log, config and evaluations are
copied to results/v1/runs/ as they grow; `make results` then rebuilds the table
(results/v1/compare.md) and the plot (results/v1/compare.png).

    python configs/compare_v1.py           # the 9 runs, skipping those in results/v1/runs/
    python configs/compare_v1.py --print   # the commands
"""

import sys

import queue_runs
from sweep import BASE

METHODS = ("mt-grpo", "grpo-or", "grpo-mr")
SEEDS = (0, 1, 2)
STEPS = 60
COMMON = BASE + ["--steps", str(STEPS), "--eval-every", str(STEPS // 2), "--eval-split", "test",
                 "--eval-questions", "0", "--save-every", "5"]


def jobs() -> list[tuple[str, list[str]]]:
    # seeds in the outer loop: the comparison of a seed is complete before the next starts
    return [(f"{m}-s{s}", COMMON + ["--method", m, "--seed", str(s), "--output-dir", f"runs/compare/{m}-s{s}"])
            for s in SEEDS for m in METHODS]


if __name__ == "__main__":
    sys.exit(queue_runs.main(__doc__, jobs(), "results/v1/runs"))
