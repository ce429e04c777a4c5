"""Tests of logprobs.py, the training forward pass: log-probs on selected positions
against a full forward, micro-batch accumulation, the plan of forward passes per prompt,
and the prompt forwarded once per group (Prefix), its gradient included."""

import contextlib
import math

import pytest
import torch

import logprobs
import mtgrpo
import sampler
from conftest import on, run_update, two_groups


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
    assert logprobs._head_on_positions_ok(model)  # a Llama: the head can run on selected positions
    with torch.no_grad():
        full = torch.log_softmax(model(input_ids=ids, attention_mask=attn).logits[:, :-1].float() / 0.7, -1)
        full = full.gather(2, ids[:, 1:, None]).squeeze(2)
        lp, ent = logprobs.token_logprobs(model, ids, attn, 0.7, True, pos)
        torch.testing.assert_close(lp[:, 1:][pos[:, 1:]], full[pos[:, 1:]], atol=1e-5, rtol=1e-5)
        assert torch.all(lp[~pos] == 0) and torch.all(ent[~pos] == 0) and torch.all(ent[pos] > 0)
        model._mtgrpo_head_ok = False  # the fallback (full logits, then select) gives the same
        try:
            lp2, _ = logprobs.token_logprobs(model, ids, attn, 0.7, False, pos)
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
        episodes.append(sampler.Episode({"question_id": "q"}, [], ids, mask, mask, [0.0] * n))
    advs = [torch.randn(len(e.token_ids), generator=g) for e in episodes]
    total = sum(sum(e.loss_mask) for e in episodes)

    def grads(groups):
        model.zero_grad()
        for grp in groups:
            b = logprobs.collate([episodes[i] for i in grp], [advs[i] for i in grp], tokenizer.pad_token_id, device)
            logp, _ = logprobs.token_logprobs(model, b.input_ids, b.attention_mask)
            loss, _ = mtgrpo.policy_loss(logp, logp.detach(), b.advantages, b.loss_mask, normalizer=total)
            loss.backward()
        return [p.grad.clone() for p in model.parameters()]

    one = grads([[0, 1, 2, 3]])
    many = grads(logprobs.micro_batches([len(e.token_ids) for e in episodes], max_tokens=20))
    for a, b in zip(one, many):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-4)
    # sorted by length 5, 7, 9, 12: 5 and 7 pad to 2 x 7 = 14 <= 20; 3 x 9 > 20; 2 x 12 > 20
    assert logprobs.micro_batches([5, 9, 12, 7], 20, pass_cost=64) == [[0, 3], [1], [2]]


def test_micro_batches_minimize_padding_plus_passes():
    # a group's continuations (the benchmark's, sorted): with one pass costing 64 tokens,
    # [15 15 28 34 36] [112 129] [167] costs 5 x 36 + 2 x 129 + 167 + 3 x 64 = 797, less than
    # filling 512-token batches ([5 shortest] [112 129 167]: 180 + 3 x 167 + 2 x 64 = 809)
    lengths = [129, 15, 167, 28, 15, 112, 36, 34]
    assert logprobs.micro_batches(lengths, 512, pass_cost=64) == [[1, 4, 3, 7, 6], [5, 0], [2]]
    assert logprobs.micro_batches(lengths, 512, pass_cost=0) == [[i] for i in (1, 4, 3, 7, 6, 5, 0, 2)]
    assert logprobs.micro_batches(lengths, 100, pass_cost=1000) == [[1, 4, 3], [7, 6], [5], [0], [2]]  # fewest passes: 3 x 28, 2 x 36 <= 100
    # against every split of the sorted lengths (brute force), random cases
    g = torch.Generator().manual_seed(0)
    for _ in range(30):
        lens = torch.randint(1, 60, (7,), generator=g).tolist()
        cap, cost = int(torch.randint(60, 200, (1,), generator=g)), int(torch.randint(0, 80, (1,), generator=g))
        L = sorted(lens)

        def total(groups):
            return sum(len(gr) * max(lens[i] for i in gr) + cost for gr in groups)

        best = min(sum((len(L[a:b]) * L[b - 1] + cost for a, b in zip((0,) + cuts, cuts + (7,))), 0)
                   for m in range(64) for cuts in [tuple(k + 1 for k in range(6) if m >> k & 1)]
                   if all((b - a) * L[b - 1] <= cap or b - a == 1 for a, b in zip((0,) + cuts, cuts + (7,))))
        groups = logprobs.micro_batches(lens, cap, pass_cost=cost)
        assert sorted(i for gr in groups for i in gr) == list(range(7)) and total(groups) == best


def test_plan_groups_rollouts_by_prompt():
    g = torch.Generator().manual_seed(0)
    eps, _ = two_groups(g)  # continuation lengths (from the last prompt token): 6, 9, 12 and 7, 10, 13
    plan = logprobs.plan_micro_batches(eps, [0, 1, 2, 3, 5], max_tokens=20)
    assert [len(p) for p, _ in plan] == [19, 24]  # each prompt minus its last token
    assert plan[0][0] == eps[0].token_ids[:19] and plan[1][0] == eps[3].token_ids[:24]
    # group 1: 6 and 9 pad to 2 x 9 = 18 <= 20, 12 alone; group 2 (episode 4 left out): 7, then 13
    assert [c for _, c in plan] == [[[0, 1], [2]], [[3], [5]]]
    assert logprobs.plan_micro_batches(eps, [0, 4], 100, shared_prefix=False) == [([], [[0, 4]])]


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
    scale = max(float(g.abs().max()) for g in g_full)  # unclipped: float32 rounding grows with the gradient
    for a, b in zip(g_full, g_shared):
        torch.testing.assert_close(b, a, atol=1e-6 * scale, rtol=1e-4)


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
        logp, _ = logprobs.token_logprobs(model, ids, torch.ones_like(ids), prefix=prefix)
        return -logp.sum()

    prefix = logprobs.Prefix(model, prompt, device)
    assert prefix.kv[0].dtype == torch.bfloat16 and all(leaf.dtype == torch.float32 for leaf in prefix.leaves)
    each = [torch.autograd.grad(loss(prefix, ids), prefix.leaves) for ids in chunks]  # one micro-batch's gradient each
    for ids in chunks:
        loss(prefix, ids).backward()
    for i, leaf in enumerate(prefix.leaves):
        assert leaf.grad.dtype == torch.float32
        torch.testing.assert_close(leaf.grad, each[0][i] + each[1][i] + each[2][i], atol=0, rtol=1e-6)
    prefix.backward()  # and on into the prompt's forward (bf16 weights' grads)
    assert model.get_input_embeddings().weight.grad is not None


def _prefix_pass(model, prompt, chunks, master=None):
    """One group's passes as train.update runs them: the prompt once (Prefix), each
    micro-batch's backward, then the prompt's. Returns the log-probs and the gradients."""
    prefix = logprobs.Prefix(model, prompt, next(model.parameters()).device)
    out = []
    for ids in chunks:
        logp, _ = logprobs.token_logprobs(model, ids, torch.ones_like(ids), prefix=prefix)
        (-logp.sum()).backward()
        out.append(logp.detach())
        if master is not None:
            master.collect_grads()
    prefix.backward()
    if master is not None:
        master.collect_grads()
    params = master.params if master is not None else list(model.parameters())
    return out, [p.grad.clone() for p in params]


def test_lean_backward_gives_the_same_log_probs_and_gradients(tiny, device):
    """lean_backward's sparse embedding gradient and copy-free GQA (the tiny Llama: tied
    embeddings, 4 query heads on 2 key/value heads): the same log-probs (bit-identical),
    the same gradients up to float32 summation order, dense at the end (AdamW needs
    dense ones), and the model and environment restored afterwards."""
    import copy
    import os

    model = copy.deepcopy(tiny[0]).to(device)
    emb = model.get_input_embeddings()
    g = torch.Generator().manual_seed(4)
    prompt = torch.randint(0, 1000, (30,), generator=g).tolist()
    chunks = [torch.randint(0, 1000, (2, 8), generator=g).to(device) for _ in range(2)]
    ref_lp, ref_g = _prefix_pass(model, prompt, chunks)
    model.zero_grad(set_to_none=True)
    with logprobs.lean_backward(model, device):
        assert emb.sparse  # tied: the embedding's own gradient is sparse ...
        lp, grads = _prefix_pass(model, prompt, chunks)
        model.zero_grad(set_to_none=True)
        ids = chunks[0][:, :4]
        model.base_model(input_ids=ids).last_hidden_state.sum().backward()
        assert emb.weight.grad.is_sparse  # ... where no LM head adds a dense one
        model.zero_grad(set_to_none=True)
    assert not emb.sparse and "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
    for a, b in zip(ref_lp, lp):
        assert torch.equal(a, b) if str(device) == "cpu" else torch.allclose(a, b, atol=1e-6)
    for a, b in zip(ref_g, grads):
        assert b.layout == torch.strided
        torch.testing.assert_close(b, a, atol=1e-6, rtol=1e-5)


def test_lean_backward_in_bf16_collects_a_sparse_first_gradient(tiny, device):
    """bf16 (precision.MasterWeights): the model's gradients move into the float32 master
    after every backward, so the prompt's backward, which reaches the embedding but not the
    LM head, leaves a sparse gradient; it is added into the master's dense float32 sum."""
    import copy

    import precision

    g = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, 1000, (30,), generator=g).tolist()
    chunks = [torch.randint(0, 1000, (2, 8), generator=g).to(device) for _ in range(2)]
    runs = []
    for lean in (False, True):
        model = copy.deepcopy(tiny[0]).to(device)
        master = precision.MasterWeights(model, "bf16")
        with logprobs.lean_backward(model, device) if lean else contextlib.nullcontext():
            runs.append(_prefix_pass(model, prompt, chunks, master)[1])
    for a, b in zip(*runs):  # bf16 backward passes, summed in another order: equal to bf16 rounding
        assert b.dtype == torch.float32 and b.layout == torch.strided
        assert float((b - a).abs().max()) <= 0.02 * float(a.abs().max())


def test_lean_backward_leaves_gqa_to_transformers_off_the_cpu(tiny):
    """On CUDA the masked GQA kernel is the slow one: lean_backward switches copy-free GQA
    on for the CPU only (the device is only named here, nothing runs on it); the sparse
    embedding gradient is used on every device."""
    import os

    model = tiny[0]
    with logprobs.lean_backward(model, "cuda"):
        assert "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ and model.get_input_embeddings().sparse
    with logprobs.lean_backward(model, "cpu"):
        assert os.environ["TRANSFORMERS_SDPA_FORCE_GQA"] == "1"
    assert not model.get_input_embeddings().sparse and "TRANSFORMERS_SDPA_FORCE_GQA" not in os.environ
