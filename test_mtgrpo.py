"""Tests of mtgrpo.py: turn-level advantages, the clipped loss (its normalizer, KL term
and TIS weights), the training forward pass (token_logprobs) and micro-batching with
the prompt shared by a group (plan_micro_batches, Prefix)."""

import math

import pytest
import torch

import mtgrpo
import sampler
from conftest import on, run_update, two_groups

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


def test_merged_fallback_changes_only_episodes_without_a_tool_result():
    """Groups of 2, where every norm is +-0.5 |d| / (|d| / sqrt 2 + eps). Row 0 never got
    a tool result (all its tokens are turn 1), row 1 did. R^O = [1, 0], R^T = [0, 0.5],
    so the merged R^O + R^T = [1, 0.5] ranks the rows as R^O does, while R^T ranks them
    the other way: without the fallback row 0's turn-1 advantage is norm(R^O) +
    norm(R^T) = s(1) - s(0.5), about 0; with it, norm(R^O + R^T) = +s(0.5)."""
    e = 1e-4
    s = lambda d: 0.5 * d / (d / math.sqrt(2) + e)  # noqa: E731
    r_o, r_t = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    turns = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 2]])
    off = mtgrpo.compute_advantages(r_t, r_o, turns, 2, "mt-grpo")
    on = mtgrpo.compute_advantages(r_t, r_o, turns, 2, "mt-grpo", merged_fallback=True)
    torch.testing.assert_close(off[0], torch.tensor([0.0, 1, 1, 1]) * (s(1) - s(0.5)))
    torch.testing.assert_close(on[0], torch.tensor([0.0, 1, 1, 1]) * s(0.5))
    # row 1 has a tool result: the same advantages either way
    torch.testing.assert_close(on[1], off[1])
    torch.testing.assert_close(off[1], torch.tensor([0.0, -s(1) + s(0.5), 0.0, -s(1)]))


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


# ------------------------------------------------------------------ the training pass


def test_logprobs_on_selected_positions_equal_full_forward(tiny, tokenizer, device):
    model = on(tiny[0], device)
    g = torch.Generator().manual_seed(5)
    ids = torch.randint(0, 1000, (3, 10), generator=g)
    attn = torch.ones(3, 10, dtype=torch.long)
    attn[1, 7:] = 0  # right padding
    pos = torch.zeros(3, 10, dtype=torch.bool)
    pos[0, 4:] = pos[1, 3:7] = pos[2, 9] = True
    ids, attn, pos = ids.to(device), attn.to(device), pos.to(device)
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


# ------------------------------------------------------------------ micro-batches and the shared prompt prefix


def test_micro_batch_accumulation_equals_one_batch(tiny, tokenizer, device):
    model = on(tiny[0], device)
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
            b = mtgrpo.collate([episodes[i] for i in grp], [advs[i] for i in grp], tokenizer.pad_token_id, device)
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


def test_plan_groups_rollouts_by_prompt():
    g = torch.Generator().manual_seed(0)
    eps, _ = two_groups(g)  # continuation lengths (from the last prompt token): 6, 9, 12 and 7, 10, 13
    plan = mtgrpo.plan_micro_batches(eps, [0, 1, 2, 3, 5], max_tokens=20)
    assert [len(p) for p, _ in plan] == [19, 24]  # each prompt minus its last token
    assert plan[0][0] == eps[0].token_ids[:19] and plan[1][0] == eps[3].token_ids[:24]
    # group 1: 6 and 9 pad to 2 x 9 = 18 <= 20, 12 alone; group 2 (episode 4 left out): 7, then 13
    assert [c for _, c in plan] == [[[0, 1], [2]], [[3], [5]]]
    assert mtgrpo.plan_micro_batches(eps, [0, 4], 100, shared_prefix=False) == [([], [[0, 4]])]


def test_shared_prefix_update_equals_full_sequences(tiny, tokenizer, device):
    """The prompt forwarded once per group (its keys and values reused, gradients
    through both) gives the loss and gradient of forwarding every episode whole, also
    when a group's continuations are split over micro-batches."""
    model = on(tiny[0], device)
    eps, advs = two_groups(torch.Generator().manual_seed(1))
    # no clipping: clipped to a norm of 0.1, a uniform scale error in either pass would go unseen
    flags = ["--mu", "1", "--tis-cap", "0", "--grad-clip", "1e9"]
    full, g_full = run_update(model, eps, advs, flags + ["--micro-batch-tokens", "1000"], tokenizer.pad_token_id, False)
    shared, g_shared = run_update(model, eps, advs, flags + ["--micro-batch-tokens", "20"], tokenizer.pad_token_id)
    assert full["micro_batches"] == 1 and shared["micro_batches"] == 4
    assert shared["loss"] == pytest.approx(full["loss"], rel=1e-5)
    assert shared["entropy"] == pytest.approx(full["entropy"], rel=1e-5)
    assert max(float(g.abs().max()) for g in g_full) > 1e-4  # a real gradient
    assert full["grad_norm"] > 0.1  # ... that clipping at the default 0.1 would have rescaled
    assert shared["grad_norm"] == pytest.approx(full["grad_norm"], rel=1e-5)
    for a, b in zip(g_full, g_shared):
        torch.testing.assert_close(b, a, atol=1e-8, rtol=1e-4)


def test_prefix_gradient_accumulates_in_float32_in_bf16(tiny, device):
    """In bf16 training the prompt's keys and values are bf16, but the leaves that collect
    their gradient over micro-batches are float32: the accumulated gradient is the
    float32 sum of each micro-batch's gradient (a bf16 leaf would round every partial sum)."""
    import copy

    import precision

    model = copy.deepcopy(tiny[0]).to(device)
    precision.MasterWeights(model, "bf16")
    g = torch.Generator().manual_seed(3)
    prompt = torch.randint(0, 1000, (30,), generator=g).tolist()
    chunks = [torch.randint(0, 1000, (2, 8), generator=g).to(device) for _ in range(3)]  # three micro-batches

    def loss(prefix, ids):
        logp, _ = mtgrpo.token_logprobs(model, ids, torch.ones_like(ids), prefix=prefix)
        return -logp.sum()

    prefix = mtgrpo.Prefix(model, prompt, device)
    assert prefix.kv[0].dtype == torch.bfloat16 and all(leaf.dtype == torch.float32 for leaf in prefix.leaves)
    each = [torch.autograd.grad(loss(prefix, ids), prefix.leaves) for ids in chunks]  # one micro-batch's gradient each
    for ids in chunks:
        loss(prefix, ids).backward()
    for i, leaf in enumerate(prefix.leaves):
        assert leaf.grad.dtype == torch.float32
        torch.testing.assert_close(leaf.grad, each[0][i] + each[1][i] + each[2][i], atol=0, rtol=1e-6)
    prefix.backward()  # and on into the prompt's forward (bf16 weights' grads)
    assert model.get_input_embeddings().weight.grad is not None
