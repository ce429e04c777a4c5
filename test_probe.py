"""Tests of probe.py: the probe's contexts (the sampler's token layout, the positions it
reads), its forward against a plain one, the KL and the decision probabilities, and in
a training run: the logged KL is the KL between the saved policies."""

import copy
import json
import math
import os

import pytest
import torch

import models
import probe
import tool_env
import train
from conftest import Q, train_main


def test_kl_by_hand():
    before = torch.tensor([[0.5, 0.5], [0.9, 0.1]]).log()
    after = torch.tensor([[0.25, 0.75], [0.9, 0.1]]).log()
    want = 0.5 * math.log(0.5 / 0.25) + 0.5 * math.log(0.5 / 0.75)  # KL(before || after), 0.1438
    assert probe.kl(before, after).tolist() == pytest.approx([want, 0.0], abs=1e-6)
    assert float(probe.kl(after, before)[0]) == pytest.approx(0.25 * math.log(0.5) + 0.75 * math.log(1.5), abs=1e-6)


def test_contexts_follow_the_sampler_layout(tokenizer, tools):
    p = probe.build_probe(tokenizer, Q, tool_env.ToolEnv(tools, tool_env.FEWSHOT))
    assert tokenizer.decode([p.tool_id]) == "tool" and tokenizer.decode([p.answer_id]) == "answer"
    for row, ids, pos in zip(Q, p.ids, p.positions):
        text = tokenizer.decode(ids)
        assert text.count(row["question"]) == 2  # in the question, and as the canonical query
        assert "Cairo" in text or "Mount Catherine" in text  # the tool really ran: its result is in the context
        # the positions read are turn 1's tokens, turn 2's tokens, then the decision after the last token
        read = tokenizer.decode([ids[t + 1] for t in pos[:-1]])
        assert read == probe.canonical_call(row["question"], tools) + probe.TURN2_REASONING
        assert pos[-1] == len(ids) - 1 and ids[-1] == tokenizer.encode("\n<", add_special_tokens=False)[-1]


def test_probe_forward_equals_a_plain_forward(tiny, tokenizer, tools):
    """The shared-prefix forward gives each row's own log-softmax at its positions."""
    model, _ = tiny
    p = probe.build_probe(tokenizer, Q, tool_env.ToolEnv(tools, tool_env.FEWSHOT))
    got = probe.probe_logprobs(model, p)
    want = []
    with torch.no_grad():
        for ids, pos in zip(p.ids, p.positions):
            logits = model(input_ids=torch.tensor([ids])).logits[0]
            want.append(torch.log_softmax(logits[pos].float(), -1))
    want = torch.cat(want)
    assert got.shape == want.shape == (sum(len(x) for x in p.positions), len(tokenizer))
    assert torch.allclose(got, want, atol=1e-4)
    second, answer = probe.decision_probs(p, got)
    last = [want[sum(len(x) for x in p.positions[: i + 1]) - 1] for i in range(len(Q))]
    assert second == pytest.approx(sum(float(l[p.tool_id].exp()) for l in last) / len(Q), rel=1e-5)
    assert answer == pytest.approx(sum(float(l[p.answer_id].exp()) for l in last) / len(Q), rel=1e-5)
    m = probe.measure(p, got, None)
    assert set(m) == {"probe_second_call", "probe_answer_prob"}  # nothing to compare with yet
    assert probe.measure(p, got, got)["probe_kl_max"] == 0.0


def test_logged_kl_is_the_kl_between_the_saved_policies(tiny, tmp_path):
    """Step 1's probe_kl_* compare the initial model with the checkpoint after step 1."""
    model, path = tiny
    out = tmp_path / "run"
    args = ["--model", path, "--steps", "1", "--questions-per-step", "2", "--group-size", "2", "--max-turn-tokens", "12",
            "--output-dir", str(out), "--lr", "1e-2", "--device", "cpu", "--eval-every", "0", "--probe-questions", "3",
            "--task", "factbook", "--temperature", "2", "--precision", "fp32"]  # as the check below: not auto's bf16
    assert train_main(args) == 0  # conftest.TEST_RUBRIC: a reward with variance, so the update is not zero
    with open(os.path.join(out, "log.jsonl")) as f:
        start, rec = [json.loads(l) for l in f]
    after = models.load_model(str(out / "checkpoint"), "cpu")[0].eval()
    import data, tasks
    env = tasks.build({"task": "factbook", "model": path}).env  # the run's environment: no demonstration
    p = probe.build_probe(models.load_model(path, "cpu")[1], data.spread_rows(data.load_task("factbook", "validation"), 3), env)
    d = probe.kl(probe.probe_logprobs(copy.deepcopy(model).eval(), p), probe.probe_logprobs(after, p))
    assert rec["probe_kl_mean"] == pytest.approx(float(d.mean()), rel=1e-4) and rec["probe_kl_mean"] > 0
    assert rec["probe_kl_max"] == pytest.approx(float(d.max()), rel=1e-4)
    assert start["step"] == 0 and "probe_kl_mean" not in start
