"""Every user error ends in one line that names the problem, and a non-zero exit; never
a traceback. Each case runs the command line's own entry point (main(argv)) in process;
one case also runs through a real subprocess."""

import json
import os
import shutil
import subprocess
import sys

import pytest

import evaluate
import gpu_check
import memory_plan
import report
import train


def _bad_trainer_state(tmp):
    run = tmp / "run"
    (run / "checkpoint").mkdir(parents=True)
    (run / "checkpoint" / "trainer_state.pt").write_bytes(b"\x80\x02 truncated")
    return ["--output-dir", str(run), "--resume"]


def _run_without_checkpoint(tmp):
    run = tmp / "run"
    run.mkdir()
    (run / "log.jsonl").write_text('{"step": 1}\n')
    return ["--model", str(run)]


def _truncated_model(tmp, tiny_path):
    folder = tmp / "model"
    shutil.copytree(tiny_path, folder)
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    return ["--model", str(folder)]


def _no_chat_template(tmp, tiny_path):
    folder = tmp / "model"
    shutil.copytree(tiny_path, folder)
    for name in os.listdir(folder):
        if name.endswith(".jinja"):
            os.remove(folder / name)
    cfg = json.loads((folder / "tokenizer_config.json").read_text())
    cfg.pop("chat_template", None)
    (folder / "tokenizer_config.json").write_text(json.dumps(cfg))
    return ["--model", str(folder)]


# (command, argv or a function of (tmp_path, tiny model path) giving argv, words the line must hold)
CASES = [
    ("train", ["--task", "foo"], "unknown task 'foo'"),
    ("train", ["--model", "/nonexistent/model"], "no such folder"),
    ("train", ["--model", "runs/none/checkpoint"], "no such folder"),
    ("train", ["--device", "cuda"], "no CUDA GPU"),
    ("train", ["--output-dir", "/proc/mtgrpo-test"], "cannot write to --output-dir"),
    ("train", ["--lr", "-1e-4"], "--lr and --eps must be positive"),
    ("train", ["--temperature", "0"], "every advantage is 0"),
    ("train", ["--steps", "0"], "--steps must be at least 1"),
    ("train", ["--task", "triviaqa:fixtures/triviaqa", "--corpus", "fixtures/triviaqa/corpus.jsonl",
               "--eval-split", "test"], "no test.jsonl or test.parquet in fixtures/triviaqa"),
    ("train", ["--task", "triviaqa"], "needs --corpus"),
    ("train", _bad_trainer_state, "trainer_state.pt is unreadable"),
    ("evaluate", ["--task", "foo"], "unknown task 'foo'"),
    ("evaluate", ["--limit", "-1"], "--limit must be 0 (all) or more"),
    ("evaluate", ["--show", "--index", "99999"], "--index 99999: the validation split has questions 0 to"),
    ("evaluate", ["--out", "/proc/mtgrpo-test/eval"], "cannot write /proc/mtgrpo-test/eval.json"),
    ("evaluate", ["--device", "cuda"], "no CUDA GPU"),
    ("evaluate", _run_without_checkpoint, "holds no model"),
    ("evaluate", _truncated_model, "could not load model"),
    ("evaluate", _no_chat_template, "has no chat template"),
    ("report", ["--table", "/nonexistent/run-s0"], "no log.jsonl"),
    ("report", [], "nothing to do"),
    ("memory_plan", ["--model", "/nonexistent/model"], "no config for model '/nonexistent/model'"),
    ("memory_plan", ["--questions-per-step", "4", "--processes", "3"], "must be a multiple of the 3 processes"),
    ("gpu_check", ["--only", "tests,nope"], "unknown step nope"),
]
MAIN = {"train": train.main, "evaluate": evaluate.main, "report": report.main, "memory_plan": memory_plan.main,
        "gpu_check": gpu_check.main}


@pytest.mark.parametrize("command, argv, words", CASES, ids=[f"{c}-{i}" for i, (c, _, _) in enumerate(CASES)])
def test_user_error_is_one_clear_line(command, argv, words, tmp_path, tiny, capsys, monkeypatch):
    monkeypatch.chdir(os.path.dirname(os.path.abspath(__file__)))
    if callable(argv):
        argv = argv(tmp_path, tiny[1]) if argv.__code__.co_argcount == 2 else argv(tmp_path)
    if command == "evaluate":
        argv = argv + ["--out", str(tmp_path / "eval")] if "--out" not in argv else argv
    if command == "train" and "--output-dir" not in argv:
        argv = argv + ["--output-dir", str(tmp_path / "run")]
    with pytest.raises(SystemExit) as exit_info:
        MAIN[command](argv)
    code = exit_info.value.code
    message = code if isinstance(code, str) else capsys.readouterr().err.strip().splitlines()[-1]
    assert code != 0 and code is not None
    assert words in message, message
    assert "\n" not in message.strip() and "Traceback" not in message


def test_gpu_check_without_a_gpu_is_one_line_and_runs_nothing(tmp_path, monkeypatch):
    """make gpu-check on a machine without CUDA: status 1, one line, no report, no step."""
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)  # this machine's case, on any machine
    monkeypatch.setattr(gpu_check, "run_command", lambda *a, **k: pytest.fail("a step ran"))
    with pytest.raises(SystemExit) as exit_info:
        gpu_check.main(["--out", str(tmp_path / "report")])
    assert str(exit_info.value.code).startswith("error: no CUDA GPU: torch ") and "\n" not in exit_info.value.code
    assert not (tmp_path / "report").exists()


def test_a_user_error_through_the_real_command_line():
    out = subprocess.run([sys.executable, "train.py", "--task", "foo", "--output-dir", "/tmp/unused"],
                         capture_output=True, text=True, cwd=os.path.dirname(os.path.abspath(__file__)))
    assert out.returncode != 0
    assert out.stderr.strip() == "error: unknown task 'foo'; choose 'factbook', 'factbook-2hop', 'triviaqa' or 'triviaqa:PATH'"
