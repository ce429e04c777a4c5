"""Where the bf16 update's time goes, against its bound (issue 23: the update takes 1.3x the
bound at most; docs/performance.md).

One process, one thread: the benchmark's update workload (update_copies.workload: 2 training
questions x G = 8, seed 2, few-shot, 64 tokens per turn, random advantages), one untimed
update, then torch.profiler over one update and over one pass of the bound (bench.bound_s's
bare forward+backward of the same unique tokens, at its usual best shape, 15 rows). The
table sums each op's self CPU time into a few kinds, so the two columns say which kind of
work the update adds.

    OMP_NUM_THREADS=1 python results/diagnostics/update_profile.py > results/diagnostics/update_profile.md
"""

import collections
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import update_copies  # noqa: E402

BOUND_ROWS = 15
# an op's kind: the first of these whose words appear in its name (else "other")
KINDS = [
    ("matrix products", ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear")),
    ("attention", ("flash_attention", "scaled_dot_product", "_efficient_attention")),
    ("copies, casts, concatenation", ("aten::copy_", "aten::cat", "aten::clone", "aten::_to_copy", "aten::contiguous")),
    ("fills and zeros", ("aten::fill_", "aten::zero_", "aten::zeros", "aten::empty", "aten::new_zeros")),
    ("embedding and index ops", ("embedding", "index", "gather", "scatter", "coalesce", "sparse")),
    ("optimizer", ("_foreach", "Optimizer", "adamw")),
    ("softmax and loss", ("softmax", "nll_loss", "cross_entropy")),
]


def kind(name: str) -> str:
    low = name.lower()
    return next((k for k, words in KINDS if any(w.lower() in low for w in words)), "other")


def profile(fn) -> tuple[dict, list, float]:
    """Self CPU seconds of fn() per kind, the top ops, and the wall seconds."""
    import time

    from torch.profiler import ProfilerActivity, profile as tprofile

    with tprofile(activities=[ProfilerActivity.CPU]) as prof:
        t0 = time.perf_counter()
        fn()
        wall = time.perf_counter() - t0
    by_kind, ops = collections.Counter(), []
    for e in prof.key_averages():
        s = e.self_cpu_time_total / 1e6
        by_kind[kind(e.key)] += s
        ops.append((s, e.key, e.count))
    return by_kind, sorted(ops, reverse=True), wall


def main():
    model, master, opt, sched, eps, advs, ucfg, tok = update_copies.workload()
    import bench  # on sys.path from workload
    import logprobs
    import train

    def update():
        train.update(model, master, opt, sched, eps, advs, ucfg, tok.pad_token_id)

    plan = logprobs.plan_micro_batches(eps, list(range(len(eps))), ucfg.micro_batch_tokens, shared_prefix=True)
    once, n_ids, n_head = bench.bound_pass(model, eps, plan)

    def bound():  # one pass of bench.bound_s, at one shape
        once(BOUND_ROWS)

    update(), bound()  # warm-up
    u_kind, u_ops, u_wall = profile(update)
    b_kind, b_ops, b_wall = profile(bound)
    n_passes = sum(len(c) for _, c in plan) + len(plan)
    print("# The bf16 update against its bound, by kind of op (self CPU seconds, one thread)\n")
    print(f"{n_ids} unique tokens, LM head on {n_head} positions; the update: {n_passes} backward passes "
          f"({sum(len(c) for _, c in plan)} micro-batches and {len(plan)} prompts); the bound: one pass, "
          f"{BOUND_ROWS} x {n_ids // BOUND_ROWS}. Wall time under the profiler: update {u_wall:.2f} s, bound {b_wall:.2f} s "
          f"({u_wall / b_wall:.2f}x).\n")
    print("| kind | update (s) | bound (s) | update - bound (s) |\n|---|---:|---:|---:|")
    for k in [k for k, _ in KINDS] + ["other"]:
        print(f"| {k} | {u_kind[k]:.2f} | {b_kind[k]:.2f} | {u_kind[k] - b_kind[k]:+.2f} |")
    tu, tb = sum(u_kind.values()), sum(b_kind.values())
    print(f"| **all** | **{tu:.2f}** | **{tb:.2f}** | **{tu - tb:+.2f}** |\n")
    for title, ops in (("update", u_ops), ("bound", b_ops)):
        print(f"The {title}'s 15 largest ops by self time:\n\n| op | calls | self (s) | kind |\n|---|---:|---:|---|")
        for s, name, n in ops[:15]:
            print(f"| `{name}` | {n} | {s:.3f} | {kind(name)} |")
        print()


if __name__ == "__main__":
    main()
