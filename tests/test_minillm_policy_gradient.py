"""MiniLLM policy-gradient pieces: hand-worked advantages/weights and unbiasedness on a toy problem."""

import itertools
import math

import pytest
import torch

from minillm import (
    long_term_advantages,
    lm_loss,
    masked_mean,
    masked_whiten,
    minillm_loss,
    mixed_importance_weights,
    pt_loss_with_kd,
    token_rewards,
)

# ------------------------------------------------------------------------------------------
# Hand-worked advantages.
# ------------------------------------------------------------------------------------------

R = torch.tensor([[1.0, 2.0, 3.0, 4.0, 0.0]], dtype=torch.float64)
M = torch.tensor([[True, True, True, True, False]])


def test_advantages_paper_default():
    # R_{t+1} = sum of later rewards: [9, 7, 4, 0]; / number of later tokens [3, 2, 1, 0] -> last = 0.
    got = long_term_advantages(R, M)
    torch.testing.assert_close(got, torch.tensor([[3.0, 3.5, 4.0, 0.0, 0.0]], dtype=torch.float64))
    got = long_term_advantages(R, M, length_norm=False)
    torch.testing.assert_close(got, torch.tensor([[9.0, 7.0, 4.0, 0.0, 0.0]], dtype=torch.float64))


def test_advantages_gamma_and_include_current():
    g = 0.5
    # include_current=False: R_{t+1} = r_{t+1} + g r_{t+2} + g^2 r_{t+3}
    want = [2 + g * 3 + g * g * 4, 3 + g * 4, 4.0, 0.0, 0.0]
    torch.testing.assert_close(long_term_advantages(R, M, gamma=g, length_norm=False), torch.tensor([want], dtype=torch.float64))
    # include_current=True (the code): R_t = r_t + g R_{t+1}; normalised by the 4, 3, 2, 1 terms summed
    cur = [1 + g * want[0], 2 + g * want[1], 3 + g * want[2], 4.0]
    torch.testing.assert_close(
        long_term_advantages(R, M, gamma=g, include_current=True),
        torch.tensor([[cur[0] / 4, cur[1] / 3, cur[2] / 2, cur[3] / 1, 0.0]], dtype=torch.float64),
    )


def test_advantages_whitening_over_mask_only():
    got = long_term_advantages(R, M, length_norm=False, whiten=True)
    x = torch.tensor([9.0, 7.0, 4.0, 0.0], dtype=torch.float64)  # mean 5, population var 11.5
    want = (x - 5.0) / math.sqrt(11.5 + 1e-8)
    torch.testing.assert_close(got[0, :4], want)
    assert got[0, 4] == 0
    torch.testing.assert_close(masked_whiten(x.view(1, 4), torch.ones(1, 4, dtype=torch.bool)), want.view(1, 4))


def test_padding_does_not_change_advantages():
    # same sequence with extra right padding, and with left padding + a hole: identical values on its
    # tokens, including discounting by *relative* position.
    r = torch.tensor([[0.3, -1.2, 0.7]], dtype=torch.float64)
    ref = long_term_advantages(r, torch.ones(1, 3, dtype=torch.bool), gamma=0.9, include_current=True)
    padded = torch.tensor([[0.0, 0.3, 5.0, -1.2, 0.7, 9.0, 9.0]], dtype=torch.float64)  # garbage on padding
    pm = torch.tensor([[False, True, False, True, True, False, False]])
    got = long_term_advantages(padded, pm, gamma=0.9, include_current=True)
    torch.testing.assert_close(got[pm].view(1, 3), ref)
    assert torch.all(got[~pm] == 0)


def test_rewards_and_masked_mean():
    t = torch.tensor([[-1.0, -2.0, -3.0]])
    s = torch.tensor([[-0.5, -1.0, float("nan")]])
    m = torch.tensor([[True, True, False]])
    r = token_rewards(t, s, m)
    torch.testing.assert_close(r, torch.tensor([[-0.5, -1.0, 0.0]]))
    assert masked_mean(r, m) == -0.75
    assert masked_mean(r, m, num_tokens=6) == -0.25
    assert masked_mean(r, torch.zeros_like(m)) == 0


def test_importance_weights_modes():
    lq = torch.log(torch.tensor([[0.5, 0.2, 0.1, 0.3]], dtype=torch.float64))
    lp = torch.log(torch.tensor([[0.1, 0.6, 0.1, 0.9]], dtype=torch.float64))
    m = torch.tensor([[True, True, True, False]])
    a = 0.2
    ratio = [0.5 / (0.2 * 0.1 + 0.8 * 0.5), 0.2 / (0.2 * 0.6 + 0.8 * 0.2), 1.0]  # q / (a p + (1-a) q)
    torch.testing.assert_close(mixed_importance_weights(lq, lp, a, m), torch.tensor([[*ratio, 0.0]], dtype=torch.float64))
    W = ratio[0] * ratio[1] * ratio[2]
    torch.testing.assert_close(mixed_importance_weights(lq, lp, a, m, mode="sequence"), torch.tensor([[W, W, W, 0.0]], dtype=torch.float64))
    torch.testing.assert_close(
        mixed_importance_weights(lq, lp, a, m, mode="prefix"), torch.tensor([[1.0, ratio[0], ratio[0] * ratio[1], 0.0]], dtype=torch.float64)
    )
    torch.testing.assert_close(mixed_importance_weights(lq, lp, a, m, max_weight=1.1), torch.tensor([[1.1, ratio[1], 1.0, 0.0]], dtype=torch.float64))
    assert torch.equal(mixed_importance_weights(lq, lp, 0.0, m, mode="sequence"), m.double())


# ------------------------------------------------------------------------------------------
# Toy problem: V = 4 (token 0 = EOS), at most L = 3 tokens, tabular student and teacher.
# ------------------------------------------------------------------------------------------

V, L, EOS = 4, 3, 0
STATES = [()] + [tuple(p) for n in range(1, L) for p in itertools.product(range(1, V), repeat=n)]  # non-EOS prefixes
SIDX = {s: i for i, s in enumerate(STATES)}


def _sequences():
    out = []
    for n in range(1, L + 1):
        for body in itertools.product(range(1, V), repeat=n - 1):
            out.append(body + (EOS,))
    out += list(itertools.product(range(1, V), repeat=L))  # truncated at L
    return out


SEQS = _sequences()  # 1 + 3 + 9 + 27 = 40


def seq_logprob(table, y):
    lp = torch.log_softmax(table, -1)
    return sum(lp[SIDX[y[:t]], y[t]] for t in range(len(y)))


def exact_kl_grad(theta, teacher):
    th = theta.clone().requires_grad_(True)
    kl = 0.0
    for y in SEQS:
        lq, lp = seq_logprob(th, y), seq_logprob(teacher, y)
        kl = kl + lq.exp() * (lq - lp)
    (g,) = torch.autograd.grad(kl, th)
    return g


def sampling_probs(theta, teacher, alpha):
    """Sequence probabilities under token-level mixing alpha p + (1 - alpha) q."""
    q, p = torch.softmax(theta, -1), torch.softmax(teacher, -1)
    mix = alpha * p + (1 - alpha) * q
    return torch.stack([math.prod(mix[SIDX[y[:t]], y[t]] for t in range(len(y))) for y in SEQS])


def estimator_grad(theta, teacher, y, **kw):
    """Gradient of minillm_loss on the single sampled sequence y (padded with garbage to L + 1)."""
    th = theta.clone().requires_grad_(True)
    n, Tpad = len(y), L + 1
    idx = [SIDX[y[:t]] for t in range(n)]
    garbage = torch.full((Tpad - n, V), 7.0, dtype=torch.float64)
    logits = torch.cat([th[idx], garbage]).unsqueeze(0)  # (1, Tpad, V)
    t_logits = torch.cat([teacher[idx], garbage]).unsqueeze(0)
    tokens = torch.tensor([list(y) + [1] * (Tpad - n)])
    mask = torch.tensor([[True] * n + [False] * (Tpad - n)])
    lq = torch.log_softmax(logits.detach(), -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    lp = torch.log_softmax(t_logits, -1).gather(-1, tokens.unsqueeze(-1)).squeeze(-1)
    loss, _ = minillm_loss(logits, tokens, mask, lq, lp, teacher_logits=t_logits, num_tokens=1, **kw)
    (g,) = torch.autograd.grad(loss, th)
    return g


UNBIASED = dict(clip_eps=None, length_norm=False, gamma=1.0, whiten=False)


@pytest.fixture(scope="module")
def toy():
    g = torch.Generator().manual_seed(0)
    theta = torch.randn(len(STATES), V, generator=g, dtype=torch.float64)
    teacher = 1.5 * torch.randn(len(STATES), V, generator=g, dtype=torch.float64)
    return theta, teacher, exact_kl_grad(theta, teacher)


def _per_sequence(theta, teacher, **kw):
    return torch.stack([estimator_grad(theta, teacher, y, **kw) for y in SEQS])  # (40, S, V)


def _mc_check(per_seq, probs, exact, n=20000, seed=1):
    """Monte-Carlo mean over n sampled sequences and its per-coordinate standard error."""
    counts = torch.bincount(torch.multinomial(probs, n, replacement=True, generator=torch.Generator().manual_seed(seed)), minlength=len(SEQS))
    w = (counts.double() / n).view(-1, 1, 1)
    mean = (w * per_seq).sum(0)
    var = (counts.double().view(-1, 1, 1) * (per_seq - mean) ** 2).sum(0) / (n - 1)
    stderr = (var / n).sqrt()
    return (mean - exact).abs(), stderr


@pytest.mark.parametrize(
    "cfg",
    [dict(include_current=False, single_step=True), dict(include_current=True, single_step=False)],
    ids=["R_t+1+single_step", "R_t-no_single_step"],
)
def test_on_policy_estimator_is_unbiased(toy, cfg):
    theta, teacher, exact = toy
    per_seq = _per_sequence(theta, teacher, alpha=0.0, **UNBIASED, **cfg)
    probs = sampling_probs(theta, teacher, 0.0)
    # exact expectation over the 40 sequences: equal to the true gradient up to rounding
    torch.testing.assert_close((probs.view(-1, 1, 1) * per_seq).sum(0), exact, rtol=1e-10, atol=1e-12)
    err, se = _mc_check(per_seq, probs, exact)
    assert torch.all(err <= 4 * se + 1e-9), (err / se).max()


def test_wrong_estimator_is_detected(toy):
    # Bug: drop r_t entirely (R_{t+1} without the single-step term). The same MC check must fail.
    theta, teacher, exact = toy
    per_seq = _per_sequence(theta, teacher, alpha=0.0, include_current=False, single_step=False, **UNBIASED)
    probs = sampling_probs(theta, teacher, 0.0)
    bias = (probs.view(-1, 1, 1) * per_seq).sum(0) - exact
    assert bias.abs().max() > 0.05
    err, se = _mc_check(per_seq, probs, exact)
    assert torch.any(err > 4 * se + 1e-9)


def test_teacher_mixed_sampling_with_exact_weights_is_unbiased(toy):
    theta, teacher, exact = toy
    per_seq = _per_sequence(theta, teacher, alpha=0.2, importance="sequence", include_current=False, single_step=True, **UNBIASED)
    probs = sampling_probs(theta, teacher, 0.2)
    torch.testing.assert_close((probs.view(-1, 1, 1) * per_seq).sum(0), exact, rtol=1e-10, atol=1e-12)
    err, se = _mc_check(per_seq, probs, exact)
    assert torch.all(err <= 4 * se + 1e-9), (err / se).max()


def test_single_token_weight_bias_is_measured(toy, capsys):
    # The paper's single-token weight is biased; we only measure it. Observed at this seed:
    # relative bias ||E[g_token] - g|| / ||g|| = 0.262, max abs coordinate 0.0997 (alpha = 0.2, V = 4, L = 3).
    theta, teacher, exact = toy
    per_seq = _per_sequence(theta, teacher, alpha=0.2, importance="token", include_current=False, single_step=True, **UNBIASED)
    probs = sampling_probs(theta, teacher, 0.2)
    bias = (probs.view(-1, 1, 1) * per_seq).sum(0) - exact
    rel = float(bias.norm() / exact.norm())
    with capsys.disabled():
        print(f"\n[single-token importance weight] relative bias = {rel:.4f}, max abs = {float(bias.abs().max()):.4f}")
    assert math.isfinite(rel)


def test_ppo_clip_and_metrics():
    # rho = exp(logq - old) and w = 1: tokens with rho outside [0.8, 1.2] and A pushing further are clipped.
    logits = torch.zeros(1, 3, 2, dtype=torch.float64, requires_grad=True)  # q = 1/2 for both tokens
    tokens = torch.tensor([[0, 1, 0]])
    mask = torch.tensor([[True, True, True]])
    old = torch.log(torch.tensor([[0.25, 0.5, 0.5]], dtype=torch.float64))  # rho = [2, 1, 1]
    teacher_lp = torch.log(torch.tensor([[0.5, 0.5, 1.0]], dtype=torch.float64))  # r = [log 2, 0, log 2]
    loss, m = minillm_loss(logits, tokens, mask, old, teacher_lp, single_step=False, length_norm=False, clip_eps=0.2)
    # A = [0 + log 2, log 2, 0]; token 0: rho = 2 > 1.2 with A > 0 -> clipped to 1.2.
    a = math.log(2)
    want = -(a * 1.2 + a * 1.0 + 0.0) / 3
    assert abs(float(loss.detach()) - want) < 1e-12
    assert abs(float(m["clip_frac"]) - 1 / 3) < 1e-12
    assert abs(float(m["ratio"]) - 4 / 3) < 1e-12
    assert abs(float(m["reward"]) - 2 * a / 3) < 1e-12
    assert abs(float(m["reverse_kl"]) + float(m["reward"])) < 1e-12  # no teacher distribution: -mean r
    loss.backward()
    assert logits.grad[0, 0].abs().max() == 0  # clipped token has no gradient


def test_lm_and_pt_losses():
    g = torch.Generator().manual_seed(3)
    logits = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 5, (2, 3), generator=g)
    mask = torch.tensor([[True, True, False], [True, False, False]])
    nll = -torch.log_softmax(logits, -1).gather(-1, labels.unsqueeze(-1)).squeeze(-1)
    want = nll[mask].mean()
    torch.testing.assert_close(lm_loss(logits, labels, mask), want)
    t = torch.randn(2, 3, 5, generator=g, dtype=torch.float64)
    p, lq = torch.softmax(t, -1), torch.log_softmax(logits, -1)
    fkl = (p * (p.log() - lq)).sum(-1)[mask].mean()
    loss, m = pt_loss_with_kd(logits, labels, mask, kd_ratio=0.25, teacher_logits=t)
    torch.testing.assert_close(loss, 0.75 * want + 0.25 * fkl)
    torch.testing.assert_close(m["kd_loss"], fkl)
