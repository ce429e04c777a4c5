"""Log-probabilities of episodes under the policy: the training forward pass.

    collate             right-padded tensors of a micro-batch of episodes (masks from lengths)
    token_logprobs      log pi(token) with logits / temperature, the LM head only where needed
    Prefix              a prompt forwarded once for its G rollouts, gradients through it
    plan_micro_batches  the update's forward passes: per group, micro-batches of continuations
    lean_backward       two cheaper kernels for the update's backward passes (same gradients)

Each episode (sampler.Episode) keeps a loss mask (1 only on sampled tokens); attention
uses a separate, padding-only mask (the reference used the loss mask as attention mask,
so the answer could not attend to the tool result: a bug).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from sampler import Episode


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


PASS_COST = 64  # what one more forward+backward pass costs, in padded tokens (bench.py, docs/performance.md)


def micro_batches(lengths: list[int], max_tokens: int, pass_cost: int = PASS_COST) -> list[list[int]]:
    """Indices grouped into micro-batches, each within `max_tokens` padded tokens (count x
    longest; a longer sequence is a micro-batch of its own). Sorted by length, the split
    points minimize padded tokens + pass_cost x passes (dynamic programming over the
    sorted lengths): a group's continuations range from a 15-token answer to a 170-token
    tool turn, and padding them all to the longest wasted a third of the update's tokens."""
    order = sorted(range(len(lengths)), key=lambda i: lengths[i])
    L = [lengths[i] for i in order]
    best, cut = [0] + [None] * len(L), [0] * (len(L) + 1)  # best[j]: the j shortest, split optimally
    for j in range(1, len(L) + 1):
        for i in range(j - 1, -1, -1):  # the last micro-batch: sorted i..j-1, padded to L[j-1]
            if (j - i) * L[j - 1] > max_tokens and j - i > 1:
                break
            cost = best[i] + (j - i) * L[j - 1] + pass_cost
            if best[j] is None or cost < best[j]:
                best[j], cut[j] = cost, i
    groups, j = [], len(L)
    while j:
        groups.append(order[cut[j]:j])
        j = cut[j]
    return groups[::-1]


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


@contextlib.contextmanager
def lean_backward(model, device):
    """Two changes that make the update's many backward passes (one per micro-batch and
    one per prompt) cheaper, with the same gradients (docs/performance.md, issue 23):

    - Tied input embedding and LM head (the embedded model, Llama, Qwen): the input
      embedding's gradient is sparse (only the rows of the batch's tokens), added into the
      dense gradient that the LM head gives the same tensor. The dense default allocates,
      zero-fills and adds a vocabulary x width tensor (113 MB for the embedded model) per
      backward pass. Untied embeddings keep the dense gradient (AdamW takes dense ones).
    - CPU: grouped-query attention without copying the keys and values to every query
      head (SDPA's enable_gqa; transformers copies them when an attention mask is passed,
      because some CUDA kernels need that). Not on CUDA, where the masked GQA kernel is
      the slow one. The log-probs are bit-identical (test_logprobs.py).
    """
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    tied = isinstance(emb, torch.nn.Embedding) and head is not None and head.weight is emb.weight
    was_sparse = emb.sparse if tied else None
    gqa_key, gqa_was = "TRANSFORMERS_SDPA_FORCE_GQA", os.environ.get("TRANSFORMERS_SDPA_FORCE_GQA")
    cpu = torch.device(device).type == "cpu"
    try:
        if tied:
            emb.sparse = True
        if cpu:
            os.environ[gqa_key] = "1"  # read by transformers at every attention call
        yield
    finally:
        if tied:
            emb.sparse = was_sparse
        if cpu:
            if gqa_was is None:
                os.environ.pop(gqa_key, None)
            else:
                os.environ[gqa_key] = gqa_was
