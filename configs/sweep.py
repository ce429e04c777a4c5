"""Validation sweep of the comparison's configuration (results/README.md, "Choosing the
configuration"; lr 3e-5 and 1e-4 at T = 0.9 are committed in results/sweep/).

Each run is MT-GRPO from the embedded model with the few-shot prompt, evaluated
greedily on the whole VALIDATION split (never test) before training and every 10
steps. Swept: the learning rate (1e-5, 3e-5, 1e-4) and the sampling temperature
(0.6, 0.9); the rest is BASE. Resumable like configs/compare.py:

    python configs/sweep.py              # all runs, one at a time
    python configs/sweep.py --print      # the commands
"""

import sys

import queue_runs

# What every run of the sweep and of the comparison shares (the comparison adds
# --steps, --seed, --method and test-split evaluation). 2 questions per step, not 4: the
# CPU budget (a run of 60 steps then takes about an hour with one thread); G = 8 gave
# reward variance in most groups in the pilot.
# recipe v1, every setting that train.py's defaults have since changed spelled out, so that
# these commands (and configs/compare_v1.py's) still run what they ran (test_configs.py)
BASE = ["--group-size", "8", "--questions-per-step", "2", "--lr", "3e-5", "--temperature", "0.9",
        "--max-turn-tokens", "64", "--mu", "2", "--fewshot", "--demo", "jp",
        "--warmup-steps", "0", "--lr-schedule", "constant", "--contains-max-extra-words", "none"]
STEPS = 30
GRID = [("lr1e-5-t0.9", ["--lr", "1e-5"]), ("lr3e-5-t0.9", []), ("lr1e-4-t0.9", ["--lr", "1e-4"]),
        ("lr3e-5-t0.6", ["--temperature", "0.6"])]


def jobs() -> list[tuple[str, list[str]]]:
    common = BASE + ["--steps", str(STEPS), "--eval-every", "10", "--eval-split", "validation",
                     "--eval-questions", "0", "--save-every", "5", "--seed", "0"]
    # later flags win in argparse: the grid's values override BASE's
    return [(name, common + extra + ["--output-dir", f"runs/sweep/{name}"]) for name, extra in GRID]


if __name__ == "__main__":
    sys.exit(queue_runs.main(__doc__, jobs(), "results/sweep"))
