"""Validation runs that chose recipes v2 and v3, the stable training recipe (issue 20).

Recipe v1 (configs/sweep.py's BASE: lr 3e-5 constant, mu = 2, 2 questions per step)
learns, but single updates swing the policy (results/README.md). Each lever below is
there for a reason read off v1's logs, not to sweep everything:

- mu = 1: v1's second optimizer step on the same batch is where its ratios fell below
  0.1; with mu = 1 every batch is used once (every peer's default), and steps are faster;
- warm-up: Adam's first steps move every weight by about lr whatever the gradient's size
  (its second-moment estimate starts from one batch), so the first updates are the
  largest; 5 steps of linear warm-up;
- cosine decay to 0.1 x lr: the last updates are small, so the final policy is not what
  one large step made of it;
- 4 questions per step: in v1 one question's 8 rollouts were often the whole signal of
  an update; 4 give each update more groups to average;
- lr 3e-5 peak, v1's. A first run at 6e-5 (to keep v1's total movement with mu = 1
  and the decay) collapsed by step 6: every answer became the demonstration's ".jp",
  entropy 0.24, no reward variance left (results/sweep_recipe/v2-lr6e-5-killed, the
  demonstration before its change to a plain name). One Adam step per batch at 6e-5
  is too large here, as two at 1e-4 were in v1's sweep.

Then one lever more, judged on the probe (probe.py; probe_kl_*, probe_second_call):
- freezing the token embeddings (tied to the LM head): under Adam even a token that is
  never sampled gets a full-size update of its output row from its tiny softmax
  gradient, a way to move behaviour that no sampled ratio sees.

Each run is MT-GRPO from the embedded model, evaluated greedily on the whole
VALIDATION split (never test) before training and every 10 steps.

Outcome: `v2` trained steadily (validation EM 0.017, 0.112, 0.190, 0.397, 0.491, 0.474,
0.500 at steps 0-60; tool success 1.000 from step 20; the probe's second-call probability
at most 0.0003 after step 10), so it is recipe v2, train.py's defaults and
configs/compare.py's recipe. The frozen-embeddings run and the v1 control were not run:
their purpose was to steady a recipe that swung, and v2 does not (results/README.md).

Recipe v3: v2's comparison lost seed 1 to the verbose-answer trap (answers that wrap the
gold in the demonstration's reasoning sentence collect contains_answer's 0.5, and EM
stays 0). v3 pays contains_answer only for answers at most one word longer than the gold.
`v3-s1` and `v3-s0` (validation EM 0.534 and 0.509 at step 60, the largest drop between
evaluations 0.034, tool success 1.000 from step 10) made it train.py's defaults and
configs/compare.py's recipe (RECIPE; recipe v2 is RECIPE_V2).
Resumable:

    python configs/sweep_recipe.py           # the runs, one at a time, skipping committed ones
    python configs/sweep_recipe.py --print   # the commands
"""

import sys

import queue_runs

BASE = ["--group-size", "8", "--questions-per-step", "4", "--lr", "3e-5", "--mu", "1",
        "--warmup-steps", "5", "--lr-schedule", "cosine", "--lr-floor", "0.1",
        "--temperature", "0.9", "--max-turn-tokens", "64", "--fewshot", "--demo", "jp"]  # '.jp' alone: before v5
RECIPE_V2 = BASE + ["--contains-max-extra-words", "none"]  # the paper's contains_answer
RECIPE = BASE + ["--contains-max-extra-words", "1"]  # recipe v3: train.py's defaults, configs/compare.py's recipe
STEPS = 60
# v1-control: recipe v1 on today's code and task, for its probe (v1's logs predate it)
V1 = ["--questions-per-step", "2", "--mu", "2", "--warmup-steps", "0", "--lr-schedule", "constant"]
GRID = [("v2", ["--contains-max-extra-words", "none"]),
        # recipe v3's candidate: v2 with contains_answer limited to answers at most 1 word
        # longer than the gold alias, on seed 1, the seed whose v2 comparison run fell into
        # the verbose-answer trap (results/README.md)
        ("v3-s1", ["--contains-max-extra-words", "1", "--seed", "1"]),
        # and on seed 0, whose v2 run learned: the limit must not cost what v2 reached
        ("v3-s0", ["--contains-max-extra-words", "1"])]
# planned, not run (v2 was steady; see the docstring): add them to GRID to run them
NOT_RUN = [("v2-frozen-emb", ["--contains-max-extra-words", "none", "--freeze-embeddings"]),
           ("v1-control", ["--contains-max-extra-words", "none"] + V1)]


def jobs() -> list[tuple[str, list[str]]]:
    common = BASE + ["--steps", str(STEPS), "--eval-every", "10", "--eval-split", "validation",
                       "--eval-questions", "0", "--save-every", "5", "--seed", "0", "--method", "mt-grpo"]
    return [(name, common + extra + ["--output-dir", f"runs/sweep_recipe/{name}"]) for name, extra in GRID]


if __name__ == "__main__":
    sys.exit(queue_runs.main(__doc__, jobs(), "results/sweep_recipe"))
