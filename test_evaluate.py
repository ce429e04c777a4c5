"""Tests of evaluate.py: the greedy evaluation's metrics and the --show rendering of an
episode with its advantages."""

import sampler
from conftest import Q, run_scripted


def test_evaluate_metrics_and_show_rendering(tiny, tokenizer, tools, tmp_path):
    import evaluate

    model, _ = tiny
    metrics, eps = evaluate.evaluate(model, tokenizer, Q, tools, sampler.RolloutConfig(max_turn_tokens=8, fewshot=False))
    assert metrics["episodes"] == 2 and set(evaluate.METRICS) <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in evaluate.METRICS)
    # a scripted two-turn rollout, rendered with its mt-grpo advantages
    eps = run_scripted(model, tokenizer, tools, ["capital of Egypt", None, "Egypt", None])
    sampler.score_episodes(eps)
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
