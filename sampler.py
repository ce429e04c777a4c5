"""Multi-turn rollouts: B questions x G episodes sampled in one batch with a KV cache.

Read beside docs/paper.md §1 (the episode):

    Episode           one rollout: token ids, loss mask, turn index and sampling log-prob of each token
    RolloutConfig     how episodes are sampled (turn budget, temperature, top-k)
    sample_episodes   the sampler: prefill each prompt once, decode all rows together, let the
                      environment (tool_env.Environment: initial_messages, step) end each turn,
                      prefill tool results in batches

The rubric (rewards.Rubric) then scores each episode, with the row it keeps.

Token in, token out: the ids the model sampled are the ids we train on. The environment's
text (end-of-turn glue, the <result> message, the next assistant header) is tokenized
once and appended as ids; nothing the model sampled is ever decoded and re-tokenized.
Per-row sampler state lives in one small dataclass (Row); the batch's KV cache and masks
in another (DecodeBatch).
"""

from __future__ import annotations

import dataclasses
import functools
from dataclasses import dataclass, field

import torch

import mtgrpo
import rewards
import tool_env


@dataclass
class Episode:
    """One rollout of dataset row `row`. Lists are per token of `token_ids` (prompt included)."""

    row: dict  # the whole dataset row: the rubric's rewards read it
    messages: list[dict] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    loss_mask: list[int] = field(default_factory=list)  # 1 on tokens the model sampled in assistant turns
    token_turns: list[int] = field(default_factory=list)  # k on tokens sampled in the k-th assistant turn, 0 elsewhere
    sample_logp: list[float] = field(default_factory=list)  # log-prob of each sampled token at sampling time, 0 elsewhere
    end_reason: str = ""
    turn_rewards: list[float] = field(default_factory=list)  # R^T_j of each tool turn j
    outcome_reward: float = 0.0  # R^O
    components: dict = field(default_factory=dict)

    @property
    def question_id(self) -> str:
        return str(self.row.get("question_id", ""))

    @property
    def question(self) -> str:
        return self.row.get("question", "")

    @property
    def turn_reward(self) -> float:
        """R^T: the sum over the tool turns (one in the paper's episode)."""
        return sum(self.turn_rewards)

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


def turn_end_ids(model, tokenizer) -> frozenset[int]:
    """The token ids that end an assistant turn: the tokenizer's EOS, the model's
    generation_config.eos_token_id (an int or a list), and the chat template's end of
    turn, the special token that the template puts right after an assistant message's
    content (the first token of chat_glue). They are not always one token: Qwen2.5-7B
    (the base model) has EOS <|endoftext|>, and its ChatML template ends turns with
    <|im_end|>, which is what a model trained on that template writes at the end of a turn."""
    ids = {tokenizer.eos_token_id}
    eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids.update(eos if isinstance(eos, (list, tuple)) else [eos])
    glue = chat_glue(tokenizer, {"role": "user", "content": "x"})
    if glue:  # only a special token: a template that ends turns with plain text ("\n") must not stop at every newline
        added = tokenizer.added_tokens_decoder.get(glue[0])
        if glue[0] in tokenizer.all_special_ids or (added is not None and added.special):
            ids.add(glue[0])
    return frozenset(i for i in ids if i is not None)


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


@dataclass
class RolloutConfig:
    """How episodes are sampled: one object for training, evaluation, `--show` and the
    benchmark, written to a run's config.json by train.py and read back by evaluate.py.
    temperature 0 is greedy decoding (top_k is then unused). What the prompt holds and
    when an episode ends is the environment's (tool_env.ToolEnv)."""

    max_turn_tokens: int = 64  # sampled tokens per assistant turn (the paper: 512 for a 7B model)
    temperature: float = 0.9
    top_k: int = 50  # 0 = the whole vocabulary
    compile_decode: bool = False  # a static KV cache and a torch.compile'd step (StaticDecodeBatch): for GPUs

    @classmethod
    def from_dict(cls, d: dict) -> "RolloutConfig":
        """From argparse's namespace (vars(args)) or a run's config.json: the keys
        of the same names; the others are ignored."""
        return cls(**{f.name: d[f.name] for f in dataclasses.fields(cls) if f.name in d})

    def greedy(self) -> "RolloutConfig":
        return dataclasses.replace(self, temperature=0.0, top_k=0)


@dataclass
class Row:
    """One episode's sampler state while it is in the decode batch."""

    ep: Episode
    force: list[int]  # teacher-forced tokens (tests), taken instead of sampled ones
    feed: list[int] = field(default_factory=list)  # ids for the next forward
    n_sampled: int = 0
    turn: int = 1  # the assistant turn being sampled, 1-based
    turn_start: int = 0  # index in ep.token_ids of this turn's first sampled token
    prefill: str = ""  # the environment's start of this turn (EnvStep.prefill), before turn_start
    parked: bool = False  # its tool result waits to be prefilled (see step 4)


class DecodeBatch:
    """The KV cache and masks of the batch rows being decoded. Rows are fed their new
    tokens left-padded to a common width; the padding gets attention 0 and no position,
    so the cache may hold holes but every real token sees exactly its own history."""

    def __init__(self, model, n_rows: int, pad: int):
        self.model, self.pad = model, pad
        self.device = next(model.parameters()).device
        self.cache = _growing_cache()
        self.attn = torch.zeros(n_rows, 0, dtype=torch.long, device=self.device)  # over cache slots
        self.n_real = torch.zeros(n_rows, dtype=torch.long, device=self.device)  # real tokens per row

    def forward(self, feeds: list[list[int]]) -> torch.Tensor:
        """Feed each row its new tokens; return the next-token logits (rows, V)."""
        ids, new_mask = self._left_padded(feeds)
        self.attn = torch.cat([self.attn, new_mask], dim=1)
        return self._run(self.model, ids, new_mask)

    def _run(self, fwd, ids: torch.Tensor, new_mask: torch.Tensor) -> torch.Tensor:
        """One forward by `fwd` of the fed ids, whose mask is already in self.attn: the
        next-token logits of every batch row."""
        # positions count real tokens only, so holes do not shift them
        pos = (self.n_real[:, None] + new_mask.cumsum(1) - 1).clamp(min=0)
        out = fwd(input_ids=ids, attention_mask=self._mask(ids.shape[1]), position_ids=pos,
                  past_key_values=self.cache, use_cache=True, logits_to_keep=1)  # only the last position's logits
        self.cache = out.past_key_values
        self.n_real = self.n_real + new_mask.sum(1)
        return out.logits[:, -1, :].float()

    def _mask(self, width: int) -> torch.Tensor:
        """The attention mask for a step `width` tokens wide. A one-token step on the CPU
        gets it in 4D (rows, 1, 1, slots), which transformers hands to SDPA as it is:
        given a 2D mask without holes, transformers drops it and calls SDPA with
        enable_gqa, whose CPU kernel for a single query was 8x slower in bf16 (5.8 ms
        against 0.7 ms per layer at 16 rows x 401 slots, AVX512-BF16; the same in
        float32) than the path a mask takes, the query heads folded onto the key heads
        (docs/performance.md, issue 23). On CUDA that path is the slow one: left as is."""
        if width == 1 and self.device.type == "cpu":
            return self.attn.bool()[:, None, None, :]
        return self.attn

    def repeat(self, n: int) -> None:
        """Each row becomes n consecutive rows (a prompt's cache copied to its G rollouts)."""
        self.cache.batch_repeat_interleave(n)
        self.attn, self.n_real = self.attn.repeat_interleave(n, 0), self.n_real.repeat_interleave(n, 0)

    def _left_padded(self, feeds: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
        """The feeds left-padded to one width, and their mask (1 on real tokens): built on
        the host and copied to the device once, not once per row."""
        width = max(len(f) for f in feeds)
        ids = torch.full((len(feeds), width), self.pad, dtype=torch.long)
        new_mask = torch.zeros(len(feeds), width, dtype=torch.long)
        for r, f in enumerate(feeds):
            if f:
                ids[r, width - len(f) :] = torch.tensor(f)
                new_mask[r, width - len(f) :] = 1
        return ids.to(self.device), new_mask.to(self.device)

    def start_decoding(self) -> None:
        """The prompts are prefilled: from here on each row is fed one token a step (and
        its tool results). Nothing to do here; StaticDecodeBatch fixes its shapes."""

    def keep(self, rows: list[int]) -> None:
        """Keep only these rows: finished episodes stop costing compute."""
        idx = torch.tensor(rows, dtype=torch.long, device=self.device)
        if rows:
            self.cache.batch_select_indices(idx)
        self.attn, self.n_real = self.attn[idx], self.n_real[idx]


def _extend(ep: Episode, ids: list[int], turn: int = 0, logp: float = 0.0) -> None:
    """Append ids to the episode: sampled (turn > 0, one id with its log-prob) or given
    by the environment (turn 0: not trained on)."""
    ep.token_ids += ids
    ep.loss_mask += [int(turn > 0)] * len(ids)
    ep.token_turns += [turn] * len(ids)
    ep.sample_logp += [logp] * len(ids)


def _end_turn(row: Row, tokenizer, env, stopped: bool, end_ids: frozenset[int]) -> bool:
    """The row's assistant turn is over: the environment (env.step) ends the episode or
    returns its next message (a tool's <result>), whose chat-template glue ids, and the
    ids of the environment's start of the next turn (step.prefill), are appended and fed
    later. Returns whether the episode goes on."""
    ep, last = row.ep, row.ep.token_ids[-1]
    text = tokenizer.decode(ep.token_ids[row.turn_start :], skip_special_tokens=True)
    ep.messages.append({"role": "assistant", "content": row.prefill + text})
    step = env.step(ep.messages, truncated=not stopped)
    if step.done:
        ep.end_reason = step.reason
        return False
    ep.messages.append(step.message)
    glue = chat_glue(tokenizer, step.message)
    if last in end_ids and glue[:1] == [last]:
        glue = glue[1:]  # the model already closed its turn with the template's own token
    glue += tokenizer.encode(step.prefill, add_special_tokens=False) if step.prefill else []
    _extend(ep, glue)  # environment tokens (turn 0): in the context, never trained on
    row.feed, row.parked = [last] + glue, True
    row.turn, row.turn_start, row.prefill = row.turn + 1, len(ep.token_ids), step.prefill
    return True


@functools.lru_cache(maxsize=8)
def _may_close_tag(tokenizer) -> frozenset[int]:
    """The ids whose text holds the last character of a stop string (">"): a turn's
    text can only come to contain "</tool>" or "</answer>" with such a token, so the
    sampler decodes a row's tail for those alone, not after every token of every row."""
    last = {s[-1] for s in STOP_STRINGS}
    texts = tokenizer.batch_decode([[i] for i in range(len(tokenizer))])
    return frozenset(i for i, t in enumerate(texts) if any(c in t for c in last))


def _record(row: Row, tok: int, logp: float, tokenizer, env, cfg: RolloutConfig, end_ids: frozenset[int]) -> bool:
    """Append one sampled token; end the turn at </tool>, </answer>, an end-of-turn token
    (`end_ids`: turn_end_ids) or the turn's token budget. Returns whether the episode goes on."""
    ep = row.ep
    row.n_sampled += 1
    _extend(ep, [tok], row.turn, logp)
    row.feed = [tok]
    stopped = tok in end_ids
    if not stopped and tok in _may_close_tag(tokenizer):  # only then can the tail newly hold a stop string
        tail = tokenizer.decode(ep.token_ids[max(row.turn_start, len(ep.token_ids) - 8) :])
        stopped = any(s in tail for s in STOP_STRINGS)
    if not stopped and len(ep.token_ids) - row.turn_start < cfg.max_turn_tokens:
        return True
    return _end_turn(row, tokenizer, env, stopped, end_ids)


def shared_prefix_len(prompts: list[list[int]], min_len: int = 16) -> int:
    """Tokens at the start of every prompt (one at least left to each), or 0 when
    there is one prompt or they share fewer than `min_len`. In a greedy evaluation each
    question is one rollout, and the few-shot system prompt is most of its prompt:
    prefilled once per batch instead of once per question, a greedy evaluation of 16
    validation questions took 48 s instead of 115 s (one thread of a 2-core AMD EPYC
    without bf16 units, float32; the same 16 trajectories)."""
    if len(prompts) < 2:
        return 0
    n, first = min(len(p) for p in prompts) - 1, prompts[0]
    common = next((i for i in range(n) if any(p[i] != first[i] for p in prompts)), n)
    return common if common >= min_len else 0


_COMPILED: list = [None, None]  # (model, its compiled forward): the last model sampled with compile_decode


def compiled_forward(model):
    """model.forward under torch.compile, compiled on first use and kept while the same
    model samples (one slot: a model no longer sampled is not kept alive). The weights
    are inputs of the compiled graph, so training them needs no recompile."""
    if _COMPILED[0] is not model:
        _COMPILED[:] = [model, torch.compile(model.forward, dynamic=False)]
    return _COMPILED[1]


class StaticDecodeBatch(DecodeBatch):
    """DecodeBatch with shapes that do not change, for torch.compile (RolloutConfig.
    compile_decode). The prompts are prefilled as in DecodeBatch; then start_decoding moves
    the cache into transformers' StaticCache, finished rows stay in the batch as holes
    (fed nothing, attention 0) instead of leaving it, and every one-token step runs the
    compiled forward (wider steps, the tool results, run eager). Every real token sees the
    same history as in DecodeBatch: only the kernels differ. It pays where per-step
    overhead dominates (a GPU: kernel launches); on a 2-core CPU it does not
    (docs/performance.md). A full cache moves into one twice its size."""

    def __init__(self, model, n_rows: int, pad: int, capacity: int = 1024):
        super().__init__(model, n_rows, pad)
        self.capacity = capacity  # cache slots: the longest episode's tokens (grown when short)
        self.slots = self.used = None  # once decoding: the batch row of each live row; the slots written

    def start_decoding(self) -> None:
        self.slots = list(range(self.attn.shape[0]))
        self._move(max(self.capacity, self.attn.shape[1] + 1))

    def _move(self, size: int) -> None:
        """The keys, values and mask so far into a StaticCache of `size` slots."""
        from transformers import StaticCache

        n = self.attn.shape[1] if self.used is None else self.used
        cache = StaticCache(config=self.model.config, max_cache_len=size)
        k0 = self.cache.layers[0].keys
        cache.early_initialization(k0.shape[0], k0.shape[1], k0.shape[-1], k0.dtype, self.device)
        for new, layer in zip(cache.layers, self.cache.layers):
            new.keys[:, :, :n], new.values[:, :, :n] = layer.keys[:, :, :n], layer.values[:, :, :n]
            new.cumulative_length.fill_(n)
        self.cache, self.attn = cache, torch.cat([self.attn[:, :n], self.attn.new_zeros(len(self.attn), size - n)], 1)
        self.used = n

    def forward(self, feeds: list[list[int]]) -> torch.Tensor:
        if self.slots is None:  # still prefilling
            return super().forward(feeds)
        rows = [[] for _ in range(len(self.attn))]  # the finished rows are fed nothing
        for slot, f in zip(self.slots, feeds):
            rows[slot] = f
        ids, new_mask = self._left_padded(rows)
        width = ids.shape[1]
        if self.used + width > self.attn.shape[1]:
            self._move(max(2 * self.attn.shape[1], self.used + width))
        self.attn[:, self.used : self.used + width] = new_mask  # in place: the compiled step's mask
        self.used += width
        return self._run(compiled_forward(self.model) if width == 1 else self.model, ids, new_mask)[self.slots]

    def keep(self, rows: list[int]) -> None:
        if self.slots is None:
            return super().keep(rows)
        self.slots = [self.slots[r] for r in rows]  # the others stay, as holes


@no_dropout
@torch.inference_mode()
def sample_episodes(model, tokenizer, rows: list[dict], env: tool_env.Environment, group_size: int, cfg: RolloutConfig,
                    generator: torch.Generator | None = None, force: list[list[int]] | None = None) -> list[Episode]:
    """Roll out `group_size` episodes for each dataset row in environment `env`
    (env.initial_messages(row), then env.step after every turn), all in one batch with
    one KV cache (DecodeBatch).

    Each step feeds every live row its newest tokens and samples one token per row.
    Each distinct prompt is prefilled once and its cache copied to its G rollouts;
    only the last position's logits are computed (the vocabulary projection of a whole
    prompt would dominate the cost). Finished episodes leave the batch and the cache.
    Log-probs are of the tempered, untruncated distribution (log_softmax(logits / T),
    T = 1 for greedy), as the training pass computes them.

    force: optional teacher forcing, one list of token ids per episode; episode i's
    first len(force[i]) sampled tokens are taken from it instead of sampled (their
    log-probs still come from the model). Used by tests and to replay trajectories.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    prompts, live = [], []
    for row in rows:
        msgs = env.initial_messages(row)
        prompts.append(prompt_ids(tokenizer, msgs))
        for _ in range(group_size):
            ep = Episode(row, [dict(m) for m in msgs])
            _extend(ep, prompts[-1])
            live.append(Row(ep, force=[], turn_start=len(ep.token_ids)))
    if force is not None:
        if len(force) != len(live):
            raise ValueError(f"force has {len(force)} scripts for {len(live)} episodes")
        for r, f in zip(live, force):
            r.force = list(f)
    episodes = [r.ep for r in live]
    end_ids = turn_end_ids(model, tokenizer)
    # 1. prefill what all prompts share (the system prompt and the demonstration) once,
    # then the rest of each distinct prompt, then copy each prompt's cache to its G rollouts
    shared = shared_prefix_len(prompts)
    batch = (StaticDecodeBatch if cfg.compile_decode else DecodeBatch)(model, 1 if shared else len(rows), pad)
    if shared:
        batch.forward([prompts[0][:shared]])
        batch.repeat(len(rows))
    logits = batch.forward([p[shared:] for p in prompts]).repeat_interleave(group_size, dim=0)
    batch.repeat(group_size)
    batch.start_decoding()
    logT = cfg.temperature if cfg.temperature > 0 else 1.0
    while live:
        # 2. sample one token per row (or take the forced one)
        tokens = _sample(logits, cfg.temperature, cfg.top_k, generator)
        for r, row in enumerate(live):
            if row.n_sampled < len(row.force):
                tokens[r] = row.force[row.n_sampled]
        logps = torch.log_softmax(logits / logT, dim=-1).gather(1, tokens[:, None]).squeeze(1)
        # 3. record it; at the end of a turn the environment ends the episode or answers.
        # A parked row was fed a hole: its logits mean nothing, it records nothing.
        toks, lps = tokens.tolist(), logps.tolist()  # one copy to the host per step, not two per row
        keep = [r for r, row in enumerate(live)
                if row.parked or _record(row, toks[r], lps[r], tokenizer, env, cfg, end_ids)]
        if len(keep) < len(live):
            batch.keep(keep)
            live = [live[r] for r in keep]
        if live:
            # 4. feed each live row its sampled token. A row whose tool result came back
            # is parked (fed nothing: a hole) until no row is still decoding; then all
            # parked rows prefill their results in one forward. Fed as soon as they
            # arrive, every result would widen that step for the whole batch: rows x
            # the result's length, where each other row needs one token.
            if all(row.parked for row in live):
                for row in live:
                    row.parked = False
            logits = batch.forward([[] if row.parked else row.feed for row in live])
    return episodes


def tool_use_rates(episodes: list[Episode]) -> tuple[float, float]:
    """(tool-call rate, tool-execution success): the fraction of episodes that got a
    tool result, and the mean fraction of successful calls among those episodes."""
    called = [e for e in episodes if tool_env.tool_results(e.messages)]
    success = sum(rewards.tool_execution_reward(e.messages) for e in called)
    return len(called) / len(episodes), success / max(len(called), 1)


def per_call_success(episodes: list[Episode], calls: int) -> dict[str, float]:
    """Tool use by call, for K-call tasks (the two-hop task's hops): for j = 1..calls,
    call{j}_rate, the fraction of episodes that made a j-th call (the environment answered
    it), and call{j}_success, the fraction of those whose j-th call ran (no "Error:")."""
    out = {}
    for j in range(1, calls + 1):
        made = [r[j - 1] for r in (tool_env.tool_results(e.messages) for e in episodes) if len(r) >= j]
        out[f"call{j}_rate"] = len(made) / len(episodes)
        out[f"call{j}_success"] = sum(not tool_env.is_error(t) for t in made) / max(len(made), 1)
    return out


def episode_advantages(episodes: list[Episode], group_size: int, method: str, **kwargs) -> list[torch.Tensor]:
    """mtgrpo.compute_advantages for scored episodes (in groups of `group_size`
    consecutive ones); one tensor per episode, aligned with its token_ids."""
    L = max(len(e.token_ids) for e in episodes)
    turns = torch.zeros(len(episodes), L, dtype=torch.long)
    for r, e in enumerate(episodes):
        turns[r, : len(e.token_turns)] = torch.tensor(e.token_turns)
    T = max(1, max(len(e.turn_rewards) for e in episodes))  # tool turns; 0 past an episode's own
    r_t = torch.tensor([e.turn_rewards + [0.0] * (T - len(e.turn_rewards)) for e in episodes])
    adv = mtgrpo.compute_advantages(r_t, torch.tensor([e.outcome_reward for e in episodes]), turns, group_size, method, **kwargs)
    return [adv[r, : len(e.token_ids)] for r, e in enumerate(episodes)]
