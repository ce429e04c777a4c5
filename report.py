"""Tables and plots over train.py runs (README "Results", `make results`).

    python report.py --table RUN_DIR... --plot RUN_DIR... --out results/compare

reads each run's log.jsonl: the table (OUT.md) has the held-out evaluations that
train.py --eval-every logged, before training and at each run's last evaluation; the
plot (OUT.png) has a panel per metric and a line per method, the mean over seeds with
the min-max range shaded. Runs that differ only in their seed (NAME-s0, NAME-s1, ...)
are one line.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys

# ----------------------------------------------------------------------------------
# Curves


# (key, title): a panel per metric. The first four prefer the held-out evaluations that
# train.py --eval-every logs (eval_*); runs without them fall back to the training rollouts.
PLOT_KEYS = (("tool_call_rate", "tool-call rate"), ("tool_success", "tool-execution success"),
             ("search_has_answer", "search has answer"), ("exact_match", "exact match"),
             ("R_T", "R^T (training rollouts)"), ("R_O", "R^O (training rollouts)"))
TRAIN_KEY = {"exact_match": "em"}  # the training log's name for a metric, where it differs
# the two-hop task's hops (rewards.TWO_HOP_RUBRIC), two panels more where the runs'
# evaluations logged them: the bridge of hop 1 is what a two-hop agent learns first
HOP_PLOT_KEYS = (("bridge_found", "search 1 found the bridge"), ("call2_success", "search 2 ran"))
# the policy-movement probe (probe.py), a row of panels more where the runs logged it; per
# step, not smoothed: a single update's swing is what they are for
PROBE_KEYS = (("probe_second_call", "probe: P(second tool call) at turn 2"),
              ("probe_kl_mean", "probe: KL(before || after) per update, mean"),
              ("probe_kl_max", "probe: KL(before || after) per update, max"))


def read_log(run_dir: str) -> list[dict]:
    path = os.path.join(run_dir, "log.jsonl")
    if not os.path.exists(path):
        raise FileNotFoundError(f"{run_dir}: no log.jsonl (is it a train.py --output-dir?)")
    with open(path) as f:
        return [json.loads(l) for l in f if l.strip()]


def run_label(run_dir: str) -> str:
    """Runs that differ only in their seed share a label: runs/mt-grpo-s0 -> mt-grpo."""
    return re.sub(r"[-_]s(eed)?\d+$", "", os.path.basename(os.path.normpath(run_dir)))


def _in_progress(run_dir: str) -> bool:
    """A run still training: its log stops before the --steps its config.json asks for."""
    path = os.path.join(run_dir, "config.json")
    if not os.path.exists(path):
        return False
    with open(path) as f:
        steps = json.load(f).get("steps")
    log = read_log(run_dir)
    return steps is not None and bool(log) and log[-1]["step"] < steps


def group_runs(run_dirs: list[str]) -> dict[str, list[list[dict]]]:
    """{label: [log of each seed]}, in the order the runs were given."""
    groups: dict[str, list[list[dict]]] = {}
    for run in run_dirs:
        groups.setdefault(run_label(run), []).append(read_log(run))
    return groups


def curve(log: list[dict], key: str) -> dict[int, float]:
    """{step: value} of `key` at the steps where the log has it."""
    return {r["step"]: r[key] for r in log if r.get(key) is not None}


def across_seeds(logs: list[list[dict]], key: str) -> tuple[list[int], list[float], list[float], list[float]]:
    """(steps, mean, min, max) of `key` over the seeds, at the steps every seed logged it."""
    per_seed = [curve(log, key) for log in logs]
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


def plot_data(run_dirs: list[str], smooth: int = 5) -> list[tuple[str, bool, dict[str, tuple]]]:
    """What plot_runs draws, a panel per PLOT_KEYS entry (and per HOP_PLOT_KEYS and
    PROBE_KEYS entry where the runs logged them): (title, held_out, {label
    (n=seeds): (steps, mean, min, max)}). The first four panels use the held-out
    evaluations where the runs have them (held_out), else the training rollouts
    smoothed over `smooth` steps."""
    groups = group_runs(run_dirs)
    rows = [r for logs in groups.values() for log in logs for r in log]
    split = next((r["eval_split"] for r in rows if "eval_split" in r), None)
    logged = lambda key: any(key in r for r in rows)  # noqa: E731  (by any run, at any step)
    panels = []
    hops = tuple(k for k in HOP_PLOT_KEYS if logged(f"eval_{k[0]}"))
    for key, title in PLOT_KEYS[:4] + hops + PLOT_KEYS[4:]:
        held_out = logged(f"eval_{key}")
        if held_out:
            title += f" ({split})" if split else ""
        elif not key.startswith("R_"):  # the R panels say "training rollouts" already
            title += " (training rollouts)"
        k = f"eval_{key}" if held_out else TRAIN_KEY.get(key, key)
        lines = {f"{label} (n={len(logs)})": across_seeds(logs if held_out else [smoothed(log, k, smooth) for log in logs], k)
                 for label, logs in groups.items()}
        panels.append((title, held_out, lines))
    if any(logged(k) for k, _ in PROBE_KEYS):
        for key, title in PROBE_KEYS:
            panels.append((title, False, {f"{label} (n={len(logs)})": across_seeds(logs, key) for label, logs in groups.items()}))
    return panels


def plot_runs(run_dirs: list[str], out: str, smooth: int = 5) -> str:
    """A panel per metric, a line per label (runs that differ only in seed are one
    label): the mean over seeds, with the min-max range over seeds shaded."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = plot_data(run_dirs, smooth)
    rows = (len(panels) + 2) // 3
    fig, axes = plt.subplots(rows, 3, figsize=(14, 3.5 * rows))
    for ax, (title, held_out, lines) in zip(axes.flat, panels):
        for label, (steps, mean, lo, hi) in lines.items():
            line, = ax.plot(steps, mean, marker="o" if held_out else None, label=label)
            if lo != hi:
                ax.fill_between(steps, lo, hi, color=line.get_color(), alpha=0.2)
        ax.set_title(title)
        ax.set_xlabel("step")
        if title.startswith("probe: KL"):
            ax.set_yscale("symlog", linthresh=1e-3)  # KL spans decades; 0 (no update) stays drawable
    for ax in axes.flat[len(panels):]:
        ax.set_visible(False)  # a last row with fewer than three panels
    axes.flat[0].legend()
    fig.tight_layout()
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out


TABLE_COLS = (("tool_call_rate", "tool-call rate"), ("tool_success", "tool success"),
              ("search_has_answer", "search has answer"), ("exact_match", "EM"),
              ("contains_answer", "contains"), ("format", "format"))
# the two-hop task's (rewards.TWO_HOP_RUBRIC) hops, as columns where every evaluation has them
HOP_COLS = (("call1_success", "search 1 ran"), ("bridge_found", "search 1 found bridge"), ("call2_rate", "second search"),
            ("call2_success", "search 2 ran"), ("search2_has_answer", "search 2 has answer"))


def _cell(vals: list[float]) -> str:
    mean = sum(vals) / len(vals)
    return f"{mean:.3f}" if min(vals) == max(vals) else f"{mean:.3f} ({min(vals):.3f}-{max(vals):.3f})"


def results_table(run_dirs: list[str]) -> str:
    """Markdown table of the held-out evaluations that train.py logged: the model before
    training (every run's step-0 evaluation) and each label at its last evaluated step.
    Cells are the mean over the runs and, where they differ, their (min-max). While a
    seed is still training (its log stops before its config.json's --steps), its label's
    row is at the last step every seed evaluated, marked "in progress"."""
    groups = group_runs(run_dirs)
    running = {run_label(d) for d in run_dirs if _in_progress(d)}
    evaluated = [r for logs in groups.values() for log in logs for r in log if "eval_exact_match" in r]
    cols = TABLE_COLS + tuple(c for c in HOP_COLS if evaluated and all(f"eval_{c[0]}" in r for r in evaluated))
    head = ["model", "runs", "step"] + [t for _, t in cols] + ["wall time / run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    start = [r for r in evaluated if r["step"] == 0]
    if start:
        cells = [_cell([r[f"eval_{k}"] for r in start]) for k, _ in cols]
        lines.append("| " + " | ".join(["base model", str(len(start)), "0"] + cells + ["-"]) + " |")
    for label, logs in groups.items():
        first = 0 if label in running else 1  # a seed still training may have no evaluation after step 0 yet
        evals = [[r for r in log if "eval_exact_match" in r and r["step"] >= first] for log in logs]
        if not all(evals):
            raise ValueError(f"{label}: a run has no evaluation after step 0 (train.py --eval-every)")
        last = [e[-1] for e in evals]
        step = str(last[0]["step"])
        if len({r["step"] for r in last}) > 1:
            if label not in running:
                raise ValueError(f"{label}: seeds end at different steps {sorted(r['step'] for r in last)}")
            common = max(set.intersection(*({r["step"] for r in e} for e in evals)))
            last = [next(r for r in e if r["step"] == common) for e in evals]
            step = f"{common} (in progress)"
        cells = [_cell([r[f"eval_{k}"] for r in last]) for k, _ in cols]
        minutes = [sum(r.get(t, 0.0) for r in log for t in ("time_sample", "time_score", "time_update", "time_eval")) / 60
                   for log in logs]
        lines.append("| " + " | ".join([label, str(len(logs)), step] + cells
                                        + [f"{sum(minutes) / len(minutes):.1f} min"]) + " |")
    return "\n".join(lines)


def curves_table(run_dirs: list[str], key: str = "exact_match", drops_from: int = 30) -> str:
    """Markdown table of one held-out metric at every evaluation, one row per run (the
    curves that results_table's last step hides), and the largest fall between consecutive
    evaluations from step `drops_from` on (issue 20's steadiness target; 0 when it only rose)."""
    curves = {}
    for run in run_dirs:
        log = read_log(run)
        curves[os.path.basename(os.path.normpath(run))] = curve(log, f"eval_{key}")
    steps = sorted({s for c in curves.values() for s in c})
    head = ["run"] + [f"step {s}" for s in steps] + [f"largest drop from step {drops_from}"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, c in curves.items():
        late = [v for s, v in sorted(c.items()) if s >= drops_from]
        drops = [a - b for a, b in zip(late, late[1:])]
        cells = [f"{c[s]:.3f}" if s in c else "-" for s in steps]
        lines.append("| " + " | ".join([name] + cells + [f"{max(0.0, *drops):.3f}" if drops else "-"]) + " |")
    return "\n".join(lines)


def seed_range_table(run_dirs: list[str], key: str = "exact_match") -> str:
    """Markdown table of one held-out metric per label and evaluation: the lowest and the
    highest seed ("lo-hi"), so "the worst MT-GRPO seed above the best GRPO-OR seed at every
    evaluation" (issue 20) reads off two rows. A step that only some seeds have evaluated
    yet shows how many ("lo-hi (2 of 3)")."""
    groups = group_runs(run_dirs)
    per_label = {label: [curve(log, f"eval_{key}") for log in logs] for label, logs in groups.items()}
    steps = sorted({s for curves in per_label.values() for c in curves for s in c})
    head = ["method, lowest-highest seed"] + [f"step {s}" for s in steps]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for label, curves in per_label.items():
        cells = []
        for s in steps:
            vals = [c[s] for c in curves if s in c]
            cell = "-" if not vals else f"{min(vals):.3f}-{max(vals):.3f}"
            cells.append(cell + (f" ({len(vals)} of {len(curves)})" if 0 < len(vals) < len(curves) else ""))
        lines.append("| " + " | ".join([label] + cells) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--plot", nargs="+", metavar="RUN_DIR", help="plot these runs' log.jsonl to OUT.png")
    p.add_argument("--table", nargs="+", metavar="RUN_DIR", help="markdown table of these runs' evaluations, to OUT.md")
    p.add_argument("--out", default="report", help="output path prefix (OUT.md, OUT.png)")
    args = p.parse_args(argv)
    args.out = re.sub(r"\.(png|md)$", "", args.out)  # a prefix: "--out curves.png" means curves.png, not curves.png.png
    if not (args.plot or args.table):
        p.error("nothing to do: give --table and/or --plot with run directories")
    try:
        if args.plot:
            print("wrote", plot_runs(args.plot, args.out + ".png"))
        if args.table:
            text = (results_table(args.table) + "\n\nExact match at every evaluation, per run:\n\n"
                    + curves_table(args.table) + "\n\nExact match per method, lowest and highest seed:\n\n"
                    + seed_range_table(args.table))
            with open(args.out + ".md", "w") as f:
                f.write(text + "\n")
            print(text + f"\nwrote {args.out}.md")
    except (OSError, ValueError) as e:
        sys.exit(f"error: {e}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
