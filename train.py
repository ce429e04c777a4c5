"""Train a tool-using agent with MT-GRPO (or the GRPO-OR / GRPO-MR baselines).

Each step: pick `--questions-per-step` questions, roll out `--group-size` (G) episodes
for each (sampler.sample_episodes), score them with R^T and R^O (rewards.py), turn
the rewards into per-token advantages (mtgrpo.compute_advantages), then take `--mu`
AdamW steps on the clipped loss (mtgrpo.policy_loss), with gradient accumulation
over micro-batches of at most `--micro-batch-tokens` padded tokens.

Simplifications against the paper's setup (docs/paper.md §6): no vLLM or DeepSpeed;
sampling uses the training model itself with a KV cache. Several processes (torchrun,
one per GPU, or gloo on CPU) each sample and score their share of a step's questions (a
question's G rollouts stay in one process, so group statistics need no communication),
and their float32 gradients are summed once per optimizer step (see update); every
process holds the whole model and optimizer state (with --fsdp, 1/N of them, and the
gradients are reduce-scattered after every backward: sharding.py);
rank 0 writes logs, evaluations and checkpoints.

    python train.py                                   # recipe v3, CPU-sized: embedded model, factbook, 30 steps
    python train.py --method grpo-or --steps 200 --group-size 8 --questions-per-step 8
    python train.py --resume --output-dir runs/mt-grpo   # continue after a crash
    torchrun --nproc_per_node 2 train.py --questions-per-step 4    # 2 processes, 2 questions each
    torchrun --nproc_per_node 8 train.py --fsdp ...                 # a model that does not fit one GPU

Writes OUTPUT_DIR/log.jsonl (one line per step) and OUTPUT_DIR/checkpoint/ (checkpoint.py).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import json
import math
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import dataclass

# PyTorch's CPU allocator puts each tensor of 2 MB or more on transparent huge pages with
# this setting (read once, at the first tensor, so it is set before torch is imported).
# The update allocates and frees gigabytes of activations and gradients; on 4 KB pages
# the kernel faults in and zero-fills every page anew (about 440k faults per bench.py
# update). Huge pages made that update 0.90x as long, for 7% more peak memory in a short
# run (docs/performance.md). THP_MEM_ALLOC_ENABLE=0 turns it off; it changes no number.
os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")

import torch  # noqa: E402
import torch.distributed as dist

import checkpoint
import data
import evaluate
import logprobs
import models
import mtgrpo
import precision
import probe
import rewards
import sampler
import sharding
import tasks
import tool_env


@dataclass
class UpdateConfig:
    """The settings of train.update: mu optimizer steps on the clipped loss of one
    batch of episodes (mtgrpo.policy_loss; docs/paper.md §2)."""

    mu: int = 1  # optimizer steps per generated batch (recipe v2: every batch is used once)
    eps: float = 0.2  # clip range [1 - eps, 1 + eps_high]
    eps_high: float | None = None  # None: eps
    beta: float = 0.0  # KL coefficient (a reference model is loaded only if > 0)
    aggregation: str = "token-mean"
    tis_cap: float = 2.0  # cap C of the truncated importance-sampling weight (0: off)
    grad_clip: float = 0.1
    micro_batch_tokens: int = 512  # padded tokens per forward/backward; bounds activation memory
    temperature: float = 0.9  # the sampler's: log-probs are of the tempered distribution
    max_sampled: int = 256  # the most tokens an episode may sample (Dr. GRPO's constant)

    @classmethod
    def from_dict(cls, d: dict) -> "UpdateConfig":
        """From argparse's namespace or a run's config.json; max_sampled follows from the
        turn budget: max_tool_calls + 1 turns of max_turn_tokens."""
        out = {f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d}
        if d.get("max_turn_tokens") and d.get("max_tool_calls"):
            out["max_sampled"] = d["max_turn_tokens"] * (d["max_tool_calls"] + 1)
        return cls(**out)


def _numbers_as_values(argv: list[str]) -> list[str]:
    """argparse takes "-1e-4" after a flag for another flag ("expected one argument"):
    glue such negative numbers to their flag ("--lr=-1e-4") so the checks below see them."""
    out = []
    for tok in argv:
        if out and re.fullmatch(r"-\d[\d.]*([eE][-+]?\d+)?", tok) and out[-1].startswith("--") and "=" not in out[-1]:
            out[-1] += "=" + tok
        else:
            out.append(tok)
    return out


def count_or_none(text: str) -> int | None:
    """A flag's value: a whole number, or 'none' (the setting off)."""
    return None if text.lower() == "none" else int(text)


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=evaluate.DefaultsHelp)
    a = p.add_argument
    a("--model", default="smollm2-135m", help="'smollm2-135m' (embedded), a local folder or a Hugging Face id")
    a("--task", default="factbook", help="'factbook', 'factbook-2hop', 'triviaqa' or 'triviaqa:PATH'")
    a("--corpus", default=None, help="'factbook', a JSONL of {title, text}, or a corpus.py --prepare folder")
    a("--method", default="mt-grpo", choices=mtgrpo.METHODS)
    # the defaults are recipe v3 (configs/sweep_recipe.py, chosen on validation: results/README.md), CPU-sized
    a("--steps", type=int, default=30)
    a("--questions-per-step", type=int, default=4)
    a("--group-size", type=int, default=8, help="G, rollouts per question")
    a("--lr", type=float, default=3e-5,
      help="the paper used 1e-6 for a 7B model; 3e-5 was chosen for the 135M model by a validation sweep")
    a("--warmup-steps", type=int, default=5, help="linear warm-up, in optimizer steps")
    a("--lr-schedule", default="cosine", choices=LR_SCHEDULES,
      help="after the warm-up: constant, or a linear or cosine decay to --lr-floor x lr at step --lr-decay-steps")
    a("--lr-floor", type=float, default=0.1, help="the decay's final lr, as a fraction of --lr")
    # 60, not --steps: the default 30-step run is the first half of recipe v3's 60-step schedule (a
    # 30-step decay ends at 7/32 validation EM where the 60-step schedule's step 30 had 12/32 and 9/32:
    # results/README.md), and `--resume --steps 60` completes that schedule instead of bending it
    a("--lr-decay-steps", type=int, default=60,
      help="the step at which the decay reaches --lr-floor (the lr stays there after it); 0: the run's last step")
    a("--freeze-embeddings", action="store_true",
      help="do not train the token embeddings (tied to the LM head in the embedded model)")
    U, R = UpdateConfig, sampler.RolloutConfig  # the defaults live in these two dataclasses
    a("--grad-clip", type=float, default=U.grad_clip)
    a("--mu", type=int, default=U.mu, help="optimizer steps per generated batch")
    a("--beta", type=float, default=U.beta, help="KL coefficient (a reference model is loaded only if > 0)")
    a("--eps", type=float, default=U.eps)
    a("--eps-high", type=float, default=U.eps_high, help="upper clip range (default: --eps)")
    a("--aggregation", default=U.aggregation, choices=mtgrpo.AGGREGATIONS)
    a("--scale", default="std", choices=("std", "none"), help="divide advantages by the group std, or not (Dr. GRPO)")
    a("--turn-coef", type=float, default=1.0, help="weight of the turn-level advantage (mt-grpo)")
    a("--gamma", type=float, default=1.0,
      help="discount of later turns' rewards in mt-grpo's turn-level reward-to-go (with one tool call: no effect)")
    a("--merged-fallback", action="store_true", help="reference rule: episodes without a tool result get the merged advantage")
    a("--temperature", type=float, default=R.temperature)
    a("--top-k", type=int, default=R.top_k, help="0: the whole vocabulary")
    a("--max-turn-tokens", type=int, default=R.max_turn_tokens)
    a("--compile-decode", action="store_true",
      help="sample with a static KV cache and a torch.compile'd decode step: for GPUs (slower on a CPU, docs/performance.md)")
    a("--max-tool-calls", type=int, default=None, help="tool results per episode (default: 1; 2 for factbook-2hop)")
    a("--force-answer", action="store_true",
      help="after the last allowed tool result the environment starts the next turn with <answer> "
           "(the two-hop task's rule, docs/task.md)")
    a("--search-chars", type=int, default=tool_env.SEARCH_MAX_CHARS)
    a("--contains-max-extra-words", type=count_or_none, default=1,
      help="contains_answer scores only an answer at most N words longer than the gold alias it holds "
           "(recipe v3; 'none': no limit, the paper's reward; rewards.contains_answer_reward)")
    a("--fewshot", action=argparse.BooleanOptionalAction, default=None,
      help="a one-shot tool-use demonstration before the question (default: on for the embedded model, "
           "which never calls the tool without it; off for other models: the paper's prompt)")
    a("--demo", default=tool_env.DEFAULT_DEMO, choices=tuple(tool_env.DEMOS),
      help="the one-search demonstration: jp+lake (recipe v5: the internet country code, '.jp', then a second "
           "whose answer is a plain name copied from its result, tool_env.FEWSHOT_LAKE) or jp (recipes v2-v4: the first alone); factbook-2hop shows its own two-search demonstration")
    a("--micro-batch-tokens", type=int, default=U.micro_batch_tokens, help="padded tokens per forward/backward; bounds activation memory")
    a("--seed", type=int, default=0)
    a("--output-dir", default="runs/default")
    a("--eval-every", type=int, default=10,
      help="greedy evaluation before training, every N steps and at the end (0: never)")
    a("--eval-split", default="validation", choices=data.SPLITS, help="tune on validation; report on test")
    a("--eval-questions", type=int, default=32, help="N questions of --eval-split, spread evenly over it (0: all)")
    a("--save-every", type=int, default=10)
    a("--resume", action="store_true", help="continue from OUTPUT_DIR/checkpoint")
    a("--log", default="jsonl", choices=("jsonl", "tensorboard"),
      help="OUTPUT_DIR/log.jsonl always; tensorboard: the same scalars to OUTPUT_DIR/tb too (pip install tensorboard)")
    a("--device", default=None)
    a("--fsdp", action="store_true",
      help="torchrun: shard the weights, gradients and AdamW state over the processes (FSDP2, as the paper's "
           "ZeRO-3), for a model that does not fit one GPU; one process ignores it")
    a("--precision", default="auto", choices=precision.PRECISIONS,
      help="bf16: bf16 forward/backward with float32 master weights and AdamW state; auto: bf16 where the hardware is fast at it")
    a("--tis-cap", type=float, default=U.tis_cap, help="cap C of the truncated importance-sampling weight (0: off)")
    a("--probe-questions", type=int, default=8,
      help="validation questions of the policy-movement probe, logged as probe_* after every update (0: off)")
    args = p.parse_args(_numbers_as_values(sys.argv[1:] if argv is None else list(argv)))
    if args.fewshot is None:
        args.fewshot = args.model in models.EMBEDDED
    if args.max_tool_calls is None:
        args.max_tool_calls = tasks.default_tool_calls(args.task)
    saved = os.path.join(args.output_dir, "config.json")
    if args.resume and os.path.isfile(saved):
        with open(saved) as f:
            if "demo" not in json.load(f):  # a run saved before --demo existed goes on with the demo it was trained with
                args.demo = tool_env.DEMO_BEFORE_THE_FLAG
    for name in ("steps", "questions_per_step", "group_size", "mu", "max_turn_tokens", "max_tool_calls",
                 "micro_batch_tokens", "save_every"):
        if getattr(args, name) < 1:
            p.error(f"--{name.replace('_', '-')} must be at least 1")
    if args.eval_questions < 0 or args.eval_every < 0 or args.probe_questions < 0:
        p.error("--eval-questions, --eval-every and --probe-questions must be 0 or more")
    if not 0 <= args.gamma <= 1:
        p.error("--gamma must be between 0 and 1")
    if args.contains_max_extra_words is not None and args.contains_max_extra_words < 0:
        p.error("--contains-max-extra-words must be 0 or more")
    if not 0 <= args.lr_floor <= 1:
        p.error("--lr-floor must be between 0 and 1 (a fraction of --lr)")
    if args.lr_decay_steps < 0:
        p.error("--lr-decay-steps must be 0 (the run's last step) or more")
    if args.group_size < 2:
        p.error("--group-size must be at least 2: advantages are relative to the group")
    if args.lr <= 0 or args.eps <= 0 or args.beta < 0:
        p.error("--lr and --eps must be positive, --beta non-negative")
    if args.temperature <= 0:
        p.error("--temperature must be positive: at 0 all G rollouts of a question are identical, "
                "so every advantage is 0 and nothing is learned")
    return args


# ----------------------------------------------------------------------------------


LR_SCHEDULES = ("constant", "linear", "cosine")


def lr_factor(step: int, warmup: int, total: int, schedule: str = "constant", floor: float = 0.1) -> float:
    """The lr multiplier after `step` optimizer steps (LambdaLR's argument: 0 before the
    first): a linear warm-up over `warmup` steps, then constant, or a linear or cosine
    decay from 1 to `floor`, reached at the last of `total` steps and kept after it. A
    decaying lr makes the last updates small, so the final policy is not whatever the
    last large step made of it."""
    if warmup and step < warmup:
        return (step + 1) / warmup
    if schedule == "constant" or total <= warmup + 1:
        return 1.0
    t = min(1.0, (step - warmup) / (total - warmup - 1))  # 0 at the first step after warm-up, 1 at the last
    if schedule == "linear":
        return 1.0 - (1.0 - floor) * t
    if schedule == "cosine":
        return floor + (1.0 - floor) * 0.5 * (1.0 + math.cos(math.pi * t))
    raise ValueError(f"unknown lr schedule {schedule!r}; choose one of {LR_SCHEDULES}")


def questions_for_step(n_rows: int, step: int, k: int, seed: int) -> list[int]:
    """Row indices of step `step`: a seeded permutation per epoch, so any step's
    questions follow from (seed, step) alone and resuming needs no data state."""
    out = []
    for j in range(step * k, step * k + k):
        epoch, pos = divmod(j, n_rows)
        perm = list(range(n_rows))
        random.Random(seed * 100_003 + epoch).shuffle(perm)
        out.append(perm[pos])
    return out


def episode_stats(episodes: list[sampler.Episode]) -> dict:
    """Means of every reward component and the tool-use rates of a batch."""
    n = len(episodes)
    stats = {k: sum(e.components[k] for e in episodes) / n for k in episodes[0].components}
    stats["episodes"] = n
    stats["R_T"] = sum(e.turn_reward for e in episodes) / n
    stats["R_O"] = sum(e.outcome_reward for e in episodes) / n
    stats["tool_call_rate"], stats["tool_success"] = sampler.tool_use_rates(episodes)
    if "exact_match" in stats:  # the paper's rubric: em, its short name in the progress bar
        stats["em"] = stats["exact_match"]
    stats["turns"] = sum(e.num_turns for e in episodes) / n
    answers = [a for a in (tool_env.final_answer(e.messages) for e in episodes) if a is not None]
    # words per final answer (normalized as EM is): a sentence around the gold shows here
    stats["answer_words"] = sum(len(rewards.normalize_answer(a).split()) for a in answers) / max(len(answers), 1)
    stats["sampled_tokens"] = sum(sum(e.loss_mask) for e in episodes) / n
    stats["episode_tokens"] = sum(len(e.token_ids) for e in episodes) / n
    for reason, c in Counter(e.end_reason for e in episodes).items():
        stats[f"end_{reason}"] = c / n
    return stats


class UpdateStats:
    """The bookkeeping of one update, kept out of its loop: token-weighted means of the
    loss terms, the clip and ratio statistics of iterations 1..mu-1 (iteration 0's ratio
    is exactly 1: it cannot clip), the sampler/trainer gap of iteration 0."""

    def __init__(self):
        self.t = Counter()
        self.diff_sum = self.diff_max = 0.0
        self.ent_sum = self.tok_sum = 0.0  # of the current iteration

    def micro_batch(self, it: int, loss, st: dict, ent, pos, b, w) -> None:
        n_tok = float(b.loss_mask.sum())
        t = self.t
        t["loss"] += loss.item()
        t["kl"] += st["kl"] * n_tok
        if it > 0:
            t["clip_frac"] += st["clip_frac"] * n_tok
            t["ratio_min"] = min(t.get("ratio_min", 1.0), st["ratio_min"])
            t["ratio_max"] = max(t.get("ratio_max", 1.0), st["ratio_max"])
        else:
            t["is_weight_min"] = min(t.get("is_weight_min", 1.0), float(w[pos].min()) if pos.any() else 1.0)
        self.ent_sum += float(ent[pos].sum())
        self.tok_sum += n_tok

    def sampler_gap(self, old, b, pos) -> None:
        """|trainer - sampler| log-prob of the trained tokens, before any optimizer step."""
        d = (old - b.sample_logp)[pos].abs()
        if d.numel():
            self.diff_sum, self.diff_max = self.diff_sum + float(d.sum()), max(self.diff_max, float(d.max()))

    def optimizer_step(self, grad_norm, lr: float) -> None:
        self.t["grad_norm"] += float(grad_norm)
        self.t["entropy"] += self.ent_sum / max(self.tok_sum, 1)
        self.t["tokens"] += self.tok_sum
        self.ent_sum = self.tok_sum = 0.0
        self.lr = lr  # the lr this optimizer step used

    def summary(self, mu: int, trained: int, n_micro: int) -> tuple[dict, float]:
        t, n_first = self.t, self.t["tokens"] / mu
        later = mu > 1 and trained  # clip_frac and the ratio range exist only with mu > 1
        return {
            "loss": t["loss"] / mu, "clip_frac": t["clip_frac"] / max(t["tokens"] - n_first, 1) if later else None,
            "kl": t["kl"] / max(t["tokens"], 1), "entropy": t["entropy"] / mu if trained else None,
            "ratio_min": t.get("ratio_min", 1.0) if later else None,
            "ratio_max": t.get("ratio_max", 1.0) if later else None, "grad_norm": t["grad_norm"] / mu,
            "logp_diff_mean": self.diff_sum / n_first if n_first else None,
            "logp_diff_max": self.diff_max if n_first else None,
            "is_weight_min": t.get("is_weight_min", 1.0),
            "lr": self.lr, "micro_batches": n_micro, "trained_episodes": trained,
        }, n_first


def update(model, master, optimizer, scheduler, episodes, advantages, cfg: UpdateConfig, pad_id: int,
           ref_model=None, shared_prefix: bool = True) -> dict:
    """The inner loop of the paper's Algorithm 1: `cfg.mu` AdamW steps on the clipped
    loss (mtgrpo.policy_loss) of one batch of episodes, gradients accumulated over
    micro-batches, the loss normalizer that of the whole batch (every process's).

    old_logp (the ratio's denominator) is the training pass's own log-prob before the
    first optimizer step: iteration 0's forward, detached (its ratio is exactly 1), kept
    for iterations 1..mu-1, as TRL computes it. The sampler's log-probs are used only to
    measure the sampler/trainer mismatch (logp_diff_*) and to correct it (mtgrpo.tis_weights).
    Each question's prompt is forwarded once for its G rollouts (logprobs.Prefix).
    """
    device = next(model.parameters()).device
    all_masks = [m for masks in gather([e.loss_mask for e in episodes]) for m in masks]
    normalizer = mtgrpo.loss_normalizer(cfg.aggregation, all_masks, cfg.max_sampled)
    # With beta = 0, an episode whose advantages are all 0 adds exactly 0 to the
    # gradient (the normalizer above still counts its tokens): skip its passes.
    # Early in training most groups have equal rewards, so this saves a lot.
    todo = [i for i, a in enumerate(advantages) if cfg.beta > 0 or bool(a.any())]
    plan = logprobs.plan_micro_batches(episodes, todo, cfg.micro_batch_tokens, shared_prefix)
    n_micro = sum(len(c) for _, c in plan)
    fsdp = isinstance(master, sharding.ShardedWeights)
    if fsdp:  # --fsdp: every process runs as many passes as the busiest one (idle ones add 0)
        plan = sharding.lockstep_plan(plan, [pad_id] if shared_prefix else [])
    stats = UpdateStats()
    frozen = {}  # (group, micro-batch) -> iteration 0's old_logp, TIS weights, ref_logp
    model.eval()  # no dropout: the update must score each token as the sampler did
    # sparse embedding gradients and GQA without copies (logprobs.lean_backward); the sharded
    # engine (--fsdp) gathers dense gradients, so it keeps the default kernels
    with contextlib.nullcontext() if fsdp else logprobs.lean_backward(model, device):
        for it in range(cfg.mu):
            master.zero_grad()
            for gi, (prefix_ids, chunks) in enumerate(plan):
                prefix = logprobs.Prefix(model, prefix_ids, device, through_output=fsdp)
                ref_prefix = None
                if ref_model is not None and it == 0:
                    with torch.no_grad():
                        ref_prefix = logprobs.Prefix(ref_model, prefix_ids, device)
                for ci, g in enumerate(chunks):
                    if g is None:  # --fsdp: this process takes part in the others' collectives, adding 0
                        sharding.idle_pass(model, prefix, pad_id, device)
                        continue
                    b = logprobs.collate([episodes[i] for i in g], [advantages[i] for i in g], pad_id, device, start=len(prefix_ids))
                    pos = b.loss_mask.bool()  # log-probs only where the loss needs them
                    logp, ent = logprobs.token_logprobs(model, b.input_ids, b.attention_mask, cfg.temperature, True, pos, prefix)
                    if it == 0:
                        old, ref = logp.detach(), None
                        if ref_model is not None:
                            with torch.no_grad():
                                ref, _ = logprobs.token_logprobs(ref_model, b.input_ids, b.attention_mask, cfg.temperature,
                                                               False, pos, ref_prefix)
                        frozen[gi, ci] = (old, mtgrpo.tis_weights(old, b.sample_logp, cfg.tis_cap) * b.loss_mask, ref)
                        stats.sampler_gap(old, b, pos)
                    old, w, ref = frozen[gi, ci]
                    loss, st = mtgrpo.policy_loss(
                        logp, old, b.advantages, b.loss_mask, eps=cfg.eps, eps_high=cfg.eps_high, beta=cfg.beta,
                        ref_logp=ref, aggregation=cfg.aggregation, normalizer=normalizer, is_weights=w,
                    )
                    loss.backward()
                    master.collect_grads()  # float32 accumulation over micro-batches
                    stats.micro_batch(it, loss, st, ent, pos, b, w)
                prefix.backward()  # the group's prompt: its gradient, once
                master.collect_grads()
            if fsdp:  # the engine has summed every backward's gradients over the processes (reduce-scatter)
                grad_norm = master.clip_grad_norm_(cfg.grad_clip)
            else:
                sum_gradients(master.params)
                grad_norm = torch.nn.utils.clip_grad_norm_(master.params, cfg.grad_clip)
            stats.optimizer_step(grad_norm, optimizer.param_groups[0]["lr"])
            optimizer.step()
            master.push()
            scheduler.step()
    return reduce_update_stats(*stats.summary(cfg.mu, len(todo), n_micro))


# how reduce_update_stats combines each key over the processes; the rest (grad_norm, lr)
# are the same on every process: the gradients are summed before they are clipped
SUMMED = ("loss", "micro_batches", "trained_episodes")  # loss: each process's is a share of one global mean
TOKEN_MEANS = ("clip_frac", "kl", "entropy", "logp_diff_mean")
MINIMA, MAXIMA = ("ratio_min", "is_weight_min"), ("ratio_max", "logp_diff_max")


def reduce_update_stats(stats: dict, tokens: float) -> dict:
    """update()'s statistics over every process, so that a torchrun log line describes
    the whole step (as its episode statistics do), not rank 0's share: sums, means
    weighted by each process's trained tokens per optimizer step (`tokens`; a process
    that trained nothing has None or 0 there and no weight), minima and maxima.
    One process: `stats` unchanged."""
    if world()[1] == 1:
        return stats
    parts = gather((stats, tokens))
    out = dict(stats)
    for k in SUMMED:
        out[k] = sum(s[k] for s, _ in parts)
    for k in TOKEN_MEANS:
        vals = [(s[k], w) for s, w in parts if s[k] is not None and w > 0]
        if vals:
            out[k] = sum(v * w for v, w in vals) / sum(w for _, w in vals)
    for keys, pick in ((MINIMA, min), (MAXIMA, max)):
        for k in keys:
            vals = [s[k] for s, _ in parts if s[k] is not None]
            out[k] = pick(vals) if vals else None
    return out


def cuda_peak_gib(device) -> float | None:
    """The most memory this process's CUDA allocator held since the last call (GiB), then
    a fresh count; None off CUDA. Logged as memory_sample_gib and memory_update_gib, the
    peaks of the two phases that memory_plan.py simulates (rank 0's under torchrun)."""
    if not str(device).startswith("cuda"):
        return None
    peak = torch.cuda.max_memory_allocated(device) / 2**30
    torch.cuda.reset_peak_memory_stats(device)
    return peak


def make_optimizer(params, lr: float) -> torch.optim.AdamW:
    """AdamW as in the paper (betas 0.9, 0.99, no weight decay) over the float32 master
    weights (precision.MasterWeights.params). fused=True updates each tensor in one
    kernel; the default (foreach) builds temporaries the size of all the weights, which
    raised the step's peak memory by about 0.5 GB for the 135M model."""
    return torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, fused=True)


def mean_adv_per_turn(advantages, episodes) -> dict:
    """adv_turnK: the mean advantage on the tokens of assistant turn K, for every turn
    that some episode reached (at least turns 1 and 2)."""
    out = {}
    for k in range(1, max(2, max(e.num_turns for e in episodes)) + 1):
        vals = [float(a[j]) for a, e in zip(advantages, episodes) for j, t in enumerate(e.token_turns) if t == k]
        out[f"adv_turn{k}"] = sum(vals) / len(vals) if vals else 0.0
    return out


# ----------------------------------------------------------------------------------
# Several processes (torchrun)


def world() -> tuple[int, int]:
    """(rank, number of processes): torchrun's, or (0, 1)."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def gather(obj) -> list:
    """Every process's `obj`, in rank order ([obj] with one process). With NCCL,
    all_gather_object stages the pickled bytes on torch.cuda.current_device(), so each
    process must have set its own GPU first (setup_distributed does); otherwise every
    rank would use GPU 0."""
    if world()[1] == 1:
        return [obj]
    out = [None] * world()[1]
    dist.all_gather_object(out, obj)
    return out


BUCKET_ELEMENTS = 32 * 2**20  # float32 elements per all-reduce: 128 MB, a few buckets for a 7B model's gradients


def sum_gradients(params, bucket_elements: int = BUCKET_ELEMENTS) -> None:
    """Sum the float32 gradients over the processes (each process's loss is already divided
    by the global normalizer, so the sum is the gradient of the whole batch). Once per
    optimizer step, not DDP's per-backward hooks: an update here runs several backward
    passes (micro-batches and each group's shared prompt) into the float32 master
    gradients, and only their total needs to travel.

    Every tensor handed to a collective lives on the parameters' device: NCCL (torchrun
    on GPUs) has no CPU backend. The gradients travel flattened into buckets of at most
    `bucket_elements` (one all-reduce each; a parameter larger than that is a bucket of
    its own), not one all-reduce per parameter: a few large messages instead of hundreds
    of small ones, at the cost of one bucket's copy. Parameters no process touched keep
    grad None, as with one process (AdamW then skips them); which ones, takes one more
    (small) all-reduce."""
    if world()[1] == 1 or not params:
        return
    device = params[0].device
    touched = torch.tensor([float(p.grad is not None) for p in params], device=device)
    dist.all_reduce(touched)
    live = [p for p, t in zip(params, touched.tolist()) if t]
    for p in live:
        if p.grad is None:  # touched by another process only: this one adds zeros
            p.grad = torch.zeros_like(p)
    buckets, size = [], 0
    for p in live:  # consecutive parameters of one dtype, up to bucket_elements together
        if not buckets or size + p.numel() > bucket_elements or p.grad.dtype != buckets[-1][0].grad.dtype:
            buckets.append([])
            size = 0
        buckets[-1].append(p)
        size += p.numel()
    for bucket in buckets:
        flat = torch.cat([p.grad.reshape(-1) for p in bucket])
        dist.all_reduce(flat)
        for p, g in zip(bucket, flat.split([p.numel() for p in bucket])):
            p.grad.copy_(g.view_as(p.grad))


def setup_distributed(args) -> tuple[int, int]:
    """Join torchrun's process group when there is one (WORLD_SIZE > 1)."""
    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return 0, 1
    cuda = (args.device or models.default_device()).startswith("cuda")
    dist.init_process_group("nccl" if cuda else "gloo")
    rank, n = world()
    if cuda:
        local = int(os.environ.get("LOCAL_RANK", rank))
        torch.cuda.set_device(local)
        args.device = f"cuda:{local}"
    if args.questions_per_step % n:
        sys.exit(f"error: --questions-per-step {args.questions_per_step} must be a multiple of the {n} processes")
    return rank, n


def main(argv=None, task: tasks.Task | None = None) -> int:
    """Train with the flags `argv` (default: the command line). `task`: your own environment,
    rubric and data (tasks.Task), instead of the one --task names (tasks.build)."""
    args = parse_args(argv)
    ckpt = os.path.join(args.output_dir, "checkpoint")
    log_path = os.path.join(args.output_dir, "log.jsonl")
    try:  # the data first: a wrong --task, --corpus or split fails in a second, before any model is loaded
        task = task or tasks.build(vars(args))  # the environment and the rubric; checks --task and --corpus
        train_rows = task.rows("train")
        held_out = task.rows(args.eval_split) if args.eval_every else None
        probe_rows = task.rows("validation") if args.probe_questions else None
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    args.max_tool_calls = getattr(task.env, "max_tool_calls", args.max_tool_calls)  # the episode's own limit
    if len(train_rows) == 0:
        sys.exit(f"error: task {args.task!r} has no training questions")
    rank, n_proc = setup_distributed(args)
    state = checkpoint.prepare_output_dir(args) if rank == 0 else None  # rank 0 alone touches the folder
    if n_proc > 1:
        dist.barrier()
        if rank > 0 and os.path.exists(os.path.join(ckpt, "trainer_state.pt")):
            state = checkpoint.load_trainer_state(ckpt)
    rngs = (state.get("rng") or [state]) if state else None  # one-process checkpoints of old kept it at the top
    if state and len(rngs) != n_proc:  # checked before any weights are read: --fsdp's optimizer shards are per process
        sys.exit(f"error: the checkpoint was saved by {len(rngs)} processes; resume it with as many" if rank == 0 else 1)
    fsdp = args.fsdp and n_proc > 1  # --fsdp (sharding.py); one process keeps the whole model
    if args.fsdp and not fsdp:
        print("note: --fsdp shards over torchrun's processes; one process trains the whole model as without it")
    if fsdp and state and not os.path.isdir(os.path.join(ckpt, sharding.OPTIMIZER_DIR)):
        sys.exit(f"error: {ckpt} was saved without --fsdp; resume it without --fsdp" if rank == 0 else 1)
    board = checkpoint.open_board(args) if rank == 0 else None
    torch.manual_seed(args.seed)
    random.seed(args.seed)
    device = args.device or models.default_device()
    prec = precision.resolve(args.precision, device)
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is available (leave --device out to use the CPU)")
    try:
        # float32; --fsdp: onto the CPU, sharding.wrap moves each process's shards to the device
        model, tokenizer = models.load_model(ckpt if state else args.model, "cpu" if fsdp else device)
    except RuntimeError as e:
        sys.exit(f"error: {e}")
    ref_model = None
    if args.beta > 0:  # the initial policy, frozen, in the compute dtype
        ref_model = copy.deepcopy(model) if not state else models.load_model(args.model, device)[0]
        precision.cast_params(ref_model, precision.DTYPES[prec]).eval().requires_grad_(False)  # as the policy
        ref_model.to(device)  # --fsdp: loaded on the CPU, and not sharded: a whole copy per process
    if args.freeze_embeddings:  # tied to the LM head in the embedded model: freezes both
        model.get_input_embeddings().weight.requires_grad_(False)
    if fsdp:  # the float32 shards are the master weights; the engine gathers bf16 copies to compute
        master = sharding.ShardedWeights(sharding.wrap(model, prec, device))
    else:
        master = precision.MasterWeights(model, prec)  # float32 master copy; the model becomes bf16 in bf16

    optimizer = make_optimizer(master.params, args.lr)
    if state and "lr_decay_steps" not in state["config"]:
        args.lr_decay_steps = 0  # saved before the flag existed, when the decay ended at the run's last step
    total = (args.lr_decay_steps or args.steps) * args.mu  # optimizer steps until the decay reaches its floor
    scheduler = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda s: lr_factor(s, max(args.warmup_steps, 0), total, args.lr_schedule, args.lr_floor))
    generator = torch.Generator(device=device).manual_seed(args.seed + rank)  # each process samples its own
    start = 0
    if state:
        if fsdp:
            sharding.load_optimizer(ckpt, model, optimizer)  # each process its shards
        else:
            optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        start = state["step"]
        saved_on = checkpoint.set_rng_state(generator, rngs[rank], reseed=(args.seed + rank) * 1_000_003 + start)
        if saved_on and rank == 0:
            print(f"note: the checkpoint sampled on {saved_on}, this run samples on {generator.device.type}, and a "
                  f"generator's state does not carry over between the two: sampling is reseeded from --seed and "
                  f"the step {start}, so the rollouts from here on differ from a run continued on {saved_on}")
    if rank == 0:
        if state:
            checkpoint.truncate_log(log_path, start)  # drop lines of steps after the checkpoint
            before = checkpoint.saved_config(args.output_dir).get("resolved_precision", prec)
            if before != prec:  # e.g. resumed on a CPU without bf16 units: emulated bf16 would be ~20x slower
                print(f"note: the steps up to {start} trained in {before}; --precision {args.precision} resolves "
                      f"to {prec} here, so the run goes on in {prec} (each log line says which: 'precision'; "
                      f"pass --precision {before} to keep it)")
        with open(os.path.join(args.output_dir, "config.json"), "w") as f:  # on resume: the new --steps etc.
            json.dump({**vars(args), "resolved_precision": prec, "processes": n_proc}, f, indent=2)

    # config.json holds these configs' fields under the same names (the flags')
    rollout, update_cfg = sampler.RolloutConfig.from_dict(vars(args)), UpdateConfig.from_dict(vars(args))
    env, rubric = task.env, task.rubric
    eval_rows = data.spread_rows(held_out, args.eval_questions) if args.eval_every else None

    def run_eval(step: int) -> dict:
        """Greedy rollouts on the held-out questions; the metrics (eval_*) go to the log,
        the summary and every rollout to OUTPUT_DIR/evals/stepNNNN.*"""
        t = time.time()
        model.eval()
        m, eps = evaluate.evaluate(model, tokenizer, eval_rows, env, rubric, rollout)
        os.makedirs(os.path.join(args.output_dir, "evals"), exist_ok=True)
        evaluate.write_eval(os.path.join(args.output_dir, "evals", f"step{step:04d}"),
                            {"step": step, "split": args.eval_split, "task": args.task, "limit": len(eval_rows),
                             "fewshot": args.fewshot, "results": m}, evaluate.trajectory_records(f"step{step}", eps))
        return {"eval_split": args.eval_split, **{f"eval_{k}": v for k, v in m.items()}, "time_eval": time.time() - t}

    def write_log(rec: dict) -> None:
        with open(log_path, "a") as f:
            f.write(json.dumps(rec) + "\n")
        if board:  # the same scalars
            for k, v in rec.items():
                if isinstance(v, (int, float)) and k != "step":
                    board.add_scalar(k, v, rec["step"])
            board.flush()

    def whole_model(needed=True):
        """--fsdp: every process gathers the whole model (sharding.gathered) for sampling, and for
        rank 0's evaluation and probe, which the others wait out inside; without it, nothing."""
        return sharding.gathered(model) if fsdp and needed else contextlib.nullcontext()

    if rank > 0:
        eval_rows = None  # rank 0 evaluates (greedy, deterministic); the others wait at the next all-reduce
    the_probe = probe_before = None
    if probe_rows and rank == 0:  # every process holds the same policy: one probes it
        the_probe = probe.build_probe(tokenizer, data.spread_rows(probe_rows, args.probe_questions), env)
    with whole_model(probe_rows or (args.eval_every and start == 0)):
        if the_probe:
            probe_before = probe.probe_logprobs(model, the_probe)  # the policy the first update starts from
        if (eval_rows or the_probe) and start == 0:
            # step 0: the model before any update, the baseline every later evaluation is read against
            write_log({"step": 0, **(run_eval(0) if eval_rows else {}),
                       **(probe.measure(the_probe, probe_before, None) if the_probe else {})})

    from tqdm import tqdm

    bar = tqdm(range(start, args.steps), initial=start, total=args.steps, desc=args.method, dynamic_ncols=True,
               disable=rank > 0)
    for step in bar:
        t0 = time.time()
        cuda_peak_gib(device)  # the step's own peaks from here
        rows = [train_rows[i] for i in questions_for_step(len(train_rows), step, args.questions_per_step, args.seed)]
        rows = rows[rank::n_proc]  # this process's share; a question's G rollouts stay together
        model.eval()
        with whole_model():
            episodes = sampler.sample_episodes(model, tokenizer, rows, env, args.group_size, rollout, generator)
        t1 = time.time()
        memory = {"memory_sample_gib": cuda_peak_gib(device)}
        for ep in episodes:
            rubric.score(ep)  # R^T per tool turn, R^O, and their components
        advantages = sampler.episode_advantages(episodes, args.group_size, args.method, turn_coef=args.turn_coef, gamma=args.gamma,
                                               scale=args.scale, merged_fallback=args.merged_fallback)
        t2 = time.time()
        upd = update(model, master, optimizer, scheduler, episodes, advantages, update_cfg, tokenizer.pad_token_id, ref_model)
        t3 = time.time()
        memory["memory_update_gib"] = cuda_peak_gib(device)
        if n_proc > 1:  # the log describes the whole step: every process's episodes
            pairs = [pair for part in gather(list(zip(episodes, advantages))) for pair in part]
            episodes, advantages = [e for e, _ in pairs], [a for _, a in pairs]
        rec = {"step": step + 1, **episode_stats(episodes), **mean_adv_per_turn(advantages, episodes), **upd,
               "time_sample": t1 - t0, "time_score": t2 - t1, "time_update": t3 - t2, "precision": prec,
               **({k: v for k, v in memory.items() if v is not None})}
        eval_now = args.eval_every and ((step + 1) % args.eval_every == 0 or step + 1 == args.steps)
        with whole_model(probe_rows or eval_now):
            if the_probe:  # how far this update moved the policy, on fixed contexts (probe.py)
                model.eval()
                after = probe.probe_logprobs(model, the_probe)
                rec.update(probe.measure(the_probe, after, probe_before), time_probe=time.time() - t3)
                probe_before = after
            if eval_rows and eval_now:
                rec.update(run_eval(step + 1))  # the final model is always evaluated
        if rank == 0:
            write_log(rec)
        bar.set_postfix(reward=f"{rec['R_T'] + rec['R_O']:.3f}", tool=f"{rec['tool_call_rate']:.2f}",
                        **({"em": f"{rec['em']:.2f}"} if "em" in rec else {}))
        if (step + 1) % args.save_every == 0 or step + 1 == args.steps:
            rngs = gather(checkpoint.rng_state(generator))
            if fsdp:  # every process: the full state dict to rank 0, the optimizer's shards
                sharding.save_checkpoint(args.output_dir, model, tokenizer, optimizer, scheduler, rngs, step + 1, args)
            elif rank == 0:
                checkpoint.save_checkpoint(args.output_dir, master, tokenizer, optimizer, scheduler, rngs, step + 1, args)
    if n_proc > 1:
        dist.barrier()  # the last checkpoint is written before any process exits
        dist.destroy_process_group()
    if rank == 0:
        print(f"done: {args.steps} steps; log {log_path}, checkpoint {ckpt}")
        if eval_rows:
            print(before_after(log_path, args))
    return 0


def before_after(log_path: str, args) -> str:
    """The held-out evaluation before training and at the last step, side by side."""
    with open(log_path) as f:
        evals = [r for r in map(json.loads, f) if "eval_episodes" in r]
    first, last = evals[0], evals[-1]
    rows = {f"step {r['step']}": {"episodes": r["eval_episodes"], **{k: r[f"eval_{k}"] for k in evaluate.METRICS if f"eval_{k}" in r}}
            for r in (first, last)}
    head = f"held-out evaluation ({args.eval_split}, {first['eval_episodes']} questions, greedy): before and after training"
    return head + "\n" + evaluate.print_table(rows, echo=False)


if __name__ == "__main__":
    sys.exit(main())
