"""Divergences vs naive float64 references written directly from the formulas.

The references below are deliberately independent of ``minillm``: unchunked, per-token Python
loops over plain probability vectors, ``0 log 0 = 0``, no log-space tricks.
"""

import math

import pytest
import torch

from minillm import DIVERGENCE_NAMES, entropy, generalized_jsd, token_divergence, token_logprobs

PARAMS = {
    "forward_kl": {},
    "reverse_kl": {},
    "tvd": {},
    "skew_kl": {"alpha": 0.1},
    "skew_rkl": {"alpha": 0.3},
    "akl": {"mu": 0.5},
    "jsd": {"beta": 0.3},
}
F_DIVERGENCES = ["forward_kl", "reverse_kl", "tvd", "skew_kl", "skew_rkl", "jsd"]  # AKL is no f-divergence


# ------------------------------------------------------------------------------------------
# Naive references on one pair of probability vectors (float64, 1-D).
# ------------------------------------------------------------------------------------------


def _kl(a, b):
    return sum(float(ai) * math.log(float(ai) / float(bi)) for ai, bi in zip(a, b) if ai > 0)


def ref_one(name, p, q, **kw):
    if name == "forward_kl":
        return _kl(p, q)
    if name == "reverse_kl":
        return _kl(q, p)
    if name == "tvd":
        return 0.5 * float((p - q).abs().sum())
    if name == "skew_kl":
        a = kw["alpha"]
        return _kl(p, a * p + (1 - a) * q)
    if name == "skew_rkl":
        a = kw["alpha"]
        return _kl(q, a * q + (1 - a) * p)
    if name == "jsd":
        b = kw["beta"]
        if b == 0:
            return _kl(p, q)
        if b == 1:
            return _kl(q, p)
        m = b * p + (1 - b) * q
        return b * _kl(p, m) + (1 - b) * _kl(q, m)
    if name == "akl":
        order = sorted(range(len(p)), key=lambda i: -float(p[i]))
        head, cum = set(), 0.0
        for i in order:  # smallest prefix with cumulative teacher mass >= mu
            if cum >= kw["mu"]:
                break
            head.add(i)
            cum += float(p[i])
        gh = sum(abs(float(p[i] - q[i])) for i in head)
        gt = sum(abs(float(p[i] - q[i])) for i in range(len(p)) if i not in head)
        wh = 0.5 if gh + gt == 0 else gh / (gh + gt)
        return wh * _kl(p, q) + (1 - wh) * _kl(q, p)
    raise KeyError(name)


def ref_tokens(name, s_logits, t_logits, mask, temperature=1.0, **kw):
    s = s_logits.double() / temperature
    t = t_logits.double() / temperature
    out = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if mask[b, i]:
                q = torch.exp(s[b, i] - s[b, i].max())
                p = torch.exp(t[b, i] - t[b, i].max())
                out[b, i] = ref_one(name, p / p.sum(), q / q.sum(), **kw)
    return out


def make(B=3, T=5, V=11, dtype=torch.float32, seed=0, scale=2.0):
    g = torch.Generator().manual_seed(seed)
    s = (scale * torch.randn(B, T, V, generator=g)).to(dtype)
    t = (scale * torch.randn(B, T, V, generator=g)).to(dtype)
    mask = torch.rand(B, T, generator=g) < 0.7
    mask[0, 0] = True
    mask[-1] = False  # an all-padding row
    return s, t, mask


# ------------------------------------------------------------------------------------------
# Values.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_matches_reference_fp32(name, temperature):
    s, t, mask = make()
    got = token_divergence(name, s, mask, teacher_logits=t, temperature=temperature, chunk_tokens=4, **PARAMS[name])
    want = ref_tokens(name, s, t, mask, temperature, **PARAMS[name])
    assert got.dtype == torch.float32 and got.shape == mask.shape
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    assert torch.all(got[~mask] == 0)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_inputs_accumulate_in_fp32(name, dtype):
    # The reference sees the same rounded half-precision inputs, so the only difference left is
    # fp32 vs fp64 arithmetic: the fp32 tolerance applies, not a bf16 one (eps 7.8e-3).
    s, t, mask = make(dtype=dtype, V=64)
    got = token_divergence(name, s, mask, teacher_logits=t, **PARAMS[name])
    assert got.dtype == torch.float32
    want = ref_tokens(name, s, t, mask, **PARAMS[name])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=2e-6)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_masked_vocabulary_minus_inf(name):
    # The last 3 vocabulary entries are -inf for both models (e.g. vocabulary padding): they carry
    # zero mass, so the value equals the divergence over the first V - 3 entries, with finite grads.
    s, t, mask = make(V=12)
    s[..., -3:] = float("-inf")
    t[..., -3:] = float("-inf")
    s.requires_grad_(True)
    got = token_divergence(name, s, mask, teacher_logits=t, chunk_tokens=5, **PARAMS[name])
    want = ref_tokens(name, s.detach()[..., :-3], t[..., :-3], mask, **PARAMS[name])
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    got.sum().backward()
    assert torch.isfinite(s.grad).all()
    assert torch.all(s.grad[..., -3:] == 0)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_padding_rows_are_zero_even_with_garbage(name):
    s, t, mask = make()
    s = s.clone()
    s[~mask] = float("nan")  # whatever sits in padded rows must not matter
    t[~mask] = float("-inf")
    s.requires_grad_(True)
    got = token_divergence(name, s, mask, teacher_logits=t, **PARAMS[name])
    assert not torch.isnan(got).any()
    assert torch.all(got[~mask] == 0) and torch.all(got[-1] == 0)
    got.sum().backward()
    assert torch.all(s.grad[~mask] == 0) and torch.isfinite(s.grad).all()


def test_all_false_mask():
    s, t, _ = make()
    s.requires_grad_(True)
    mask = torch.zeros(s.shape[:2], dtype=torch.bool)
    for name in DIVERGENCE_NAMES:
        got = token_divergence(name, s, mask, teacher_logits=t, **PARAMS[name])
        assert torch.equal(got, torch.zeros_like(got))
        got.sum().backward()
    assert torch.equal(s.grad, torch.zeros_like(s))


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_chunked_equals_unchunked(name):
    s, t, mask = make(B=4, T=6, V=17)
    grads, vals = [], []
    for chunk in (1, 3, 10_000):  # 10_000 > B*T: one chunk
        x = s.clone().requires_grad_(True)
        v = token_divergence(name, x, mask, teacher_logits=t, chunk_tokens=chunk, **PARAMS[name])
        (v * torch.linspace(0.5, 1.5, v.numel()).view_as(v)).sum().backward()
        vals.append(v.detach())
        grads.append(x.grad)
    for v, g in zip(vals[:-1], grads[:-1]):
        torch.testing.assert_close(v, vals[-1], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(g, grads[-1], rtol=1e-6, atol=1e-7)


# ------------------------------------------------------------------------------------------
# Gradients.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", [n for n in DIVERGENCE_NAMES if n != "akl"])
@pytest.mark.parametrize("form", ["full", "topk"])
def test_gradcheck(name, form):
    s, t, mask = make(B=2, T=3, V=6, dtype=torch.float64, scale=1.0)
    s.requires_grad_(True)
    if form == "full":
        kw = {"teacher_logits": t}
    else:
        lp, ids = torch.log_softmax(t, -1).topk(3, dim=-1)
        kw = {"teacher_topk_ids": ids, "teacher_topk_logprobs": lp}
    f = lambda x: token_divergence(name, x, mask, chunk_tokens=2, temperature=0.8, **kw, **PARAMS[name])
    assert torch.autograd.gradcheck(f, (s,))


def test_akl_gradient_treats_weights_as_constants():
    # gradcheck cannot apply: the head/tail weights are detached by design. Compare to autograd through
    # a float64 reference whose weights are computed from detached probabilities.
    s, t, mask = make(B=2, T=3, V=7, dtype=torch.float64)
    x = s.clone().requires_grad_(True)
    token_divergence("akl", x, mask, teacher_logits=t, mu=0.5, chunk_tokens=2).sum().backward()
    y = s.clone().requires_grad_(True)
    total = 0.0
    for b in range(2):
        for i in range(3):
            if mask[b, i]:
                q = torch.softmax(y[b, i], -1)
                p = torch.softmax(t[b, i], -1)
                qd = q.detach()
                order = torch.argsort(p, descending=True)
                cum = torch.cumsum(p[order], 0) - p[order]
                head = torch.zeros(7, dtype=torch.bool)
                head[order[cum < 0.5]] = True
                gh, gt = (p - qd).abs()[head].sum(), (p - qd).abs()[~head].sum()
                total = total + gh / (gh + gt) * (p * (p / q).log()).sum() + gt / (gh + gt) * (q * (q / p).log()).sum()
    total.backward()
    torch.testing.assert_close(x.grad, y.grad, rtol=1e-10, atol=1e-12)


def test_token_logprobs_reference_and_gradcheck():
    s, _, mask = make(B=2, T=4, V=9, dtype=torch.float64)
    tok = torch.randint(0, 9, (2, 4), generator=torch.Generator().manual_seed(1))
    got = token_logprobs(s, tok, temperature=0.5, chunk_tokens=3)
    want = torch.log_softmax(s / 0.5, -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1)
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    x = s.clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: token_logprobs(z, tok, temperature=0.5, chunk_tokens=3), (x,))
    assert torch.autograd.gradcheck(lambda z: entropy(z, mask, temperature=0.5, chunk_tokens=3), (x,))
    # bf16 logits -> fp32 output equal to the fp64 computation on the same rounded values
    sb = s.to(torch.bfloat16)
    got_b = token_logprobs(sb, tok)
    assert got_b.dtype == torch.float32
    torch.testing.assert_close(got_b.double(), torch.log_softmax(sb.double(), -1).gather(-1, tok.unsqueeze(-1)).squeeze(-1), rtol=1e-6, atol=1e-6)


def test_entropy_reference():
    s, _, mask = make(V=8)
    p = torch.softmax(s.double(), -1)
    want = torch.where(mask, -(p * p.log()).sum(-1), 0.0)
    torch.testing.assert_close(entropy(s, mask).double(), want, rtol=1e-5, atol=1e-6)


# ------------------------------------------------------------------------------------------
# Top-k form.
# ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_topk_with_k_equal_v_equals_full(name, dtype):
    s, t, mask = make(V=10, dtype=dtype)
    lp, ids = torch.log_softmax(t / 0.8, -1).topk(10, dim=-1)  # top-k log-probs are given at the temperature
    full = token_divergence(name, s, mask, teacher_logits=t, temperature=0.8, **PARAMS[name])
    topk = token_divergence(name, s, mask, teacher_topk_ids=ids, teacher_topk_logprobs=lp, temperature=0.8, **PARAMS[name])
    # fp64: rest buckets are clamped at eps = 2.2e-16 on both sides; fp32: eps = 1.2e-7.
    tol = 1e-12 if dtype == torch.float64 else 2e-6
    torch.testing.assert_close(topk, full, rtol=tol, atol=tol)


@pytest.mark.parametrize("name", DIVERGENCE_NAMES)
def test_topk_is_exact_on_the_coarsened_partition(name):
    K = 4
    s, t, mask = make(V=12, dtype=torch.float64)
    lp, ids = torch.log_softmax(t, -1).topk(K, dim=-1)
    got = token_divergence(name, s, mask, teacher_topk_ids=ids, teacher_topk_logprobs=lp, **PARAMS[name])
    want = torch.zeros(mask.shape, dtype=torch.float64)
    for b in range(mask.shape[0]):
        for i in range(mask.shape[1]):
            if mask[b, i]:
                p, q = torch.softmax(t[b, i], -1), torch.softmax(s[b, i], -1)
                rest = torch.ones(12, dtype=torch.bool)
                rest[ids[b, i]] = False
                pk = torch.cat([p[ids[b, i]], p[rest].sum().view(1)])
                qk = torch.cat([q[ids[b, i]], q[rest].sum().view(1)])
                want[b, i] = ref_one(name, pk, qk, **PARAMS[name])
    torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
    if name in F_DIVERGENCES:  # data-processing inequality: coarsening never increases an f-divergence
        full = token_divergence(name, s, mask, teacher_logits=t, **PARAMS[name])
        assert torch.all(got[mask] <= full[mask] + 1e-12)
        assert torch.all(got[mask] < full[mask])  # and here strictly (random logits)


# ------------------------------------------------------------------------------------------
# Generalized JSD: beta endpoints and beta = 0.5.
# ------------------------------------------------------------------------------------------


def test_jsd_beta_endpoints_follow_trl():
    s, t, mask = make(dtype=torch.float64)
    fkl = ref_tokens("forward_kl", s, t, mask)
    rkl = ref_tokens("reverse_kl", s, t, mask)
    torch.testing.assert_close(generalized_jsd(s, mask, beta=0.0, teacher_logits=t), fkl, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(generalized_jsd(s, mask, beta=1.0, teacher_logits=t), rkl, rtol=1e-12, atol=1e-12)
    # ...which are the normalised limits of the Eq. (1) formula (itself -> 0 at both ends):
    # JSD(b)/b -> KL(p||q) as b -> 0, JSD(b)/(1-b) -> KL(q||p) as b -> 1, with O(b) relative error
    # (constant ~ chi^2 / 2, a few hundred for these logits).
    b = 1e-8
    lo = generalized_jsd(s, mask, beta=b, teacher_logits=t)
    hi = generalized_jsd(s, mask, beta=1 - b, teacher_logits=t)
    torch.testing.assert_close(lo / b, fkl, rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(hi / b, rkl, rtol=1e-5, atol=1e-12)
    assert lo[mask].max() < 1e-7 and hi[mask].max() < 1e-7


def test_jsd_half_is_symmetric_jsd():
    s, t, mask = make(dtype=torch.float64)
    p, q = torch.softmax(t, -1), torch.softmax(s, -1)
    m = 0.5 * (p + q)
    direct = 0.5 * (p * (p / m).log()).sum(-1) + 0.5 * (q * (q / m).log()).sum(-1)
    got = generalized_jsd(s, mask, beta=0.5, teacher_logits=t)
    torch.testing.assert_close(got, torch.where(mask, direct, 0.0), rtol=1e-12, atol=1e-12)
    swapped = generalized_jsd(t, mask, beta=0.5, teacher_logits=s)  # symmetric in (p, q)
    torch.testing.assert_close(got, swapped, rtol=1e-12, atol=1e-12)
    assert got[mask].max() <= math.log(2)


def test_skew_endpoints():
    s, t, mask = make(dtype=torch.float64)
    fkl = token_divergence("forward_kl", s, mask, teacher_logits=t)
    rkl = token_divergence("reverse_kl", s, mask, teacher_logits=t)
    torch.testing.assert_close(token_divergence("skew_kl", s, mask, teacher_logits=t, alpha=0.0), fkl, rtol=0, atol=0)
    torch.testing.assert_close(token_divergence("skew_rkl", s, mask, teacher_logits=t, alpha=0.0), rkl, rtol=0, atol=0)
    assert torch.all(token_divergence("skew_kl", s, mask, teacher_logits=t, alpha=1.0) == 0)


def test_pinned_values():
    # Any diff that moves these numbers is changing an objective.
    s, t, _ = make(B=1, T=1, V=5, dtype=torch.float64, seed=123)
    mask = torch.ones(1, 1, dtype=torch.bool)
    got = {n: round(float(token_divergence(n, s, mask, teacher_logits=t, **PARAMS[n])[0, 0]), 6) for n in DIVERGENCE_NAMES}
    assert got == PINNED


# Values of the naive reference above at seed 123 (B=T=1, V=5), rounded to 1e-6.
PINNED = {'forward_kl': 0.612329, 'reverse_kl': 0.877898, 'tvd': 0.457691, 'skew_kl': 0.486883, 'skew_rkl': 0.28516, 'akl': 0.787754, 'jsd': 0.127789}


# ------------------------------------------------------------------------------------------
# Dispatcher errors.
# ------------------------------------------------------------------------------------------


def test_dispatcher_errors():
    s, t, mask = make()
    with pytest.raises(ValueError, match="valid choices: forward_kl, reverse_kl, tvd, skew_kl, skew_rkl, akl, jsd"):
        token_divergence("kl", s, mask, teacher_logits=t)
    with pytest.raises(ValueError, match=r"missing=\['beta'\]"):
        token_divergence("jsd", s, mask, teacher_logits=t)
    with pytest.raises(ValueError, match=r"extra=\['beta'\]"):
        token_divergence("forward_kl", s, mask, teacher_logits=t, beta=0.5)
    with pytest.raises(ValueError, match="exactly one of teacher_logits"):
        token_divergence("forward_kl", s, mask)
    ids = torch.zeros(*mask.shape, 2, dtype=torch.long)
    with pytest.raises(ValueError, match="exactly one of teacher_logits"):
        token_divergence("forward_kl", s, mask, teacher_logits=t, teacher_topk_ids=ids, teacher_topk_logprobs=ids.float())
    with pytest.raises(ValueError, match=r"beta must be in \[0.0, 1.0\], got 1.5"):
        token_divergence("jsd", s, mask, teacher_logits=t, beta=1.5)
