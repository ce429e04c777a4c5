"""Does the bf16 update lose its time to the number of passes? (issue 23: the update is
1.55x its bound in bf16, results/bench_update_bf16.json.)

Each backward pass pays costs that do not scale with its tokens: the tied embedding's
vocabulary-sized gradient, MasterWeights.collect_grads. If those were what the update
loses, fewer and larger micro-batches would make it faster. logprobs.micro_batches picks
the split that minimizes padded tokens + PASS_COST x passes; here the same episodes (the
benchmark's workload: 2 training questions x G = 8, seed 2, few-shot, 64 tokens per turn,
random advantages) are updated under splits with fewer passes (a larger token budget and
pass cost), alternating, 3 rounds, medians. The results go to micro_batch_shapes.md.

    OMP_NUM_THREADS=1 python results/diagnostics/micro_batch_shapes.py
"""

import functools
import os
import statistics
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import bench  # noqa: E402
import data  # noqa: E402
import logprobs  # noqa: E402
import models  # noqa: E402
import precision  # noqa: E402
import sampler  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402

SPLITS = [(512, logprobs.PASS_COST), (4096, logprobs.PASS_COST), (4096, 300), (4096, 10**6)]  # (max tokens, pass cost)
ROUNDS, SEED = 3, 2

torch.manual_seed(0)
rows = [data.load_task("factbook", "train")[i] for i in range(2)]
env = tasks.build({"task": "factbook", "fewshot": True, "demo": "jp"}).env
model, tok = models.load_model("smollm2-135m", "cpu")
master = precision.MasterWeights(model, "bf16")
opt = bench.ready_optimizer(master)  # lr 0: no update moves the weights
cfg = sampler.RolloutConfig(max_turn_tokens=64, temperature=bench.T, top_k=bench.K)
eps = sampler.sample_episodes(model, tok, rows, env, 8, cfg, generator=torch.Generator().manual_seed(SEED))
g = torch.Generator().manual_seed(SEED)
advs = [torch.randn(len(e.token_ids), generator=g) * torch.tensor(e.loss_mask, dtype=torch.float) for e in eps]

times, passes = {s: [] for s in SPLITS}, {}
split = logprobs.micro_batches
for rnd in range(ROUNDS):
    for max_tokens, cost in SPLITS:
        logprobs.micro_batches = functools.partial(split, pass_cost=cost)  # the split train.update plans with
        ucfg = train.UpdateConfig(mu=1, temperature=bench.T, max_sampled=64 * 2, micro_batch_tokens=max_tokens)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
        t = time.perf_counter()
        out = train.update(model, master, opt, sched, eps, advs, ucfg, tok.pad_token_id)
        times[max_tokens, cost].append(time.perf_counter() - t)
        passes[max_tokens, cost] = out["micro_batches"]
        print(rnd, max_tokens, cost, out["micro_batches"], f"{times[max_tokens, cost][-1]:.1f} s", flush=True)
logprobs.micro_batches = split

lines = ["# The bf16 update's time against its number of passes",
         "",
         f"`OMP_NUM_THREADS=1 python results/diagnostics/micro_batch_shapes.py` ({len(eps)} episodes, "
         f"{sum(len(e.token_ids) for e in eps)} tokens; one update each, {ROUNDS} alternating rounds; "
         f"cpu, {torch.get_num_threads()} thread).",
         "",
         "| max tokens per micro-batch | pass cost | continuation micro-batches | update, median (s) | rounds (s) |",
         "|---:|---:|---:|---:|---|"]
for s in SPLITS:
    lines.append(f"| {s[0]} | {s[1]} | {passes[s]} | {statistics.median(times[s]):.1f} | "
                 + ", ".join(f"{t:.1f}" for t in times[s]) + " |")
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "micro_batch_shapes.md")
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
