"""Recipe v2 (history): MT-GRPO vs GRPO-OR vs GRPO-MR, 3 methods x seeds 0, 1, 2.

The second comparison, stopped after three runs when MT-GRPO's seed 1 fell into the
verbose-answer trap (results/README.md; recipe v3's comparison is configs/compare.py).
Recipe v2 is configs/sweep_recipe.py's RECIPE_V2: recipe v3 without the contains_answer
limit. Everything else is configs/compare.py's. The finished runs are in results/v2/runs/
(`make results`: results/v2/compare.{md,png}); seed 1's MT-GRPO, stopped at step 33, is
results/v2_partial/.

    python configs/compare_v2.py           # the 9 runs, skipping those in results/v2/runs/
    python configs/compare_v2.py --print   # the commands
"""

import sys

import compare
import queue_runs
from sweep_recipe import RECIPE_V2


def jobs() -> list[tuple[str, list[str]]]:
    return compare.jobs(RECIPE_V2, "runs/compare_v2")


if __name__ == "__main__":
    sys.exit(queue_runs.main(__doc__, jobs(), "results/v2/runs", precision=compare.PRECISION))
