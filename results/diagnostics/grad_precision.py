"""Is bf16's gradient a different gradient, or the same one rounded? (issue 20, the bf16 vs
float32 finding: seed 0 of the v2 comparison learned later in bf16 than in float32.)

One batch of the comparison's recipe (8 training questions x G = 8 rollouts, sampled once in
float32, scored with the paper's rubric, MT-GRPO advantages), and the gradient of one
update (train.update, lr 0, no clipping) in float32 and in bf16 (bf16 weights, float32
master). As the yardstick of sampling noise: the float32 gradients of each group's first
and second four rollouts (advantages within those halves). The results go to
grad_precision.md.

    OMP_NUM_THREADS=1 python results/diagnostics/grad_precision.py
"""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__)))))
import data  # noqa: E402
import models  # noqa: E402
import precision  # noqa: E402
import sampler  # noqa: E402
import tasks  # noqa: E402
import train  # noqa: E402

G, L, QUESTIONS, SEED = 8, 64, 8, 3
task = tasks.build({"task": "factbook", "fewshot": True, "demo": "jp"})
rows = [data.load_task("factbook", "train")[i] for i in range(QUESTIONS)]
ucfg = train.UpdateConfig(mu=1, temperature=0.9, max_sampled=L * (task.env.max_tool_calls + 1), grad_clip=1e9)
m32, tok = models.load_model("smollm2-135m", "cpu")
w32 = precision.MasterWeights(m32, "fp32")
m16, _ = models.load_model("smollm2-135m", "cpu")
w16 = precision.MasterWeights(m16, "bf16")

eps = sampler.sample_episodes(m32, tok, rows, task.env, G, sampler.RolloutConfig(max_turn_tokens=L, temperature=0.9),
                              generator=torch.Generator().manual_seed(SEED))
for e in eps:
    task.rubric.score(e)


def advantages(episodes, group_size):
    return sampler.episode_advantages(episodes, group_size, "mt-grpo", turn_coef=1.0, gamma=1.0, scale="std",
                                      merged_fallback=False)


def gradient(model, master, episodes, advs) -> torch.Tensor:
    opt = train.make_optimizer(master.params, lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    train.update(model, master, opt, sched, episodes, advs, ucfg, tok.pad_token_id)
    return torch.cat([p.grad.flatten().double() for p in master.params])


def cos(a, b) -> float:
    return float(a @ b / (a.norm() * b.norm()))


halves = [[e for i, e in enumerate(eps) if (i % G < G // 2) == first] for first in (True, False)]
g32, g16 = gradient(m32, w32, eps, advantages(eps, G)), gradient(m16, w16, eps, advantages(eps, G))
big = g32.abs() > g32.abs().median()  # Adam's early steps are about the signs: count them where they matter
h1, h2 = (gradient(m32, w32, h, advantages(h, G // 2)) for h in halves)
lines = [
    "# The gradient of one batch: bf16 against float32, and against sampling noise",
    "",
    f"`OMP_NUM_THREADS=1 python results/diagnostics/grad_precision.py` ({len(eps)} episodes: {QUESTIONS} training "
    f"questions x G = {G}, sampled in float32 with seed {SEED}; MT-GRPO advantages; train.update, lr 0, no clipping).",
    "",
    "| pair | cosine | sign agreement (the larger half of the weights) | norm ratio |",
    "|---|---|---|---|",
    f"| bf16 vs float32, the same {len(eps)} episodes | {cos(g16, g32):.4f} | "
    f"{float((g16.sign() == g32.sign())[big].float().mean()):.4f} | {float(g16.norm() / g32.norm()):.4f} |",
    f"| float32: each group's rollouts 1-4 vs 5-8 (sampling noise) | {cos(h1, h2):.4f} | "
    f"{float((h1.sign() == h2.sign())[big].float().mean()):.4f} | {float(h1.norm() / h2.norm()):.4f} |",
]
out = os.path.join(os.path.dirname(os.path.abspath(__file__)), "grad_precision.md")
with open(out, "w") as f:
    f.write("\n".join(lines) + "\n")
print("\n".join(lines))
