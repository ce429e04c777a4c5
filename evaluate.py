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

import data
import models
import mtgrpo
import precision
import sampler
import tasks
import tool_env

METRICS = ("tool_call_rate", "tool_success", "search_has_answer", "exact_match", "contains_answer", "format")


def evaluate(model, tokenizer, rows, env, rubric, rollout: sampler.RolloutConfig, samples=1, batch_questions=8, seed=0):
    """(metrics, episodes) over `rows` in environment `env`, scored by `rubric`: means over
    all rollouts; greedy when samples is 1, else `samples` rollouts per question sampled
    as `rollout` says. tool_call_rate is of episodes, tool_success over the episodes that
    called the tool; the rest are the rubric's component scores (each in [0, 1]; a turn
    reward's is its mean over the episode's tool turns)."""
    if samples == 1:
        rollout = rollout.greedy()
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    episodes = []
    for i in range(0, len(rows), batch_questions):
        episodes += sampler.sample_episodes(model, tokenizer, rows[i : i + batch_questions], env, samples, rollout, gen)
    for e in episodes:
        rubric.score(e)
    n = len(episodes)
    call_rate, success = sampler.tool_use_rates(episodes)
    metrics = {"episodes": n, "tool_call_rate": call_rate, "tool_success": success,
               **{k: sum(e.components[k] for e in episodes) / n for k in episodes[0].components}}
    if getattr(env, "max_tool_calls", 1) > 1:  # a K-call task: each call's rate and success too
        metrics.update(sampler.per_call_success(episodes, env.max_tool_calls))
    return metrics, episodes


def trajectory_records(name: str, episodes: list[sampler.Episode]) -> list[dict]:
    """One JSON-able dict per rollout: the conversation, how it ended, its rewards."""
    return [{"model": name, "question_id": e.question_id, "aliases": e.row.get("answer", {}).get("aliases"), "messages": e.messages,
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


def run_config(name: str, args=None) -> dict:
    """The settings a model is sampled and scored with: a train.py run's own (its
    config.json: task, corpus, --search-chars, demonstration, tool-call limit, rollout
    settings, held-out split and questions), else {"model": name}; the flags given on the
    command line (not None in `args`) override either. tasks.build, sampler.RolloutConfig
    and held_out read it."""
    path = os.path.join(name, "config.json")
    config = {"model": name}
    if os.path.isfile(path):
        with open(path) as f:
            saved = json.load(f)
        if "method" in saved:  # train.py's flags; a model folder's config.json is the model's (its "temperature" is no run's)
            config = {"demo": tool_env.DEMO_BEFORE_THE_FLAG, **saved}  # a run saved before --demo existed
    given = {k: v for k, v in vars(args or argparse.Namespace()).items() if v is not None and k != "model"}
    return {**config, **given}


def held_out(config: dict) -> tuple[str, list[dict]]:
    """(split, rows) to evaluate on: --split and --limit, else the run's --eval-split and
    --eval-questions, spread over the split as train.py spreads them (data.spread_rows)."""
    split = config.get("split") or config.get("eval_split") or "validation"
    limit = config["limit"] if config.get("limit") is not None else config.get("eval_questions", 64)
    return split, data.spread_rows(data.load_task(config.get("task") or "factbook", split), limit)


def print_table(results: dict[str, dict], echo: bool = True) -> str:
    """One row per model: the METRICS it has, or (another rubric's) all its numbers."""
    first = next(iter(results.values()))
    cols = ("episodes",) + (tuple(c for c in METRICS if c in first)
                            or tuple(k for k, v in first.items() if isinstance(v, float)))
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
    head = (f"<p>question: {html.escape(episode.question)} | gold: {html.escape(', '.join(episode.row.get('answer', {}).get('aliases', [])))} | "
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


def show(args) -> int:
    config = run_config(args.model[0], args)
    task = build_task(config)
    split = args.split or "validation"
    try:
        rows = data.load_task(config.get("task") or "factbook", split)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")
    if not 0 <= args.index < len(rows):
        sys.exit(f"error: --index {args.index}: the {split} split has questions 0 to {len(rows) - 1}")
    model, tok = load(args, args.model[0])
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(args.seed)
    eps = sampler.sample_episodes(model, tok, [rows[args.index]], task.env, args.group_size,
                                  sampler.RolloutConfig.from_dict(config), gen)
    for e in eps:
        task.rubric.score(e)
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


def build_task(config: dict) -> tasks.Task:
    try:
        return tasks.build(config)
    except (ValueError, RuntimeError, FileNotFoundError) as e:
        sys.exit(f"error: {e}")


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


def main(argv=None, rubric=None, env=None) -> int:
    """Evaluate with the flags `argv` (default: the command line); `rubric`: your own
    (rewards.Rubric) instead of the task's, for a run trained with one; `env`: a function
    of the task's environment that returns the one to evaluate in (tool_env.Environment),
    to change the episode rules without editing tool_env.py."""
    p = argparse.ArgumentParser(description="Evaluate agents on held-out questions, or show one rollout's credit assignment.",
                                formatter_class=DefaultsHelp)
    p.add_argument("--model", nargs="+", default=["smollm2-135m"], help="models or train.py run directories")
    # by default a run's own settings (its config.json), else the defaults below
    p.add_argument("--task", default=None, help="default: the run's, else factbook")
    p.add_argument("--corpus", default=None)
    p.add_argument("--split", default=None, choices=data.SPLITS, help="default: the run's --eval-split, else validation")
    p.add_argument("--limit", type=int, default=None,
                   help="N questions spread evenly over the split, as train.py spreads them (0: all; "
                        "default: the run's --eval-questions, else 64)")
    p.add_argument("--samples", type=int, default=1,
                   help="rollouts per question: 1 is greedy, more are sampled at the run's temperature and top-k")
    p.add_argument("--fewshot", action=argparse.BooleanOptionalAction, default=None,
                   help="the one-shot demonstration (default: as the run was trained; on for the embedded model)")
    p.add_argument("--demo", default=None, choices=tuple(tool_env.DEMOS), help=f"default: the run's, else {tool_env.DEFAULT_DEMO}")
    p.add_argument("--search-chars", type=int, default=None, help="default: the run's, else 600")
    p.add_argument("--max-tool-calls", type=int, default=None, help="default: the run's, else the task's")
    p.add_argument("--force-answer", action=argparse.BooleanOptionalAction, default=None,
                   help="an <answer> forced after the last allowed tool result (default: as the run was trained; off)")
    p.add_argument("--max-turn-tokens", type=int, default=None, help="default: the run's, else 64")
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
    if (args.limit or 0) < 0 or args.samples < 1 or args.group_size < 2:
        p.error("--limit must be 0 (all) or more, --samples at least 1, --group-size at least 2")
    check_writable(args.out + (".html" if args.show else ".json"))  # before the work, not after
    if args.show:
        return show(args)
    results, trajectories, splits = {}, [], {}
    for name in args.model:
        config = run_config(name, args)  # each model as it was trained
        task = build_task(config)
        rubric_used = rubric or task.rubric
        try:
            split, rows = held_out(config)
        except (ValueError, RuntimeError, FileNotFoundError) as e:
            sys.exit(f"error: {e}")
        model, tok = load(args, name)
        rollout = sampler.RolloutConfig.from_dict(config)
        env_used = env(task.env) if env else task.env
        metrics, eps = evaluate(model, tok, rows, env_used, rubric_used, rollout, args.samples, seed=args.seed)
        results[name] = {**metrics, "split": split, "rollout": dataclasses.asdict(rollout)}
        trajectories += trajectory_records(name, eps)
        splits[name] = split
        del model
    print_table(results)
    write_eval(args.out, {"split": next(iter(splits.values())), "limit": args.limit, "samples": args.samples,
                          "results": results}, trajectories)
    print(f"wrote {args.out}.json and {args.out}.trajectories.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
