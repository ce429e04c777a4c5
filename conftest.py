"""Fixtures shared by the test files: the embedded model's tokenizer, tiny random
models with that tokenizer (fast stand-ins for the real model), a small search corpus
and its tools, and a chat builder for crafted episodes."""

import pytest
import torch

import mtgrpo
import tool_env

CORPUS = [
    {"title": "Egypt - Government - Capital", "text": "name: Cairo; geographic coordinates: 30 03 N, 31 15 E"},
    {"title": "Egypt - Geography - Elevation", "text": "highest point: Mount Catherine 2,629 m; lowest point: Qattara Depression -133 m"},
    {"title": "Chad - Government - Capital", "text": "name: N'Djamena"},
    {"title": "Peru - People and Society - Major urban areas - population", "text": "11.2 million LIMA (capital)"},
]


def chat(*turns: str, question: str = "q") -> list[dict]:
    """An episode's messages: system, the question, then assistant and environment
    (user) messages alternately."""
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": f"{tool_env.QUESTION_PREFIX} {question}"}]
    return msgs + [{"role": "assistant" if i % 2 == 0 else "user", "content": t} for i, t in enumerate(turns)]


@pytest.fixture(scope="module")
def tools():
    return tool_env.make_tools(CORPUS)


@pytest.fixture(scope="module")
def tokenizer():
    return mtgrpo.load_model("smollm2-135m", "cpu")[1]


@pytest.fixture(scope="module")
def tiny(tokenizer, tmp_path_factory):
    """A tiny randomly initialized Llama with the real tokenizer, saved as a folder."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=4096,
                      tie_word_embeddings=True, bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    model = LlamaForCausalLM(cfg).eval()
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, str(path)


@pytest.fixture(scope="module")
def tiny_gpt2_dropout(tokenizer):
    """A tiny GPT-2 with dropout 0.1 everywhere: in train mode two forwards differ."""
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(vocab_size=len(tokenizer), n_embd=32, n_layer=2, n_head=4, n_positions=2048,
                     resid_pdrop=0.1, embd_pdrop=0.1, attn_pdrop=0.1,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    return GPT2LMHeadModel(cfg)
