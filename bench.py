"""Benchmark one MT-GRPO training step against today's float32 step and against TRL.

Fixed configuration (change with flags, and say so when you quote numbers): the
embedded model, the factbook task (the first `--questions` training questions), G = 8,
`--max-turn-tokens` 64 per turn, the few-shot prompt (so that some rollouts call the
tool and run two turns), temperature 0.9, top-k 50, mu = 2, random advantages (every
episode is trained, whatever the rewards), lr 0 (every repetition samples the same
policy). Repetition r samples with seed r. Reported: medians over `--repeats`.

- today's float32 step: the sampler, then mu iterations of the update with every
  episode forwarded whole (train.update(..., shared_prefix=False)) in float32;
- our step in `--precision` (default auto: bf16 where the hardware is fast at it): the
  same, with each question's prompt forwarded once for its G rollouts (logprobs.Prefix);
  the two alternate within each repetition, so a slow spell of the machine hits both;
- our update against a bare forward + backward (cross-entropy, whole sequences, our
  precision) on the same tokens, per optimizer iteration;
- the peer: TRL's GRPOTrainer on the same prompts, G, questions and token budget,
  single turn (bench_trl.py, run in .venv-trl; `make bench-trl` installs it), in our
  precision and, when that is bf16, in TRL's default float32 too;
- peak memory per phase (RSS on CPU, max allocated on CUDA) against the floor:
  (bf16 weights +) float32 master weights + float32 gradients + AdamW state;
- one decode step of the sampler at 1 / 4 / 16 rows, and at 16 rows against the plain HF
  eager step and a static cache (eager; `--compile`: compiled, and whole sampling calls
  with `--compile-decode`); `--decode-only` runs these alone; `--naive` also times the
  naive sampler (re-template the conversation and `generate` every turn).

    python bench.py                 # CPU; on a CUDA machine it uses the GPU
    python bench.py --out results/bench_cpu.json
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import gc
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import data
import logprobs
import models
import precision
import sampler
import tasks
import train  # sets THP_MEM_ALLOC_ENABLE before any tensor exists, so the timed update runs as train.py's


def naive_sample(model, tok, rows, env, G, max_turn_tokens, temperature, top_k):
    """The reference's way: re-template and re-tokenize the conversation every turn."""
    convs = [env.initial_messages(r) for r in rows for _ in range(G)]
    active = list(range(len(convs)))
    sampled = 0
    eos = tok.eos_token_id
    while active:
        texts = [tok.apply_chat_template(convs[i], tokenize=False, add_generation_prompt=True) for i in active]
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_turn_tokens, do_sample=temperature > 0,
                             temperature=temperature or None, top_k=top_k or None, top_p=1.0,
                             stop_strings=list(sampler.STOP_STRINGS), tokenizer=tok, pad_token_id=eos)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        still = []
        for r, i in enumerate(active):
            ids = new[r]
            n = ids.index(eos) if eos in ids else len(ids)  # pad == eos: count up to the first
            text = tok.decode(ids[:n])
            hit_stop = any(s in text for s in sampler.STOP_STRINGS)
            sampled += n + (0 if hit_stop or n == len(ids) else 1)
            convs[i].append({"role": "assistant", "content": text})
            step = env.step(convs[i], truncated=n == len(ids) and not hit_stop)
            if not step.done:
                convs[i].append(step.message)
                still.append(i)
        active = still
    return sampled, len(convs)


def reset_peak_memory(device, trim: bool = True) -> None:
    """Start a phase's peak-memory window. On CPU with `trim`, first hand freed heap back to
    the OS (glibc malloc_trim): the RSS would otherwise still hold what the previous phase
    (e.g. the naive sampler) freed, and charge it to the next one. rl_step trims before
    sampling only: a trim before the update would make the timed update fault in fresh pages
    that train.py's update, which follows its sampling directly, does not pay (0.5-1.1 s of
    15 s, docs/performance.md)."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        gc.collect()
        try:
            if trim:
                ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):
            pass
        try:  # Linux: "5" resets the process's peak RSS (VmHWM) to its current RSS
            with open("/proc/self/clear_refs", "w") as f:
                f.write("5")
        except OSError:
            pass


def peak_memory_mb(device) -> float:
    if str(device).startswith("cuda"):
        return torch.cuda.max_memory_allocated() / 2**20
    try:
        with open("/proc/self/status") as f:
            return next(int(l.split()[1]) for l in f if l.startswith("VmHWM")) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def timed(fn):
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    t = time.perf_counter()
    out = fn()
    if torch.cuda.is_available():
        torch.cuda.synchronize()
    return time.perf_counter() - t, out


def decode_tokens(rows: int, context: int, steps: int) -> torch.Tensor:
    """The fixed random sequences the decode measurements prefill and then feed, a token
    a step (teacher-forced, so that every variant scores the same inputs)."""
    return torch.randint(100, 1000, (rows, context + steps), generator=torch.Generator().manual_seed(0))


def hf_decode(model, rows: int, cache, fwd=None, context: int = 400, steps: int = 8, skip: int = 0):
    """Decode steps called on the model directly (no mask), in `cache`, each step by `fwd`
    (default: the model), after a `context`-token prefill: (median step time in ms over the
    steps after the first `skip`, each step's log-probs (rows, steps, V))."""
    device = next(model.parameters()).device
    model.eval()
    fwd = fwd or model
    ids = decode_tokens(rows, context, steps).to(device)
    times, lps = [], []
    with torch.inference_mode():
        kw = {"past_key_values": cache, "use_cache": True, "logits_to_keep": 1}
        model(input_ids=ids[:, :context], cache_position=torch.arange(context, device=device), **kw)
        for s in range(steps):
            at = torch.tensor([context + s], device=device)
            nxt = ids[:, context + s : context + s + 1]
            dt, out = timed(lambda: fwd(input_ids=nxt, cache_position=at, position_ids=at.expand(rows, 1), **kw))
            times.append(dt * 1000)
            lps.append(torch.log_softmax(out.logits[:, -1].float(), -1))
    return statistics.median(times[skip:]), torch.stack(lps, 1)


def sampler_decode(model, rows: int, context: int = 400, steps: int = 8, skip: int = 0):
    """hf_decode through the sampler's own batch (sampler.DecodeBatch: its cache, its
    masks), on the same sequences: (median step ms, each step's log-probs)."""
    model.eval()
    ids = decode_tokens(rows, context, steps).tolist()
    times, lps = [], []
    with torch.inference_mode():
        batch = sampler.DecodeBatch(model, rows, 0)
        batch.forward([r[:context] for r in ids])
        batch.start_decoding()
        for s in range(steps):
            dt, logits = timed(lambda: batch.forward([[r[context + s]] for r in ids]))
            times.append(dt * 1000)
            lps.append(torch.log_softmax(logits, -1))
    return statistics.median(times[skip:]), torch.stack(lps, 1)


def decode_step_ms(model, rows: int) -> float:
    """Median time of one decode step of the sampler for `rows` sequences: how the cost
    of a sampling step grows with the batch."""
    return sampler_decode(model, rows, skip=2)[0]


def median_s(fn, repeats: int) -> float:
    """The median wall time of `repeats` calls of fn()."""
    return statistics.median(timed(fn)[0] for _ in range(repeats))


def bound_pass(model, episodes, plan):
    """The bound's pass (bound_s): (once, tokens, head positions), where once(rows) runs a bare
    forward + backward (cross-entropy) of exactly the unique tokens one optimizer iteration
    forwards (each planned prompt once, every continuation unpadded) as `rows` rows, the LM
    head on as many positions as there are sampled tokens."""
    device = next(model.parameters()).device
    stream = []
    for prefix, chunks in plan:
        stream += prefix + [t for c in chunks for i in c for t in episodes[i].token_ids[len(prefix):]]
    n_head = sum(sum(episodes[i].loss_mask) for _, chunks in plan for c in chunks for i in c)
    ids = torch.tensor(stream, device=device)
    head = model.get_output_embeddings()

    def once(rows: int):
        x = ids[: len(ids) // rows * rows].view(rows, -1)
        model.zero_grad(set_to_none=True)
        h = model.base_model(input_ids=x, use_cache=False).last_hidden_state.flatten(0, 1)
        at = torch.linspace(0, h.size(0) - 2, n_head, device=device).long()  # spread over the rows
        F.cross_entropy(head(h[at]).float(), x.flatten()[at + 1]).backward()
        model.zero_grad(set_to_none=True)

    return once, len(ids), n_head


def bound_s(model, episodes, plan, repeats: int, row_lengths=(128, 256, 512, 1024)) -> dict:
    """The update's bound: bound_pass at the best row length of `row_lengths` for this
    machine. The median of `repeats` per shape."""
    once, n_ids, n_head = bound_pass(model, episodes, plan)
    per_shape = {}
    for rows in sorted({max(1, round(n_ids / L)) for L in row_lengths}, reverse=True):
        per_shape[f"{rows}x{n_ids // rows}"] = median_s(lambda: once(rows), repeats)
    best = min(per_shape, key=per_shape.get)
    return {"tokens": n_ids, "lm_head_positions": n_head, "per_shape_s": per_shape, "best_shape": best,
            "bound_s": per_shape[best]}


def update_over_bound(model, reps, ucfg, repeats: int) -> dict:
    """The update against its bound, repetition by repetition. reps: [(episodes, update
    seconds per optimizer iteration)]. Each repetition samples its own episodes, with a
    different number of tokens, so each update is divided by the bound of its own tokens:
    bound_s's sweep of row shapes on the last repetition, the others timed at its best shape.
    The ratio is the median of the per-repetition ratios."""
    def plan(eps):
        return logprobs.plan_micro_batches(eps, list(range(len(eps))), ucfg.micro_batch_tokens, shared_prefix=True)

    res = bound_s(model, reps[-1][0], plan(reps[-1][0]), repeats)
    rows = int(res["best_shape"].split("x")[0])
    bounds = []
    for eps, _ in reps[:-1]:
        once, _, _ = bound_pass(model, eps, plan(eps))
        bounds.append(median_s(lambda: once(rows), repeats))
    bounds.append(res["bound_s"])
    per = [{"update_per_iteration_s": u, "bound_s": b, "ratio": u / b} for (_, u), b in zip(reps, bounds)]
    res.update(per_repetition=per, update_per_iteration_s=statistics.median(r["update_per_iteration_s"] for r in per),
               bound_s=statistics.median(r["bound_s"] for r in per),
               update_over_bound=statistics.median(r["ratio"] for r in per))
    return res


def decode_variants(model, rows: int = 16, steps: int = 12, compile_: bool = False) -> dict:
    """One greedy decode step at `rows` rows after a 400-token prefill: the plain HF eager
    step (the model called with the sampler's growing cache and no mask: what a sampler
    step cost before issue 23, whenever the batch had no holes) against the sampler's own
    (sampler.DecodeBatch) and transformers' StaticCache, eager and (compile_) under
    torch.compile, all fed the same tokens. Each: the median step time (ms, the first 2
    steps left out: compiling), its speed-up over the HF eager step, and how its greedy
    tokens and log-probs agree with it."""
    from transformers import StaticCache

    context = 400
    ms, lps = hf_decode(model, rows, sampler._growing_cache(), steps=steps, skip=2)
    top = lps.argmax(-1, keepdim=True)  # the HF eager step's greedy token at each step

    def compare(ms2, lps2, t0):
        """Against the HF eager step, on the same inputs: the share of steps with the same
        greedy token, and the largest difference in that token's log-prob."""
        return {"ms": ms2, "speedup": ms / ms2, "same_argmax": float((lps2.argmax(-1, keepdim=True) == top).float().mean()),
                "max_logp_diff": float((lps.gather(-1, top) - lps2.gather(-1, top)).abs().max()),
                "wall_s_with_compile": time.perf_counter() - t0}

    out = {"rows": rows, "context": context, "hf_eager_ms": ms,
           "sampler": compare(*sampler_decode(model, rows, context, steps, skip=2), time.perf_counter())}
    variants = [("static_eager", model)] + ([("static_compiled", torch.compile(model.forward, dynamic=False))] if compile_ else [])
    for name, fwd in variants:
        t0 = time.perf_counter()
        cache = StaticCache(config=model.config, max_cache_len=context + steps)
        out[name] = compare(*hf_decode(model, rows, cache, fwd, context, steps, skip=2), t0)
    return out


def sampler_compile(model, tok, rows, env, G, turn_tokens, repeats: int) -> dict:
    """Whole sampling calls (the RL step's rollouts) with and without compile_decode
    (sampler.StaticDecodeBatch: a static cache and a torch.compile'd step), alternating,
    each pair with the same seed, after one compiled call to compile: the median seconds,
    and whether the tokens and log-probs agree."""
    device = next(model.parameters()).device
    cfg = sampler.RolloutConfig(max_turn_tokens=turn_tokens, temperature=T, top_k=K)
    static = dataclasses.replace(cfg, compile_decode=True)
    run = lambda c, seed: sampler.sample_episodes(model, tok, rows, env, G, c, generator=torch.Generator(device=device).manual_seed(seed))  # noqa: E731
    compile_s, _ = timed(lambda: run(static, 0))
    times, same, diff = {"eager_s": [], "compiled_s": []}, True, 0.0
    for rep in range(repeats):
        t1, a = timed(lambda: run(cfg, rep))
        t2, b = timed(lambda: run(static, rep))
        times["eager_s"].append(t1)
        times["compiled_s"].append(t2)
        same &= [e.token_ids for e in a] == [e.token_ids for e in b]
        if same:
            diff = max(diff, max(abs(x - y) for e, f in zip(a, b) for x, y in zip(e.sample_logp, f.sample_logp)))
    out = {k: statistics.median(v) for k, v in times.items()}
    return {**out, "speedup": out["eager_s"] / out["compiled_s"], "first_call_s_with_compiling": compile_s,
            "same_tokens": same, "max_logp_diff": diff if same else None, "runs": times}


def ready_optimizer(master):
    """The AdamW of a run that has taken its first step (train.py keeps one optimizer for
    the whole run): its state (exp_avg, exp_avg_sq: 1 GB of zeros for the 135M model) is
    allocated here, by one step on zero gradients at lr 0, not inside a timed update, as
    TRL's timed steps come after its warm-up step (bench_trl.py)."""
    opt = train.make_optimizer(master.params, lr=0.0)
    for p in master.params:
        p.grad = torch.zeros_like(p)
    opt.step()
    master.zero_grad()
    return opt


def rl_step(model, master, opt, tok, rows, env, G, turn_tokens, seed, shared_prefix, device, ucfg):
    """One RL step as train.py takes it (sample, then mu optimizer steps), with random
    advantages so that every episode is trained whatever the rewards. lr is 0, so the
    weights (and the next repetition's rollouts) do not change; `opt` is ready_optimizer's.
    Returns the episodes, the phase times and the phase peaks."""
    reset_peak_memory(device)
    gen = torch.Generator(device=device).manual_seed(seed)
    cfg = sampler.RolloutConfig(max_turn_tokens=turn_tokens, temperature=T, top_k=K)
    t_sample, eps = timed(lambda: sampler.sample_episodes(model, tok, rows, env, G, cfg, generator=gen))
    peak_sample = peak_memory_mb(device)
    g = torch.Generator().manual_seed(seed)
    advs = [torch.randn(len(e.token_ids), generator=g) * torch.tensor(e.loss_mask, dtype=torch.float) for e in eps]
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    reset_peak_memory(device, trim=False)
    t_update, upd = timed(lambda: train.update(model, master, opt, sched, eps, advs, ucfg, tok.pad_token_id,
                                               shared_prefix=shared_prefix))
    peak_update = peak_memory_mb(device)
    del sched
    return eps, advs, {"sample_s": t_sample, "update_s": t_update, "step_s": t_sample + t_update,
                       "sampled_tokens": sum(sum(e.loss_mask) for e in eps),
                       "episode_tokens": sum(len(e.token_ids) for e in eps),
                       "two_turn": sum(e.num_turns > 1 for e in eps), "micro_batches": upd["micro_batches"],
                       "logp_diff_max": upd["logp_diff_max"], "sample_peak_mb": peak_sample, "update_peak_mb": peak_update}


def run_trl(args, prec: str) -> dict | None:
    """bench_trl.py in .venv-trl (make bench-trl), or None when that venv is missing."""
    import os
    import subprocess

    py = os.path.join(os.path.dirname(os.path.abspath(__file__)), ".venv-trl", "bin", "python")
    if not os.path.exists(py):
        print("TRL peer skipped: no .venv-trl (make bench-trl installs it)")
        return None
    cmd = [py, "bench_trl.py", "--questions", str(args.questions), "--group-size", str(args.group_size),
           "--max-turn-tokens", str(args.max_turn_tokens), "--mu", str(args.mu), "--repeats", str(args.repeats),
           "--precision", prec]
    out = subprocess.run(cmd, capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    if out.returncode != 0:
        print(f"TRL peer failed (exit {out.returncode}): {out.stderr.strip().splitlines()[-1:] }")
        return None
    return json.loads(out.stdout.strip().splitlines()[-1])


T, K = 0.9, 50  # the training defaults: temperature and top-k


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Benchmark one RL step: today's float32 step, ours, and TRL's.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-turn-tokens", type=int, default=64)
    p.add_argument("--mu", type=int, default=2)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--precision", default="auto", choices=precision.PRECISIONS, help="ours; the baseline is float32")
    p.add_argument("--no-trl", action="store_true", help="skip the TRL peer")
    p.add_argument("--naive", action="store_true", help="also time the naive multi-turn sampler (re-template every turn)")
    p.add_argument("--compile", action="store_true", help="also time a decode step under torch.compile (static cache)")
    p.add_argument("--decode-only", action="store_true",
                   help="only the decode measurements (with --compile: and whole sampling calls with --compile-decode)")
    p.add_argument("--update-only", action="store_true",
                   help="only our update (sampled as in the full run) against its bound")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(argv)

    device = args.device or models.default_device()
    prec = precision.resolve(args.precision, device)
    torch.manual_seed(0)
    ds = data.load_task("factbook", "train")
    rows = [ds[i] for i in range(args.questions)]
    env = tasks.build({"task": "factbook", "fewshot": True, "demo": "jp"}).env  # issue 23's workload: the '.jp' demo
    G, L = args.group_size, args.max_turn_tokens
    ucfg = train.UpdateConfig(mu=args.mu, temperature=T, max_sampled=L * (env.max_tool_calls + 1))
    base_model, tok = models.load_model(args.model, device)
    base = precision.MasterWeights(base_model, "fp32")
    ours_model = base_model if prec == "fp32" else models.load_model(args.model, device)[0]
    ours = base if prec == "fp32" else precision.MasterWeights(ours_model, prec)
    n_params = sum(p.numel() for p in base_model.parameters())
    res = {"device": torch.cuda.get_device_name() if str(device).startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
           "config": {"model": args.model, "questions": args.questions, "G": G, "max_turn_tokens": L, "mu": args.mu,
                      "fewshot": True, "temperature": T, "top_k": K, "repeats": args.repeats, "precision": prec,
                      "micro_batch_tokens": ucfg.micro_batch_tokens}}

    if args.decode_only:
        return decode_report(args, res, ours_model, tok, rows, env, G, L)
    if args.update_only:
        return update_report(args, res, ours_model, ours, tok, rows, env, G, L, device, ucfg)

    # --- whole RL steps: today's (float32, every episode forwarded whole) and ours
    # (default precision, each prompt forwarded once per group), alternating per
    # repetition so that a slow spell of the machine hits both; same seed, same rollouts
    # in float32. lr = 0 keeps the weights, so every repetition samples the same policy.
    runs, ours_eps = {"today_fp32": [], "ours": []}, []
    base_opt = ready_optimizer(base)
    ours_opt = base_opt if ours is base else ready_optimizer(ours)
    for rep in range(args.repeats):
        _, _, r = rl_step(base_model, base, base_opt, tok, rows, env, G, L, rep, False, device, ucfg)
        runs["today_fp32"].append(r)
        eps, advs, r = rl_step(ours_model, ours, ours_opt, tok, rows, env, G, L, rep, True, device, ucfg)
        runs["ours"].append(r)
        ours_eps.append(eps)
        print(f"rep {rep}: today's fp32 step {runs['today_fp32'][-1]['step_s']:.1f} s "
              f"(sample {runs['today_fp32'][-1]['sample_s']:.1f} + update {runs['today_fp32'][-1]['update_s']:.1f}), "
              f"ours ({prec}) {r['step_s']:.1f} s (sample {r['sample_s']:.1f} + update {r['update_s']:.1f})", flush=True)
    med = lambda name, k: statistics.median(x[k] for x in runs[name])  # noqa: E731
    for name in runs:
        res[name] = {k: med(name, k) for k in ("step_s", "sample_s", "update_s", "sampled_tokens", "episode_tokens")}
        res[name]["runs"] = runs[name]
    res["step_speedup"] = med("today_fp32", "step_s") / med("ours", "step_s")
    res["step_speedup_per_repeat"] = statistics.median(a["step_s"] / b["step_s"] for a, b in zip(runs["today_fp32"], runs["ours"]))

    # --- the bound: a bare forward+backward of the unique tokens one iteration of our
    # update forwards (each repetition's own episodes), LM head on the sampled positions
    res["bound"] = update_over_bound(ours_model, [(e, r["update_s"] / args.mu) for e, r in zip(ours_eps, runs["ours"])],
                                     ucfg, args.repeats)

    # --- our update against a bare forward+backward (cross-entropy over whole sequences,
    # in our precision) on the same tokens: one optimizer iteration's worth
    groups = logprobs.micro_batches([len(e.token_ids) for e in eps], ucfg.micro_batch_tokens)
    batches = [logprobs.collate([eps[i] for i in grp], [advs[i] for i in grp], tok.pad_token_id, device) for grp in groups]

    def bare():
        ours_model.zero_grad(set_to_none=True)
        for b in batches:
            logits = ours_model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b.input_ids[:, 1:].flatten()).backward()
        ours_model.zero_grad(set_to_none=True)

    bb = [timed(bare)[0] for _ in range(args.repeats)]
    per_iter = med("ours", "update_s") / args.mu
    res["update_vs_bare"] = {"bare_s": statistics.median(bb), "ours_per_iteration_s": per_iter,
                             "ratio": statistics.median(bb) / per_iter}

    # --- peak memory per phase (from the timed runs) against the floor
    floor = n_params * (16 if prec == "fp32" else 18) / 2**20  # (bf16 weights 2 +) fp32 master 4 + grads 4 + AdamW 8
    res["memory"] = {"floor_mb": floor, "what": "peak RSS (CPU) or max allocated (CUDA) per phase",
                     "sample_peak_mb": max(r["sample_peak_mb"] for r in runs["ours"]),
                     "update_peak_mb": max(r["update_peak_mb"] for r in runs["ours"])}
    if prec != "fp32":
        res["memory"]["note"] = "the float32 baseline model stays loaded during our phases and is counted in the RSS"
    res["memory"]["update_peak_over_floor"] = res["memory"]["update_peak_mb"] / floor
    decode(args, res, ours_model, tok, rows, env, G, L)

    if args.naive:
        dt, (n, _) = timed(lambda: naive_sample(ours_model, tok, rows, env, G, L, T, K))
        res["naive_sampler"] = {"s": dt, "tok_s": n / dt, "ours_tok_s": med("ours", "sampled_tokens") / med("ours", "sample_s")}

    trl = None if args.no_trl else run_trl(args, prec)
    if trl:
        res["trl"] = trl
        res["ours_over_trl"] = med("ours", "step_s") / trl["rl_step_s"]
    trl32 = run_trl(args, "fp32") if trl and prec != "fp32" else None  # and against TRL's own default, float32
    if trl32:
        res["trl_fp32"] = trl32
        res["ours_over_trl_fp32"] = med("ours", "step_s") / trl32["rl_step_s"]

    o, b = res["ours"], res["today_fp32"]
    lines = [f"device: {res['device']}   config: {json.dumps(res['config'])}",
             f"{'measure':<46}{'value':>12}   target",
             f"{'today fp32 step: sample + update (s)':<46}{b['sample_s']:>5.1f} +{b['update_s']:>5.1f}",
             f"{'our step (' + prec + '): sample + update (s)':<46}{o['sample_s']:>5.1f} +{o['update_s']:>5.1f}",
             f"{'step speed-up, today fp32 / ours':<46}{res['step_speedup']:>11.2f}x   >= 3x",
             f"{'  (median of per-repeat ratios)':<46}{res['step_speedup_per_repeat']:>11.2f}x",
             f"{'update / bare forward+backward (throughput)':<46}{res['update_vs_bare']['ratio']:>11.2f}x   >= 0.9x",
             f"{'bound: bare fwd+bwd, unique tokens (s)':<46}{res['bound']['bound_s']:>12.1f}   "
             f"{res['bound']['tokens']} tokens, head on {res['bound']['lm_head_positions']}, rows x length {res['bound']['best_shape']}",
             f"{'update per iteration / bound (median of reps)':<46}{res['bound']['update_over_bound']:>11.2f}x   <= 1.3x"]
    if trl:
        lines += [f"{'TRL GRPOTrainer step (s), single turn':<46}{trl['rl_step_s']:>12.1f}",
                  f"{'our step / TRL step':<46}{res['ours_over_trl']:>11.2f}x   <= 0.25x"]
    if trl32:
        lines += [f"{'TRL step in float32, its default (s)':<46}{trl32['rl_step_s']:>12.1f}",
                  f"{'our step / TRL float32 step':<46}{res['ours_over_trl_fp32']:>11.2f}x"]
    m = res["memory"]
    lines += [f"{'peak memory: sampling / update (MiB)':<46}{m['sample_peak_mb']:>5.0f} /{m['update_peak_mb']:>5.0f}",
              f"{'floor: weights, master, grads, AdamW (MiB)':<46}{floor:>12.0f}",
              *decode_lines(args, res),
              f"{'tokens per step: sampled / whole episodes':<46}{o['sampled_tokens']:>5.0f} /{o['episode_tokens']:>5.0f}"]
    if args.naive:
        lines.append(f"{'sampling tok/s: ours / naive':<46}{res['naive_sampler']['ours_tok_s']:>5.1f} /{res['naive_sampler']['tok_s']:>5.1f}")
    return write(args, res, lines)


def decode(args, res: dict, model, tok, rows, env, G, L) -> None:
    """The decode measurements, into `res`: one step at 1 / 4 / 16 rows, the static-cache
    variants at 16 rows, and (--compile) whole sampling calls with compile_decode."""
    res["decode_step_ms"] = {str(r): decode_step_ms(model, r) for r in (1, 4, 16)}
    res["decode_variants"] = decode_variants(model, compile_=args.compile)
    if args.compile:
        res["sampler_compile_decode"] = sampler_compile(model, tok, rows, env, G, L, args.repeats)


def decode_lines(args, res: dict) -> list[str]:
    v = res["decode_variants"]
    lines = [f"{'sampler decode step, 1 / 4 / 16 rows (ms)':<46}" + " /".join(f"{x:4.0f}" for x in res["decode_step_ms"].values()),
             f"{'decode step, 16 rows: HF eager / sampler':<46}{v['hf_eager_ms']:>5.0f} /{v['sampler']['ms']:>5.0f}"
             f"   {v['sampler']['speedup']:.2f}x faster (>= 2x); same argmax {v['sampler']['same_argmax']:.3f}, "
             f"max |dlogp| {v['sampler']['max_logp_diff']:.1e}",
             f"{'  static cache (eager / compiled)':<46}{v['static_eager']['ms']:>5.0f}"
             + (f" /{v['static_compiled']['ms']:>5.0f}" if args.compile else "")]
    if args.compile:
        c = res["sampler_compile_decode"]
        lines.append(f"{'sampling call (s): ours / --compile-decode':<46}{c['eager_s']:>5.1f} /{c['compiled_s']:>5.1f}"
                     f"   same tokens: {c['same_tokens']}, max |dlogp| {c['max_logp_diff']}")
    return lines


def decode_report(args, res: dict, model, tok, rows, env, G, L) -> int:
    """--decode-only: the decode measurements alone."""
    decode(args, res, model, tok, rows, env, G, L)
    return write(args, res, [f"device: {res['device']}   config: {json.dumps(res['config'])}", *decode_lines(args, res)])


def update_report(args, res: dict, model, master, tok, rows, env, G, L, device, ucfg) -> int:
    """--update-only: our update per optimizer iteration (the full run's repetitions: same
    seeds, same episodes), each against the bound of its own episodes, in one run."""
    opt = ready_optimizer(master)
    runs, reps = [], []
    for rep in range(args.repeats):
        eps, _, r = rl_step(model, master, opt, tok, rows, env, G, L, rep, True, device, ucfg)
        runs.append(r)
        reps.append((eps, r["update_s"] / args.mu))
        print(f"rep {rep}: update {r['update_s']:.1f} s ({r['micro_batches']} micro-batches)", flush=True)
    res["bound"] = b = update_over_bound(model, reps, ucfg, args.repeats)
    res["ours"] = {"runs": runs}
    return write(args, res, [
        f"device: {res['device']}   config: {json.dumps(res['config'])}",
        *(f"rep {i}: update per iteration {r['update_per_iteration_s']:.1f} s, bound {r['bound_s']:.1f} s: {r['ratio']:.2f}x"
          for i, r in enumerate(b["per_repetition"])),
        f"{'our update per iteration (s)':<46}{b['update_per_iteration_s']:>12.1f}",
        f"{'bound: bare fwd+bwd, unique tokens (s)':<46}{b['bound_s']:>12.1f}   "
        f"last repetition: {b['tokens']} tokens, head on {b['lm_head_positions']}, rows x length {b['best_shape']}",
        f"{'update per iteration / bound (median of reps)':<46}{b['update_over_bound']:>11.2f}x   <= 1.3x"])


def write(args, res: dict, lines: list[str]) -> int:
    print("\n".join(lines))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
