"""Recipe v5 (README "Results"): recipe v4 with the two-answer demonstration
(--demo jp+lake), MT-GRPO vs GRPO-OR vs GRPO-MR, seeds 0, 1, 2.

Recipe v4 (configs/compare_v4.py) brought MT-GRPO seeds 0 and 1 to test EM 0.461 and
0.452 at step 90, but seed 2 fell into the demonstration-answer trap: its training
rollouts answered right twice in 90 steps (1 of 32 at steps 9 and 39), so the outcome
reward was the same 0.4 (format and XML) for nearly every rollout and gave the answer turn
no signal, and its answers collapsed onto the demonstration's form: ".jp" to 68 of the 115
test questions at step 10, ".js" to 110 at step 40, while the reasoning often named the
right answer (README "Recipe v4"). v5 changes one thing: a second demonstration after
".jp" whose answer is a plain name copied from its tool result (tool_env.FEWSHOT_LAKE),
so the answer the policy starts from is no longer only ".jp"'s form
(results/diagnostics/answer_prior.md: the base model's answers under each). Everything
else is v4's: 90 steps, 2880 rollouts per run. The runs go to results/v5/runs/
(`make results`: results/v5/compare.{md,png}); MT-GRPO's seeds run first, seed 2 (v4's
trapped seed) before 0 and 1.

    python configs/compare_v5.py           # the 9 runs, skipping those in results/v5/runs/
    python configs/compare_v5.py --print   # the commands
"""

import sys

import compare
import queue_runs
from compare_v4 import STEPS
from sweep_recipe import RECIPE

SEED_ORDER = (2, 0, 1)
ORDER = [f"{m}-s{s}" for m in compare.METHODS for s in SEED_ORDER]


def jobs() -> list[tuple[str, list[str]]]:
    demo = RECIPE.index("--demo") + 1
    recipe = RECIPE[:demo] + ["jp+lake"] + RECIPE[demo + 1:]  # v4's, with the second demonstration
    by_name = dict(compare.jobs(recipe=recipe, runs="runs/compare_v5", steps=STEPS))
    return [(name, by_name[name]) for name in ORDER]


if __name__ == "__main__":
    sys.exit(queue_runs.main(__doc__, jobs(), "results/v5/runs", precision=compare.PRECISION))
