"""Tests of mtgrpo.py alone: turn-level advantages against hand-computed numbers (one
tool turn and K), and the clipped loss (its normalizer, KL term and TIS weights)."""

import math

import pytest
import torch

import mtgrpo

# ------------------------------------------------------------------ advantages

def test_advantages_two_groups_hand_computed():
    # group 1: R^O = [2, 0, 1] (mean 1, std 1), R^T = [0.7, 0.2, 0.45] (mean 0.45, std 0.25)
    # group 2: R^O = [0.4, 0.4, 0.4] (zero variance), R^T = [0, 0.2, 0.4] (mean 0.2, std 0.2)
    r_o = torch.tensor([2.0, 0.0, 1.0, 0.4, 0.4, 0.4])
    r_t = torch.tensor([0.7, 0.2, 0.45, 0.0, 0.2, 0.4])
    # prompt token, two turn-1 tokens, an env token, one turn-2 token; row 2 has no tool result
    turns = torch.tensor([[0, 1, 1, 0, 2]] * 6)
    turns[2] = torch.tensor([0, 1, 1, 1, 0])
    e = 1e-4
    no = [2 / (1 + e) * 0.5, -1 / (1 + e), 0.0, 0.0, 0.0, 0.0]  # norm(R^O)
    no[0] = 1 / (1 + e)
    nt = [0.25 / (0.25 + e), -0.25 / (0.25 + e), 0.0, -0.2 / (0.2 + e), 0.0, 0.2 / (0.2 + e)]  # norm(R^T)
    # merged R^O + R^T: group 1 [2.7, 0.2, 1.45] (mean 1.45, std 1.25); group 2 [0.4, 0.6, 0.8] (mean 0.6, std 0.2)
    nm = [1.25 / (1.25 + e), -1.25 / (1.25 + e), 0.0, -0.2 / (0.2 + e), 0.0, 0.2 / (0.2 + e)]

    def expect(turn1, turn2):
        out = torch.zeros(6, 5)
        for i in range(6):
            for j in range(5):
                t = int(turns[i, j])
                out[i, j] = turn1[i] if t == 1 else turn2[i] if t >= 2 else 0.0
        return out

    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "grpo-or")
    torch.testing.assert_close(adv, expect(no, no))
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "grpo-mr")
    torch.testing.assert_close(adv, expect(nm, nm))
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "mt-grpo")
    torch.testing.assert_close(adv, expect([a + b for a, b in zip(no, nt)], no))
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "mt-grpo", turn_coef=0.5)
    torch.testing.assert_close(adv, expect([a + 0.5 * b for a, b in zip(no, nt)], no))
    # the zero-variance group gives exactly 0 from R^O, never NaN
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "grpo-or")
    assert torch.equal(adv[3:], torch.zeros(3, 5))
    # the reference's fallback: row 2 (no tool result) gets the merged advantage
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "mt-grpo", merged_fallback=True)
    torch.testing.assert_close(adv[2], torch.tensor([0.0, nm[2], nm[2], nm[2], 0.0]))
    torch.testing.assert_close(adv[0], torch.tensor([0.0, no[0] + nt[0], no[0] + nt[0], 0.0, no[0]]))
    # Dr. GRPO: centered, not scaled
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "grpo-or", scale="none")
    torch.testing.assert_close(adv[:3, 4], torch.tensor([1.0, -1.0, 0.0]))
    torch.testing.assert_close(adv[2, 1:4], torch.tensor([0.0, 0.0, 0.0]))


def test_merged_fallback_changes_only_episodes_without_a_tool_result():
    """Groups of 2, where every norm is +-0.5 |d| / (|d| / sqrt 2 + eps). Row 0 never got
    a tool result (all its tokens are turn 1), row 1 did. R^O = [1, 0], R^T = [0, 0.5],
    so the merged R^O + R^T = [1, 0.5] ranks the rows as R^O does, while R^T ranks them
    the other way: without the fallback row 0's turn-1 advantage is norm(R^O) +
    norm(R^T) = s(1) - s(0.5), about 0; with it, norm(R^O + R^T) = +s(0.5)."""
    e = 1e-4
    s = lambda d: 0.5 * d / (d / math.sqrt(2) + e)  # noqa: E731
    r_o, r_t = torch.tensor([1.0, 0.0]), torch.tensor([0.0, 0.5])
    turns = torch.tensor([[0, 1, 1, 1], [0, 1, 0, 2]])
    off = mtgrpo.compute_advantages(r_t, r_o, turns, 2, "mt-grpo")
    on = mtgrpo.compute_advantages(r_t, r_o, turns, 2, "mt-grpo", merged_fallback=True)
    torch.testing.assert_close(off[0], torch.tensor([0.0, 1, 1, 1]) * (s(1) - s(0.5)))
    torch.testing.assert_close(on[0], torch.tensor([0.0, 1, 1, 1]) * s(0.5))
    # row 1 has a tool result: the same advantages either way
    torch.testing.assert_close(on[1], off[1])
    torch.testing.assert_close(off[1], torch.tensor([0.0, -s(1) + s(0.5), 0.0, -s(1)]))


def test_k_turn_advantages_hand_computed():
    """One group of 3 episodes with 1, 2 and 3 assistant turns (T = 2 tool turns):
    A answered at once, B searched once then answered, C searched twice then answered.
    Column 1 R^T_1 = [0, 1, 2] (mean 1, std 1), column 2 R^T_2 = [0, 0, 3] (mean 1,
    std sqrt 3): A and B never reached turn 2 and hold 0 there. R^O = [2, 0, 1]."""
    e = 1e-4
    r_t = torch.tensor([[0.0, 0.0], [1.0, 0.0], [2.0, 3.0]])
    r_o = torch.tensor([2.0, 0.0, 1.0])
    turns = torch.tensor([[0, 1, 1, 0, 0, 0, 0],  # A: prompt, turn 1, then padding
                          [0, 1, 0, 2, 0, 0, 0],  # B: turn 1, result, turn 2
                          [0, 1, 0, 2, 0, 3, 3]])  # C: turn 1, result, turn 2, result, turn 3
    no = [1 / (1 + e), -1 / (1 + e), 0.0]  # norm(R^O)
    n1 = [-1 / (1 + e), 0.0, 1 / (1 + e)]
    n2 = [-1 / (math.sqrt(3) + e), -1 / (math.sqrt(3) + e), 2 / (math.sqrt(3) + e)]
    g = 0.5
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "mt-grpo", gamma=g)
    want = torch.zeros(3, 7)
    want[0, 1:3] = no[0] + n1[0] + g * n2[0]  # A stopped at turn 1: judged by the columns it did not reach too
    want[1, 1] = no[1] + n1[1] + g * n2[1]
    want[1, 3] = no[1] + n2[1]
    want[2, 1] = no[2] + n1[2] + g * n2[2]
    want[2, 3] = no[2] + n2[2]
    want[2, 5:] = no[2]  # the answer turn: no turn reward after it
    torch.testing.assert_close(adv, want)
    # turn_coef scales the reward-to-go only; gamma = 1 (default) sums it undiscounted
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "mt-grpo", turn_coef=2.0)
    assert float(adv[2, 1]) == pytest.approx(no[2] + 2 * (n1[2] + n2[2]), rel=1e-5)
    # grpo-mr: norm(R^O + sum_j R^T_j) = norm([2, 1, 6]) (mean 3, std sqrt 7) on every assistant token
    adv = mtgrpo.compute_advantages(r_t, r_o, turns, 3, "grpo-mr")
    nm = [(x - 3) / (math.sqrt(7) + e) for x in (2.0, 1.0, 6.0)]
    torch.testing.assert_close(adv, torch.tensor(nm)[:, None] * (turns > 0).float())
    # grpo-or ignores the turn rewards
    torch.testing.assert_close(mtgrpo.compute_advantages(r_t, r_o, turns, 3, "grpo-or"),
                               torch.tensor(no)[:, None] * (turns > 0).float())


def test_one_tool_turn_as_a_column_is_todays_advantage():
    """(N,) and (N, 1) turn rewards give exactly the same advantages, for every method
    and option (the two-group hand computation above uses (N,))."""
    g = torch.Generator().manual_seed(3)
    r_t, r_o = torch.rand(8, generator=g), torch.rand(8, generator=g)
    turns = torch.tensor([[0, 1, 1, 0, 2, 2]] * 4 + [[0, 1, 1, 1, 0, 0]] * 4)
    for method in mtgrpo.METHODS:
        for kw in ({}, {"turn_coef": 0.5, "gamma": 0.3}, {"merged_fallback": True}, {"scale": "none"}):
            a = mtgrpo.compute_advantages(r_t, r_o, turns, 4, method, **kw)
            b = mtgrpo.compute_advantages(r_t[:, None], r_o, turns, 4, method, **kw)
            assert torch.equal(a, b), (method, kw)


def test_advantages_bad_input():
    with pytest.raises(ValueError, match="do not split into groups of 4"):
        mtgrpo.compute_advantages(torch.zeros(6), torch.zeros(6), torch.ones(6, 2, dtype=torch.long), 4, "mt-grpo")
    with pytest.raises(ValueError, match="unknown method"):
        mtgrpo.compute_advantages(torch.zeros(2), torch.zeros(2), torch.ones(2, 2, dtype=torch.long), 2, "ppo")


# ------------------------------------------------------------------ loss


def test_mu1_ratio_one_gives_reinforce_gradient():
    logp = torch.tensor([[-1.0, -2.0, -0.5], [-0.3, -0.7, -9.0]], requires_grad=True)
    adv = torch.tensor([[1.0, 1.0, 1.0], [-2.0, -2.0, 5.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, st = mtgrpo.policy_loss(logp, logp.detach(), adv, mask)
    assert st["ratio_min"] == 1.0 and st["ratio_max"] == 1.0 and st["clip_frac"] == 0.0
    loss.backward()
    # d/dlogp of -sum(mask * A * exp(logp - old)) / 5 at ratio 1 is -mask * A / 5
    torch.testing.assert_close(logp.grad, -(adv * mask) / 5)
    assert loss.item() == pytest.approx(-(3 * 1 - 2 * 2) / 5)


def test_clipping_on_crafted_ratios():
    old = torch.zeros(1, 4)
    logp = torch.tensor([[math.log(1.5), math.log(1.5), math.log(0.5), math.log(0.5)]], requires_grad=True)
    adv = torch.tensor([[1.0, -1.0, 1.0, -1.0]])
    mask = torch.ones(1, 4)
    loss, st = mtgrpo.policy_loss(logp, old, adv, mask, eps=0.2, aggregation="dr-grpo", normalizer=1.0)
    # per token: -min(1.5, 1.2) = -1.2 (clipped); -min(-1.5, -1.2) = 1.5; -min(0.5, 0.8) = -0.5; -min(-0.5, -0.8) = 0.8 (clipped)
    assert loss.item() == pytest.approx(-1.2 + 1.5 - 0.5 + 0.8)
    assert st["clip_frac"] == pytest.approx(0.5)
    loss.backward()
    # clipped tokens get no gradient; the others get -A * ratio
    torch.testing.assert_close(logp.grad, torch.tensor([[0.0, 1.5, -0.5, 0.0]]))
    # eps_high widens only the upper side: ratio 1.5 < 1 + 0.6 is not clipped
    loss, _ = mtgrpo.policy_loss(logp.detach(), old, adv, mask, eps=0.2, eps_high=0.6, aggregation="dr-grpo", normalizer=1.0)
    assert float(loss) == pytest.approx(-1.5 + 1.5 - 0.5 + 0.8)


def test_token_mean_vs_seq_mean_on_unequal_lengths():
    # seq 1: one token with loss 1; seq 2: three tokens with loss 3 (A = -1 and -3 at ratio 1)
    logp = torch.zeros(2, 3)
    adv = torch.tensor([[-1.0, 0.0, 0.0], [-3.0, -3.0, -3.0]])
    mask = torch.tensor([[1.0, 0.0, 0.0], [1.0, 1.0, 1.0]])
    tm, _ = mtgrpo.policy_loss(logp, logp, adv, mask, aggregation="token-mean")
    sm, _ = mtgrpo.policy_loss(logp, logp, adv, mask, aggregation="seq-mean")
    dr, _ = mtgrpo.policy_loss(logp, logp, adv, mask, aggregation="dr-grpo", normalizer=10.0)
    assert float(tm) == pytest.approx((1 + 9) / 4)
    assert float(sm) == pytest.approx((1 + 3) / 2)
    assert float(dr) == pytest.approx(10 / 10)


def test_loss_normalizer_of_a_whole_batch():
    masks = [[0, 0, 1, 1, 1], [0, 0, 1, 0, 0], [0, 1, 1, 1, 1]]  # 3 episodes, 3 + 1 + 4 loss tokens
    assert mtgrpo.loss_normalizer("token-mean", masks, 256) == 8
    assert mtgrpo.loss_normalizer("seq-mean", masks, 256) == 3
    assert mtgrpo.loss_normalizer("dr-grpo", masks, 256) == 3 * 256
    # dr-grpo's constant is not in the mask: no silent fallback to the padded size
    with pytest.raises(ValueError, match="loss_normalizer"):
        mtgrpo.policy_loss(torch.zeros(1, 2), torch.zeros(1, 2), torch.ones(1, 2), torch.ones(1, 2), aggregation="dr-grpo")


def test_kl_term():
    logp = torch.tensor([[-1.0, -2.0]])
    ref = torch.tensor([[-1.5, -2.0]])
    loss, st = mtgrpo.policy_loss(logp, logp, torch.zeros(1, 2), torch.ones(1, 2), beta=0.1, ref_logp=ref)
    k3 = math.exp(-0.5) + 0.5 - 1  # exp(d) - d - 1 with d = ref - logp = -0.5
    assert st["kl"] == pytest.approx(k3 / 2)
    assert float(loss) == pytest.approx(0.1 * k3 / 2)
    with pytest.raises(ValueError, match="beta > 0 needs ref_logp"):
        mtgrpo.policy_loss(logp, logp, torch.zeros(1, 2), torch.ones(1, 2), beta=0.1)


def test_tis_weights_hand_computed():
    old = torch.tensor([[-1.0, -0.5, -2.0]])
    sample = torch.tensor([[-1.5, -0.5, -1.0]])
    # exp(old - sample) = e^0.5, 1, e^-1, truncated at C
    torch.testing.assert_close(mtgrpo.tis_weights(old, sample, 2.0), torch.tensor([[math.exp(0.5), 1.0, math.exp(-1)]]))
    torch.testing.assert_close(mtgrpo.tis_weights(old, sample, 1.5), torch.tensor([[1.5, 1.0, math.exp(-1)]]))
    assert torch.equal(mtgrpo.tis_weights(old, sample, 0), torch.ones(1, 3))
    # in the loss at ratio 1: -sum(w A) / n
    adv = torch.tensor([[1.0, -2.0, 3.0]])
    loss, _ = mtgrpo.policy_loss(old, old, adv, torch.ones(1, 3), is_weights=mtgrpo.tis_weights(old, sample, 1.5))
    assert float(loss) == pytest.approx(-(1.5 * 1 - 2 * 1 + 3 * math.exp(-1)) / 3)


def test_mtgrpo_imports_torch_and_the_standard_library_only():
    """The file a reader copies: its import statements name torch and the standard
    library only, and importing it after torch loads nothing else (no project module,
    no transformers)."""
    import ast
    import subprocess
    import sys

    tree = ast.parse(open(mtgrpo.__file__).read())
    names = {a.name.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names}
    names |= {n.module.split(".")[0] for n in ast.walk(tree) if isinstance(n, ast.ImportFrom) and n.module}
    assert names - set(sys.stdlib_module_names) == {"torch"}, names
    code = ("import sys, torch; before = set(sys.modules); import mtgrpo; "
            "print(sorted({m.split('.')[0] for m in set(sys.modules) - before}))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert set(ast.literal_eval(out)) - set(sys.stdlib_module_names) == {"mtgrpo"}, out
