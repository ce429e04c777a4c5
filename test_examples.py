"""Tests of examples/: the calculator agent's tool on hostile input, its rubric, and a
few training steps of it with a tiny model, through train.main's plug-in."""

import json
import os
import sys

import pytest

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "examples"))
import calculator  # noqa: E402

import rewards  # noqa: E402
import sampler  # noqa: E402
import tasks  # noqa: E402
import tool_env  # noqa: E402
import train  # noqa: E402
from conftest import chat  # noqa: E402

TOOLS = {"calculate": calculator.calculate}


def run(expression) -> str:
    return tool_env.run_tool_call(json.dumps({"name": "calculate", "args": {"expression": expression}}).join(
        ["<tool>", "</tool>"]), TOOLS)


def test_calculator_evaluates_arithmetic():
    assert run("(12 + 7) * 3") == "57" and run("-4 / 8") == "-0.5" and run("2.5*2") == "5"


@pytest.mark.parametrize("hostile", [
    "__import__('os').system('echo pwned')", "().__class__.__bases__[0].__subclasses__()", "open('/etc/passwd').read()",
    "9**9**9", "2 ** 100", "10 ** 10 * 10 ** 10", "99999999 * 99999999", "1e308 * 10", "1 / 0", "7 // 2", "7 % 2",
    "(" * 60 + "1" + ")" * 60, "1 +" * 40 + "1", "x", "lambda: 1", "[1] * 10", "True + 1", "1j * 2", "'a' * 3",
    "1 if 1 else 2", "(1).real", "", "1 +", "\x00",
])
def test_calculator_refuses_hostile_expressions(hostile):
    """The model's text is untrusted: anything but bounded arithmetic is an error result,
    never executed, never a crash; the tool never calls eval."""
    out = run(hostile)
    assert out.startswith("Error: "), (hostile, out)
    assert "pwned" not in out and "root:" not in out


def test_calculator_rubric():
    row = calculator.rows("validation")[0]
    gold = row["answer"]["aliases"][0]
    call = '<reasoning>r</reasoning>\n<tool>{"name": "calculate", "args": {"expression": "1 + 1"}}</tool>'
    ep = sampler.Episode(row, chat(call, "<result>\n2\n</result>", f"<reasoning>r</reasoning>\n<answer>{gold}</answer>"))
    calculator.RUBRIC.score(ep)
    assert ep.turn_rewards == [0.5] and ep.components["correct"] == 1.0 and ep.outcome_reward == pytest.approx(1.2)
    ep = sampler.Episode(row, chat("<answer>about 12 or 13</answer>"))
    calculator.RUBRIC.score(ep)
    assert ep.turn_rewards == [] and ep.components["correct"] == 0.0
    # the prompt describes the tool's own argument, and the demo's call runs
    env = tool_env.ToolEnv(TOOLS, calculator.DEMO)
    assert '"args": {"expression": "..."}' in env.initial_messages(row)[0]["content"]
    assert env.step(env.initial_messages(row)[:-1][:3]).message["content"] == calculator.DEMO[2]["content"]


def test_calculator_agent_trains_through_the_plug_in(tiny, tmp_path):
    task = tasks.Task(tool_env.ToolEnv(TOOLS, calculator.DEMO), calculator.RUBRIC, calculator.rows)
    out = tmp_path / "calc"
    assert train.main(["--model", tiny[1], "--steps", "2", "--group-size", "2", "--questions-per-step", "2",
                       "--max-turn-tokens", "8", "--eval-every", "2", "--eval-questions", "2", "--probe-questions", "1",
                       "--device", "cpu", "--output-dir", str(out)], task=task) == 0
    log = [json.loads(line) for line in open(out / "log.jsonl")]
    assert [r["step"] for r in log] == [0, 1, 2]
    assert {"call_ran", "correct", "format", "eval_correct", "probe_kl_mean"} <= set(log[-1])
    assert "exact_match" not in log[-1] and "em" not in log[-1]  # the rubric's own components only
