"""Evaluate agents, plot training runs, and show turn-level credit on one rollout.

    python evaluate.py                                    # the base model, validation split, greedy
    python evaluate.py --model smollm2-135m runs/a runs/b --split test --limit 100
    python evaluate.py --samples 4                        # 4 sampled rollouts per question (T = 0.9)
    python evaluate.py --plot runs/a runs/b --out curves.png
    python evaluate.py --show --model runs/a --method mt-grpo

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
import html
import json
import os
import re
import sys

import torch

import mtgrpo
import precision
import tool_env

METRICS = ("tool_call_rate", "tool_success", "search_has_answer", "exact_match", "contains_answer", "format")


def evaluate(model, tokenizer, rows, tools, samples=1, temperature=0.0, fewshot=False,
             max_turn_tokens=128, max_tool_calls=1, batch_questions=8, seed=0):
    """(metrics, episodes) over `rows`: means over all rollouts. Rates are of
    episodes; tool_success is over episodes that called the tool; the rest are the
    reward components divided by their maximum (so all lie in [0, 1])."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    episodes = []
    for i in range(0, len(rows), batch_questions):
        episodes += mtgrpo.sample_episodes(
            model, tokenizer, rows[i : i + batch_questions], tools, samples, max_turn_tokens,
            temperature if samples > 1 else 0.0, 0, max_tool_calls, fewshot, gen,
        )
    mtgrpo.score_episodes(episodes)
    n = len(episodes)
    call_rate, success = mtgrpo.tool_use_rates(episodes)
    metrics = {
        "episodes": n,
        "tool_call_rate": call_rate,
        "tool_success": success,
        "search_has_answer": sum(e.components["search_has_answer"] > 0 for e in episodes) / n,
        "exact_match": sum(e.components["exact_match"] > 0 for e in episodes) / n,
        "contains_answer": sum(e.components["contains_answer"] > 0 for e in episodes) / n,
        "format": sum(e.components["format"] for e in episodes) / n / 0.2,
    }
    return metrics, episodes


def trajectory_records(name: str, episodes: list[mtgrpo.Episode]) -> list[dict]:
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


def resolve_model(name: str) -> str:
    """A run directory stands for its checkpoint."""
    ck = os.path.join(name, "checkpoint")
    return ck if os.path.isdir(ck) else name


def default_fewshot(name: str) -> bool:
    """The prompt a model is evaluated with unless --fewshot says: a train.py run's own,
    the demonstration for the embedded model, the paper's prompt otherwise."""
    cfg = os.path.join(name, "config.json")
    if os.path.isfile(cfg):
        with open(cfg) as f:
            return bool(json.load(f).get("fewshot", False))
    return name in mtgrpo.EMBEDDED


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
# --plot


# (key, title): a panel per metric. The first four prefer the held-out evaluations that
# train.py --eval-every logs (eval_*); runs without them fall back to the training rollouts.
PLOT_KEYS = (("tool_call_rate", "tool-call rate"), ("tool_success", "tool-execution success"),
             ("search_has_answer", "search has answer"), ("exact_match", "exact match"),
             ("R_T", "R^T (training rollouts)"), ("R_O", "R^O (training rollouts)"))
TRAIN_KEY = {"exact_match": "em"}  # the training log's name for a metric, where it differs
TRAIN_SCALE = {"search_has_answer": ", x0.5"}  # training logs hold the weighted reward component


def read_log(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no log.jsonl (is it a train.py --output-dir?)")
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def run_label(run_dir: str) -> str:
    """Runs that differ only in their seed share a label: runs/mt-grpo-s0 -> mt-grpo."""
    return re.sub(r"[-_]s(eed)?\d+$", "", os.path.basename(os.path.normpath(run_dir)))


def group_runs(run_dirs: list[str]) -> dict[str, list[list[dict]]]:
    """{label: [log of each seed]}, in the order the runs were given."""
    groups: dict[str, list[list[dict]]] = {}
    for run in run_dirs:
        groups.setdefault(run_label(run), []).append(read_log(run))
    return groups


def across_seeds(logs: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) of `key` over the seeds, at the steps every seed logged it."""
    per_seed = [{r["step"]: r[key] for r in log if r.get(key) is not None} for log in logs]
    steps = sorted(set.intersection(*(set(p) for p in per_seed))) if per_seed else []
    vals = [[p[s] for p in per_seed] for s in steps]
    return steps, [sum(v) / len(v) for v in vals], [min(v) for v in vals], [max(v) for v in vals]


def smoothed(log: list[dict], key: str, window: int) -> list[dict]:
    """The log with `key` replaced by its trailing moving average over `window` steps
    (one step's few rollouts are noisy); steps without the key are left out."""
    rows = [r for r in log if r.get(key) is not None]
    out = []
    for i, r in enumerate(rows):
        w = [x[key] for x in rows[max(0, i - window + 1) : i + 1]]
        out.append({"step": r["step"], key: sum(w) / len(w)})
    return out


def plot_runs(run_dirs: list[str], out: str, smooth: int = 5) -> str:
    """A panel per metric, a line per label (runs that differ only in seed are one
    label): the mean over seeds, with the min-max range over seeds shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = group_runs(run_dirs)
    split = next((r["eval_split"] for logs in groups.values() for log in logs for r in log if "eval_split" in r), None)
    fig, axes = plt.subplots(2, 3, figsize=(14, 7))
    for ax, (key, title) in zip(axes.flat, PLOT_KEYS):
        held_out = any(f"eval_{key}" in r for logs in groups.values() for log in logs for r in log)
        for label, logs in groups.items():
            if held_out:
                steps, mean, lo, hi = across_seeds(logs, f"eval_{key}")
            else:
                k = TRAIN_KEY.get(key, key)
                steps, mean, lo, hi = across_seeds([smoothed(log, k, smooth) for log in logs], k)
            line, = ax.plot(steps, mean, marker="o" if held_out else None, label=f"{label} (n={len(logs)})")
            if len(logs) > 1:
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        if held_out:
            title += f" ({split})" if split else ""
        elif not key.startswith("R_"):  # the R panels say "training rollouts" already
            title += f" (training rollouts{TRAIN_SCALE.get(key, '')})"
        ax.set_title(title)
        ax.set_xlabel("step")
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


TABLE_COLS = (("tool_call_rate", "tool-call rate"), ("tool_success", "tool success"),
              ("search_has_answer", "search has answer"), ("exact_match", "EM"),
              ("contains_answer", "contains"), ("format", "format"))


def _cell(vals: list[float]) -> str:
    mean = sum(vals) / len(vals)
    return f"{mean:.3f}" if min(vals) == max(vals) else f"{mean:.3f} ({min(vals):.3f}-{max(vals):.3f})"


def results_table(run_dirs: list[str]) -> str:
    """Markdown table of the held-out evaluations that train.py logged: the model before
    training (every run's step-0 evaluation) and each label at its last evaluated step.
    Cells are the mean over the runs and, where they differ, their (min-max)."""
    groups = group_runs(run_dirs)
    head = ["model", "runs", "step"] + [t for _, t in TABLE_COLS] + ["wall time / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    start = [r for logs in groups.values() for log in logs for r in log if r["step"] == 0 and "eval_exact_match" in r]
    if start:
        cells = [_cell([r[f"eval_{k}"] for r in start]) for k, _ in TABLE_COLS]
        lines.append("| " + " | ".join(["base model", str(len(start)), "0"] + cells + ["-"]) + " |")
    for label, logs in groups.items():
        evals = [[r for r in log if "eval_exact_match" in r and r["step"] > 0] for log in logs]
        if not all(evals):
            raise ValueError(f"{label}: a run has no evaluation after step 0 (train.py --eval-every)")
        last = [e[-1] for e in evals]
        if len({r["step"] for r in last}) > 1:
            raise ValueError(f"{label}: seeds end at different steps {sorted(r['step'] for r in last)}")
        cells = [_cell([r[f"eval_{k}"] for r in last]) for k, _ in TABLE_COLS]
        minutes = [sum(r.get(t, 0.0) for r in log for t in ("time_sample", "time_score", "time_update", "time_eval")) / 60
                   for log in logs]
        lines.append("| " + " | ".join([label, str(len(logs)), str(last[0]["step"])] + cells
                                        + [f"{sum(minutes) / len(minutes):.1f} min"]) + " |")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------
# --show


def _rgb(a: float, scale: float) -> tuple[int, int, int]:
    x = max(-1.0, min(1.0, a / scale)) if scale > 0 else 0.0
    if x >= 0:
        return (int(255 * (1 - x)), 255, int(255 * (1 - x)))
    return (255, int(255 * (1 + x)), int(255 * (1 + x)))


def render(tokenizer, episode: mtgrpo.Episode, adv: torch.Tensor, scale: float | None = None) -> tuple[str, str]:
    """(ANSI text, HTML page) of one rollout, tokens coloured by advantage; full
    colour at |A| = scale (default: this rollout's largest |A|)."""
    scale = scale or float(adv.abs().max()) or 1.0
    ansi, page = [], []
    prev_turn = 0
    for j, tok in enumerate(episode.token_ids):
        piece = tokenizer.decode([tok])
        turn = episode.token_turns[j]
        if turn and turn != prev_turn:
            label = f"[turn {turn}]"
            ansi.append(f"\x1b[1;36m{label}\x1b[0m")
            page.append(f'<span class="label">{label}</span>')
        prev_turn = turn or prev_turn
        if episode.loss_mask[j]:
            r, g, b = _rgb(float(adv[j]), scale)
            ansi.append(f"\x1b[38;2;0;0;0;48;2;{r};{g};{b}m{piece}\x1b[0m")
            page.append(f'<span style="background:rgb({r},{g},{b})" title="A={float(adv[j]):+.3f}">{html.escape(piece)}</span>')
        else:
            ansi.append(f"\x1b[90m{piece}\x1b[0m")
            page.append(f'<span class="env">{html.escape(piece)}</span>')
    head = (f"<p>question: {html.escape(episode.question)} | gold: {html.escape(', '.join(episode.aliases))} | "
            f"R^T = {episode.turn_reward:.3f}, R^O = {episode.outcome_reward:.3f}, end: {episode.end_reason}</p>")
    doc = ("<!doctype html><meta charset='utf-8'><title>MT-GRPO rollout</title><style>"
           "body{font-family:monospace;white-space:pre-wrap;max-width:1000px}.env{color:#999}"
           ".label{color:#08c;font-weight:bold}</style>" + head + "".join(page))
    return "".join(ansi), doc


def load(args, name: str):
    """(model, tokenizer) in the compute dtype of --precision."""
    device = args.device or mtgrpo.default_device()
    dtype = precision.DTYPES[precision.resolve(args.precision, device)]
    return mtgrpo.load_model(resolve_model(name), device, dtype)


def show(args, tools: dict) -> int:
    model, tok = load(args, args.model[0])
    rows = tool_env.load_task(args.task, args.split)
    row = rows[args.index]
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    eps = mtgrpo.sample_episodes(model, tok, [row], tools, args.group_size, args.max_turn_tokens,
                                 0.9, 50, 1, args.fewshot, gen)
    mtgrpo.score_episodes(eps)
    advs = mtgrpo.episode_advantages(eps, len(eps), args.method)
    # show the most informative rollout: the one with the most turns, then the largest |A|
    best = max(range(len(eps)), key=lambda r: (eps[r].num_turns, float(advs[r].abs().max())))
    for r, e in enumerate(eps):
        print(f"rollout {r}: R^T={e.turn_reward:.3f} R^O={e.outcome_reward:.3f} turns={e.num_turns} end={e.end_reason}")
    # one colour scale for the whole group, so rollouts can be compared
    text, doc = render(tok, eps[best], advs[best], max(float(a.abs().max()) for a in advs))
    print(f"\nrollout {best} ({args.method}):\n{text}\n")
    out = args.out + ".html"
    with open(out, "w") as f:
        f.write(doc)
    print(f"wrote {out}")
    return 0


# ----------------------------------------------------------------------------------


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="Evaluate agents, plot runs, show credit assignment.")
    p.add_argument("--model", nargs="+", default=["smollm2-135m"], help="models or train.py run directories")
    p.add_argument("--task", default="factbook")
    p.add_argument("--corpus", default=None)
    p.add_argument("--split", default="validation", choices=tool_env.SPLITS)
    p.add_argument("--limit", type=int, default=64, help="first N questions of the split (0: all)")
    p.add_argument("--samples", type=int, default=1, help="rollouts per question; > 1 samples at T = 0.9")
    p.add_argument("--fewshot", action=argparse.BooleanOptionalAction, default=None,
                   help="the one-shot demonstration (default: as the runs were trained; on for the embedded model)")
    p.add_argument("--max-turn-tokens", type=int, default=128)
    p.add_argument("--out", default="eval", help="output path prefix")
    p.add_argument("--plot", nargs="+", metavar="RUN_DIR", help="plot these runs' log.jsonl to OUT.png")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR", help="markdown table of these runs' evaluations, to OUT.md")
    p.add_argument("--show", action="store_true", help="colour one rollout's tokens by advantage")
    p.add_argument("--method", default="mt-grpo", choices=mtgrpo.METHODS)
    p.add_argument("--group-size", type=int, default=8)
    p.add_argument("--index", type=int, default=0, help="question index for --show")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--device", default=None)
    p.add_argument("--precision", default="auto", choices=precision.PRECISIONS,
                   help="weights' dtype for sampling; auto: bf16 where the hardware is fast at it")
    args = p.parse_args(argv)
    if args.fewshot is None:
        args.fewshot = all(default_fewshot(m) for m in args.model)
    if args.plot or args.table:
        try:
            if args.plot:
                print("wrote", plot_runs(args.plot, args.out + ".png"))
            if args.table:
                text = results_table(args.table)
                with open(args.out + ".md", "w") as f:
                    f.write(text + "\n")
                print(text + f"\nwrote {args.out}.md")
        except (FileNotFoundError, ValueError) as e:
            sys.exit(f"error: {e}")
        return 0
    try:
        args.corpus = tool_env.default_corpus(args.task, args.corpus)
        tools = tool_env.make_tools(tool_env.load_corpus(args.corpus))
    except (ValueError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if args.show:
        return show(args, tools)
    rows = tool_env.load_task(args.task, args.split)
    rows = [rows[i] for i in range(len(rows) if args.limit <= 0 else min(args.limit, len(rows)))]
    results, trajectories = {}, []
    for name in args.model:
        model, tok = load(args, name)
        metrics, eps = evaluate(model, tok, rows, tools, args.samples, 0.9, args.fewshot, args.max_turn_tokens, seed=args.seed)
        results[name] = metrics
        trajectories += trajectory_records(name, eps)
        del model
    print_table(results)
    write_eval(args.out, {"split": args.split, "task": args.task, "limit": args.limit, "samples": args.samples,
                          "fewshot": args.fewshot, "results": results}, trajectories)
    print(f"wrote {args.out}.json and {args.out}.trajectories.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
