"""A fixed probe of the policy, to see how far each update moves it.

The update's own numbers (ratio, clip fraction) look only at tokens that were sampled,
and only within the update. A swing can come from an update whose ratios look mild:
MT-GRPO seed 2's last update of recipe v1 made the policy end half its episodes with a
second tool call, a behaviour that had not been sampled once in 30 steps, so no ratio
saw it (results/README.md). The probe looks at the same fixed contexts after every
update, over the whole vocabulary:

- each of `n` validation questions gets a canonical turn 1 (a search with the question
  as the query), the tool's real result, and the start of a turn-2 decision: a neutral
  `<reasoning>` and the `<` that opens either `<tool>` or `<answer>`;
- one no-grad forward over these contexts gives the next-token distribution at every
  assistant position (turn 1, turn 2 and the decision);
- `kl(before, after)` is KL(pi_before || pi_after) at each of those positions; its mean
  and max (probe_kl_mean, probe_kl_max) measure the update;
- at the decision, `second_call` is the probability of `tool` after the `<` (the policy
  starting a second call), `answer_prob` that of `answer`.

The contexts use the sampler's token layout (prompt ids, the turn's ids, the chat
template's glue, the next turn's ids), so the probe sees what the sampler would feed.
A forward over 16 contexts costs about a second of a step on the embedded model: the
shared system prompt and demonstration are forwarded once (logprobs.Prefix).
"""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass

import torch

import logprobs
import sampler
import tool_env

TURN2_REASONING = "<reasoning>I have the search result.</reasoning>\n<"  # neutral: it neither restates a query nor an answer


@dataclass
class Probe:
    ids: list[list[int]]  # one context per question
    positions: list[list[int]]  # indices t whose next-token distribution is read (t predicts t + 1)
    tool_id: int  # the token after "<" that starts "<tool>"
    answer_id: int  # ... and "<answer>"


def canonical_call(question: str, tools: dict) -> str:
    """Turn 1 as a trained agent writes it: a search with the question as the query,
    with the first tool and its first argument."""
    name, fn = next(iter(tools.items()))
    arg = next(iter(inspect.signature(fn).parameters))
    call = json.dumps({"name": name, "args": {arg: question}})
    return f"<reasoning>I should search for this.</reasoning>\n<tool>{call}</tool>"


def _next_token_after(tokenizer, context_ids: list[int], text: str, word: str) -> int:
    """The first token that `text + word` has beyond `context_ids` (tokenized as the
    sampler's glue is: the turn's text alone)."""
    full = tokenizer.encode(text + word, add_special_tokens=False)
    if full[: len(context_ids)] != context_ids or len(full) == len(context_ids):
        raise ValueError(f"the tokenizer merges {word!r} into the text before it; the probe's decision needs a boundary")
    return full[len(context_ids)]


def build_probe(tokenizer, rows, env) -> Probe:
    """The probe's contexts for `rows` (dataset rows with a "question")."""
    ids, positions = [], []
    turn2 = tokenizer.encode(TURN2_REASONING, add_special_tokens=False)
    tool_id = _next_token_after(tokenizer, turn2, TURN2_REASONING, "tool>")
    answer_id = _next_token_after(tokenizer, turn2, TURN2_REASONING, "answer>")
    if tool_id == answer_id:
        raise ValueError("the probe cannot tell <tool> from <answer> by their first token")
    for row in rows:
        msgs = env.initial_messages(row)
        call = canonical_call(row["question"], env.tools)
        result = env.step(msgs + [{"role": "assistant", "content": call}]).message  # the tool's real result
        prompt = sampler.prompt_ids(tokenizer, msgs)
        turn1 = tokenizer.encode(call, add_special_tokens=False)
        glue = sampler.chat_glue(tokenizer, result)
        seq = prompt + turn1 + glue + turn2
        t1, t2 = len(prompt), len(prompt) + len(turn1) + len(glue)
        # t - 1 predicts token t: turn 1's tokens, turn 2's tokens, and the decision after the last one
        positions.append(list(range(t1 - 1, t1 + len(turn1) - 1)) + list(range(t2 - 1, len(seq))))
        ids.append(seq)
    return Probe(ids, positions, tool_id, answer_id)


@torch.no_grad()
def probe_logprobs(model, probe: Probe) -> torch.Tensor:
    """log pi(. | context) at every probe position, (positions, V) float32 on the CPU,
    in the order of probe.positions. The contexts' common prefix is forwarded once."""
    device = next(model.parameters()).device
    common = sampler.shared_prefix_len(probe.ids, min_len=1)
    common = min(common, min(p[0] for p in probe.positions))  # every read position lies after the prefix
    prefix = logprobs.Prefix(model, probe.ids[0][:common], device)
    rest = [s[common:] for s in probe.ids]
    L = max(len(r) for r in rest)
    n = len(rest)
    input_ids = torch.full((n, L), 0, dtype=torch.long)
    attn = torch.zeros(n, common + L, dtype=torch.long)
    sel = torch.zeros(n, L, dtype=torch.bool)
    for i, (r, pos) in enumerate(zip(rest, probe.positions)):
        input_ids[i, : len(r)] = torch.tensor(r)
        attn[i, : common + len(r)] = 1
        sel[i, [p - common for p in pos]] = True
    input_ids, attn = input_ids.to(device), attn.to(device)
    kw = {"past_key_values": prefix.cache(n), "use_cache": True,
          "position_ids": common + torch.arange(L, device=device).expand(n, -1)} if common else {"use_cache": False}
    if logprobs._head_on_positions_ok(model):
        hidden = model.base_model(input_ids=input_ids, attention_mask=attn, **kw).last_hidden_state
        logits = model.get_output_embeddings()(hidden[sel.to(device)])
    else:
        logits = model(input_ids=input_ids, attention_mask=attn, **kw).logits[sel.to(device)]
    # a row-major boolean selection keeps each row's positions in order, rows in order
    return torch.log_softmax(logits.float(), dim=-1).cpu()


def kl(before: torch.Tensor, after: torch.Tensor) -> torch.Tensor:
    """KL(pi_before || pi_after) at each position, from log-probs (positions, V)."""
    return (before.exp() * (before - after)).sum(-1).clamp(min=0)


def decision_probs(probe: Probe, logp: torch.Tensor) -> tuple[float, float]:
    """(second_call, answer_prob): the mean over questions of P(tool) and P(answer) at
    the turn-2 decision (the last position of each context)."""
    last = torch.tensor([len(p) for p in probe.positions]).cumsum(0) - 1
    p = logp[last].exp()
    return float(p[:, probe.tool_id].mean()), float(p[:, probe.answer_id].mean())


def measure(probe: Probe, logp: torch.Tensor, before: torch.Tensor | None) -> dict:
    """The probe_* fields of a log line: the decision, and the movement since `before`."""
    second, answer = decision_probs(probe, logp)
    out = {"probe_second_call": second, "probe_answer_prob": answer}
    if before is not None:
        d = kl(before, logp)
        out.update(probe_kl_mean=float(d.mean()), probe_kl_max=float(d.max()))
    return out
