"""Fixtures and helpers shared by the test files: the embedded model's tokenizer, tiny
random models with that tokenizer (fast stand-ins for the real model), a small search
corpus and its tools, a chat builder for crafted episodes, two questions (Q), scripted
rollouts, synthetic groups of episodes and a train.update with lr 0.

The device of the tests that can run on one: MTGRPO_TEST_DEVICE (default cpu, so
`make test` runs on the CPU; `make gpu-check` sets cuda). Those tests take the `device`
fixture and are marked `device` (`pytest -m device` runs them alone)."""

import copy
import os

import pytest
import torch

import dataclasses

import models
import precision
import rewards
import sampler
import tasks
import tool_env
import train

CORPUS = [
    {"title": "Egypt - Government - Capital", "text": "name: Cairo; geographic coordinates: 30 03 N, 31 15 E"},
    {"title": "Egypt - Geography - Elevation", "text": "highest point: Mount Catherine 2,629 m; lowest point: Qattara Depression -133 m"},
    {"title": "Chad - Government - Capital", "text": "name: N'Djamena"},
    {"title": "Peru - People and Society - Major urban areas - population", "text": "11.2 million LIMA (capital)"},
]

Q = [
    {"question_id": "q1", "question": "What is the capital of Egypt?", "answer": {"aliases": ["Cairo"]}},
    {"question_id": "q2", "question": "What is the highest point in Egypt?", "answer": {"aliases": ["Mount Catherine"]}},
]


def chat(*turns: str, question: str = "q") -> list[dict]:
    """An episode's messages: system, the question, then assistant and environment
    (user) messages alternately."""
    msgs = [{"role": "system", "content": "sys"}, {"role": "user", "content": f"{tool_env.QUESTION_PREFIX} {question}"}]
    return msgs + [{"role": "assistant" if i % 2 == 0 else "user", "content": t} for i, t in enumerate(turns)]


TEST_DEVICE = os.environ.get("MTGRPO_TEST_DEVICE", "cpu")


def pytest_configure(config):
    config.addinivalue_line("markers", "device: runs on MTGRPO_TEST_DEVICE (default cpu)")


def pytest_collection_modifyitems(items):
    for item in items:
        if "device" in getattr(item, "fixturenames", ()):
            item.add_marker(pytest.mark.device)


@pytest.fixture(scope="session")
def device() -> str:
    """MTGRPO_TEST_DEVICE; an error, not a skip, where it names a CUDA device that is
    missing: a GPU check must not pass by running nothing."""
    if TEST_DEVICE.startswith("cuda") and not torch.cuda.is_available():
        pytest.fail(f"MTGRPO_TEST_DEVICE={TEST_DEVICE} but torch sees no CUDA GPU")
    return TEST_DEVICE


def on(model, device):
    """The model itself on the CPU, a copy on another device (the fixtures' models are
    shared by a whole module and stay on the CPU)."""
    return model if str(device) == "cpu" else copy.deepcopy(model).to(device)


@pytest.fixture(scope="module")
def tools():
    return tool_env.make_tools(CORPUS)


@pytest.fixture(scope="module")
def env(tools):
    """The paper's environment over CORPUS: no demonstration, one tool call."""
    return tool_env.ToolEnv(tools)


@pytest.fixture(scope="module")
def tokenizer():
    return models.load_model("smollm2-135m", "cpu")[1]


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


# ------------------------------------------------------------------ scripted rollouts

def scripted(tokenizer, query):
    turn1 = f'<reasoning>look it up</reasoning><tool>{{"name": "wiki_search", "args": {{"query": "{query}"}}}}</tool>'
    turn2 = "<reasoning>found</reasoning><answer>Cairo</answer>"
    return tokenizer.encode(turn1, add_special_tokens=False) + tokenizer.encode(turn2, add_special_tokens=False)


def run_scripted(model, tokenizer, tools, queries, max_tool_calls=1, demo=None):
    force = [scripted(tokenizer, q) if q else tokenizer.encode("<answer>x</answer>", add_special_tokens=False) for q in queries]
    cfg = sampler.RolloutConfig(max_turn_tokens=48, temperature=1.0, top_k=0)
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(0)  # sampling needs one on its device
    env = tool_env.ToolEnv(tools, demo, max_tool_calls)
    return sampler.sample_episodes(model, tokenizer, Q, env, len(queries) // 2, cfg, generator=gen, force=force)


def in_dtype(model, dtype):
    return model if dtype == torch.float32 else copy.deepcopy(model).to(dtype)


# ------------------------------------------------------------------ synthetic groups, one update

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
            episodes.append(sampler.Episode({"question_id": f"q{q}", "question": "q"}, [], ids, mask, mask, [0.0] * len(ids)))
    advs = [torch.randn(len(e.token_ids), generator=generator) * torch.tensor(e.loss_mask, dtype=torch.float) for e in episodes]
    return episodes, advs


def run_update(model, episodes, advs, flags, pad_id, shared_prefix=True, ref_model=None):
    """train.update with lr 0 (the weights stay, the gradients are left on the params), at
    temperature 1 as the tests sample."""
    master = precision.MasterWeights(model, "fp32")
    opt = torch.optim.SGD(master.params, lr=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    args = vars(train.parse_args(["--temperature", "1", *flags]))
    out = train.update(model, master, opt, sched, episodes, advs, train.UpdateConfig.from_dict(args), pad_id, ref_model,
                       shared_prefix=shared_prefix)
    return out, [p.grad.clone() for p in master.params]


# ------------------------------------------------------------------ a reward a random tiny model earns


def _sampled(ep):
    return [t for t, m in zip(ep.token_ids, ep.loss_mask) if m]


# The paper's rubric plus a deterministic reward that depends on the sampled tokens, so that
# a random tiny model gets non-zero advantages and really updates (rewards.py is tested on
# its own). It is handed to train.main as a plug-in (tasks.Task), not monkeypatched in.
TEST_RUBRIC = rewards.Rubric(turn=rewards.PAPER_RUBRIC.turn, outcome=rewards.PAPER_RUBRIC.outcome + [
    rewards.Reward("token_sum", 1.0, lambda ep, row: (sum(_sampled(ep)) % 97) / 96)])


def task_for(argv) -> tasks.Task:
    """The task train.py's flags `argv` name, scored by TEST_RUBRIC."""
    return dataclasses.replace(tasks.build(vars(train.parse_args(argv))), rubric=TEST_RUBRIC)


def train_main(argv) -> int:
    """train.main(argv) with TEST_RUBRIC."""
    return train.main(argv, task=task_for(argv))
