"""Bring your own agent: a calculator tool, arithmetic word problems and a rubric of your
own, trained with MT-GRPO by this project's train.main (which also takes all its flags).

    python examples/calculator.py                    # the embedded model, 10 steps on the CPU
    python examples/calculator.py --steps 40 --lr 1e-5 --output-dir runs/calc

The model's text is untrusted input: `calculate` evaluates it with a parser of its own over
Python's ast (numbers and + - * / only, bounded size), never with eval.
"""

import ast
import operator
import os
import random
import re
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import rewards, tasks, tool_env, train  # noqa: E402

OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv}


def _value(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        return -_value(node.operand) if isinstance(node.op, ast.USub) else _value(node.operand)
    if isinstance(node, ast.BinOp) and type(node.op) in OPS:
        out = OPS[type(node.op)](_value(node.left), _value(node.right))  # ZeroDivisionError: the tool's error
        if abs(out) > 1e12:
            raise ValueError("the result is too large")
        return out
    raise ValueError("only numbers, + - * / and parentheses are allowed")


def calculate(expression: str) -> str:
    """Evaluates an arithmetic expression.

    Args:
        expression: numbers with + - * / and parentheses, e.g. "(12 + 7) * 3"
    """
    if len(expression) > 100 or expression.count("(") > 10:
        raise ValueError("the expression is too long")
    out = _value(ast.parse(expression, mode="eval").body)  # a syntax error becomes an "Error:" result
    return f"{out:g}"


def problem(rng: random.Random, i: int) -> dict:
    a, b, c = rng.randint(12, 99), rng.randint(12, 99), rng.randint(2, 9)
    q = f"A farm has {c} fields with {a} cows and {b} sheep each. How many animals are on the farm?"
    return {"question_id": f"calc{i}", "question": q, "answer": {"aliases": [str((a + b) * c)]}}


def rows(split: str) -> list[dict]:
    rng = random.Random({"train": 0, "validation": 1, "test": 2}[split])
    return [problem(rng, i) for i in range(200 if split == "train" else 16)]


def answered_number(ep, row) -> float:
    """The outcome: the final answer, as a number, is the gold one."""
    numbers = re.findall(r"-?\d+(?:\.\d+)?", tool_env.final_answer(ep.messages) or "")
    return float(len(numbers) == 1 and float(numbers[0]) == float(row["answer"]["aliases"][0]))


# The demonstration asks what the task asks: with another wording ("shops sell apples"), the
# 135M model answered from memory and never called the tool in 32 sampled rollouts
DEMO = [{"role": "user", "content": "Question: A farm has 2 fields with 25 cows and 17 sheep each. How many animals are on the farm?"},
        {"role": "assistant", "content": '<reasoning>I should compute (25 + 17) * 2.</reasoning>\n'
                                         '<tool>{"name": "calculate", "args": {"expression": "(25 + 17) * 2"}}</tool>'},
        {"role": "user", "content": "<result>\n84\n</result>"},
        {"role": "assistant", "content": "<reasoning>The result is 84.</reasoning>\n<answer>84</answer>"}]
RUBRIC = rewards.Rubric(
    turn=[rewards.Reward("call_ran", 0.5, rewards.tool_ran)],  # R^T: a well-formed call that the tool ran
    outcome=[rewards.Reward("correct", 1.0, answered_number),
             rewards.Reward("format", 0.2, lambda ep, row: rewards.format_reward(ep.messages))])

if __name__ == "__main__":
    task = tasks.Task(tool_env.ToolEnv({"calculate": calculate}, DEMO), RUBRIC, rows)
    flags = ["--steps", "10", "--group-size", "6", "--max-turn-tokens", "96", "--mu", "1", "--eval-questions", "16",
             "--eval-every", "5", "--output-dir", "runs/calculator", *sys.argv[1:]]
    sys.exit(train.main(flags, task=task))
