"""Tests of sampler.py: multi-turn sampling, the loss and turn masks, token-in/token-out,
the sampler's log-probs against the training pass's (tiny model in float32 and bf16,
and the real embedded model), greedy sampling against a plain sampler, and top-k."""

import pytest
import torch

import logprobs
import models
import sampler
import tool_env
from conftest import Q, in_dtype, on, run_scripted, scripted


def check_consistency(model, tokenizer, episodes, tol=1e-4):
    b = logprobs.collate(episodes, [torch.zeros(len(e.token_ids)) for e in episodes], tokenizer.pad_token_id,
                       next(model.parameters()).device)
    with torch.no_grad():
        logp, _ = logprobs.token_logprobs(model, b.input_ids, b.attention_mask, 1.0)
    m = b.loss_mask.bool()
    assert m.sum() > 0
    diff = (logp[m] - b.sample_logp[m]).abs().max()
    assert diff < tol, float(diff)


# ------------------------------------------------------------------ masks, token-in/token-out


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
    b = logprobs.collate(eps, [torch.zeros(len(x.token_ids)) for x in eps], tokenizer.pad_token_id)
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


def test_forced_answer_is_environment_text_at_the_start_of_the_last_turn(tiny, tokenizer, tools):
    """force_answer: after the last allowed result the environment writes "<answer>" (turn 0,
    never trained on); the model's tokens follow it, and the message, which the rewards read,
    holds both, so the answer scores. The log-probs of the tokens after it still match the
    training pass's, which sees the same ids."""
    model, _ = tiny
    call = '<reasoning>look it up</reasoning><tool>{"name": "wiki_search", "args": {"query": "capital of Egypt"}}</tool>'
    script = tokenizer.encode(call, add_special_tokens=False) + tokenizer.encode("Cairo</answer>", add_special_tokens=False)
    env = tool_env.ToolEnv(tools, max_tool_calls=1, force_answer=True)
    cfg = sampler.RolloutConfig(max_turn_tokens=48, temperature=1.0, top_k=0)
    gen = torch.Generator().manual_seed(0)
    e = sampler.sample_episodes(model, tokenizer, Q[:1], env, 2, cfg, generator=gen, force=[script, script])[0]
    assert e.end_reason == "answer" and e.num_turns == 2
    assert e.messages[-1] == {"role": "assistant", "content": "<answer>Cairo</answer>"}
    assert tool_env.final_answer(e.messages) == "Cairo"
    prefill = tokenizer.encode(tool_env.ANSWER_PREFILL, add_special_tokens=False)
    first2 = e.token_turns.index(2)
    assert e.token_ids[first2 - len(prefill) : first2] == prefill
    assert e.loss_mask[first2 - len(prefill) : first2] == [0] * len(prefill)
    assert tokenizer.decode(e.token_ids[: first2 - len(prefill)]).endswith("<|im_start|>assistant\n")
    assert [t for t, m in zip(e.token_ids, e.loss_mask) if m] == script  # the model's own tokens, no more
    check_consistency(model, tokenizer, [e])
    # without the rule the same script's second turn is no answer
    plain = sampler.sample_episodes(model, tokenizer, Q[:1], tool_env.ToolEnv(tools), 2, cfg, generator=gen,
                                    force=[script, script])[0]
    assert plain.messages[-1]["content"].startswith("Cairo") and tool_env.final_answer(plain.messages) is None


# ------------------------------------------------------------------ log-prob consistency, greedy equivalence


# bf16: the sampler (KV cache, one token at a time) and the training pass (whole
# sequences) round differently. Measured on this tiny model over 3 seeds, scripted and
# free rollouts: max |dlogp| 4.9e-4 (mean 6e-6); the tolerance is 4x that. (On the
# embedded model the gap is larger, mean 0.024, max 0.28, which is why train.update
# takes old_logp from the training pass and corrects the sampler with TIS.)
TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-3}


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_logprob_consistency_tiny_model(tiny, tokenizer, tools, dtype, device):
    model = on(in_dtype(tiny[0], dtype), device)
    eps = run_scripted(model, tokenizer, tools, ["capital of Egypt", "highest point Egypt", "Egypt", None])
    check_consistency(model, tokenizer, eps, TOL[dtype])
    # free sampling too, with the fewshot prompt (long prompt) and the turn budget
    cfg = sampler.RolloutConfig(max_turn_tokens=20, temperature=1.0, top_k=50)
    free = sampler.sample_episodes(model, tokenizer, Q, tool_env.ToolEnv(tools, tool_env.FEWSHOT), 3, cfg, generator=torch.Generator(device=device).manual_seed(3))
    assert {e.end_reason for e in free} <= {"budget", "no_action", "answer", "tool", "tool_limit"}
    check_consistency(model, tokenizer, free, TOL[dtype])


def plain_greedy_episode(model, tokenizer, row, tools, max_turn_tokens, force=()):
    """The obviously-correct sampler: one episode, no cache, no padding; every token
    is the argmax of a full forward pass over the whole sequence so far."""
    msgs = tool_env.ToolEnv(tools).initial_messages(row)
    ids = sampler.prompt_ids(tokenizer, msgs)
    force, n_sampled = list(force), 0
    device = next(model.parameters()).device
    while True:
        start = len(ids)
        while True:
            with torch.no_grad():
                nxt = int(model(input_ids=torch.tensor([ids], device=device), logits_to_keep=1).logits[0, -1].argmax())
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
def test_greedy_sampler_equals_plain_sampler(tiny, tokenizer, tools, dtype, device):
    """The batched sampler (shared prefill, padding, holes, growing cache, compaction)
    gives the same tokens as a plain full-recompute sampler, one episode at a time.
    In bf16 too: the rounding differs between the two, but measured on this model no
    argmax is close enough to a tie to flip (all 4 episodes identical)."""
    model = on(in_dtype(tiny[0], dtype), device)
    queries = ["capital of Egypt", "highest point Egypt", "Egypt", None]
    # scripts end 3 tokens early, then greedy decoding takes over; one episode is all greedy
    force = [scripted(tokenizer, q)[:-3] if q else [] for q in queries]
    greedy = sampler.RolloutConfig(max_turn_tokens=48).greedy()
    batched = sampler.sample_episodes(model, tokenizer, Q, tool_env.ToolEnv(tools), 2, greedy, force=force)
    assert any(e.num_turns == 2 for e in batched)
    for i, ep in enumerate(batched):
        assert ep.token_ids == plain_greedy_episode(model, tokenizer, Q[i // 2], tools, 48, force[i])


def test_static_cache_decode_equals_the_growing_cache(tiny, tokenizer, tools, device, monkeypatch):
    """compile_decode (StaticDecodeBatch: a StaticCache, finished rows kept as holes, a
    full cache moved into a bigger one) samples the same tokens with the same log-probs
    as the default batch: greedy against the plain sampler, and free sampling with the
    same seed. torch.compile itself runs only on a CUDA device (gpu_check.py), where it
    is meant to pay; elsewhere the one-token steps run the same static-shape path eager."""
    import functools

    model = on(tiny[0], device)
    if not device.startswith("cuda"):
        monkeypatch.setattr(sampler, "compiled_forward", lambda m: m)
    calls = []
    moves = sampler.StaticDecodeBatch._move
    monkeypatch.setattr(sampler.StaticDecodeBatch, "_move", lambda self, size: calls.append(size) or moves(self, size))
    # 64 slots: less than a prompt, so the cache starts just big enough and moves as it fills
    monkeypatch.setattr(sampler, "StaticDecodeBatch", functools.partial(sampler.StaticDecodeBatch, capacity=64))
    queries = ["capital of Egypt", "highest point Egypt", "Egypt", None]
    force = [scripted(tokenizer, q)[:-3] if q else [] for q in queries]
    greedy = sampler.RolloutConfig(max_turn_tokens=48, compile_decode=True).greedy()
    static = sampler.sample_episodes(model, tokenizer, Q, tool_env.ToolEnv(tools), 2, greedy, force=force)
    assert any(e.num_turns == 2 for e in static) and len({len(e.token_ids) for e in static}) > 1  # holes
    for i, ep in enumerate(static):
        assert ep.token_ids == plain_greedy_episode(model, tokenizer, Q[i // 2], tools, 48, force[i])
    assert len(calls) >= 2 and calls == sorted(calls)  # started small, then grew
    env = tool_env.ToolEnv(tools, tool_env.FEWSHOT)
    runs = [sampler.sample_episodes(model, tokenizer, Q, env, 3, sampler.RolloutConfig(max_turn_tokens=20, temperature=1.0, compile_decode=c),
                                    generator=torch.Generator(device=device).manual_seed(5)) for c in (False, True)]
    assert [e.token_ids for e in runs[0]] == [e.token_ids for e in runs[1]]
    diff = max(abs(a - b) for x, y in zip(*runs) for a, b in zip(x.sample_logp, y.sample_logp))
    assert diff < 1e-5, diff


def test_one_token_steps_on_the_cpu_fold_the_query_heads_instead_of_enable_gqa(tiny, tokenizer, monkeypatch):
    """A decode step without holes: a 2D mask would be dropped by transformers, and SDPA
    called with enable_gqa, 8x slower on a bf16 CPU (sampler.DecodeBatch._mask). The 4D
    mask keeps it on the path that folds the query heads onto the key heads (tiny: 4
    query heads, 2 key heads), with the same result."""
    import transformers.integrations.sdpa_attention as sdpa

    model = tiny[0]
    calls, real = [], torch.nn.functional.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        calls.append((q.shape[1], q.shape[2], kw.get("enable_gqa", False)))
        return real(q, k, v, **kw)

    ids = torch.randint(100, 1000, (3, 9), generator=torch.Generator().manual_seed(0)).tolist()
    with torch.inference_mode():
        batch = sampler.DecodeBatch(model, 3, 0)
        batch.forward(ids)
        monkeypatch.setattr(sdpa.torch.nn.functional, "scaled_dot_product_attention", spy)
        step = batch.forward([[5], [6], [7]])
    assert calls == [(2, 2, False)] * model.config.num_hidden_layers  # 2 key heads x 2 folded queries
    batch.device = torch.device("cuda")  # named only: on CUDA the 2D mask stays (its masked path is the slow one)
    assert batch._mask(1) is batch.attn and batch._mask(3) is batch.attn
    monkeypatch.undo()
    with torch.inference_mode():  # the same logits as the whole sequences
        full = model(input_ids=torch.tensor([r + [t] for r, t in zip(ids, (5, 6, 7))])).logits[:, -1].float()
    assert torch.allclose(step, full, atol=1e-5)


def test_top_k_sampling_stays_in_the_top_k():
    logits = torch.tensor([[0.0, 5.0, 1.0, 4.0, -1.0]] * 200)
    tokens = sampler._sample(logits, 1.0, 2, torch.Generator().manual_seed(0))
    assert set(tokens.tolist()) == {1, 3}
    # p(1) / p(3) = e^(5 - 4); observed share of token 1 near e / (1 + e) = 0.73
    assert 0.6 < (tokens == 1).float().mean() < 0.85
    assert sampler._sample(logits[:1], 0.0, 2, None).tolist() == [1]  # greedy


# ------------------------------------------------------------------ the real embedded model


def test_shared_prefix_len():
    a, b = list(range(40)), list(range(30)) + [99] * 5
    assert sampler.shared_prefix_len([a, b]) == 30
    assert sampler.shared_prefix_len([a, a[:20]]) == 19  # one token at least left to each prompt
    assert sampler.shared_prefix_len([a]) == 0  # one prompt: nothing to share
    assert sampler.shared_prefix_len([a, [7] + a]) == 0 and sampler.shared_prefix_len([a[:10], a[:12]]) == 0  # too short


def test_real_model_logprob_consistency(tokenizer, tools, device):
    model, _ = models.load_model("smollm2-135m", device)
    eps = run_scripted(model, tokenizer, tools, ["capital of Egypt", "Egypt", "highest point Egypt", None])
    assert eps[0].num_turns == 2
    check_consistency(model, tokenizer, eps)


# ------------------------------------------------------------------ where a turn ends


def test_a_turn_ends_at_the_templates_end_of_turn_token_when_eos_differs(tiny, tokenizer, tools):
    """As for Qwen2.5-7B (base): EOS is <|endoftext|> (tokenizer and generation_config),
    but the chat template ends a turn with <|im_end|>. A model that closes its turn with
    <|im_end|> has ended the turn; the tokens after it are never sampled, and a turn
    that goes on to a tool result gets the template's glue without a second <|im_end|>."""
    import copy

    tok = copy.deepcopy(tokenizer)
    tok.eos_token = "<|endoftext|>"
    model = copy.deepcopy(tiny[0])
    model.generation_config.eos_token_id = model.config.eos_token_id = tok.eos_token_id
    im_end = tok.convert_tokens_to_ids("<|im_end|>")
    assert tok.eos_token_id != im_end
    turn = tok.encode("<reasoning>no tool needed</reasoning>", add_special_tokens=False) + [im_end]
    after = tok.encode(" and then some more text that goes on", add_special_tokens=False)
    cfg = sampler.RolloutConfig(max_turn_tokens=40, temperature=1.0, top_k=0)
    call = tok.encode("<tool>not json", add_special_tokens=False) + [im_end]  # an attempt: an Error result comes back
    answer = tok.encode("<answer>Cairo</answer>", add_special_tokens=False)
    eps = sampler.sample_episodes(model, tok, Q[:1], tool_env.ToolEnv(tools), 2, cfg, torch.Generator().manual_seed(0),
                                  force=[turn + after, call + answer])
    assert [t for t, m in zip(eps[0].token_ids, eps[0].loss_mask) if m] == turn
    assert eps[0].end_reason == "no_action" and eps[0].messages[-1]["content"] == "<reasoning>no tool needed</reasoning>"
    e = eps[1]
    assert e.end_reason == "answer" and [t for t, k in zip(e.token_ids, e.token_turns) if k == 2] == answer
    glue = sampler.chat_glue(tok, e.messages[-2])
    end1 = e.token_turns.index(2)  # turn 1, the glue, then turn 2
    assert e.token_ids[end1 - len(call) - len(glue) + 1 : end1] == call + glue[1:]  # one <|im_end|>: the model's
    assert sampler.turn_end_ids(model, tok) == {tok.eos_token_id, im_end}
    assert sampler.turn_end_ids(tiny[0], tokenizer) == {im_end}  # the embedded tokenizer: one token, as before


def test_per_call_success_counts_each_call_among_the_episodes_that_made_it():
    """Two-hop tool use by call: the rate of episodes that made call j, and the share of
    those whose call j ran (its result is no "Error:")."""
    def ep(*results):
        msgs = [{"role": "user", "content": tool_env.QUESTION_PREFIX + " q"}]
        for r in results:
            msgs += [{"role": "assistant", "content": "<tool>...</tool>"},
                     {"role": "user", "content": f"{tool_env.RESULT_OPEN}{r}{tool_env.RESULT_CLOSE}"}]
        return sampler.Episode({}, msgs)

    eps = [ep("a", "b"), ep("a", "Error: no such tool"), ep("Error: bad json"), ep()]
    got = sampler.per_call_success(eps, 2)
    # call 1: made by 3 of 4, ran in 2 of those 3; call 2: made by 2 of 4, ran in 1 of 2
    assert got == pytest.approx({"call1_rate": 0.75, "call1_success": 2 / 3, "call2_rate": 0.5, "call2_success": 0.5})
    assert sampler.per_call_success([ep()], 1) == {"call1_rate": 0.0, "call1_success": 0.0}
