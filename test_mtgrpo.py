"""Tests of mtgrpo.py and train.py: advantages, loss, masks, log-prob consistency,
checkpoint/resume, and one end-to-end step with the real embedded model."""

import json
import math
import os
import shutil

import pytest
import torch

import checkpoint
import mtgrpo
import precision
import sampler
import tool_env
import train

Q = [
    {"question_id": "q1", "question": "What is the capital of Egypt?", "answer": {"aliases": ["Cairo"]}},
    {"question_id": "q2", "question": "What is the highest point in Egypt?", "answer": {"aliases": ["Mount Catherine"]}},
]
# ------------------------------------------------------------------ advantages

def test_advantages_two_groups_hand_computed():
    # group 1: R^O = [2, 0, 1] (mean 1, std 1), R^T = [0.7, 0.2, 0.45] (mean 0.45, std 0.25)
    # group 2: R^O = [0.4, 0.4, 0.4] (zero variance), R^T = [0, 0.2, 0.4] (mean 0.2, std 0.2)
    r_o = torch.tensor([2.0, 0.0, 1.0, 0.4, 0.4, 0.4])
    r_t = torch.tensor([0.7, 0.2, 0.45, 0.0, 0.2, 0.4])
    # prompt token, two turn-1 tokens, an env token, one turn-2 token; row 2 has no tool result
    turns = torch.tensor([[0, 1, 1, 0, 2]] * 6)
    turns[2] = torch.tensor([0, 1, 1, 1, 0])
    e = 1e-4
    no = [2 / (1 + e) * 0.5, -1 / (1 + e), 0.0, 0.0, 0.0, 0.0]  # norm(R^O)
    no[0] = 1 / (1 + e)
    nt = [0.25 / (0.25 + e), -0.25 / (0.25 + e), 0.0, -0.2 / (0.2 + e), 0.0, 0.2 / (0.2 + e)]  # norm(R^T)
    # merged R^O + R^T: group 1 [2.7, 0.2, 1.45] (mean 1.45, std 1.25); group 2 [0.4, 0.6, 0.8] (mean 0.6, std 0.2)
    nm = [1.25 / (1.25 + e), -1.25 / (1.25 + e), 0.0, -0.2 / (0.2 + e), 0.0, 0.2 / (0.2 + e)]

    def expect(turn1, turn2):
        out = torch.zeros(6, 5)
        for i in range(6):
            for j in range(5):
                t = int(turns[i, j])
                out[i, j] = turn1[i] if t == 1 else turn2[i] if t >= 2 else 0.0
        return out

    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "grpo-or")
    torch.testing.assert_close(adv, expect(no, no))
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "grpo-mr")
    torch.testing.assert_close(adv, expect(nm, nm))
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "mt-grpo")
    torch.testing.assert_close(adv, expect([a + b for a, b in zip(no, nt)], no))
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "mt-grpo", turn_coef=0.5)
    torch.testing.assert_close(adv, expect([a + 0.5 * b for a, b in zip(no, nt)], no))
    # the zero-variance group gives exactly 0 from R^O, never NaN
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "grpo-or")
    assert torch.equal(adv[3:], torch.zeros(3, 5))
    # the reference's fallback: row 2 (no tool result) gets the merged advantage
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "mt-grpo", merged_fallback=True)
    torch.testing.assert_close(adv[2], torch.tensor([0.0, nm[2], nm[2], nm[2], 0.0]))
    torch.testing.assert_close(adv[0], torch.tensor([0.0, no[0] + nt[0], no[0] + nt[0], 0.0, no[0]]))
    # Dr. GRPO: centered, not scaled
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "grpo-or", scale="none")
    torch.testing.assert_close(adv[:3, 4], torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(adv[2, 1:4], torch.tensor([0.0, 0.0, 0.0]))


def test_advantages_bad_input():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        mtgrpo.compute_advantages(torch.zeros(6), torch.zeros(6), torch.ones(6, 2, dtype=torch.long), 4, "mt-grpo")
    with pytest.raises(ValueError, match="unknown method"):
        mtgrpo.compute_advantages(torch.zeros(2), torch.zeros(2), torch.ones(2, 2, dtype=torch.long), 2, "ppo")


# ------------------------------------------------------------------ loss

def test_mu1_ratio_one_gives_reinforce_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, st = mtgrpo.policy_loss(logp, logp.detach(), adv, mask)
    assert st["ratio_min"] == 1.0 and st["ratio_max"] == 1.0 and st["clip_frac"] == 0.0
    loss.backward()
    # d/dlogp of -sum(mask * A * exp(logp - old)) / 5 at ratio 1 is -mask * A / 5
    torch.testing.assert_close(logp.grad, -(adv * mask) / 5)
    assert loss.item() == pytest.approx(-(3 * 1 - 2 * 2) / 5)


def test_clipping_on_crafted_ratios():
    old = torch.zeros(1, 4)
    logp = torch.tensor([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, st = mtgrpo.policy_loss(logp, old, adv, mask, eps=0.2, aggregation="dr-grpo", normalizer=1.0)
    # per token: -min(1.5, 1.2) = -1.2 (clipped); -min(-1.5, -1.2) = 1.5; -min(0.5, 0.8) = -0.5; -min(-0.5, -0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx(-1.2 + 1.5 - 0.5 + 0.8)
    assert st["clip_frac"] == pytest.approx(0.5)
    loss.backward()
    # clipped tokens get no gradient; the others get -A * ratio
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.5, -0.5, 0.0]]))
    # eps_high widens only the upper side: ratio 1.5 < 1 + 0.6 is not clipped
    loss, _ = mtgrpo.policy_loss(logp.detach(), old, adv, mask, eps=0.2, eps_high=0.6, aggregation="dr-grpo", normalizer=1.0)
    assert float(loss) == pytest.approx(-1.5 + 1.5 - 0.5 + 0.8)


def test_token_mean_vs_seq_mean_on_unequal_lengths():
    # seq 1: one token with loss 1; seq 2: three tokens with loss 3 (A = -1 and -3 at ratio 1)
    logp = torch.zeros(2, 3)
    adv = torch.tensor([[-1.0, 0.0, 0.0], [-3.0, -3.0, -3.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    tm, _ = mtgrpo.policy_loss(logp, logp, adv, mask, aggregation="token-mean")
    sm, _ = mtgrpo.policy_loss(logp, logp, adv, mask, aggregation="seq-mean")
    dr, _ = mtgrpo.policy_loss(logp, logp, adv, mask, aggregation="dr-grpo", normalizer=10.0)
    assert float(tm) == pytest.approx((1 + 9) / 4)
    assert float(sm) == pytest.approx((1 + 3) / 2)
    assert float(dr) == pytest.approx(10 / 10)


def test_loss_normalizer_of_a_whole_batch():
    masks = [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]  # 3 episodes, 3 + 1 + 4 loss tokens
    assert mtgrpo.loss_normalizer("token-mean", masks, 256) == 8
    assert mtgrpo.loss_normalizer("seq-mean", masks, 256) == 3
    assert mtgrpo.loss_normalizer("dr-grpo", masks, 256) == 3 * 256
    # dr-grpo's constant is not in the mask: no silent fallback to the padded size
    with pytest.raises(ValueError, match="loss_normalizer"):
        mtgrpo.policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), aggregation="dr-grpo")


def test_kl_term():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    loss, st = mtgrpo.policy_loss(logp, logp, torch.zeros(1, 2), torch.ones(1, 2), beta=0.1, ref_logp=ref)
    k3 = math.exp(-0.5) + 0.5 - 1  # exp(d) - d - 1 with d = ref - logp = -0.5
    assert st["kl"] == pytest.approx(k3 / 2)
    assert float(loss) == pytest.approx(0.1 * k3 / 2)
    with pytest.raises(ValueError, match="beta > 0 needs ref_logp"):
        mtgrpo.policy_loss(logp, logp, torch.zeros(1, 2), torch.ones(1, 2), beta=0.1)


def test_micro_batch_accumulation_equals_one_batch(tiny, tokenizer):
    model, _ = tiny
    g = torch.Generator().manual_seed(1)
    episodes = []
    for n in (5, 9, 12, 7):
        ids = torch.randint(0, 1000, (n,), generator=g).tolist()
        mask = [0, 0] + [1] * (n - 2)
        episodes.append(sampler.Episode("q", "q", [], ids, mask, mask, [0.0] * n, []))
    advs = [torch.randn(len(e.token_ids), generator=g) for e in episodes]
    total = sum(sum(e.loss_mask) for e in episodes)

    def grads(groups):
        model.zero_grad()
        for grp in groups:
            b = mtgrpo.collate([episodes[i] for i in grp], [advs[i] for i in grp], tokenizer.pad_token_id)
            logp, _ = mtgrpo.token_logprobs(model, b.input_ids, b.attention_mask)
            loss, _ = mtgrpo.policy_loss(logp, logp.detach(), b.advantages, b.loss_mask, normalizer=total)
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    one = grads([[0, 1, 2, 3]])
    many = grads(mtgrpo.micro_batches([len(e.token_ids) for e in episodes], max_tokens=20))
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # sorted by length 5, 7, 9, 12: 5 and 7 pad to 2 x 7 = 14 <= 20; 3 x 9 > 20; 2 x 12 > 20
    assert mtgrpo.micro_batches([5, 9, 12, 7], 20) == [[0, 3], [1], [2]]


def two_groups(generator, prompt_lens=(20, 25), group_size=3):
    """Synthetic episodes: two questions (prompts of different lengths) x G rollouts of
    different lengths, each with two sampled spans around a 2-token environment span."""
    episodes = []
    for q, plen in enumerate(prompt_lens):
        prompt = torch.randint(0, 1000, (plen,), generator=generator).tolist()
        for r in range(group_size):
            n = 5 + 3 * r + q
            mask = [0] * plen + [1, 1, 0, 0] + [1] * (n - 4)
            ids = prompt + torch.randint(0, 1000, (n,), generator=generator).tolist()
            episodes.append(sampler.Episode(f"q{q}", "q", [], ids, mask, mask, [0.0] * len(ids), []))
    advs = [torch.randn(len(e.token_ids), generator=generator) * torch.tensor(e.loss_mask, dtype=torch.float) for e in episodes]
    return episodes, advs


def run_update(model, episodes, advs, flags, pad_id, shared_prefix=True, ref_model=None):
    """train.update with lr 0 (the weights stay, the gradients are left on the params), at
    temperature 1 as the tests sample."""
    master = precision.MasterWeights(model, "fp32")
    opt = torch.optim.SGD(master.params, lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = vars(train.parse_args(["--temperature", "1", *flags]))
    out = train.update(model, master, opt, sched, episodes, advs, train.UpdateConfig.from_dict(args),
                       sampler.RolloutConfig.from_dict(args), pad_id, ref_model, shared_prefix=shared_prefix)
    return out, [p.grad.clone() for p in master.params]


def test_plan_groups_rollouts_by_prompt():
    g = torch.Generator().manual_seed(0)
    eps, _ = two_groups(g)  # continuation lengths (from the last prompt token): 6, 9, 12 and 7, 10, 13
    plan = mtgrpo.plan_micro_batches(eps, [0, 1, 2, 3, 5], max_tokens=20)
    assert [len(p) for p, _ in plan] == [19, 24]  # each prompt minus its last token
    assert plan[0][0] == eps[0].token_ids[:19] and plan[1][0] == eps[3].token_ids[:24]
    # group 1: 6 and 9 pad to 2 x 9 = 18 <= 20, 12 alone; group 2 (episode 4 left out): 7, then 13
    assert [c for _, c in plan] == [[[0, 1], [2]], [[3], [5]]]
    assert mtgrpo.plan_micro_batches(eps, [0, 4], 100, shared_prefix=False) == [([], [[0, 4]])]


def test_shared_prefix_update_equals_full_sequences(tiny, tokenizer):
    """The prompt forwarded once per group (its keys and values reused, gradients
    through both) gives the loss and gradient of forwarding every episode whole, also
    when a group's continuations are split over micro-batches."""
    model, _ = tiny
    eps, advs = two_groups(torch.Generator().manual_seed(1))
    flags = ["--mu", "1", "--tis-cap", "0"]
    full, g_full = run_update(model, eps, advs, flags + ["--micro-batch-tokens", "1000"], tokenizer.pad_token_id, False)
    shared, g_shared = run_update(model, eps, advs, flags + ["--micro-batch-tokens", "20"], tokenizer.pad_token_id)
    assert full["micro_batches"] == 1 and shared["micro_batches"] == 4
    assert shared["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert shared["entropy"] == pytest.approx(full["entropy"], rel=1e-5)
    assert max(float(g.abs().max()) for g in g_full) > 1e-4  # a real gradient
    for a, b in zip(g_full, g_shared):
        torch.testing.assert_close(b, a, atol=1e-8, rtol=1e-4)


def test_tis_weights_hand_computed():
    old = torch.tensor([[-1.0, -0.5, -2.0]])
    sample = torch.tensor([[-1.5, -0.5, -1.0]])
    # exp(old - sample) = e^0.5, 1, e^-1, truncated at C
    torch.testing.assert_close(mtgrpo.tis_weights(old, sample, 2.0), torch.tensor([[math.exp(0.5), 1.0, math.exp(-1)]]))
    torch.testing.assert_close(mtgrpo.tis_weights(old, sample, 1.5), torch.tensor([[1.5, 1.0, math.exp(-1)]]))
    assert torch.equal(mtgrpo.tis_weights(old, sample, 0), torch.ones(1, 3))
    # in the loss at ratio 1: -sum(w A) / n
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    loss, _ = mtgrpo.policy_loss(old, old, adv, torch.ones(1, 3), is_weights=mtgrpo.tis_weights(old, sample, 1.5))
    assert float(loss) == pytest.approx(-(1.5 * 1 - 2 * 1 + 3 * math.exp(-1)) / 3)


def test_old_logp_is_the_trainers_own_and_tis_corrects_the_sampler(tiny, tokenizer):
    """The sampler's log-probs are off by 0.3 on every token (as a bf16 sampler would be,
    a little): the ratio still starts at exactly 1, in every one of the mu iterations
    (lr 0, so pi_theta = pi_old), the mismatch is logged, and each token's term is
    weighted by w = min(e^0.3, C)."""
    model, _ = tiny
    eps, advs = two_groups(torch.Generator().manual_seed(2))
    b = mtgrpo.collate(eps, advs, tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _ = mtgrpo.token_logprobs(model, b.input_ids, b.attention_mask)
    for r, e in enumerate(eps):
        e.sample_logp = [float(logp[r, j]) - 0.3 if m else 0.0 for j, m in enumerate(e.loss_mask)]
    n_tok = sum(sum(e.loss_mask) for e in eps)
    sum_a = sum(float(a.sum()) for a in advs)  # advantages are 0 off the loss mask
    for cap, w in ((2.0, math.exp(0.3)), (1.2, 1.2), (0.0, 1.0)):
        out, _ = run_update(model, eps, advs, ["--mu", "2", "--tis-cap", str(cap)], tokenizer.pad_token_id)
        assert out["ratio_min"] == pytest.approx(1.0, abs=1e-6) and out["ratio_max"] == pytest.approx(1.0, abs=1e-6)
        assert out["clip_frac"] == 0.0  # against the sampler's log-probs the ratio would be e^0.3 = 1.35: clipped
        assert out["logp_diff_mean"] == pytest.approx(0.3, abs=1e-5) and out["logp_diff_max"] == pytest.approx(0.3, abs=1e-5)
        assert out["loss"] == pytest.approx(-w * sum_a / n_tok, rel=1e-4)


def test_dropout_is_off_in_sampling_and_update(tiny_gpt2_dropout, tokenizer, tools):
    """A model with dropout, left in train mode: the sampler and the update both run it
    without dropout, so they agree, and the KL to a frozen copy is 0 before any update."""
    import copy

    model = tiny_gpt2_dropout.train()
    ids = torch.randint(0, 1000, (1, 30))
    assert not torch.equal(model(input_ids=ids).logits, model(input_ids=ids).logits)  # dropout is really on
    eps = run_scripted(model, tokenizer, tools, ["capital of Egypt", None, "Egypt", None])
    assert model.training  # the sampler restored the mode
    g = torch.Generator().manual_seed(0)
    advs = [torch.randn(len(e.token_ids), generator=g) * torch.tensor(e.loss_mask, dtype=torch.float) for e in eps]
    ref = copy.deepcopy(model).eval()
    out, _ = run_update(model, eps, advs, ["--mu", "1", "--beta", "0.1"], tokenizer.pad_token_id, ref_model=ref)
    assert out["logp_diff_max"] < 1e-5
    assert out["kl"] < 1e-9


# ------------------------------------------------------------------ sampling, masks, consistency

def scripted(tokenizer, query):
    turn1 = f'<reasoning>look it up</reasoning><tool>{{"name": "wiki_search", "args": {{"query": "{query}"}}}}</tool>'
    turn2 = "<reasoning>found</reasoning><answer>Cairo</answer>"
    return tokenizer.encode(turn1, add_special_tokens=False) + tokenizer.encode(turn2, add_special_tokens=False)


def run_scripted(model, tokenizer, tools, queries, **kw):
    force = [scripted(tokenizer, q) if q else tokenizer.encode("<answer>x</answer>", add_special_tokens=False) for q in queries]
    cfg = sampler.RolloutConfig(max_turn_tokens=48, temperature=1.0, top_k=0, **kw)
    return sampler.sample_episodes(model, tokenizer, Q, tools, len(queries) // 2, cfg,
                                  generator=torch.Generator().manual_seed(0), force=force)


def check_consistency(model, tokenizer, episodes, tol=1e-4):
    b = mtgrpo.collate(episodes, [torch.zeros(len(e.token_ids)) for e in episodes], tokenizer.pad_token_id)
    with torch.no_grad():
        logp, _ = mtgrpo.token_logprobs(model, b.input_ids, b.attention_mask, 1.0)
    m = b.loss_mask.bool()
    assert m.sum() > 0
    diff = (logp[m] - b.sample_logp[m]).abs().max()
    assert diff < tol, float(diff)


def test_multi_turn_masks_and_token_in_token_out(tiny, tokenizer, tools):
    model, _ = tiny
    # rows of different prompt lengths, tool results of different lengths, one no-tool episode
    eps = run_scripted(model, tokenizer, tools, ["capital of Egypt", "highest point Egypt", "Egypt", None])
    e = eps[0]
    assert e.end_reason == "answer" and e.num_turns == 2
    assert [m["role"] for m in e.messages[-3:]] == ["assistant", "user", "assistant"]
    assert e.messages[-2]["content"].startswith("<result>\nEgypt - Government - Capital")
    # the sampled ids are exactly the scripted ids (never re-tokenized)
    sampled = [t for t, m in zip(e.token_ids, e.loss_mask) if m]
    assert sampled == scripted(tokenizer, "capital of Egypt")
    # environment tokens: loss mask 0, turn 0, and they are the chat template's rendering
    env = [j for j in range(len(e.token_ids)) if e.token_turns[j] == 0 and j >= e.token_turns.index(1)]
    assert env and all(e.loss_mask[j] == 0 for j in env)
    env_text = tokenizer.decode([e.token_ids[j] for j in env])
    assert "<result>" in env_text and "</result>" in env_text and env_text.endswith("<|im_start|>assistant\n")
    # turns: 1 before the result, 2 after it
    first2 = e.token_turns.index(2)
    assert all(t in (0, 1) for t in e.token_turns[:first2]) and e.loss_mask[first2] == 1
    # the no-tool episode is all turn 1
    assert eps[3].num_turns == 1 and eps[3].end_reason == "answer"
    # the collated attention mask covers env tokens (they are attended to), the loss mask does not
    b = mtgrpo.collate(eps, [torch.zeros(len(x.token_ids)) for x in eps], tokenizer.pad_token_id)
    assert all(b.attention_mask[0, j] == 1 and b.loss_mask[0, j] == 0 for j in env)


def test_env_tokens_are_attended_to(tiny, tokenizer, tools):
    """Changing the tool result changes the log-probs of the answer tokens."""
    model, _ = tiny
    a = run_scripted(model, tokenizer, tools, ["capital of Egypt"] * 2)[0]
    other = tool_env.make_tools([{"title": "Egypt - Government - Capital", "text": "something else entirely"}])
    b = run_scripted(model, tokenizer, other, ["capital of Egypt"] * 2)[0]
    la = [lp for lp, t in zip(a.sample_logp, a.token_turns) if t == 2]
    lb = [lp for lp, t in zip(b.sample_logp, b.token_turns) if t == 2]
    assert len(la) == len(lb) and max(abs(x - y) for x, y in zip(la, lb)) > 1e-4


# bf16: the sampler (KV cache, one token at a time) and the training pass (whole
# sequences) round differently. Measured on this tiny model over 3 seeds, scripted and
# free rollouts: max |dlogp| 4.9e-4 (mean 6e-6); the tolerance is 4x that. (On the
# embedded model the gap is larger, mean 0.024, max 0.28, which is why train.update
# takes old_logp from the training pass and corrects the sampler with TIS.)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-3}


def in_dtype(model, dtype):
    import copy

    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_consistency_tiny_model(tiny, tokenizer, tools, dtype):
    model = in_dtype(tiny[0], dtype)
    eps = run_scripted(model, tokenizer, tools, ["capital of Egypt", "highest point Egypt", "Egypt", None])
    check_consistency(model, tokenizer, eps, TOL[dtype])
    # free sampling too, with the fewshot prompt (long prompt) and the turn budget
    cfg = sampler.RolloutConfig(max_turn_tokens=20, temperature=1.0, top_k=50, fewshot=True)
    free = sampler.sample_episodes(model, tokenizer, Q, tools, 3, cfg, generator=torch.Generator().manual_seed(3))
    assert {e.end_reason for e in free} <= {"budget", "no_action", "answer", "tool", "tool_limit"}
    check_consistency(model, tokenizer, free, TOL[dtype])


def plain_greedy_episode(model, tokenizer, row, tools, max_turn_tokens, force=()):
    """The obviously-correct sampler: one episode, no cache, no padding; every token
    is the argmax of a full forward pass over the whole sequence so far."""
    msgs = tool_env.initial_messages(row["question"], tools)
    ids = sampler.prompt_ids(tokenizer, msgs)
    force, n_sampled = list(force), 0
    while True:
        start = len(ids)
        while True:
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids]), logits_to_keep=1).logits[0, -1].argmax())
            if n_sampled < len(force):
                nxt = force[n_sampled]
            n_sampled += 1
            ids.append(nxt)
            text = tokenizer.decode(ids[start:])
            stopped = nxt == tokenizer.eos_token_id or any(s in text for s in sampler.STOP_STRINGS)
            if stopped or len(ids) - start >= max_turn_tokens:
                break
        msgs.append({"role": "assistant", "content": tokenizer.decode(ids[start:], skip_special_tokens=True)})
        step = tool_env.env_step(msgs, tools, truncated=not stopped)
        if step.done:
            return ids
        msgs.append(step.message)
        glue = sampler.chat_glue(tokenizer, step.message)
        ids += glue[1:] if nxt == tokenizer.eos_token_id and glue[:1] == [tokenizer.eos_token_id] else glue


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_greedy_sampler_equals_plain_sampler(tiny, tokenizer, tools, dtype):
    """The batched sampler (shared prefill, padding, holes, growing cache, compaction)
    gives the same tokens as a plain full-recompute sampler, one episode at a time.
    In bf16 too: the rounding differs between the two, but measured on this model no
    argmax is close enough to a tie to flip (all 4 episodes identical)."""
    model = in_dtype(tiny[0], dtype)
    queries = ["capital of Egypt", "highest point Egypt", "Egypt", None]
    # scripts end 3 tokens early, then greedy decoding takes over; one episode is all greedy
    force = [scripted(tokenizer, q)[:-3] if q else [] for q in queries]
    greedy = sampler.RolloutConfig(max_turn_tokens=48).greedy()
    batched = sampler.sample_episodes(model, tokenizer, Q, tools, 2, greedy, force=force)
    assert any(e.num_turns == 2 for e in batched)
    for i, ep in enumerate(batched):
        assert ep.token_ids == plain_greedy_episode(model, tokenizer, Q[i // 2], tools, 48, force[i])


# ------------------------------------------------------------------ train.py

def train_args(tiny_path, out, steps, extra=()):
    return ["--model", tiny_path, "--steps", str(steps), "--questions-per-step", "2", "--group-size", "2",
            "--max-turn-tokens", "12", "--output-dir", str(out), "--save-every", "1", "--lr", "1e-3",
            "--device", "cpu", "--eval-every", "2", "--eval-questions", "2", *extra]


def read_log(out):
    with open(os.path.join(out, "log.jsonl")) as f:
        return [json.loads(l) for l in f]


def fake_scores(episodes):
    """A deterministic reward that depends on the sampled tokens, so that a random
    tiny model gets non-zero advantages and really updates (rewards.py is tested
    on its own)."""
    for i, e in enumerate(episodes):
        sampled = [t for t, m in zip(e.token_ids, e.loss_mask) if m]
        e.turn_reward = float(sampled[0] % 2)
        e.outcome_reward = i % 2 + 0.1 * (sum(sampled) % 3)  # i % 2: never a zero-variance group of 2
        e.components = {"tool_execution": 0.0, "search_has_answer": 0.0, "exact_match": 0.0,
                        "contains_answer": 0.0, "format": 0.0, "xml": 0.0}


def test_spread_covers_the_split():
    assert train.spread(10, 4) == [0, 2, 5, 7]
    assert train.spread(3, 5) == [0, 1, 2]
    assert train.spread(6, 6) == [0, 1, 2, 3, 4, 5]


def test_checkpoint_then_resume_equals_uninterrupted(tiny, tmp_path, monkeypatch, capsys):
    _, path = tiny
    monkeypatch.setattr(sampler, "score_episodes", fake_scores)
    assert train.main(train_args(path, tmp_path / "full", 3)) == 0
    out = capsys.readouterr().out  # the run ends with the held-out table: before (step 0) and after (step 3)
    assert "before and after training" in out and "step 0 " in out and "step 3 " in out
    assert train.main(train_args(path, tmp_path / "cut", 2)) == 0
    # "crash" after step 2, in the worst places: between save_checkpoint's two renames
    # (only checkpoint.old and a half checkpoint.tmp left) and while writing a log line
    cut_dir = tmp_path / "cut"
    os.replace(cut_dir / "checkpoint", cut_dir / "checkpoint.old")
    (cut_dir / "checkpoint.tmp").mkdir()
    with open(cut_dir / "log.jsonl", "a") as f:
        f.write('{"step": 3, "tool_execu')
    # a changed setting is refused, naming it (the old optimizer state would keep the old lr)
    with pytest.raises(SystemExit, match=r"--lr 0.001 -> 0.01"):
        train.main(train_args(path, cut_dir, 3, ["--resume", "--lr", "1e-2"]))
    # resume to step 3 (--steps may change)
    assert train.main(train_args(path, tmp_path / "cut", 3, ["--resume"])) == 0
    assert not (cut_dir / "checkpoint.old").exists() and not (cut_dir / "checkpoint.tmp").exists()
    full, cut = read_log(tmp_path / "full"), read_log(tmp_path / "cut")
    # step 0: the evaluation before training, logged once (not again on --resume)
    assert [r["step"] for r in cut] == [0, 1, 2, 3]
    assert full[0] == {**cut[0], "time_eval": full[0]["time_eval"]} and "loss" not in full[0]
    # evaluations: before training, every 2 steps, and at the last step (3) whatever --eval-every says
    assert sorted(os.listdir(tmp_path / "cut" / "evals")) == [
        "step0000.json", "step0000.trajectories.jsonl", "step0002.json", "step0002.trajectories.jsonl",
        "step0003.json", "step0003.trajectories.jsonl"]
    full, cut = full[1:], cut[1:]
    assert all(r["trained_episodes"] > 0 and r["grad_norm"] > 0 for r in full)  # real updates happened
    for key in ("loss", "R_O", "sampled_tokens", "entropy", "grad_norm", "clip_frac"):
        assert cut[2][key] == full[2][key], key
    assert cut[1]["loss"] == full[1]["loss"]
    # greedy evaluation every 2 steps, logged on the same line
    assert "eval_exact_match" in full[1] and "eval_exact_match" not in full[0]
    assert 0.0 <= full[1]["eval_tool_call_rate"] <= 1.0
    # the checkpoint loads with plain transformers
    from transformers import AutoModelForCausalLM

    AutoModelForCausalLM.from_pretrained(tmp_path / "cut" / "checkpoint")
    # its model card: the held-out evaluations and a command that gives back the run's settings
    card = (cut_dir / "checkpoint" / "README.md").read_text()
    assert "for 3 of 3 steps" in card and "| 0 | " in card and "| 3 | " in card
    command = card.strip().splitlines()[-1].split()
    assert command[:2] == ["python", "train.py"]
    expected = {**vars(train.parse_args(train_args(path, cut_dir, 3))), "device": None}
    assert vars(train.parse_args(command[2:] + ["--output-dir", str(cut_dir)])) == expected
    # a finished run is not silently overwritten
    with pytest.raises(SystemExit, match="already has a run"):
        train.main(train_args(path, tmp_path / "cut", 3))


def test_a_run_killed_before_its_first_checkpoint_starts_over(tiny, tmp_path, monkeypatch, capsys):
    _, path = tiny
    monkeypatch.setattr(sampler, "score_episodes", fake_scores)
    out = tmp_path / "run"
    (out / "evals").mkdir(parents=True)  # what a kill during step 1 leaves: the step-0 evaluation, no checkpoint
    (out / "log.jsonl").write_text('{"step": 0, "eval_exact_match": 0.5}\n')
    (out / "evals" / "step0000.json").write_text("{}")
    for extra in ([], ["--resume"]):  # a plain rerun and --resume both start over
        assert train.main(train_args(path, out, 1, extra)) == 0
        assert "starting over" in capsys.readouterr().out
        assert [r["step"] for r in read_log(out)] == [0, 1] and read_log(out)[0]["eval_exact_match"] != 0.5
        shutil.rmtree(out / "checkpoint")  # back to "no checkpoint" for the next round
    # --log tensorboard: the same scalars to OUTPUT_DIR/tb, or one clear line without the package
    try:
        import tensorboard  # noqa: F401
    except ImportError:
        with pytest.raises(SystemExit, match="pip install tensorboard"):
            train.main(train_args(path, tmp_path / "tb", 1, ["--log", "tensorboard"]))
    else:
        assert train.main(train_args(path, tmp_path / "tb", 1, ["--log", "tensorboard"])) == 0
        assert any(n.startswith("events.out.tfevents") for n in os.listdir(tmp_path / "tb" / "tb"))


def test_bf16_master_weights_keep_updates_that_bf16_rounds_away(tiny):
    """One AdamW step at lr 1e-6 (Adam's first step moves every weight by ~lr): updating
    bf16 weights directly loses nearly all of it (bf16 spacing near 0.02 is 1.2e-4); the
    float32 master weights keep all of it, and the bf16 model is their rounding."""
    import copy

    ids = torch.randint(0, 1000, (2, 16), generator=torch.Generator().manual_seed(0))

    def step(model, params):
        model(input_ids=ids, labels=ids).loss.backward()
        if master is not None:
            master.collect_grads()
        torch.optim.AdamW(params, lr=1e-6).step()

    master = None
    old = in_dtype(tiny[0], torch.bfloat16)
    before = [p.detach().clone() for p in old.parameters()]
    step(old, list(old.parameters()))
    changed_old = sum(int((p != b).sum()) for p, b in zip(old.parameters(), before)) / sum(b.numel() for b in before)

    model = copy.deepcopy(tiny[0])
    master = precision.MasterWeights(model, "bf16")
    assert all(p.dtype == torch.bfloat16 for p in model.parameters()) and all(m.dtype == torch.float32 for m in master.params)
    before = [m.detach().clone() for m in master.params]
    step(model, master.params)
    assert all(p.grad is None for p in model.parameters()) and all(m.grad.dtype == torch.float32 for m in master.params)
    master.push()
    delta = torch.cat([(m.detach() - b).flatten() for m, b in zip(master.params, before)]).abs()
    assert changed_old < 0.05
    assert float((delta > 0).float().mean()) > 0.95 and float(delta.max()) < 1.1e-6  # float32 spacing at 1.0 (norm weights): 1.2e-7
    for p, m in zip(model.parameters(), master.params):
        assert torch.equal(p, m.to(torch.bfloat16))
    sd = master.state_dict()
    assert all(t.dtype == torch.float32 for t in sd.values())
    assert sd["lm_head.weight"].data_ptr() == sd["model.embed_tokens.weight"].data_ptr()  # tied weights stay tied


def test_bf16_training_checkpoints_float32_master_weights(tiny, tmp_path, monkeypatch):
    _, path = tiny
    monkeypatch.setattr(sampler, "score_episodes", fake_scores)
    out = tmp_path / "bf16"
    assert train.main(train_args(path, out, 2, ["--precision", "bf16", "--lr", "1e-6", "--eval-every", "0"])) == 0
    assert json.loads((out / "config.json").read_text())["resolved_precision"] == "bf16"
    from transformers import AutoModelForCausalLM

    init = AutoModelForCausalLM.from_pretrained(path).state_dict()
    saved = AutoModelForCausalLM.from_pretrained(out / "checkpoint").state_dict()  # the config says float32
    w, w0 = saved["model.layers.0.mlp.up_proj.weight"], init["model.layers.0.mlp.up_proj.weight"]
    assert w.dtype == torch.float32
    assert float((w != w0).float().mean()) > 0.9  # nearly every weight moved at lr 1e-6 ...
    # ... by about lr per optimizer step: 2 steps x mu 2 = 4 Adam steps of at most ~lr
    # each (a bound, not an equality: |m_hat / sqrt(v_hat)| can exceed 1 a little)
    assert float((w - w0).abs().max()) < 4 * 1e-6 * 1.1
    assert float((w.to(torch.bfloat16).float() != w).float().mean()) > 0.9  # not a bf16 model's weights
    # resume continues from the float32 master weights
    assert train.main(train_args(path, out, 3, ["--precision", "bf16", "--lr", "1e-6", "--eval-every", "0", "--resume"])) == 0
    assert [r["step"] for r in read_log(out)] == [1, 2, 3]


def test_precision_auto_follows_the_hardware_check(monkeypatch):
    assert precision.resolve("fp32", "cuda") == "fp32" and precision.resolve("bf16", "cpu") == "bf16"
    for amx, avx512bf16, want in ((True, False, "bf16"), (False, True, "bf16"), (False, False, "fp32")):
        monkeypatch.setattr(torch.cpu, "_is_amx_tile_supported", lambda: amx, raising=False)
        monkeypatch.setattr(torch.cpu, "_is_avx512_bf16_supported", lambda: avx512bf16, raising=False)
        assert precision.resolve("auto", "cpu") == want
    with pytest.raises(ValueError, match="unknown precision"):
        precision.resolve("fp16", "cpu")


def test_fewshot_is_on_by_default_for_the_embedded_model_only():
    assert train.parse_args([]).fewshot is True
    assert train.parse_args(["--no-fewshot"]).fewshot is False  # the paper's prompt, one flag away
    assert train.parse_args(["--model", "Qwen/Qwen2.5-7B"]).fewshot is False
    assert train.parse_args(["--model", "Qwen/Qwen2.5-7B", "--fewshot"]).fewshot is True


def test_train_cli_rejects_bad_flags(tmp_path, capsys):
    with pytest.raises(SystemExit):
        train.parse_args(["--group-size", "1"])
    assert "--group-size must be at least 2" in capsys.readouterr().err
    # --resume where nothing was saved yet starts the run (a driver can always pass --resume)
    assert checkpoint.prepare_output_dir(train.parse_args(["--resume", "--output-dir", str(tmp_path / "none")])) is None


def test_questions_for_step_is_a_seeded_permutation():
    seen = [i for s in range(5) for i in train.questions_for_step(10, s, 2, seed=7)]
    assert sorted(seen) == list(range(10))  # one epoch covers every question once
    assert train.questions_for_step(10, 3, 2, 7) == train.questions_for_step(10, 3, 2, 7)
    assert train.questions_for_step(10, 0, 2, 7) != train.questions_for_step(10, 0, 2, 8)


# ------------------------------------------------------------------ the real embedded model

def test_real_model_logprob_consistency(tokenizer, tools):
    model, _ = mtgrpo.load_model("smollm2-135m", "cpu")
    eps = run_scripted(model, tokenizer, tools, ["capital of Egypt", "Egypt", "highest point Egypt", None])
    assert eps[0].num_turns == 2
    check_consistency(model, tokenizer, eps)


def test_real_model_end_to_end_one_step(tmp_path):
    out = tmp_path / "run"
    args = ["--steps", "1", "--group-size", "2", "--questions-per-step", "2", "--max-turn-tokens", "32",
            "--output-dir", str(out), "--device", "cpu", "--fewshot", "--eval-every", "0"]
    assert train.main(args) == 0
    (rec,) = read_log(out)
    for key in ("R_T", "R_O", "exact_match", "format", "tool_call_rate", "tool_success", "clip_frac", "kl",
                "adv_turn1", "time_sample", "time_update", "loss", "sampled_tokens"):
        assert key in rec and math.isfinite(rec[key]), key
    # entropy is measured on the episodes that were trained (those with a non-zero advantage)
    assert (rec["entropy"] is None) == (rec["trained_episodes"] == 0)
    # sampler vs trainer log-probs of the trained tokens: float32 agrees within 1e-4 (a bf16
    # run, where the hardware makes it the default, within the measured 0.28 and some margin)
    if rec["trained_episodes"]:
        prec = json.loads((out / "config.json").read_text())["resolved_precision"]
        assert rec["logp_diff_max"] < {"fp32": 1e-3, "bf16": 1.0}[prec]
    else:
        assert rec["logp_diff_max"] is None
    assert os.path.exists(out / "checkpoint" / "model.safetensors")


def test_logprobs_on_selected_positions_equal_full_forward(tiny, tokenizer):
    model, _ = tiny
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 1000, (3, 10), generator=g)
    attn = torch.ones(3, 10, dtype=torch.long)
    attn[1, 7:] = 0  # right padding
    pos = torch.zeros(3, 10, dtype=torch.bool)
    pos[0, 4:] = pos[1, 3:7] = pos[2, 9] = True
    assert mtgrpo._head_on_positions_ok(model)  # a Llama: the head can run on selected positions
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / 0.7, -1)
        full = full.gather(2, ids[:, 1:, None]).squeeze(2)
        lp, ent = mtgrpo.token_logprobs(model, ids, attn, 0.7, True, pos)
        torch.testing.assert_close(lp[:, 1:][pos[:, 1:]], full[pos[:, 1:]], atol=1e-5, rtol=1e-5)
        assert torch.all(lp[~pos] == 0) and torch.all(ent[~pos] == 0) and torch.all(ent[pos] > 0)
        model._mtgrpo_head_ok = False  # the fallback (full logits, then select) gives the same
        try:
            lp2, _ = mtgrpo.token_logprobs(model, ids, attn, 0.7, False, pos)
        finally:
            model._mtgrpo_head_ok = True
    torch.testing.assert_close(lp2, lp, atol=1e-5, rtol=1e-5)


def test_top_k_sampling_stays_in_the_top_k():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, -1.0]] * 200)
    tokens = sampler._sample(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {1, 3}
    # p(1) / p(3) = e^(5 - 4); observed share of token 1 near e / (1 + e) = 0.73
    assert 0.6 < (tokens == 1).float().mean() < 0.85
    assert sampler._sample(logits[:1], 0.0, 2, None).tolist() == [1]  # greedy


# ------------------------------------------------------------------ evaluate.py

def test_evaluate_metrics_and_show_rendering(tiny, tokenizer, tools, tmp_path):
    import evaluate

    model, _ = tiny
    metrics, eps = evaluate.evaluate(model, tokenizer, Q, tools, sampler.RolloutConfig(max_turn_tokens=8, fewshot=False))
    assert metrics["episodes"] == 2 and set(evaluate.METRICS) <= set(metrics)
    assert all(0.0 <= metrics[k] <= 1.0 for k in evaluate.METRICS)
    # a scripted two-turn rollout, rendered with its mt-grpo advantages
    eps = run_scripted(model, tokenizer, tools, ["capital of Egypt", None, "Egypt", None])
    sampler.score_episodes(eps)
    advs = mtgrpo.episode_advantages(eps, 2, "mt-grpo")
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
