"""Evaluate agents on held-out questions, and show turn-level credit on one rollout.

    python evaluate.py                                    # the base model, validation split, greedy
    python evaluate.py --model smollm2-135m runs/a runs/b --split test --limit 100
    python evaluate.py --samples 4                        # 4 sampled rollouts per question
    python evaluate.py --show --model runs/a --method mt-grpo

Rollouts are sampled as the run was trained (its config.json holds its RolloutConfig);
--samples 1 (the default) is greedy. Tables and plots over training logs: report.py.

A model is 'smollm2-135m', a Hugging Face id or folder, or a run directory of
train.py (its checkpoint/ is loaded). Metrics per model: tool-call rate, tool-execution
success, search-has-answer, exact match, contains-answer, format; printed as a
table, written to OUT.json, every trajectory to OUT.trajectories.jsonl.

--show samples one group of G rollouts for one question, computes the advantages of
--method and prints one rollout with each sampled token coloured by its advantage
(green positive, red negative, brighter = larger), prompt and tool-result tokens
grey, each turn labelled; it also writes the same as a standalone HTML file.
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import html
import json
import os
import sys

import torch

import corpus
import data
import models
import mtgrpo
import precision
import sampler
import tool_env

METRICS = ("tool_call_rate", "tool_success", "search_has_answer", "exact_match", "contains_answer", "format")


def evaluate(model, tokenizer, rows, tools, rollout: sampler.RolloutConfig, samples=1, batch_questions=8, seed=0):
    """(metrics, episodes) over `rows`: means over all rollouts; greedy when samples
    is 1, else `samples` rollouts per question sampled as `rollout` says. Rates are of
    episodes; tool_success is over episodes that called the tool; the rest are the
    reward components divided by their maximum (so all lie in [0, 1])."""
    if samples == 1:
        rollout = rollout.greedy()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    episodes = []
    for i in range(0, len(rows), batch_questions):
        episodes += sampler.sample_episodes(model, tokenizer, rows[i : i + batch_questions], tools, samples, rollout, gen)
    sampler.score_episodes(episodes)
    n = len(episodes)
    call_rate, success = sampler.tool_use_rates(episodes)
    metrics = {
        "episodes": n,
        "tool_call_rate": call_rate,
        "tool_success": success,
        "search_has_answer": sum(e.components["search_has_answer"] > 0 for e in episodes) / n,
        "exact_match": sum(e.components["exact_match"] > 0 for e in episodes) / n,
        "contains_answer": sum(e.components["contains_answer"] > 0 for e in episodes) / n,
        "format": sum(e.components["format"] for e in episodes) / n,
    }
    return metrics, episodes


def trajectory_records(name: str, episodes: list[sampler.Episode]) -> list[dict]:
    """One JSON-able dict per rollout: the conversation, how it ended, its rewards."""
    return [{"model": name, "question_id": e.question_id, "aliases": e.aliases, "messages": e.messages,
             "end": e.end_reason, "R_T": e.turn_reward, "R_O": e.outcome_reward, **e.components} for e in episodes]


def write_eval(prefix: str, summary: dict, trajectories: list[dict]) -> None:
    """PREFIX.json (the summary) and PREFIX.trajectories.jsonl (one rollout a line)."""
    with open(prefix + ".json", "w") as f:
        json.dump(summary, f, indent=2)
    with open(prefix + ".trajectories.jsonl", "w") as f:
        for t in trajectories:
            f.write(json.dumps(t, ensure_ascii=False) + "\n")


def check_writable(path: str) -> None:
    """Exit with one line now if `path` cannot be written, rather than after the work."""
    folder = os.path.dirname(path) or "."
    if not os.path.isdir(folder):
        sys.exit(f"error: cannot write {path}: folder {folder} does not exist")
    if not os.access(folder, os.W_OK) or (os.path.exists(path) and not os.access(path, os.W_OK)):
        sys.exit(f"error: cannot write {path}: permission denied")


def resolve_model(name: str) -> str:
    """A run directory stands for its checkpoint."""
    ck = os.path.join(name, "checkpoint")
    return ck if os.path.isdir(ck) else name


def rollout_config(name: str, args=None) -> sampler.RolloutConfig:
    """How a model is sampled: a train.py run's own RolloutConfig (from its config.json),
    else the defaults with the demonstration for the embedded model only; the flags
    given on the command line (not None in `args`) override either."""
    cfg = os.path.join(name, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            rollout = sampler.RolloutConfig.from_dict(json.load(f))
    else:
        rollout = sampler.RolloutConfig(fewshot=name in models.EMBEDDED)
    given = {k: v for k, v in vars(args or argparse.Namespace()).items() if v is not None}
    return dataclasses.replace(rollout, **{f.name: given[f.name] for f in dataclasses.fields(rollout) if f.name in given})


def print_table(results: dict[str, dict], echo: bool = True) -> str:
    cols = ("episodes",) + METRICS
    name_w = max(12, *(len(k) for k in results))
    lines = ["model".ljust(name_w) + "".join(f"{c:>18}" for c in cols)]
    for name, m in results.items():
        lines.append(name.ljust(name_w) + "".join(f"{m[c]:>18.3f}" if c != "episodes" else f"{m[c]:>18d}" for c in cols))
    text = "\n".join(lines)
    if echo:
        print(text)
    return text


# ----------------------------------------------------------------------------------
# --show


def _rgb(a: float, scale: float) -> tuple[int, int, int]:
    x = max(-1.0, min(1.0, a / scale)) if scale > 0 else 0.0
    if x >= 0:
        return (int(255 * (1 - x)), 255, int(255 * (1 - x)))
    return (255, int(255 * (1 + x)), int(255 * (1 + x)))


def question_start(tokenizer, episode: sampler.Episode) -> int:
    """Index of the first token of the question's message: what precedes it (system
    prompt, demonstration) is the same in every rollout and rarely worth reading."""
    q = next(i for i, m in enumerate(episode.messages)
             if m["role"] == "user" and m["content"] == f"{tool_env.QUESTION_PREFIX} {episode.question}")
    text = tokenizer.apply_chat_template(episode.messages[:q], tokenize=False)
    return len(tokenizer.encode(text, add_special_tokens=False))


def render(tokenizer, episode: sampler.Episode, adv: torch.Tensor, scale: float | None = None,
           start: int = 0, colour: bool = True) -> tuple[str, str]:
    """(terminal text, HTML page) of one rollout, tokens coloured by advantage; full
    colour at |A| = scale (default: this rollout's largest |A|). The terminal text
    starts at token `start` and has colour codes only if `colour` (not into a pipe)."""
    scale = scale or float(adv.abs().max()) or 1.0
    ansi, page = [], []
    prev_turn = 0
    for j, tok in enumerate(episode.token_ids):
        piece = tokenizer.decode([tok])
        turn = episode.token_turns[j]
        shown = j >= start
        if turn and turn != prev_turn:
            label = f"[turn {turn}]"
            ansi.append(f"\x1b[1;36m{label}\x1b[0m" if colour else label)
            page.append(f'<span class="label">{label}</span>')
        prev_turn = turn or prev_turn
        if episode.loss_mask[j]:
            r, g, b = _rgb(float(adv[j]), scale)
            ansi.append(f"\x1b[38;2;0;0;0;48;2;{r};{g};{b}m{piece}\x1b[0m" if colour else piece)
            page.append(f'<span style="background:rgb({r},{g},{b})" title="A={float(adv[j]):+.3f}">{html.escape(piece)}</span>')
        else:
            if shown:
                ansi.append(f"\x1b[90m{piece}\x1b[0m" if colour else piece)
            page.append(f'<span class="env">{html.escape(piece)}</span>')
    head = (f"<p>question: {html.escape(episode.question)} | gold: {html.escape(', '.join(episode.aliases))} | "
            f"R^T = {episode.turn_reward:.3f}, R^O = {episode.outcome_reward:.3f}, end: {episode.end_reason}</p>")
    doc = ("<!doctype html><meta charset='utf-8'><title>MT-GRPO rollout</title><style>"
           "body{font-family:monospace;white-space:pre-wrap;max-width:1000px}.env{color:#999}"
           ".label{color:#08c;font-weight:bold}</style>" + head + "".join(page))
    return "".join(ansi), doc


def load(args, name: str):
    """(model, tokenizer) in the compute dtype of --precision."""
    device = args.device or models.default_device()
    if device.startswith("cuda") and not torch.cuda.is_available():
        sys.exit("error: --device cuda but no CUDA GPU is available (leave --device out to use the CPU)")
    dtype = precision.DTYPES[precision.resolve(args.precision, device)]
    try:
        return models.load_model(resolve_model(name), device, dtype)
    except RuntimeError as e:
        sys.exit(f"error: {e}")


def show(args, tools: dict, row: dict) -> int:
    model, tok = load(args, args.model[0])
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    eps = sampler.sample_episodes(model, tok, [row], tools, args.group_size, rollout_config(args.model[0], args), gen)
    sampler.score_episodes(eps)
    advs = sampler.episode_advantages(eps, len(eps), args.method)
    # show the most informative rollout: the one with the most turns, then the largest |A|
    best = max(range(len(eps)), key=lambda r: (eps[r].num_turns, float(advs[r].abs().max())))
    for r, e in enumerate(eps):
        print(f"rollout {r}: R^T={e.turn_reward:.3f} R^O={e.outcome_reward:.3f} turns={e.num_turns} end={e.end_reason}")
    # one colour scale for the whole group, so rollouts can be compared
    start = 0 if args.full_prompt else question_start(tok, eps[best])
    text, doc = render(tok, eps[best], advs[best], max(float(a.abs().max()) for a in advs), start, sys.stdout.isatty())
    print(f"\nrollout {best} ({args.method}):\n{text}\n")
    out = args.out + ".html"
    with open(out, "w") as f:
        f.write(doc)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------


class DefaultsHelp(argparse.HelpFormatter):
    """-h shows every flag's default (argparse's own formatter skips flags without help), none for None."""

    def _format_action(self, action):
        if not action.help and self._shown(action):  # argparse prints no help line for help=None
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)

    def _get_help_string(self, action):
        shown = self._shown(action) and "%(default)" not in action.help
        return action.help + (" (default: %(default)s)" if shown else "")

    @staticmethod
    def _shown(action) -> bool:
        return bool(action.option_strings) and action.default not in (None, False, argparse.SUPPRESS)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Evaluate agents on held-out questions, or show one rollout's credit assignment.",
                                formatter_class=DefaultsHelp)
    p.add_argument("--model", nargs="+", default=["smollm2-135m"], help="models or train.py run directories")
    p.add_argument("--task", default="factbook")
    p.add_argument("--corpus", default=None)
    p.add_argument("--split", default="validation", choices=data.SPLITS)
    p.add_argument("--limit", type=int, default=64, help="first N questions of the split (0: all)")
    p.add_argument("--samples", type=int, default=1,
                   help="rollouts per question: 1 is greedy, more are sampled at the run's temperature and top-k")
    # the rollout settings: by default a run's own (its config.json), else sampler.RolloutConfig's
    p.add_argument("--fewshot", action=argparse.BooleanOptionalAction, default=None,
                   help="the one-shot demonstration (default: as the run was trained; on for the embedded model)")
    p.add_argument("--max-turn-tokens", type=int, default=None, help="default: the run's, else 128")
    p.add_argument("--temperature", type=float, default=None, help="with --samples > 1 or --show; default: the run's, else 0.9")
    p.add_argument("--top-k", type=int, default=None, help="with --samples > 1 or --show; default: the run's, else 50")
    p.add_argument("--out", default="eval", help="output path prefix")
    p.add_argument("--show", action="store_true", help="colour one rollout's tokens by advantage")
    p.add_argument("--method", default="mt-grpo", choices=mtgrpo.METHODS)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--index", type=int, default=0, help="question index for --show")
    p.add_argument("--full-prompt", action="store_true", help="--show prints the system prompt and demo too")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=precision.PRECISIONS,
                   help="weights' dtype for sampling; auto: bf16 where the hardware is fast at it")
    args = p.parse_args(argv)
    if args.limit < 0 or args.samples < 1 or args.group_size < 2:
        p.error("--limit must be 0 (all) or more, --samples at least 1, --group-size at least 2")
    check_writable(args.out + (".html" if args.show else ".json"))  # before the work, not after
    try:
        args.corpus = corpus.default_corpus(args.task, args.corpus)
        tools = tool_env.make_tools(corpus.load_corpus(args.corpus))
        rows = data.load_task(args.task, args.split)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.show:
        if not 0 <= args.index < len(rows):
            sys.exit(f"error: --index {args.index}: the {args.split} split has questions 0 to {len(rows) - 1}")
        return show(args, tools, rows[args.index])
    rows = [rows[i] for i in range(len(rows) if args.limit == 0 else min(args.limit, len(rows)))]
    results, trajectories = {}, []
    for name in args.model:
        model, tok = load(args, name)
        rollout = rollout_config(name, args)
        metrics, eps = evaluate(model, tok, rows, tools, rollout, args.samples, seed=args.seed)
        results[name] = {**metrics, "rollout": dataclasses.asdict(rollout)}
        trajectories += trajectory_records(name, eps)
        del model
    print_table(results)
    write_eval(args.out, {"split": args.split, "task": args.task, "limit": args.limit, "samples": args.samples,
                          "results": results}, trajectories)
    print(f"wrote {args.out}.json and {args.out}.trajectories.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
