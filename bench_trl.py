"""The peer for bench.py: one GRPO step of TRL's GRPOTrainer on the benchmark's prompts.

A user who does not take this project would take TRL. This script times its RL step on
the same workload as bench.py: the embedded model, the few-shot prompt of the first
`--questions` factbook training questions, G rollouts each, `--max-turn-tokens` x 2 new
tokens per rollout (bench.py's two turns), mu = 2 (num_iterations), beta = 0,
temperature 0.9, top-k 50, random rewards (so every rollout is trained, as in bench.py).
TRL is single-turn: its rollouts have no tool call and no second turn; the token budget
is the same. TRL is not a dependency of this project: `make bench-trl` installs it in a
separate virtual environment (.venv-trl) and bench.py runs this script there.

One RL step = one generation + mu optimizer steps = mu trainer steps. Prints one JSON line.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import sys
import tempfile

import torch
import models


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-turn-tokens", type=int, default=64)
    p.add_argument("--mu", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3, help="RL steps timed, after one warm-up step")
    p.add_argument("--precision", default="fp32", choices=("fp32", "bf16"))
    args = p.parse_args(argv)

    from datasets import Dataset
    from transformers import TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    import mtgrpo
    import tasks
    from data import load_task

    path = models._embedded_path("smollm2-135m")
    env = tasks.build({"task": "factbook", "fewshot": True, "demo": "jp"}).env  # the same prompt as bench.py's
    rows = load_task("factbook", "train")
    prompts = [env.initial_messages(rows[i]) for i in range(args.questions)]
    steps = args.mu * (1 + args.repeats)
    data = Dataset.from_list([{"prompt": prompts[j % len(prompts)]} for j in range(args.questions * (1 + args.repeats))])
    rng = random.Random(0)

    def random_reward(completions, **kwargs):
        return [rng.random() for _ in completions]

    times, lengths = [], []

    class Clock(TrainerCallback):
        """TRL logs each trainer step's wall time (step_time) and the completions' length."""

        def on_log(self, a, state, control, logs=None, **kw):
            if logs and "step_time" in logs:
                times.append(float(logs["step_time"]))
            if logs and "completions/mean_length" in logs:
                lengths.append(float(logs["completions/mean_length"]))

    with tempfile.TemporaryDirectory() as out:
        cfg = GRPOConfig(
            output_dir=out, max_steps=steps, learning_rate=1e-6, per_device_train_batch_size=args.questions * args.group_size,
            num_generations=args.group_size, num_iterations=args.mu, max_completion_length=2 * args.max_turn_tokens,
            temperature=0.9, top_k=50, beta=0.0, use_cpu=not torch.cuda.is_available(), bf16=args.precision == "bf16",
            logging_steps=1, save_strategy="no", report_to="none", disable_tqdm=True, seed=0, shuffle_dataset=False,
            dataloader_num_workers=0,
        )
        trainer = GRPOTrainer(model=path, reward_funcs=random_reward, args=cfg, train_dataset=data, callbacks=[Clock()])
        trainer.train()
    if len(times) != steps:
        sys.exit(f"error: expected {steps} step times from TRL's log, got {len(times)}")
    per_rl_step = [sum(times[i : i + args.mu]) for i in range(0, steps, args.mu)][1:]  # drop the warm-up step
    print(json.dumps({"trl_version": __import__("trl").__version__, "precision": args.precision,
                      "rl_step_s": statistics.median(per_rl_step), "rl_steps_s": per_rl_step,
                      "completion_mean_tokens": statistics.mean(lengths) if lengths else None,
                      "device": "cuda" if torch.cuda.is_available() else f"cpu ({torch.get_num_threads()} threads)"}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
