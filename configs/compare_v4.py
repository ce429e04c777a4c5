"""Recipe v4: recipe v3 trained for 90 steps, MT-GRPO vs GRPO-OR vs GRPO-MR, seeds 0, 1, 2.

Recipe v3's comparison (configs/compare.py, results/runs/) stopped at 60 steps while its
curves were still rising: MT-GRPO's test EM went up from step 50 to step 60 in seeds 0
and 2 (0.409 -> 0.426, 0.417 -> 0.452), and its training EM rose through step 50 in
every seed. Issue 20 asks for as many steps as the curves need to settle, so v4 is v3
with 90 steps: the same warm-up and the same cosine decay, which reaches 0.1 x lr at step
60 (--lr-decay-steps' default), then 30 more steps at that floor; 2880 rollouts per run.
Nothing else changes. The runs go to results/v4/runs/
(`make results`: results/v4/compare.{md,png}); MT-GRPO's seeds run first, since they
decide whether the longer recipe reaches the targets.

Outcome: MT-GRPO seeds 0 and 1 reached 0.461 and 0.452, seed 2 fell into the
demonstration-answer trap (EM 0 from step 20), so the GRPO-OR and GRPO-MR runs were not
made (README "Recipe v4"); recipe v5 (configs/compare_v5.py) follows.

    python configs/compare_v4.py           # the 9 runs, skipping those in results/v4/runs/
    python configs/compare_v4.py --print   # the commands
"""

import sys

import compare
import queue_runs

STEPS = 90
ORDER = [f"{m}-s{s}" for m in compare.METHODS for s in compare.SEEDS]  # a method's seeds together


def jobs() -> list[tuple[str, list[str]]]:
    by_name = dict(compare.jobs(runs="runs/compare_v4", steps=STEPS))
    return [(name, by_name[name]) for name in ORDER]


if __name__ == "__main__":
    sys.exit(queue_runs.main(__doc__, jobs(), "results/v4/runs", precision=compare.PRECISION))
