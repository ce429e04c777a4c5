"""What a backward pass costs whatever its size, and where the bf16 update's time goes
against its bound (issue 23; docs/performance.md, "On a CPU with AMX").

One process, one thread, the benchmark's update workload (update_copies.workload: 2
training questions x G = 8, seed 2, few-shot, 64 tokens per turn, random advantages):

1. The update split into its parts (each part's wall time summed over the update; medians
   of REPEATS warm updates): the prompts' forward and backward (logprobs.Prefix), the
   continuations' forward (logprobs.token_logprobs, with the entropy) and backward,
   MasterWeights.collect_grads, and clipping + AdamW + push.
2. The bound (bench.bound_pass) of the same episodes at 15, 7 and 4 rows.
3. A pass of 2 tokens: a continuation of one token after the first prompt (the head on it)
   and the same without the prompt; forward, backward and collect_grads, medians of
   REPEATS. What such a pass costs is what every micro-batch pays on top of its tokens.

    OMP_NUM_THREADS=1 python results/diagnostics/pass_cost.py > results/diagnostics/pass_cost.md
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # as train.py sets it, before torch allocates

import collections  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import update_copies  # noqa: E402

REPEATS = 5


def timed_parts(objects_and_names):
    """Wrap each (object, attribute, label) so its wall time adds to the returned Counter."""
    spent = collections.Counter()
    for obj, name, label in objects_and_names:
        f = getattr(obj, name)

        def g(*a, _f=f, _label=label, **k):
            t0 = time.perf_counter()
            out = _f(*a, **k)
            spent[_label] += time.perf_counter() - t0
            return out

        setattr(obj, name, g)
    return spent


def main():
    model, master, opt, sched, eps, advs, ucfg, tok = update_copies.workload()
    import torch

    import bench
    import logprobs
    import train

    plan = logprobs.plan_micro_batches(eps, list(range(len(eps))), ucfg.micro_batch_tokens, shared_prefix=True)
    real = sum(len(eps[i].token_ids) - len(p) for p, c in plan for ch in c for i in ch)
    padded = sum(len(ch) * max(len(eps[i].token_ids) - len(p) for i in ch) for p, c in plan for ch in c)
    n_micro = sum(len(c) for _, c in plan)

    # 1. the update, part by part
    once, n_ids, n_head = bench.bound_pass(model, eps, plan)
    train.update(model, master, opt, sched, eps, advs, ucfg, tok.pad_token_id)  # warm-up
    once(7)
    spent = timed_parts([
        (logprobs.Prefix, "__init__", "prompts: forward"), (logprobs.Prefix, "backward", "prompts: backward"),
        (logprobs, "token_logprobs", "continuations: forward (and entropy)"),
        (torch.Tensor, "backward", "continuations: backward"), (master, "collect_grads", "collect_grads (float32 sum)"),
        (torch.nn.utils, "clip_grad_norm_", "clip, AdamW, push"), (opt, "step", "clip, AdamW, push"),
        (master, "push", "clip, AdamW, push"),
    ])
    parts, totals = collections.defaultdict(list), []
    for _ in range(REPEATS):
        spent.clear()
        t0 = time.perf_counter()
        train.update(model, master, opt, sched, eps, advs, ucfg, tok.pad_token_id)
        totals.append(time.perf_counter() - t0)
        for k, v in spent.items():
            parts[k].append(v)
        parts["the rest (loss, collate, bookkeeping)"].append(totals[-1] - sum(spent.values()))
    # 2. the bound, same episodes
    bounds = {rows: statistics.median(bench.timed(lambda: once(rows))[0] for _ in range(REPEATS)) for rows in (15, 7, 4)}
    best = min(bounds, key=bounds.get)

    # 3. a pass of 2 tokens
    e = eps[0]
    P = e.prompt_len - 1

    def tiny(with_prompt: bool):
        with logprobs.lean_backward(model, "cpu"):
            pre = logprobs.Prefix(model, e.token_ids[:P] if with_prompt else [], "cpu")
            ids = torch.tensor([e.token_ids[P:P + 2]])
            pos = torch.tensor([[False, True]])
            t0 = time.perf_counter()
            logp, _ = logprobs.token_logprobs(model, ids, torch.ones_like(ids), 1.0, False, pos, pre)
            t1 = time.perf_counter()
            logp.sum().backward()
            t2 = time.perf_counter()
            master.collect_grads()
            t3 = time.perf_counter()
        master.zero_grad()
        return t1 - t0, t2 - t1, t3 - t2

    tiny(True), tiny(False)
    small = {w: [statistics.median(x) for x in zip(*[tiny(w) for _ in range(REPEATS)])] for w in (True, False)}

    u = statistics.median(totals)
    print("# A pass's fixed cost, and the bf16 update against its bound (one thread)\n")
    print(f"{n_ids} unique tokens, LM head on {n_head} positions. The update: {len(plan)} prompts "
          f"({', '.join(str(len(p)) for p, _ in plan)} tokens) and {n_micro} micro-batches of continuations "
          f"({real} tokens, {padded} with padding), so {len(plan) + n_micro} backward passes. Medians of {REPEATS}.\n")
    print("| part of the update | seconds |\n|---|---:|")
    for k, v in parts.items():
        print(f"| {k} | {statistics.median(v):.2f} |")
    print(f"| **the update** | **{u:.2f}** |\n")
    print("| the bound (bench.bound_pass), rows x length | seconds |\n|---|---:|")
    for rows, s in bounds.items():
        print(f"| {rows} x {n_ids // rows} | {s:.2f} |")
    print(f"\nupdate / best bound: **{u / bounds[best]:.2f}x**\n")
    print("| a pass of 2 tokens (head on 1) | forward | backward | collect_grads | all |\n|---|---:|---:|---:|---:|")
    for w, label in ((True, f"after the {P}-token prompt"), (False, "without a prompt")):
        f, b, c = small[w]
        print(f"| {label} | {f * 1e3:.0f} ms | {b * 1e3:.0f} ms | {c * 1e3:.0f} ms | {(f + b + c) * 1e3:.0f} ms |")


if __name__ == "__main__":
    main()
