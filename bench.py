"""Benchmark one MT-GRPO step and compare it with two references, in one run.

Fixed configuration (change with flags, and say so when you quote numbers): the
embedded model, the factbook task (the first `--questions` training questions), G = 8,
`--max-turn-tokens` 64 per turn, the few-shot prompt (so that some rollouts do call the
tool and run two turns), temperature 0.9, top-k 50, seed 0.

Measured, each `--repeats` times (medians reported); repetition r samples with seed r,
ours and the naive sampler one after the other, so both see the same machine state:
- our sampler (mtgrpo.sample_episodes): sampled tokens/s and episodes/s;
  then our log-prob pass and update; the peak memory is taken over these alone;
- the naive sampler, as the reference does it without vLLM: per turn, re-apply the chat
  template to the whole conversation, `model.generate` with stop strings, decode, run
  the tool, repeat; our speed-up is the ratio of sampled tokens/s;
- the log-prob pass (token_logprobs under inference_mode) in tokens/s;
- the update (train.update, mu = 1, every episode trained) in tokens/s, and the
  hardware bound: a bare forward + backward (cross-entropy) on the same micro-batches;
- the whole step's time split, and peak memory (RSS on CPU, max allocated on CUDA)
  against the floor of weights + gradients + AdamW state (16 bytes per parameter).

    python bench.py                 # CPU; on a CUDA machine it uses the GPU
    python bench.py --out bench.json
"""

from __future__ import annotations

import argparse
import ctypes
import gc
import json
import resource
import statistics
import sys
import time

import torch
import torch.nn.functional as F

import mtgrpo
import tool_env
import train


def naive_sample(model, tok, rows, tools, G, max_turn_tokens, temperature, top_k, fewshot, max_tool_calls=1):
    """The reference's way: re-template and re-tokenize the conversation every turn."""
    convs = [tool_env.initial_messages(r["question"], tools, fewshot) for r in rows for _ in range(G)]
    active = list(range(len(convs)))
    sampled = 0
    eos = tok.eos_token_id
    while active:
        texts = [tok.apply_chat_template(convs[i], tokenize=False, add_generation_prompt=True) for i in active]
        enc = tok(texts, return_tensors="pt", padding=True, padding_side="left", add_special_tokens=False)
        enc = {k: v.to(model.device) for k, v in enc.items()}
        out = model.generate(**enc, max_new_tokens=max_turn_tokens, do_sample=temperature > 0,
                             temperature=temperature or None, top_k=top_k or None, top_p=1.0,
                             stop_strings=list(mtgrpo.STOP_STRINGS), tokenizer=tok, pad_token_id=eos)
        new = out[:, enc["input_ids"].shape[1]:].tolist()
        still = []
        for r, i in enumerate(active):
            ids = new[r]
            n = ids.index(eos) if eos in ids else len(ids)  # pad == eos: count up to the first
            text = tok.decode(ids[:n])
            hit_stop = any(s in text for s in mtgrpo.STOP_STRINGS)
            sampled += n + (0 if hit_stop or n == len(ids) else 1)
            convs[i].append({"role": "assistant", "content": text})
            step = tool_env.env_step(convs[i], tools, max_tool_calls, truncated=n == len(ids) and not hit_stop)
            if not step.done:
                convs[i].append(step.message)
                still.append(i)
        active = still
    return sampled, len(convs)


def reset_peak_memory(device) -> None:
    """Start a phase's peak-memory window. On CPU, first hand freed heap back to the
    OS (glibc malloc_trim): the RSS would otherwise still hold what the previous phase
    (e.g. the naive sampler) freed, and charge it to the next one."""
    if str(device).startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    else:
        gc.collect()
        try:
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


def decode_step_ms(model, rows: int, context: int = 400, steps: int = 8) -> float:
    """Median time of one cached decode step for `rows` sequences after a `context`-token
    prefill: how the cost of a sampling step grows with the batch."""
    device = next(model.parameters()).device
    model.eval()
    ids = torch.randint(100, 1000, (rows, context), device=device)
    times = []
    with torch.inference_mode():
        cache = mtgrpo._growing_cache()
        out = model(input_ids=ids, past_key_values=cache, use_cache=True, logits_to_keep=1)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        for _ in range(steps):
            dt, out = timed(lambda: model(input_ids=nxt, past_key_values=cache, use_cache=True, logits_to_keep=1))
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            times.append(dt * 1000)
    return statistics.median(times)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Benchmark sampling, log-prob pass and update.")
    p.add_argument("--model", default="smollm2-135m")
    p.add_argument("--questions", type=int, default=2)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--max-turn-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--no-naive", action="store_true", help="skip the naive reference")
    p.add_argument("--device", default=None)
    p.add_argument("--out", default="bench.json")
    args = p.parse_args(argv)

    device = args.device or mtgrpo.default_device()
    torch.manual_seed(0)
    model, tok = mtgrpo.load_model(args.model, device)
    model.eval()
    ds = tool_env.load_task("factbook", "train")
    rows = [ds[i] for i in range(args.questions)]
    tools = tool_env.make_tools(tool_env.load_corpus("factbook"))
    G, T, K = args.group_size, 0.9, 50
    res = {"device": torch.cuda.get_device_name() if str(device).startswith("cuda") else f"cpu ({torch.get_num_threads()} threads)",
           "config": {"model": args.model, "questions": args.questions, "G": G, "max_turn_tokens": args.max_turn_tokens,
                      "fewshot": True, "temperature": T, "top_k": K, "seed": 0, "repeats": args.repeats,
                      "dtype": str(next(model.parameters()).dtype)}}

    # --- sampling: ours and the naive way alternate, so that a slow spell of the
    # machine hits both; repetition `rep` seeds both with `rep`. The peak memory is
    # read over our phases only (it is reset before each, see reset_peak_memory).
    ours, naive, peaks, episodes = [], [], [], None
    for rep in range(args.repeats):
        reset_peak_memory(device)
        gen = torch.Generator(device=device).manual_seed(rep)
        dt, eps = timed(lambda: mtgrpo.sample_episodes(model, tok, rows, tools, G, args.max_turn_tokens, T, K,
                                                       fewshot=True, generator=gen))
        peaks.append(peak_memory_mb(device))
        n = sum(sum(e.loss_mask) for e in eps)
        ours.append({"s": dt, "tokens": n, "episodes": len(eps), "tok_s": n / dt, "ep_s": len(eps) / dt,
                     "two_turn": sum(e.num_turns > 1 for e in eps)})
        episodes = episodes or eps
        msg = f"rep {rep}: ours {ours[-1]['tok_s']:.1f} tok/s"
        if not args.no_naive:
            torch.manual_seed(rep)
            dt, (n, ne) = timed(lambda: naive_sample(model, tok, rows, tools, G, args.max_turn_tokens, T, K, True))
            naive.append({"s": dt, "tokens": n, "episodes": ne, "tok_s": n / dt, "ep_s": ne / dt})
            msg += f", naive {naive[-1]['tok_s']:.1f} tok/s, ratio {ours[-1]['tok_s'] / naive[-1]['tok_s']:.2f}"
        print(msg, flush=True)
    mtgrpo.score_episodes(episodes)
    g = torch.Generator().manual_seed(0)
    advs = [torch.randn(len(e.token_ids), generator=g) * torch.tensor(e.loss_mask, dtype=torch.float) for e in episodes]
    targs = train.parse_args(["--mu", "1", "--max-turn-tokens", str(args.max_turn_tokens)])
    tokens = sum(len(e.token_ids) for e in episodes)
    groups = mtgrpo.micro_batches([len(e.token_ids) for e in episodes], targs.micro_batch_tokens)
    batches = [mtgrpo.collate([episodes[i] for i in grp], [advs[i] for i in grp], tok.pad_token_id, device) for grp in groups]

    def logprob_pass():
        with torch.inference_mode():
            for b in batches:
                mtgrpo.token_logprobs(model, b.input_ids, b.attention_mask, T, positions=b.loss_mask.bool())

    def bare():
        model.zero_grad(set_to_none=True)
        for b in batches:
            logits = model(input_ids=b.input_ids, attention_mask=b.attention_mask).logits
            F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), b.input_ids[:, 1:].flatten()).backward()

    opt = train.make_optimizer(model, lr=1e-9)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    lp, up, bb = [], [], []
    for _ in range(args.repeats):
        reset_peak_memory(device)
        lp.append(timed(logprob_pass)[0])
        up.append(timed(lambda: train.update(model, opt, sched, episodes, advs, targs, tok.pad_token_id))[0])
        peaks.append(peak_memory_mb(device))
        bb.append(timed(bare)[0])  # the bound, right after the update it bounds
    peak = max(peaks)
    sample_peak, update_peak = max(peaks[: args.repeats]), max(peaks[args.repeats :])

    # what one decode step costs as the batch grows (the sampler runs ~2 x max-turn-tokens of them)
    res["decode_step_ms"] = {str(r): decode_step_ms(model, r) for r in (1, 4, 16)}
    med = lambda xs, k: statistics.median(x[k] for x in xs)  # noqa: E731
    res["sampling"] = {"ours_tok_s": med(ours, "tok_s"), "ours_ep_s": med(ours, "ep_s"), "runs": ours}
    if naive:
        res["sampling"].update({"naive_tok_s": med(naive, "tok_s"), "naive_ep_s": med(naive, "ep_s"), "naive_runs": naive,
                                "speedup": med(ours, "tok_s") / med(naive, "tok_s"),
                                "speedup_per_repeat": [o["tok_s"] / n["tok_s"] for o, n in zip(ours, naive)]})
        res["sampling"]["median_speedup_per_repeat"] = statistics.median(res["sampling"]["speedup_per_repeat"])
    res["logprob"] = {"tok_s": tokens / statistics.median(lp), "tokens": tokens}
    res["update"] = {"tok_s": tokens / statistics.median(up), "bare_tok_s": tokens / statistics.median(bb),
                     "fraction_of_bound": statistics.median(bb) / statistics.median(up), "micro_batches": len(batches),
                     "micro_batch_tokens": targs.micro_batch_tokens}
    n_params = sum(p.numel() for p in model.parameters())
    floor_mb = n_params * (4 + 4 + 8) / 2**20 if next(model.parameters()).dtype == torch.float32 else n_params * (2 + 2 + 8) / 2**20
    res["memory"] = {"peak_mb": peak, "sampling_peak_mb": sample_peak, "update_peak_mb": update_peak, "floor_mb": floor_mb, "what": "peak RSS (CPU) or max allocated (CUDA) during our sampling, log-prob passes and updates"}
    res["memory"]["peak_over_floor"] = res["memory"]["peak_mb"] / floor_mb
    sample_s = statistics.median(o["s"] for o in ours)
    res["step"] = {"sample_s": sample_s, "logprob_s": statistics.median(lp), "update_s": statistics.median(up)}
    res["step"]["total_s"] = sample_s + res["step"]["update_s"]  # train.py reuses the sampler's log-probs

    s = res["sampling"]
    lines = [f"device: {res['device']}   config: {json.dumps(res['config'])}",
             f"{'measure':<34}{'value':>14}",
             f"{'sampling, ours (tok/s)':<34}{s['ours_tok_s']:>14.1f}",
             f"{'sampling, ours (episodes/s)':<34}{s['ours_ep_s']:>14.3f}"]
    if naive:
        lines += [f"{'sampling, naive (tok/s)':<34}{s['naive_tok_s']:>14.1f}",
                  f"{'sampling speed-up (ratio of medians)':<34}{s['speedup']:>14.2f}",
                  f"{'  (median of per-repeat ratios)':<34}{s['median_speedup_per_repeat']:>14.2f}"]
    lines += [f"{'log-prob pass (tok/s)':<34}{res['logprob']['tok_s']:>14.1f}",
              f"{'update (tok/s)':<34}{res['update']['tok_s']:>14.1f}",
              f"{'bare forward+backward (tok/s)':<34}{res['update']['bare_tok_s']:>14.1f}",
              f"{'update / bare bound':<34}{res['update']['fraction_of_bound']:>14.2f}",
              f"{'peak memory (MiB)':<34}{res['memory']['peak_mb']:>14.0f}",
              f"{'  in sampling / in the update':<34}{sample_peak:>7.0f} /{update_peak:>5.0f}",
              f"{'floor: weights+grads+AdamW (MiB)':<34}{floor_mb:>14.0f}",
              f"{'decode step, 1 / 4 / 16 rows (ms)':<34}" + " /".join(f"{v:5.0f}" for v in res["decode_step_ms"].values()),
              f"{'step: sample + update (s)':<34}{sample_s:>6.1f} +{res['step']['update_s']:>6.1f}"]
    print("\n".join(lines))
    with open(args.out, "w") as f:
        json.dump(res, f, indent=2)
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
