"""configs/queue_runs.py: the driver of the sweep and the comparison skips finished
runs (in their folder or already in results/), resumes runs with a checkpoint, starts
over runs killed before their first checkpoint, and gives each run cores/N threads."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "configs"))
import queue_runs  # noqa: E402


def _log(folder, rows):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "log.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in rows)


def test_finished_needs_the_last_step_and_its_evaluation(tmp_path):
    run = str(tmp_path / "run")
    assert not queue_runs.finished(run, 3)  # no log
    _log(run, [{"step": 0, "eval_exact_match": 0.0}, {"step": 3}])
    assert not queue_runs.finished(run, 3)  # killed before the final evaluation was logged
    _log(run, [{"step": 0, "eval_exact_match": 0.0}, {"step": 2, "eval_exact_match": 0.1}])
    assert not queue_runs.finished(run, 3)
    _log(run, [{"step": 3, "eval_exact_match": 0.1}])
    assert queue_runs.finished(run, 3)


class FakeProc:
    returncode = 0

    def poll(self):
        return 0


@pytest.fixture
def started(monkeypatch, tmp_path):
    """Run run_all in tmp_path with Popen recorded instead of called."""
    calls = []

    def popen(cmd, cwd, stdout, stderr, env):
        calls.append((cmd[2:], env["OMP_NUM_THREADS"]))
        return FakeProc()

    monkeypatch.chdir(tmp_path)  # restored after the test (run_all changes into ROOT)
    monkeypatch.setattr(queue_runs, "ROOT", str(tmp_path))
    monkeypatch.setattr(queue_runs.subprocess, "Popen", popen)
    monkeypatch.setattr(queue_runs.time, "sleep", lambda s: None)
    monkeypatch.setattr(queue_runs, "usable_cores", lambda: 4)
    return calls


def test_run_all_skips_finished_resumes_and_restarts(started):
    done = [{"step": 0, "eval_exact_match": 0.0}, {"step": 2, "eval_exact_match": 0.5}]
    _log("results/a", done)  # committed earlier: skipped, though runs/a does not exist
    _log("runs/b", done)  # finished in its folder: skipped, and copied to results
    _log("runs/c", [{"step": 1}])  # has a checkpoint: resumed
    os.makedirs("runs/c/checkpoint")
    open("runs/c/checkpoint/trainer_state.pt", "w").close()
    _log("runs/d", [{"step": 1}])  # killed before its first checkpoint: started over
    jobs = [(n, ["--steps", "2", "--output-dir", f"runs/{n}"]) for n in "abcde"]
    assert queue_runs.run_all(jobs, parallel=2, results="results") == 0
    assert started == [(["--steps", "2", "--output-dir", "runs/c", "--resume"], "2"),
                       (["--steps", "2", "--output-dir", "runs/d"], "2"),
                       (["--steps", "2", "--output-dir", "runs/e"], "2")]
    assert not os.path.exists("runs/d/log.jsonl")  # the stale log was removed before the restart
    assert queue_runs.finished("results/b", 2)


@pytest.mark.parametrize("driver", ["compare", "compare_v1", "compare_v2", "compare_v4", "compare_v5", "compare_2hop",
                                    "sweep", "sweep_recipe"])
def test_every_driven_command_parses(driver):
    """Each driver's train.py commands are valid: a mistyped flag fails here, not hours
    into a queue of runs."""
    import importlib

    import train

    jobs = importlib.import_module(driver).jobs()
    assert len({name for name, _ in jobs}) == len(jobs)  # one output folder each
    for _, argv in jobs:
        train.parse_args(argv)


def test_only_picks_runs_in_the_given_order_and_rejects_unknown_names(monkeypatch, capsys):
    """--only 'b,a' runs b then a and nothing else; a mistyped name stops the driver
    with one line before anything starts."""
    jobs = [("a", ["--output-dir", "runs/a"]), ("b", ["--output-dir", "runs/b"]), ("c", ["--output-dir", "runs/c"])]
    seen = []
    monkeypatch.setattr(queue_runs, "run_all", lambda js, parallel, results: seen.append([n for n, _ in js]) or 0)
    assert queue_runs.main("doc", jobs, "results", ["--only", "b,a"]) == 0
    assert seen == [["b", "a"]]
    with pytest.raises(SystemExit) as e:
        queue_runs.main("doc", jobs, "results", ["--only", "b,x"])
    assert e.value.code == 2
    assert "unknown run x" in capsys.readouterr().err


def test_a_pinned_precision_stops_the_driver_where_it_is_not_the_fast_one(monkeypatch, capsys):
    """compare.py's runs all train in bf16: on a machine whose --precision auto gives fp32
    (no bf16 units: bf16 would be emulated) the driver says so in one line and starts
    nothing; where auto gives bf16 it runs; --print works anywhere."""
    jobs = [("a", ["--precision", "bf16", "--output-dir", "runs/a"])]
    started = []
    monkeypatch.setattr(queue_runs, "run_all", lambda js, parallel, results: started.append(js) or 0)
    monkeypatch.setattr(queue_runs, "auto_precision", lambda: "fp32")
    with pytest.raises(SystemExit) as e:
        queue_runs.main("doc", jobs, "results", [], precision="bf16")
    assert e.value.code == 2 and "auto gives fp32" in capsys.readouterr().err and not started
    assert queue_runs.main("doc", jobs, "results", ["--print"], precision="bf16") == 0
    monkeypatch.setattr(queue_runs, "auto_precision", lambda: "bf16")
    assert queue_runs.main("doc", jobs, "results", [], precision="bf16") == 0 and started == [jobs]


def test_the_comparisons_pin_one_precision():
    import compare
    import compare_2hop

    for driver in (compare, compare_2hop):
        assert all(queue_runs.flag(args, "--precision") == driver.PRECISION == "bf16" for _, args in driver.jobs())


# settings a committed config.json may predate: what its run did without them
BEFORE_THE_FLAG = {"contains_max_extra_words": None, "demo": "jp"}  # tool_env.DEMO_BEFORE_THE_FLAG


@pytest.mark.parametrize("driver,results", [("compare", "results/runs"), ("compare_v1", "results/v1/runs"),
                                            ("compare_v2", "results/v2/runs"), ("compare_v4", "results/v4/runs"),
                                            ("compare_v5", "results/v5/runs"),
                                            ("compare_2hop", "results/runs_2hop"), ("sweep", "results/sweep"),
                                            ("sweep_recipe", "results/sweep_recipe")])
def test_every_committed_run_is_what_its_driver_runs_today(driver, results):
    """A driver's command for a committed run parses to that run's config.json: when a
    train.py default changes (recipe v3's contains_answer limit), the commands of earlier
    recipes must spell the old value out, or rerunning them would run something else."""
    import importlib

    import train

    root = os.path.dirname(os.path.abspath(__file__))
    checked = 0
    for name, argv in importlib.import_module(driver).jobs():
        path = os.path.join(root, results, name, "config.json")
        if not os.path.exists(path):
            continue
        saved, now = json.load(open(path)), vars(train.parse_args(argv))
        if saved.get("precision") == "auto" and now["precision"] != "auto":  # pinned later to what auto chose
            saved["precision"] = saved["resolved_precision"]
        for c in (saved, now):  # where the decay ends: 0, and a config from before the flag, the last step
            c["lr_decay_steps"] = (c.get("lr_decay_steps") or c["steps"]) if c.get("lr_schedule", "constant") != "constant" else None
        for key, value in now.items():
            if key != "resume" and (key in saved or key in BEFORE_THE_FLAG):  # the driver adds --resume itself
                assert saved.get(key, BEFORE_THE_FLAG.get(key)) == value, (name, key)
        checked += 1
    assert checked


def test_print_into_a_closed_pipe_ends_quietly():
    """`configs/compare_2hop.py --print | head -1` printed a BrokenPipeError traceback."""
    import subprocess

    out = subprocess.run(f"{sys.executable} configs/compare_2hop.py --print | head -1", shell=True,
                         capture_output=True, text=True, cwd=queue_runs.ROOT)
    assert out.stdout.startswith("python train.py ") and out.stdout.count("\n") == 1
    assert "Traceback" not in out.stderr and "BrokenPipe" not in out.stderr
