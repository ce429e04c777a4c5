"""Tests of evaluate.py: the greedy evaluation's metrics and the --show rendering of an
episode with its advantages."""

import rewards
import sampler
import tool_env
from conftest import Q, run_scripted


def test_evaluate_metrics_and_show_rendering(tiny, tokenizer, tools, tmp_path):
    import evaluate

    model, _ = tiny
    metrics, eps = evaluate.evaluate(model, tokenizer, Q, tool_env.ToolEnv(tools), rewards.PAPER_RUBRIC,
                                     sampler.RolloutConfig(max_turn_tokens=8))
    assert metrics["episodes"] == 2 and set(evaluate.METRICS) <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in evaluate.METRICS)
    assert "call1_rate" not in metrics  # a one-call task: no per-call columns
    two, _ = evaluate.evaluate(model, tokenizer, Q, tool_env.ToolEnv(tools, max_tool_calls=2), rewards.PAPER_RUBRIC,
                               sampler.RolloutConfig(max_turn_tokens=8))
    assert two["call1_rate"] == two["tool_call_rate"] and {"call1_success", "call2_rate", "call2_success"} <= set(two)
    # a scripted two-turn rollout, rendered with its mt-grpo advantages
    eps = run_scripted(model, tokenizer, tools, ["capital of Egypt", None, "Egypt", None])
    for e in eps:
        rewards.PAPER_RUBRIC.score(e)
    advs = sampler.episode_advantages(eps, 2, "mt-grpo")
    ansi, page = evaluate.render(tokenizer, eps[0], advs[0])
    assert "[turn 1]" in ansi and "[turn 2]" in ansi
    assert page.count('class="label"') == 2 and 'class="env"' in page and "A=+" in page
    # every sampled token is coloured, every other token is grey
    assert page.count("<span style=") == sum(eps[0].loss_mask)
    assert page.count('class="env"') == len(eps[0].token_ids) - sum(eps[0].loss_mask)
    # the terminal text starts at the question and, into a pipe, has no colour codes
    start = evaluate.question_start(tokenizer, eps[0])
    plain, _ = evaluate.render(tokenizer, eps[0], advs[0], start=start, colour=False)
    assert plain.lstrip().startswith("<|im_start|>user\nQuestion: What is the capital of Egypt?")
    assert "\x1b[" not in plain and "You answer questions" not in plain and "[turn 1]" in plain
    assert "You" in ansi and "system" in ansi  # the full text has the system prompt


def test_a_run_is_evaluated_as_it_was_trained(tmp_path):
    """evaluate.py reads a run's config.json: its split and the spread of its questions (as
    train.py's --eval-questions takes them), its --search-chars, demonstration and tool-call
    limit; a flag given on the command line overrides the run's."""
    import argparse
    import json

    import data
    import evaluate
    import tasks

    run = tmp_path / "run"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({
        "method": "mt-grpo", "model": "smollm2-135m", "task": "factbook", "corpus": None, "search_chars": 40, "fewshot": True,
        "max_tool_calls": 2, "eval_split": "test", "eval_questions": 3, "max_turn_tokens": 24, "temperature": 0.7}))
    config = evaluate.run_config(str(run))
    split, rows = evaluate.held_out(config)
    test = data.load_task("factbook", "test")
    assert split == "test" and rows == [test[0], test[len(test) // 3], test[2 * len(test) // 3]]  # spread, not the first 3
    env = tasks.build(config).env
    assert env.max_tool_calls == 2 and env.demo == tool_env.FEWSHOT  # saved without "demo": trained with '.jp' alone
    assert len(env.tools["wiki_search"]("capital of Egypt")) <= 40 + 4  # cut at the run's budget (+ " ...")
    assert sampler.RolloutConfig.from_dict(config) == sampler.RolloutConfig(max_turn_tokens=24, temperature=0.7)
    given = argparse.Namespace(model=[str(run)], split="validation", limit=0, search_chars=None, temperature=None)
    split, rows = evaluate.held_out(evaluate.run_config(str(run), given))
    assert split == "validation" and len(rows) == len(data.load_task("factbook", "validation"))  # --limit 0: all
    # a model that is no run: the defaults, the demonstration for the embedded model only
    assert tasks.build(evaluate.run_config("smollm2-135m")).env.demo == tool_env.DEMOS[tool_env.DEFAULT_DEMO]
    assert tasks.build(evaluate.run_config("Qwen/Qwen2.5-7B")).env.demo is None
    assert evaluate.held_out(evaluate.run_config("smollm2-135m"))[0] == "validation"


def test_evaluate_main_runs_the_episodes_in_the_env_it_is_given(tiny, tmp_path):
    """evaluate.main(env=f) evaluates in f(the task's environment): here one that ends
    every episode after its first turn, which the task's rules would only do for an
    answer or no action. A model folder's own config.json is not taken for a run's
    settings: the tiny model gets no demonstration (the embedded model's)."""
    import json

    import evaluate

    seen = []

    class FirstTurnOnly:
        def __init__(self, inner):
            self.inner = inner

        def initial_messages(self, row):
            return self.inner.initial_messages(row)

        def step(self, messages, truncated=False):
            seen.append(len(messages))
            return tool_env.EnvStep(True, "stopped")

    flags = ["--model", tiny[1], "--task", "triviaqa:fixtures/triviaqa", "--corpus", "fixtures/triviaqa/corpus.jsonl",
             "--split", "train", "--limit", "2", "--max-turn-tokens", "6", "--device", "cpu", "--precision", "fp32", "--out", str(tmp_path / "e")]
    assert evaluate.main(flags, env=FirstTurnOnly) == 0
    ends = [json.loads(line)["end"] for line in open(tmp_path / "e.trajectories.jsonl")]
    assert evaluate.run_config(tiny[1]) == {"model": tiny[1]}
    assert ends == ["stopped", "stopped"] and seen == [3, 3]  # system prompt, question, first assistant turn
