"""Run a list of train.py commands to the end, across sittings.

Each job is (name, train.py arguments). Run again after a kill or in a later sitting:
a finished run (its log reaches --steps with the final evaluation, in its output folder
or already copied to RESULTS/NAME/) is skipped, a run with a checkpoint is resumed
(--resume), a run killed before its first checkpoint is started again. While they run,
and when each ends, the run's log.jsonl, config.json and evals/ are copied to
RESULTS/NAME/, so the results can be committed as they grow.

One run at a time with every core, by default: on the 2-core CPU, two one-thread runs
side by side sampled 2.8x slower each than one two-thread run alone (median sampling
time per step of GRPO-OR, seed 0 beside MT-GRPO vs seed 1 alone: 12.6 s vs 4.5 s),
because sampling is many small matrix products. `--parallel N` gives each of N runs
cores/N threads. The cores are those the driver may use: `taskset -c 0 python
configs/compare.py` runs everything on core 0 with one thread and leaves core 1 free
(a test suite sharing the cores of a two-thread run slowed its updates 3-8x, as every
parallel region waits for the thread that lost its core).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def flag(args: list[str], name: str, default=None):
    return args[args.index(name) + 1] if name in args else default


def finished(out_dir: str, steps: int) -> bool:
    """The log reaches `steps` and that line holds the final evaluation."""
    try:
        with open(os.path.join(out_dir, "log.jsonl")) as f:
            last = [json.loads(line) for line in f if line.strip()][-1]
    except (OSError, IndexError, json.JSONDecodeError):
        return False
    return last.get("step") == steps and "eval_exact_match" in last


def copy_results(out_dir: str, dest: str) -> None:
    if not os.path.exists(os.path.join(out_dir, "log.jsonl")):
        return
    os.makedirs(dest, exist_ok=True)
    for name in ("log.jsonl", "config.json"):
        if os.path.exists(os.path.join(out_dir, name)):
            shutil.copy2(os.path.join(out_dir, name), os.path.join(dest, name))
    if os.path.isdir(os.path.join(out_dir, "evals")):
        shutil.copytree(os.path.join(out_dir, "evals"), os.path.join(dest, "evals"), dirs_exist_ok=True)


def usable_cores() -> int:
    """The cores this process may run on (`taskset -c 0 python configs/...` gives the runs
    one core and leaves the other free for other work), not all the machine has."""
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


def start(args: list[str], threads: int) -> subprocess.Popen | None:
    out_dir = flag(args, "--output-dir")
    steps = int(flag(args, "--steps"))
    if finished(out_dir, steps):
        return None
    if os.path.exists(os.path.join(out_dir, "checkpoint", "trainer_state.pt")):
        args = args + ["--resume"]
    elif os.path.exists(out_dir):
        shutil.rmtree(out_dir)  # killed before its first checkpoint: nothing to resume
    os.makedirs(os.path.dirname(out_dir) or ".", exist_ok=True)
    log = open(out_dir.rstrip("/") + ".out", "a")
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    print(f"start: {' '.join(args)}", flush=True)
    return subprocess.Popen([sys.executable, "train.py", *args], cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)


def run_all(jobs: list[tuple[str, list[str]]], parallel: int, results: str, copy_every: float = 600) -> int:
    """Run the jobs, `parallel` at a time; returns the number that failed."""
    os.chdir(ROOT)
    todo, running, failed = list(jobs), {}, 0
    threads = max(1, usable_cores() // parallel)
    last_copy = time.time()
    while todo or running:
        while todo and len(running) < parallel:
            name, args = todo.pop(0)
            if finished(os.path.join(results, name), int(flag(args, "--steps"))):
                print(f"done already: {name} (in {results})", flush=True)  # committed: delete it to redo
                continue
            proc = start(args, threads)
            if proc is None:
                print(f"done already: {name}", flush=True)
                copy_results(flag(args, "--output-dir"), os.path.join(results, name))
            else:
                running[name] = (proc, args)
        time.sleep(5)
        for name, (proc, args) in list(running.items()):
            if proc.poll() is not None:
                del running[name]
                copy_results(flag(args, "--output-dir"), os.path.join(results, name))
                status = "finished" if proc.returncode == 0 else f"FAILED (exit {proc.returncode})"
                failed += proc.returncode != 0
                print(f"{status}: {name}", flush=True)
        if time.time() - last_copy > copy_every:
            for name, (_, args) in running.items():
                copy_results(flag(args, "--output-dir"), os.path.join(results, name))
            last_copy = time.time()
    return failed


def auto_precision() -> str:
    """What train.py's --precision auto gives on this machine (its default device)."""
    sys.path.insert(0, ROOT)
    import models
    import precision

    return precision.resolve("auto", models.default_device())


def main(doc: str, jobs: list[tuple[str, list[str]]], results: str, argv: list[str] | None = None,
         precision: str | None = None) -> int:
    """The command line of a list of runs (configs/sweep.py, configs/compare.py).
    precision: the one precision every run of the list trains in (their --precision);
    the driver stops on a machine where that precision is not the fast one, rather than
    emulate it (bf16 without bf16 units: ~20x slower) or mix precisions in one table."""
    import argparse

    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--print", action="store_true", help="print the train.py commands and exit")
    p.add_argument("--parallel", type=int, default=1, help="runs side by side (each gets cores/N threads)")
    p.add_argument("--only", default="", help="comma-separated run names: only these, in this order "
                                              "(e.g. the seeds of one method first)")
    a = p.parse_args(argv)
    if a.parallel < 1:
        p.error(f"--parallel must be at least 1, got {a.parallel}")
    if a.only:
        by_name = dict(jobs)
        names = [n.strip() for n in a.only.split(",") if n.strip()]
        unknown = [n for n in names if n not in by_name]
        if unknown:
            p.error(f"--only: unknown run {', '.join(unknown)}; the runs are {', '.join(by_name)}")
        jobs = [(n, by_name[n]) for n in names]
    if precision and not a.print and auto_precision() != precision:
        p.error(f"these runs train in {precision} (the committed ones did), but {precision} is not this machine's "
                f"fast precision (--precision auto gives {auto_precision()}): run them on a machine where it is")
    if a.print:
        try:
            print("\n".join("python train.py " + " ".join(args) for _, args in jobs), flush=True)
        except BrokenPipeError:  # `--print | head`: the reader has what it wanted
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error at exit
        return 0
    return run_all(jobs, a.parallel, results)
