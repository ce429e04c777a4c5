"""memory_plan.py: the meta-device parameter count against the real embedded model and a
hand count of Qwen2.5-1.5B, every term of the arithmetic against hand-computed numbers,
the activation formula against what autograd really keeps (a small Qwen2, bf16, through
logprobs.token_logprobs with a Prefix), and the KV-cache slots against the real sampler."""

import dataclasses

import pytest
import torch

import memory_plan as mp
import logprobs
import models
import precision
import sampler
from conftest import run_scripted

# ------------------------------------------------------------------ the model, on the meta device


def test_meta_count_equals_the_real_embedded_model():
    from transformers import AutoModelForCausalLM

    real = AutoModelForCausalLM.from_pretrained(models._embedded_path("smollm2-135m"))  # its weights; no tokenizer
    m = mp.shape_of(mp.load_config("smollm2-135m"), "smollm2-135m")
    assert m.params == sum(p.numel() for p in real.parameters())
    # tied weights once: the state dict lists the embedding twice (as the LM head too)
    assert m.params < sum(t.numel() for t in real.state_dict().values())
    assert m.root_params + m.layers * m.layer_params == m.params  # all its layers are alike
    assert (m.layers, m.hidden, m.kv_heads, m.head_dim) == (30, 576, 3, 64)


def test_qwen_1_5b_count_by_hand():
    """Qwen2.5-1.5B: tied embedding 151936 x 1536; per layer q (with bias), k and v (256
    wide, with bias), o, three MLP matrices, two norms; a final norm. 1.54B as published."""
    h, i, kv = 1536, 8960, 256
    layer = (h * h + h) + 2 * (h * kv + kv) + h * h + 3 * h * i + 2 * h
    m = mp.shape_of(mp.load_config("Qwen/Qwen2.5-1.5B-Instruct"))
    assert m.layer_params == layer and m.params == 151936 * h + 28 * layer + h == 1_543_714_304


# ------------------------------------------------------------------ the arithmetic, by hand

# 8 layers of 100 parameters and a root of 200; hidden 8, intermediate 16, 2 heads, 1 kv head of 4, vocab 50
TINY = mp.Shape("tiny", params=1000, layer_params=100, root_params=200, hidden=8, intermediate=16, layers=8,
                heads=2, kv_heads=1, head_dim=4, vocab=50)
# 2 processes, 2 questions each x G = 2: 4 rows; episodes 70 + 2 x 5 + 3 = 83 tokens;
# continuations 83 - 70 + 1 = 14 tokens, 2 in a micro-batch of 30; beta > 0: a reference
SET = mp.Settings(processes=2, group_size=2, questions_per_step=4, prompt_tokens=70, max_turn_tokens=5,
                  max_tool_calls=1, result_tokens=3, micro_batch_tokens=30, beta=0.1)


def test_every_term_by_hand_unsharded():
    assert mp.episode_tokens(SET) == 83 and mp.micro_batch(SET) == (2, 14)
    assert mp.allocated_slots(70, 83) == 140 and mp.allocated_slots(10, 23) == 64  # doubles from the prompt; 64 at least
    p = mp.plan(TINY, SET)
    assert p["state"] == {"bf16 weights": 2000, "float32 master weights": 4000, "float32 gradients": 4000,
                          "AdamW state (2 x float32)": 8000, "reference model (bf16)": 2000}
    assert p["sampling"] == {
        "KV cache while sampling": 4 * 140 * (8 * 2 * 1 * 4 * 2),  # rows x slots x layers x k,v x kv heads x dim x bf16
        "prefill working set (one layer)": 140 * (8 * 16 + 12 * 8 + 3 * 140),  # the 2 prompts of 70 > 4 results of 3
        "next-token logits": 4 * 50 * 14}
    # one layer: per token 20 h + 8 i + 4 heads + 2 kv_len = 160 + 128 + 8 + 168 = 464, and 4 h per attended position
    layer = 2 * (14 * 464 + 84 * 32)
    assert layer == 18368
    assert p["update"] == {
        "bf16 gradients of one backward": 2000,
        "activations: decoder layers": 8 * layer + 2 * 14 * 6 * 8 + layer,  # 8 layers, final norm, backward's layer
        # the prompt: 70 x (8 layers x (160 + 128 + 8 + 16 unrepeated k, v) + final norm 48) + fp32 leaves and grads
        "activations: the group's prompt (Prefix)": 70 * (8 * 312 + 48) + 8 * 70 * 2 * 4 * 8,
        "LM head on loss positions": 20 * (2 * 8 + 4 * 50) + 20 * 50 * 10,  # 2 rows x 10 sampled tokens
        "reference forward (no grad)": layer + 20 * 50 * 10,
        "all-reduce bucket (float32)": 4 * 32 * 2**20}
    assert p["peak_sampling"] == 20000 + 71680 + 90160 + 2800
    assert p["peak_update"] == 20000 + sum(p["update"].values())
    assert p["peak"] == max(p["peak_sampling"], p["peak_update"])


def test_every_term_by_hand_sharded_and_one_process():
    p = mp.plan(TINY, dataclasses.replace(SET, shard=True))
    gathered = 2 * (200 + 2 * 100)  # the root and two layers, bf16
    assert p["state"] == {"bf16 weights": 1000, "float32 master weights": 2000, "float32 gradients": 2000,
                          "AdamW state (2 x float32)": 4000, "reference model (bf16)": 1000 + gathered,
                          "gathered for compute: root + 2 layers (bf16)": gathered}
    assert p["update"]["bf16 gradients of one backward"] == 1000 + 2 * (200 + 100)
    assert "all-reduce bucket (float32)" not in p["update"]  # sharded: reduce-scatter per layer
    one = mp.plan(TINY, dataclasses.replace(SET, processes=1, shard=True, beta=0.0))  # one process: nothing to shard
    assert sum(one["state"].values()) == 2000 + 4000 + 4000 + 8000
    assert one["sampling"]["KV cache while sampling"] == 8 * 140 * 128  # all 4 questions x G = 2 here
    assert "reference forward (no grad)" not in one["update"] and "all-reduce bucket (float32)" not in one["update"]
    with pytest.raises(ValueError, match="multiple of the 3 processes"):
        mp.plan(TINY, dataclasses.replace(SET, processes=3))


def test_fits_leaves_ten_percent():
    assert mp.fits(72 * mp.GiB) == "yes" and mp.fits(75 * mp.GiB) == "tight" and mp.fits(81 * mp.GiB) == "no"


# ------------------------------------------------------------------ against the real code


def test_activation_formula_matches_what_autograd_keeps(device):
    """A small Qwen2 in bf16, the update's forward (logprobs.Prefix, then token_logprobs on
    a padded micro-batch, LM head on loss positions): the bytes of the tensors autograd
    saves for backward, excluding the weights, within 5% of saved_for_backward (measured
    on the CPU's SDPA kernel: 0.5% apart; on CUDA another kernel runs)."""
    from transformers import AutoModelForCausalLM, Qwen2Config

    torch.manual_seed(0)
    cfg = Qwen2Config(vocab_size=1000, hidden_size=128, intermediate_size=352, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    m = mp.shape_of(cfg)
    model = precision.cast_params(AutoModelForCausalLM.from_config(cfg).eval(), torch.bfloat16).to(device)
    # prompt 50; one turn of 39 sampled tokens: continuations of 40, 3 in a micro-batch of 120
    s = mp.Settings(prompt_tokens=50, max_turn_tokens=39, max_tool_calls=0, micro_batch_tokens=120)
    rows, cont = mp.micro_batch(s)
    assert (rows, cont) == (3, 40)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 1000, (rows, cont), generator=g)
    attn = torch.ones(rows, cont, dtype=torch.long)
    attn[0, -7:] = 0  # a shorter episode: the update's padding mask
    pos = torch.zeros(rows, cont, dtype=torch.bool)
    pos[:, 1:] = True  # every continuation token after the prompt's last is sampled
    ids, attn, pos = ids.to(device), attn.to(device), pos.to(device)
    logprobs._head_on_positions_ok(model)  # its check runs a forward of its own: not under the hooks
    weights = {p.untyped_storage().data_ptr() for p in model.parameters()}
    saved = {}

    def pack(t):
        if t.untyped_storage().data_ptr() not in weights:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()  # views of one storage once
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        prefix = logprobs.Prefix(model, torch.randint(0, 1000, (s.prompt_tokens,), generator=g).tolist(), device)
        logprobs.token_logprobs(model, ids, attn, 1.0, False, pos, prefix)
    want = sum(mp.saved_for_backward(m, s).values())
    assert sum(saved.values()) == pytest.approx(want, rel=0.05)


def test_kv_cache_slots_match_the_sampler(tiny, tokenizer, tools, monkeypatch):
    """The sampler's cache holds at most prompt + 2 turns + the result slots (the filled
    part, counted from the batch's attention mask), in a buffer that doubles from the prompt."""
    seen = []
    forward = sampler.DecodeBatch.forward

    def record(self, feeds):
        out = forward(self, feeds)
        seen.append((self.attn.shape[1], self.cache.layers[0]._k.shape[-2]))
        return out

    monkeypatch.setattr(sampler.DecodeBatch, "forward", record)
    eps = run_scripted(tiny[0], tokenizer, tools, ["capital of Egypt", "highest point Egypt", "Egypt", None])
    prompt = max(e.prompt_len for e in eps)
    result = max(e.token_turns.index(2) - (len(e.token_ids) - e.token_turns[::-1].index(1)) for e in eps if e.num_turns == 2)
    filled, capacity = seen[-1]
    s = mp.Settings(prompt_tokens=prompt, max_turn_tokens=48, max_tool_calls=1, result_tokens=result + 1)
    assert filled <= mp.episode_tokens(s)
    shared = sampler.shared_prefix_len([e.token_ids[: e.prompt_len] for e in eps[::2]])  # one per question
    assert shared > 0 and capacity == mp.allocated_slots(prompt, filled, shared) > filled


def test_the_commands_defaults_are_train_pys():
    """Settings() (the plan the gpu check compares with a default train.py run) has
    train.py's defaults, as the command line's flags do."""
    args = vars(mp.parse_args([]))
    assert mp.Settings(**{f.name: args[f.name] for f in dataclasses.fields(mp.Settings)}) == mp.Settings()
