"""Two costs of the bf16 update that are not forward or backward work (issue 23: the
update is 1.55x its bound in bf16, docs/performance.md).

1. MasterWeights.collect_grads adds each pass's bf16 gradients into the float32 master
   .grad. On the CPU a float32 += bf16 `add_` runs a slow mixed-dtype loop; casting to
   float32 first (exact) and adding float32 gives the same sum faster.
2. Fresh large tensors. glibc serves allocations above its mmap threshold (at most 32 MB)
   with fresh pages, which the kernel zero-fills on first touch (minor page faults), and
   returns them on free; the tied embedding's gradient (49152 x 576) is made anew in every
   backward. `mallopt(M_MMAP_MAX, 0)` + a high M_TRIM_THRESHOLD keeps freed memory in the
   process for reuse instead (measured here, not adopted: update_copies.md says why).

Variants, each in its own process (the allocator's state does not reset inside one):
`mixed` (collect_grads before 55a945c: add_ of the bf16 gradient), `cast` (collect_grads at
55a945c: cast, then add_), `cast+heap` (and the mallopt settings). Each process samples the benchmark's
workload (2 training questions x G = 8, seed 2, few-shot, 64 tokens per turn, random
advantages), runs one untimed update, then 3 timed ones (their median); the variants
alternate over ROUNDS rounds. Minor page faults and system time are per timed update.

    OMP_NUM_THREADS=1 python results/diagnostics/update_copies.py > results/diagnostics/update_copies.md
"""

import ctypes
import os
import resource
import statistics
import subprocess
import sys
import time
import types

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
VARIANTS, ROUNDS, SEED = ("mixed", "cast", "cast+heap"), 2, 2


def whole_collect(self, cast: bool):
    """collect_grads with whole-tensor adds: before 55a945c (cast=False: float32 += bf16 in
    one add_) and at 55a945c (cast=True: the whole gradient cast to float32, then add_)."""
    for m, p in zip(self.params, self.model_params):
        if p.grad is None:
            continue
        if m.grad is None:
            m.grad = (p.grad.to_dense() if p.grad.is_sparse else p.grad).float()
        else:
            m.grad.add_(p.grad.float() if cast else p.grad)
        p.grad = None


# variant (before any "+") -> the collect_grads it runs; any other: today's precision.MasterWeights'
COLLECTS = {"mixed": lambda self: whole_collect(self, False), "cast": lambda self: whole_collect(self, True)}


def workload(variant: str = "today"):
    """The benchmark's update workload in this process: (model, master, optimizer, scheduler,
    episodes, advantages, UpdateConfig, tokenizer), collect_grads as `variant` says."""
    if variant.endswith("+heap"):
        libc = ctypes.CDLL("libc.so.6")
        M_TRIM_THRESHOLD, M_MMAP_MAX = -1, -4
        assert libc.mallopt(M_MMAP_MAX, 0) == 1 and libc.mallopt(M_TRIM_THRESHOLD, 2 ** 30) == 1
    import torch

    sys.path.insert(0, ROOT)
    import bench
    import data
    import models
    import precision
    import sampler
    import tasks
    import train

    torch.manual_seed(0)
    rows = [data.load_task("factbook", "train")[i] for i in range(2)]
    env = tasks.build({"task": "factbook", "fewshot": True, "demo": "jp"}).env
    model, tok = models.load_model("smollm2-135m", "cpu")
    master = precision.MasterWeights(model, "bf16")
    if variant.split("+")[0] in COLLECTS:
        master.collect_grads = types.MethodType(COLLECTS[variant.split("+")[0]], master)
    opt = bench.ready_optimizer(master)  # lr 0: no update moves the weights
    cfg = sampler.RolloutConfig(max_turn_tokens=64, temperature=bench.T, top_k=bench.K)
    eps = sampler.sample_episodes(model, tok, rows, env, 8, cfg, generator=torch.Generator().manual_seed(SEED))
    g = torch.Generator().manual_seed(SEED)
    advs = [torch.randn(len(e.token_ids), generator=g) * torch.tensor(e.loss_mask, dtype=torch.float) for e in eps]
    ucfg = train.UpdateConfig(mu=1, temperature=bench.T, max_sampled=64 * 2)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model, master, opt, sched, eps, advs, ucfg, tok


def child(variant):
    model, master, opt, sched, eps, advs, ucfg, tok = workload(variant)
    import train  # on sys.path from workload
    out = []
    for i in range(4):
        r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        res = train.update(model, master, opt, sched, eps, advs, ucfg, tok.pad_token_id)
        r1, t1 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
        if i:  # the first update warms the allocator and the kernels up
            out.append((t1 - t0, r1.ru_minflt - r0.ru_minflt, r1.ru_stime - r0.ru_stime, res["grad_norm"]))
    print(repr(out))


def compare(script: str, variants, rounds: int) -> dict:
    """Run `script VARIANT` (whose main calls child) for each variant, alternating, `rounds`
    times: {variant: [(seconds, minor faults, system seconds, grad norm) per timed update]}."""
    runs = {v: [] for v in variants}
    for rnd in range(rounds):
        for v in variants:
            p = subprocess.run([sys.executable, script, v], capture_output=True, text=True, check=True)
            runs[v] += eval(p.stdout.strip().splitlines()[-1])
            print(f"<!-- round {rnd} {v}: {[f'{t:.2f}' for t, *_ in runs[v][-3:]]} -->", flush=True)
    return runs


def table(runs: dict) -> str:
    """Markdown: each variant's median update time, against the first variant's."""
    base = statistics.median(t for t, *_ in next(iter(runs.values())))
    lines = [f"| variant | update, median (s) | vs {next(iter(runs))} | minor page faults per update | "
             "system time per update (s) | grad norm (the same in all?) |", "|---|---:|---:|---:|---:|---|"]
    for v, xs in runs.items():
        t = statistics.median(x[0] for x in xs)
        lines.append(f"| {v} | {t:.2f} | {t / base:.3f}x | {statistics.median(x[1] for x in xs):.0f} | "
                     f"{statistics.median(x[2] for x in xs):.2f} | {sorted({round(x[3], 6) for x in xs})} |")
    return "\n".join(lines)


if __name__ == "__main__":
    if len(sys.argv) == 2:
        child(sys.argv[1])
        sys.exit(0)
    runs = compare(__file__, VARIANTS, ROUNDS)
    print(f"# The bf16 update's copies: {ROUNDS} rounds x 3 timed updates per variant, one thread\n")
    print(table(runs))
