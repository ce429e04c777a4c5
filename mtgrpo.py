"""MT-GRPO's algorithm: group-normalized turn-level advantages and the clipped loss.

The file to read beside the paper (Zeng et al., arXiv 2505.11821) and docs/paper.md §2,
and to copy: it imports torch and nothing else. In the paper's order:

    group_normalize       norm(x) = (x - mean_G) / (std_G + eps) within each group of G rollouts
    compute_advantages    GRPO-OR, GRPO-MR and MT-GRPO per-token advantages (paper Figure 1),
                          for one tool turn or K (the turn-level reward-to-go)
    tis_weights           the truncated importance-sampling weight of a sampler that is not
                          exactly the trained policy
    policy_loss           the clipped surrogate of GRPO with optional k3 KL (TRL, March 2025),
    loss_normalizer       ... and its denominator over a whole optimizer batch

Everything here works on tensors: token_turns (N, L) gives the assistant turn of each
token (0 on the prompt, the tool results and padding), loss masks are 1 only on sampled
tokens. Where those come from: sampler.py (episodes), logprobs.py (log-probabilities of
episodes under the policy), train.py (the update that puts them together).
"""

from __future__ import annotations

import torch


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
    gamma: float = 1.0,
) -> torch.Tensor:
    """Per-token advantages (N, L); 0 where token_turns == 0 (token_turns: k on the
    tokens of the k-th assistant turn).

    turn_rewards: (N,), the paper's one tool turn, or (N, T): column j - 1 is R^T_j,
    the reward of tool turn j (0 for an episode that did not reach it).

    grpo-or:  A = norm(R^O) on every assistant token.
    grpo-mr:  A = norm(R^O + sum_j R^T_j) on every assistant token.
    mt-grpo:  on the tokens of turn k,
                  A = norm(R^O) + turn_coef * sum_{j >= k} gamma^(j - k) norm(R^T_j),
              the turn-level reward-to-go, each column normalized within its group; a
              turn after the last one with a turn reward (the answer) gets norm(R^O).
              With T = 1 this is the paper's Figure 1: norm(R^O) + turn_coef *
              norm(R^T) on turn 1, norm(R^O) on turn 2. An episode with no tool
              result is all turn 1.
    merged_fallback: the reference code's rule, not in the paper: an mt-grpo episode
              without a tool result gets the grpo-mr advantage on all its tokens.

    Why the reward-to-go, not turn k's own reward alone: a turn's action also decides
    what later turns can reach (a first search that finds the bridge entity is what
    lets the second search find the answer), so turn k is credited with every turn
    reward from k on, as the outcome reward credits every turn with the outcome.

    Why every column over the whole group, with 0 where an episode stopped before turn
    j, and every episode summing every column j >= k: then the baseline subtracted
    from an episode's advantage has the same terms whatever turn the episode stopped
    at. Normalizing a column over only the episodes that reached it, and summing only
    an episode's reached turns, makes the baseline depend on the episode's own decision
    to stop: an action-dependent baseline, which biases the gradient of that decision
    (verl issue 7244). Here an episode that stopped early meets the columns of the turns
    it did not reach at 0, which is below their group mean when others earned reward
    there: stopping is judged by what it gave up.
    """
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {METHODS}")
    norm = lambda x: group_normalize(x.float(), group_size, scale, eps)  # noqa: E731
    r_t = turn_rewards if turn_rewards.dim() == 2 else turn_rewards[:, None]  # (N, T)
    assistant = (token_turns > 0).float()
    a_o = norm(outcome_rewards)[:, None]
    if method == "grpo-or":
        return a_o * assistant
    a_merged = norm(outcome_rewards + r_t.sum(1))[:, None]
    if method == "grpo-mr":
        return a_merged * assistant
    T = r_t.size(1)
    # to_go[:, k - 1] = sum_{j >= k} gamma^(j - k) norm(R^T_j); column T: no turn reward left
    to_go = torch.zeros(r_t.size(0), T + 1, device=r_t.device)
    for k in range(T, 0, -1):
        to_go[:, k - 1] = norm(r_t[:, k - 1]) + gamma * to_go[:, k]
    per_token = to_go.gather(1, (token_turns.clamp(min=1, max=T + 1) - 1).long())
    adv = (a_o + turn_coef * per_token) * assistant
    if merged_fallback:
        no_result = ~(token_turns >= 2).any(dim=1, keepdim=True)
        adv = torch.where(no_result, a_merged * assistant, adv)
    return adv


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
