"""Issue 24 §3 again, with the forced answer: MT-GRPO vs GRPO-OR vs GRPO-MR on
--task factbook-2hop, seeds 0 and 1, exactly as configs/compare_2hop.py plus --force-answer:
after the second search's result the environment starts the next turn with "<answer>".

Why: in compare_2hop's runs no method answered. From step 20 every episode made a third
call and ended at the tool limit, so R^O was the same across each group and the last turn
got no advantage; the base model never answers after two searches, even when told that no
search is left (results/diagnostics/two_hop_third_turn.md). With the rule every episode
that searched twice ends with an answer, and exact match can tell the groups' episodes
apart (docs/task.md, "The forced answer").

Logs, configs and evaluations are copied to results/runs_2hop_forced/.

    python configs/compare_2hop_forced.py              # the 6 runs, skipping those in results/runs_2hop_forced/
    python configs/compare_2hop_forced.py --print      # the commands
"""

import sys

import queue_runs
from compare_2hop import COMMON, METHODS, PRECISION, SEEDS


def jobs() -> list[tuple[str, list[str]]]:
    return [(f"{m}-s{s}", COMMON + ["--force-answer", "--method", m, "--seed", str(s),
                                    "--output-dir", f"runs/compare_2hop_forced/{m}-s{s}"])
            for s in SEEDS for m in METHODS]


if __name__ == "__main__":
    sys.exit(queue_runs.main(__doc__, jobs(), "results/runs_2hop_forced", precision=PRECISION))
