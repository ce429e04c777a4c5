"""The first run on a machine with a CUDA GPU: what works there, and the numbers to keep.

    make gpu-check                         # = python gpu_check.py: every step below
    python gpu_check.py --only tests,train # some steps (a rerun after a fix)

Steps, in order, each in its own process with a time limit; each one's outcome is
recorded whether it passes, fails or runs out of time, and the next one runs anyway:

    env       the GPU(s), driver, torch, CUDA, cuDNN, transformers, the commit
    tests     the tests that can take a device, on CUDA (MTGRPO_TEST_DEVICE=cuda pytest -m device)
    train     3 steps of train.py with the embedded model on cuda (--precision auto: bf16)
    plan      memory_plan.py's peaks for that run against the peaks it logged
    bench     bench.py --device cuda --no-trl (the step benchmark, on the GPU)
    torchrun  2 processes on 2 GPUs, NCCL (skipped, saying so, with fewer than 2 GPUs)
    suite     the rest of the test suite (pytest -m "not device"), with CUDA present

It writes results/gpu_check/ (--out): report.md and report.json (the environment, each
step's command, status, exit code, wall time, the tail of its output and its key
numbers), logs/STEP.log (each step's whole output), bench_cuda.json, train_log.jsonl.
The report is rewritten after every step, so a killed check leaves what it had. Run
folders go to runs/gpu_check/ (not committed). Without a CUDA GPU it prints one line
and exits with status 1 before anything runs.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
PY = sys.executable
RUNS = os.path.join("runs", "gpu_check")
TAIL_LINES = 40
# seconds; sized for an H100-class GPU with a few CPU cores, with room (nothing measured yet)
LIMITS = {"tests": 600, "train": 600, "bench": 900, "torchrun": 600, "suite": 1500}
STEPS = ("env", "tests", "train", "plan", "bench", "torchrun", "suite")


def run_command(name: str, cmd: list[str], limit: int, out: str, env: dict | None = None) -> dict:
    """Run cmd in its own process group (torchrun's workers die with it on a timeout),
    its output to OUT/logs/NAME.log; the record of the step."""
    os.makedirs(os.path.join(out, "logs"), exist_ok=True)
    log = os.path.join(out, "logs", f"{name}.log")
    t = time.time()
    with open(log, "w") as f:
        proc = subprocess.Popen(cmd, cwd=HERE, stdout=f, stderr=subprocess.STDOUT, start_new_session=True,
                                env={**os.environ, **(env or {})})
        try:
            code, status = proc.wait(timeout=limit), None
        except subprocess.TimeoutExpired:
            for sig in (signal.SIGTERM, signal.SIGKILL):
                try:
                    os.killpg(proc.pid, sig)
                    proc.wait(timeout=20)
                    break
                except (subprocess.TimeoutExpired, ProcessLookupError):
                    continue
            code, status = proc.returncode, "timeout"
    with open(log, errors="replace") as f:
        text = f.read()
    return {"name": name, "command": " ".join(f"{k}={v}" for k, v in (env or {}).items()) + (" " if env else "")
            + shlex.join(cmd), "status": status or ("passed" if code == 0 else "failed"), "exit_code": code,
            "wall_s": round(time.time() - t, 1), "limit_s": limit, "tail": tail(text), "numbers": {}, "log": log}


def tail(text: str, n: int = TAIL_LINES) -> str:
    """The last n lines, progress bars' carriage-return redraws reduced to their last state."""
    lines = [line.rsplit("\r", 1)[-1] for line in text.replace("\r\n", "\n").split("\n")]
    return "\n".join(lines[-n:]).strip()


def pytest_numbers(text: str) -> dict:
    """passed / failed / skipped / error counts of pytest's summary line."""
    found = re.findall(r"(\d+) (passed|failed|skipped|errors?|deselected)", text)
    return {kind.rstrip("s") if kind.startswith("error") else kind: int(n) for n, kind in found}


def read_log(folder: str) -> list[dict]:
    path = os.path.join(folder, "log.jsonl")
    if not os.path.exists(path):
        return []
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ---------------------------------------------------------------- the steps


def step_env(out: str) -> dict:
    import torch
    import transformers

    t = time.time()
    gpus = [{"name": torch.cuda.get_device_name(i), "memory_gib": round(torch.cuda.get_device_properties(i).total_memory / 2**30, 1),
             "capability": ".".join(map(str, torch.cuda.get_device_capability(i)))} for i in range(torch.cuda.device_count())]
    driver = ""
    if shutil.which("nvidia-smi"):
        q = subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"], capture_output=True, text=True)
        driver = q.stdout.strip().splitlines()[0] if q.returncode == 0 and q.stdout.strip() else ""
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True).stdout.strip()
    dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=HERE, capture_output=True,
                           text=True).stdout.strip()
    numbers = {"gpus": gpus, "gpu_count": len(gpus), "driver": driver, "torch": torch.__version__,
               "cuda": torch.version.cuda, "cudnn": torch.backends.cudnn.version(), "bf16": torch.cuda.is_bf16_supported(),
               "transformers": transformers.__version__, "python": platform.python_version(),
               "cpu_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
               "commit": commit + (" (with uncommitted changes)" if dirty else "")}
    return {"name": "env", "command": "(in process) torch.cuda, nvidia-smi, git", "status": "passed", "exit_code": 0,
            "wall_s": round(time.time() - t, 1), "tail": "", "numbers": numbers}


def step_tests(out: str, device_tests: bool) -> dict:
    name, marker = ("tests", "device") if device_tests else ("suite", "not device")
    r = run_command(name, [PY, "-m", "pytest", "-q", "-m", marker, "-p", "no:cacheprovider"], LIMITS[name], out,
                    env={"MTGRPO_TEST_DEVICE": "cuda"})
    with open(r["log"], errors="replace") as f:
        r["numbers"] = pytest_numbers(f.read().splitlines()[-1] if os.path.getsize(r["log"]) else "")
    return r


TRAIN = ["--steps", "3", "--device", "cuda", "--eval-every", "3", "--eval-questions", "8", "--save-every", "3"]


def step_train(out: str) -> dict:
    folder = os.path.join(RUNS, "train")
    shutil.rmtree(os.path.join(HERE, folder), ignore_errors=True)  # a fresh run every time
    r = run_command("train", [PY, "train.py", *TRAIN, "--output-dir", folder], LIMITS["train"], out)
    log = read_log(os.path.join(HERE, folder))
    if log:
        shutil.copy(os.path.join(HERE, folder, "log.jsonl"), os.path.join(out, "train_log.jsonl"))
        steps = [x for x in log if x["step"] > 0]
        keys = ("time_sample", "time_update", "memory_sample_gib", "memory_update_gib", "logp_diff_max", "R_O")
        r["numbers"] = {"steps": [{k: round(x[k], 4) for k in ("step", *keys) if x.get(k) is not None} for x in steps]}
        evals = [x for x in log if "eval_exact_match" in x]
        if evals:
            r["numbers"]["eval_exact_match"] = {x["step"]: x["eval_exact_match"] for x in evals}
        cfg = os.path.join(HERE, folder, "config.json")
        if os.path.exists(cfg):
            with open(cfg) as f:
                r["numbers"]["resolved_precision"] = json.load(f).get("resolved_precision")
    return r


def step_plan(out: str) -> dict:
    """memory_plan.py for the train step's settings (train.py's defaults; prompt: the
    demonstration's ~370 tokens and the question) against the peaks that run logged."""
    t = time.time()
    import memory_plan as mp

    s = mp.Settings(prompt_tokens=400)  # the other fields are train.py's defaults, as the train step ran
    cmd = "python memory_plan.py --model smollm2-135m --prompt-tokens 400"
    try:
        p = mp.plan(mp.shape_of(mp.load_config("smollm2-135m"), "smollm2-135m"), s)
        steps = [x for x in read_log(os.path.join(HERE, RUNS, "train")) if x.get("memory_update_gib") is not None]
        numbers = {"plan_sampling_gib": round(p["peak_sampling"] / mp.GiB, 2), "plan_update_gib": round(p["peak_update"] / mp.GiB, 2)}
        if steps:
            numbers["measured_sampling_gib"] = round(max(x["memory_sample_gib"] for x in steps), 2)
            numbers["measured_update_gib"] = round(max(x["memory_update_gib"] for x in steps), 2)
        status, text = ("passed" if steps else "failed"), ("" if steps else "no logged peaks: the train step did not run")
    except Exception:  # noqa: BLE001: recorded, and the next step runs
        numbers, status, text = {}, "failed", traceback.format_exc()
    return {"name": "plan", "command": cmd, "status": status, "exit_code": 0 if status == "passed" else 1,
            "wall_s": round(time.time() - t, 1), "tail": tail(text), "numbers": numbers}


def step_bench(out: str) -> dict:
    result = os.path.join(out, "bench_cuda.json")
    r = run_command("bench", [PY, "bench.py", "--device", "cuda", "--no-trl", "--out", result], LIMITS["bench"], out)
    if r["status"] == "passed" and os.path.exists(result):
        with open(result) as f:
            b = json.load(f)
        r["numbers"] = {"step_speedup": round(b["step_speedup"], 2), "ours_step_s": round(b["ours"]["step_s"], 2),
                        "fp32_step_s": round(b["today_fp32"]["step_s"], 2),
                        "sample_peak_mib": round(b["memory"]["sample_peak_mb"]),
                        "update_peak_mib": round(b["memory"]["update_peak_mb"]),
                        "decode_step_ms": {k: round(v, 1) for k, v in b["decode_step_ms"].items()}}
    return r


def step_torchrun(out: str) -> dict:
    import torch

    n = torch.cuda.device_count()
    folder = os.path.join(RUNS, "torchrun")
    cmd = [PY, "-m", "torch.distributed.run", "--nproc_per_node", "2", "train.py", "--device", "cuda", "--steps", "2",
           "--questions-per-step", "2", "--eval-every", "0", "--save-every", "2", "--output-dir", folder]
    if n < 2:
        return {"name": "torchrun", "command": shlex.join(cmd), "status": "skipped", "exit_code": None, "wall_s": 0.0,
                "tail": f"skipped: {n} GPU (2 needed)", "numbers": {}}
    shutil.rmtree(os.path.join(HERE, folder), ignore_errors=True)
    r = run_command("torchrun", cmd, LIMITS["torchrun"], out)
    log = read_log(os.path.join(HERE, folder))
    if log:
        r["numbers"] = {"steps": [x["step"] for x in log], "episodes_per_step": [x.get("episodes") for x in log],
                        "time_update": [round(x["time_update"], 2) for x in log if "time_update" in x]}
    return r


# ---------------------------------------------------------------- the report


def write_report(out: str, records: list[dict]) -> None:
    with open(os.path.join(out, "report.json"), "w") as f:
        json.dump({"written": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "steps": records}, f, indent=2)
    env = next((r["numbers"] for r in records if r["name"] == "env"), {})
    lines = ["# GPU check", "", f"Written by `make gpu-check` (gpu_check.py) on {time.strftime('%Y-%m-%d %H:%M %Z')}."]
    if env:
        gpus = ", ".join(f"{g['name']} ({g['memory_gib']} GiB, sm {g['capability']})" for g in env["gpus"])
        lines += ["", f"GPUs: {env['gpu_count']} x {gpus}; driver {env['driver'] or '?'}; torch {env['torch']}, "
                  f"CUDA {env['cuda']}, cuDNN {env['cudnn']}, bf16 {env['bf16']}; transformers {env['transformers']}; "
                  f"Python {env['python']}; {env['cpu_cores']} CPU cores; commit {env['commit']}."]
    lines += ["", "| step | status | exit | wall s | key numbers |", "| --- | --- | ---: | ---: | --- |"]
    for r in records:
        if r["name"] == "env":
            continue
        nums = json.dumps(r["numbers"]) if r["numbers"] else ""
        nums = nums if len(nums) <= 160 else nums[:157] + "..."  # whole in the step's section below
        lines.append(f"| {r['name']} | {r['status']} | {r['exit_code'] if r['exit_code'] is not None else ''} | "
                     f"{r['wall_s']} | {nums.replace('|', '/')} |")
    for r in records:
        if r["name"] == "env":
            continue
        lines += ["", f"## {r['name']}: {r['status']}", "", "```bash", r["command"], "```"]
        if r["numbers"]:
            lines += ["", "```json", json.dumps(r["numbers"], indent=1), "```"]
        if r["tail"]:
            lines += ["", "```", r["tail"], "```"]
    with open(os.path.join(out, "report.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", default=os.path.join("results", "gpu_check"), help="where the report goes")
    p.add_argument("--only", default=",".join(STEPS), help=f"comma-separated steps of {', '.join(STEPS)}")
    args = p.parse_args(argv)
    only = [s.strip() for s in args.only.split(",") if s.strip()]
    unknown = [s for s in only if s not in STEPS]
    if unknown:
        sys.exit(f"error: unknown step {', '.join(unknown)}; choose from {', '.join(STEPS)}")
    import torch

    if not torch.cuda.is_available():
        sys.exit(f"error: no CUDA GPU: torch {torch.__version__} (CUDA {torch.version.cuda or 'not built in'}) sees "
                 "none; make gpu-check is for a machine with a GPU (make test checks everything else)")
    out = os.path.join(HERE, args.out) if not os.path.isabs(args.out) else args.out
    os.makedirs(out, exist_ok=True)
    run = {"env": step_env, "tests": lambda o: step_tests(o, True), "train": step_train, "plan": step_plan,
           "bench": step_bench, "torchrun": step_torchrun, "suite": lambda o: step_tests(o, False)}
    records = []
    for name in STEPS:
        if name not in only:
            continue
        print(f"gpu-check: {name} ...", flush=True)
        try:
            rec = run[name](out)
        except Exception:  # noqa: BLE001: a step that cannot even start is recorded as failed
            rec = {"name": name, "command": "", "status": "failed", "exit_code": None, "wall_s": 0.0,
                   "tail": tail(traceback.format_exc()), "numbers": {}}
        rec.pop("log", None)
        records.append(rec)
        print(f"gpu-check: {name} {rec['status']} ({rec['wall_s']} s) {json.dumps(rec['numbers'])[:300]}", flush=True)
        write_report(out, records)
    failed = [r["name"] for r in records if r["status"] in ("failed", "timeout")]
    print(f"gpu-check: report in {os.path.relpath(out, HERE)}/report.md; "
          + (f"failed: {', '.join(failed)}" if failed else "every step that ran passed"))
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
