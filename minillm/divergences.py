r"""Per-token divergences between a teacher ``p`` and a student ``q`` (differentiable in the student).

Every public function returns a ``(B, T)`` tensor (fp32; fp64 for fp64 inputs), exactly 0 where
``mask`` is False; reduce it with :func:`minillm.reduce.masked_mean`. Logits are aligned:
``student_logits[:, t]`` is the distribution that produced token ``t``.

Notation: ``p = softmax(teacher_logits / temperature)``, ``q = softmax(student_logits / temperature)``
(temperature as in GKD / TRL ``generalized_jsd_loss``), ``KL(a||b) = sum_v a(v) log(a(v) / b(v))``.

Teacher inputs (exactly one of):

* ``teacher_logits`` ``(B, T, V)`` -- full-vocabulary form.
* ``teacher_topk_ids`` ``(B, T, K)`` long + ``teacher_topk_logprobs`` ``(B, T, K)`` -- top-k form.
  The log-probs are of the *full* teacher distribution (their exp sums to <= 1) and must already
  be computed at ``temperature``; in this form only the student logits are divided by
  ``temperature`` (the teacher's tail partition function is unknown, so its log-probs cannot be
  re-tempered here).

Top-k tail rule. Both distributions are coarsened to ``K + 1`` outcomes: the K teacher ids and one
"rest" bucket, with teacher mass ``1 - sum_k p_k`` and student mass ``sum_{v not in ids} q(v)``
(computed from the student's own full softmax, not as ``1 - sum``). The divergence is then
evaluated *exactly* on this partition. For f-divergences (KL in both directions, skew KLs, JSD,
TVD) this is a lower bound on the full-vocabulary value by the data-processing inequality
(coarsening is a Markov kernel), with equality when the distributions agree within the tail
up to scale. Both rest masses are clamped below at the machine epsilon of the compute dtype:
``1 - sum_k p_k`` carries rounding error of that order anyway, the clamp keeps every KL term
finite, and with ``K = V`` the top-k value equals the full value to O(eps). AKL is not an
f-divergence; on the partition it is simply AKL of the two (K+1)-outcome distributions.

Numerics. Log-probabilities are computed in fp32 (fp64 for fp64 inputs) and floored at
``-1e4`` (``exp(-1e4)`` is exactly 0 in every float format), so ``-inf`` logits on masked
vocabulary entries give 0 contribution and no NaN in value or gradient. If the *reference*
distribution of a KL has zero mass where the other has mass (e.g. teacher ``-inf`` where the
student is finite in reverse KL), the true value is ``+inf``; we return the large finite
``q(v) * (log q(v) + 1e4)`` instead. JSD, skew KLs and TVD are always finite.

Memory. All forms run through :func:`minillm._chunking.chunked_rows`: chunks of
``chunk_tokens`` flattened tokens in a custom autograd Function that recomputes each chunk in
backward, so at most one chunk of fp32 ``(chunk, V)`` temporaries is alive at a time.
The teacher receives no gradient.
"""

from __future__ import annotations

import functools
import math
from typing import Callable

import torch

from ._chunking import chunked_rows, compute_dtype

LOG_FLOOR = -1e4  # floor for log-probabilities; exp(LOG_FLOOR) == 0 in fp16/bf16/fp32/fp64.

PairFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (log q, log p) (n, D) -> (n,)


# --------------------------------------------------------------------------------------------
# Divergences on log-probability rows. ls = log q (student), lt = log p (teacher), both (n, D),
# already floored at LOG_FLOOR.
# --------------------------------------------------------------------------------------------


def _kl(la: torch.Tensor, lb: torch.Tensor) -> torch.Tensor:
    """sum_v a (log a - log b) per row; a = exp(la). Entries with la at the floor give exactly 0."""
    return (la.exp() * (la - lb)).sum(-1)


def _log_mix(la: torch.Tensor, lb: torch.Tensor, w: float) -> torch.Tensor:
    """log(w * a + (1 - w) * b), stable (logaddexp), exact at w in {0, 1}."""
    if w == 0.0:
        return lb
    if w == 1.0:
        return la
    return torch.logaddexp(la + math.log(w), lb + math.log1p(-w))


def _fkl(ls, lt):
    return _kl(lt, ls)  # KL(p || q)


def _rkl(ls, lt):
    return _kl(ls, lt)  # KL(q || p)


def _tvd(ls, lt):
    return 0.5 * (lt.exp() - ls.exp()).abs().sum(-1)


def _skl(ls, lt, *, alpha):
    return _kl(lt, _log_mix(lt, ls, alpha))  # KL(p || alpha p + (1 - alpha) q)


def _srkl(ls, lt, *, alpha):
    return _kl(ls, _log_mix(ls, lt, alpha))  # KL(q || alpha q + (1 - alpha) p)


def _jsd(ls, lt, *, beta):
    if beta == 0.0:
        return _kl(lt, ls)  # TRL convention: beta = 0 -> forward KL(p || q)
    if beta == 1.0:
        return _kl(ls, lt)  # TRL convention: beta = 1 -> reverse KL(q || p)
    m = _log_mix(lt, ls, beta)  # m = beta p + (1 - beta) q
    return beta * _kl(lt, m) + (1.0 - beta) * _kl(ls, m)


def _akl(ls, lt, *, mu):
    p, q = lt.exp(), ls.exp()
    sp, order = p.sort(dim=-1, descending=True)  # (n, D)
    sq = q.gather(-1, order)
    gap = (sp - sq).abs()
    # head = smallest prefix (by descending p) whose cumulative teacher mass reaches mu: a token is in
    # the head iff the mass strictly before it is < mu, so the token that crosses mu is in the head.
    head = (sp.cumsum(-1) - sp) < mu
    g_head = torch.where(head, gap, torch.zeros_like(gap)).sum(-1).detach()
    g_tail = torch.where(head, torch.zeros_like(gap), gap).sum(-1).detach()
    denom = g_head + g_tail
    safe = denom > 0  # denom == 0 iff p == q, where both KLs are 0: any weights do; use 1/2.
    w_head = torch.where(safe, g_head / torch.where(safe, denom, torch.ones_like(denom)), torch.full_like(denom, 0.5))
    return w_head * _kl(lt, ls) + (1.0 - w_head) * _kl(ls, lt)


# --------------------------------------------------------------------------------------------
# Row functions: raw inputs of one chunk -> per-token divergence.
# --------------------------------------------------------------------------------------------


def _full_rows(x, t, *, pair: PairFn, temperature: float, dtype: torch.dtype):
    ls = torch.log_softmax(x.to(dtype) / temperature, dim=-1).clamp_min(LOG_FLOOR)  # (n, V)
    lt = torch.log_softmax(t.to(dtype) / temperature, dim=-1).clamp_min(LOG_FLOOR)  # (n, V)
    return pair(ls, lt)


def topk_partition(x, ids, tlp, *, temperature: float, dtype: torch.dtype):
    """Student and teacher log-probs on the (K + 1)-outcome partition (K ids + rest bucket).

    Args:
        x: ``(n, V)`` student logits; ids: ``(n, K)`` long; tlp: ``(n, K)`` teacher log-probs.

    Returns:
        ``(ls, lt)``, each ``(n, K + 1)``; the last column is the rest bucket.
    """
    log_eps = math.log(torch.finfo(dtype).eps)
    ls_full = torch.log_softmax(x.to(dtype) / temperature, dim=-1).clamp_min(LOG_FLOOR)  # (n, V)
    ls_k = ls_full.gather(-1, ids)  # (n, K)
    # student tail mass = sum over the complement of ids (ids' entries pushed to the floor).
    ls_rest = torch.logsumexp(ls_full.scatter(-1, ids, LOG_FLOOR), dim=-1).clamp_min(log_eps)  # (n,)
    lt_k = tlp.to(dtype).clamp_min(LOG_FLOOR)  # (n, K)
    lse = torch.logsumexp(lt_k, dim=-1)
    neg = lse < 0
    # log(1 - exp(lse)) = log(-expm1(lse)); where sum >= 1 numerically, the tail is below rounding.
    lt_rest = torch.where(neg, torch.log(-torch.expm1(torch.where(neg, lse, -torch.ones_like(lse)))), torch.full_like(lse, log_eps))
    lt_rest = lt_rest.clamp_min(log_eps)
    return torch.cat([ls_k, ls_rest.unsqueeze(-1)], -1), torch.cat([lt_k, lt_rest.unsqueeze(-1)], -1)


def _topk_rows(x, ids, tlp, *, pair: PairFn, temperature: float, dtype: torch.dtype):
    ls, lt = topk_partition(x, ids, tlp, temperature=temperature, dtype=dtype)
    return pair(ls, lt)


def _run(
    pair: PairFn,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    teacher_logits: torch.Tensor | None,
    teacher_topk_ids: torch.Tensor | None,
    teacher_topk_logprobs: torch.Tensor | None,
    temperature: float,
    chunk_tokens: int,
) -> torch.Tensor:
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    full = teacher_logits is not None
    topk = teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if full == topk or (topk and (teacher_topk_ids is None or teacher_topk_logprobs is None)):
        raise ValueError(
            "give exactly one of teacher_logits or (teacher_topk_ids and teacher_topk_logprobs); got "
            f"teacher_logits={'set' if full else None}, teacher_topk_ids={'set' if teacher_topk_ids is not None else None}, "
            f"teacher_topk_logprobs={'set' if teacher_topk_logprobs is not None else None}."
        )
    if full:
        if teacher_logits.shape != student_logits.shape:
            raise ValueError(
                f"teacher_logits {tuple(teacher_logits.shape)} must match student_logits {tuple(student_logits.shape)}; "
                "for different vocabularies map the teacher to the student vocabulary first."
            )
        dtype = compute_dtype(student_logits, teacher_logits)
        fn = functools.partial(_full_rows, pair=pair, temperature=temperature, dtype=dtype)
        aux = (teacher_logits.detach(),)
    else:
        if teacher_topk_ids.shape != teacher_topk_logprobs.shape or teacher_topk_ids.shape[:2] != student_logits.shape[:2]:
            raise ValueError(
                f"teacher_topk_ids {tuple(teacher_topk_ids.shape)} and teacher_topk_logprobs "
                f"{tuple(teacher_topk_logprobs.shape)} must both be (B, T, K) with (B, T) = {tuple(student_logits.shape[:2])}."
            )
        dtype = compute_dtype(student_logits, teacher_topk_logprobs)
        fn = functools.partial(_topk_rows, pair=pair, temperature=temperature, dtype=dtype)
        aux = (teacher_topk_ids.long(), teacher_topk_logprobs.detach())
    return chunked_rows(fn, student_logits, mask, aux, chunk_tokens=chunk_tokens, out_dtype=dtype)


def _check_unit(name: str, value: float) -> float:
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0.0, 1.0], got {value}.")
    return value


_TEACHER_DOC = """
    Args:
        student_logits: ``(B, T, V)`` student logits (any float dtype; fp32 accumulation).
        mask: ``(B, T)`` bool, True on response tokens.
        teacher_logits: ``(B, T, V)`` full-vocabulary teacher logits, or
        teacher_topk_ids, teacher_topk_logprobs: ``(B, T, K)`` top-k form (module docstring: tail rule).
        temperature: both logits are divided by it (top-k form: student only).
        chunk_tokens: flattened tokens per chunk.

    Returns:
        ``(B, T)`` fp32 per-token divergence, 0 where ``mask`` is False.
"""


def forward_kl(student_logits, mask, *, teacher_logits=None, teacher_topk_ids=None, teacher_topk_logprobs=None, temperature=1.0, chunk_tokens=4096):
    return _run(_fkl, student_logits, mask, teacher_logits, teacher_topk_ids, teacher_topk_logprobs, temperature, chunk_tokens)


forward_kl.__doc__ = r"""Forward KL ``KL(p || q) = sum_v p(v) log(p(v) / q(v))`` (mode-covering; standard KD, Hinton et al. 2015).""" + _TEACHER_DOC


def reverse_kl(student_logits, mask, *, teacher_logits=None, teacher_topk_ids=None, teacher_topk_logprobs=None, temperature=1.0, chunk_tokens=4096):
    return _run(_rkl, student_logits, mask, teacher_logits, teacher_topk_ids, teacher_topk_logprobs, temperature, chunk_tokens)


reverse_kl.__doc__ = r"""Reverse KL ``KL(q || p) = sum_v q(v) log(q(v) / p(v))`` (mode-seeking; MiniLLM arXiv 2306.08543 Eq. 1 per token).""" + _TEACHER_DOC


def total_variation(student_logits, mask, *, teacher_logits=None, teacher_topk_ids=None, teacher_topk_logprobs=None, temperature=1.0, chunk_tokens=4096):
    return _run(_tvd, student_logits, mask, teacher_logits, teacher_topk_ids, teacher_topk_logprobs, temperature, chunk_tokens)


total_variation.__doc__ = r"""Total variation distance ``TVD(p, q) = 1/2 sum_v |p(v) - q(v)|`` (in [0, 1]).""" + _TEACHER_DOC


def skew_forward_kl(student_logits, mask, *, alpha, teacher_logits=None, teacher_topk_ids=None, teacher_topk_logprobs=None, temperature=1.0, chunk_tokens=4096):
    alpha = _check_unit("alpha", alpha)
    pair = functools.partial(_skl, alpha=alpha)
    return _run(pair, student_logits, mask, teacher_logits, teacher_topk_ids, teacher_topk_logprobs, temperature, chunk_tokens)


skew_forward_kl.__doc__ = r"""alpha-skew forward KL (DistiLLM, Ko et al. 2024, arXiv 2402.03898, Sec. 3.1):

    ``SKL^(alpha)(p, q) = KL(p || alpha p + (1 - alpha) q)``.

    ``alpha = 0`` is forward KL; ``alpha = 1`` is 0. Bounded by ``log(1 / alpha)`` for ``alpha > 0``.
    DistiLLM's default is ``alpha = 0.1``.
""" + _TEACHER_DOC


def skew_reverse_kl(student_logits, mask, *, alpha, teacher_logits=None, teacher_topk_ids=None, teacher_topk_logprobs=None, temperature=1.0, chunk_tokens=4096):
    alpha = _check_unit("alpha", alpha)
    pair = functools.partial(_srkl, alpha=alpha)
    return _run(pair, student_logits, mask, teacher_logits, teacher_topk_ids, teacher_topk_logprobs, temperature, chunk_tokens)


skew_reverse_kl.__doc__ = r"""alpha-skew reverse KL (DistiLLM, arXiv 2402.03898, Sec. 3.1):

    ``SRKL^(alpha)(p, q) = KL(q || alpha q + (1 - alpha) p)``  (the skew mixes the *student* into the reference).

    ``alpha = 0`` is reverse KL; ``alpha = 1`` is 0.
""" + _TEACHER_DOC


def adaptive_kl(student_logits, mask, *, mu, teacher_logits=None, teacher_topk_ids=None, teacher_topk_logprobs=None, temperature=1.0, chunk_tokens=4096):
    mu = _check_unit("mu", mu)
    pair = functools.partial(_akl, mu=mu)
    return _run(pair, student_logits, mask, teacher_logits, teacher_topk_ids, teacher_topk_logprobs, temperature, chunk_tokens)


adaptive_kl.__doc__ = r"""Adaptive KL (AKL, Wu et al. 2024, arXiv 2404.02657, Sec. 4):

    Sort the vocabulary by teacher probability, descending. The *head* H is the smallest prefix whose
    cumulative teacher mass is >= mu; the boundary token (the one whose inclusion makes the mass reach
    mu) belongs to the head. ``g_head = sum_{v in H} |p - q|``, ``g_tail = sum_{v not in H} |p - q|``,

        ``AKL = g_head / (g_head + g_tail) * KL(p || q) + g_tail / (g_head + g_tail) * KL(q || p)``.

    The weights are detached (treated as per-token coefficients; no gradient flows through the
    sort/gap computation); we follow the paper's description and could not check the reference code
    offline. If ``p == q`` (both gaps 0) both KLs are 0 and we use weights 1/2. ``mu = 0``: empty head,
    pure reverse KL. The paper uses ``mu = 0.5``.
""" + _TEACHER_DOC


def generalized_jsd(student_logits, mask, *, beta, teacher_logits=None, teacher_topk_ids=None, teacher_topk_logprobs=None, temperature=1.0, chunk_tokens=4096):
    beta = _check_unit("beta", beta)
    pair = functools.partial(_jsd, beta=beta)
    return _run(pair, student_logits, mask, teacher_logits, teacher_topk_ids, teacher_topk_logprobs, temperature, chunk_tokens)


generalized_jsd.__doc__ = r"""Generalized JSD (GKD, Agarwal et al. 2024, arXiv 2306.13649, Eq. (1)):

    ``JSD(beta)(p, q) = beta KL(p || m) + (1 - beta) KL(q || m)``, ``m = beta p + (1 - beta) q``.

    Endpoints follow TRL's ``GKDTrainer.generalized_jsd_loss``: ``beta = 0`` returns the forward KL
    ``KL(p || q)`` and ``beta = 1`` the reverse KL ``KL(q || p)``. These are *not* the values of the
    formula at the endpoints (it is 0 there: m collapses onto q resp. p); they are its normalised limits,
    ``JSD(beta) / beta -> KL(p || q)`` as beta -> 0 and ``JSD(beta) / (1 - beta) -> KL(q || p)`` as
    beta -> 1, which is why GKD describes small beta as forward-KL-like and beta near 1 as reverse-KL-like.
    ``beta = 0.5`` is the symmetric JSD.
""" + _TEACHER_DOC


# --------------------------------------------------------------------------------------------
# Dispatcher used by the learner.
# --------------------------------------------------------------------------------------------

_DIVERGENCES: dict[str, tuple[Callable, tuple[str, ...]]] = {
    "forward_kl": (forward_kl, ()),
    "reverse_kl": (reverse_kl, ()),
    "tvd": (total_variation, ()),
    "skew_kl": (skew_forward_kl, ("alpha",)),
    "skew_rkl": (skew_reverse_kl, ("alpha",)),
    "akl": (adaptive_kl, ("mu",)),
    "jsd": (generalized_jsd, ("beta",)),
}
DIVERGENCE_NAMES = tuple(_DIVERGENCES)


def token_divergence(
    name: str,
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    **params: float,
) -> torch.Tensor:
    """Per-token divergence by name: the single entry point of the learner.

    Args:
        name: one of ``forward_kl``, ``reverse_kl``, ``tvd``, ``skew_kl`` (needs ``alpha``),
            ``skew_rkl`` (``alpha``), ``akl`` (``mu``), ``jsd`` (``beta``).
        params: exactly the parameters the divergence needs (extra or missing -> ValueError).
        Other arguments: see :func:`forward_kl`.

    Returns:
        ``(B, T)`` fp32 per-token divergence, 0 where ``mask`` is False.
    """
    if name not in _DIVERGENCES:
        raise ValueError(f"unknown divergence {name!r}; valid choices: {', '.join(DIVERGENCE_NAMES)}.")
    fn, needed = _DIVERGENCES[name]
    missing = [k for k in needed if k not in params]
    extra = [k for k in params if k not in needed]
    if missing or extra:
        spec = ", ".join(f"{n}({', '.join(p)})" if p else n for n, (_, p) in _DIVERGENCES.items())
        raise ValueError(f"divergence {name!r} takes params {list(needed)}, got missing={missing} extra={extra}; valid choices: {spec}.")
    return fn(
        student_logits,
        mask,
        teacher_logits=teacher_logits,
        teacher_topk_ids=teacher_topk_ids,
        teacher_topk_logprobs=teacher_topk_logprobs,
        temperature=temperature,
        chunk_tokens=chunk_tokens,
        **params,
    )
