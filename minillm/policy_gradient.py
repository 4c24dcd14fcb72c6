r"""MiniLLM: reverse-KL distillation by policy gradient (Gu et al., ICLR 2024, arXiv 2306.08543).

Official code: microsoft/LMOps ``minillm/minillm/`` (``losses.py`` at commit 7b14bef,
``sampler.py`` at 19f288d); referred to below as "the code".

Notation (all ``(B, T)``, aligned with the response tokens ``y_t``; ``T_i`` is sequence i's response
length, i.e. its number of mask-True positions, which are assumed to be its response tokens in order,
EOS included):

* ``q = q_theta`` the student, ``p`` the teacher; ``r_t = log p(y_t | y_<t, x) - log q(y_t | y_<t, x)``.
* Sequence-level objective (paper Eq. 1): ``L(theta) = KL(q || p) = E_{y~q}[-sum_t r_t]``.
* Paper Eq. 2-5: ``grad L = (grad L)_Single + (grad L)_Long`` with
  ``(grad L)_Long = -E_q[sum_t R_{t+1} grad log q(y_t | y_<t)]``, ``R_{t+1} = sum_{t' > t} r_{t'}`` and
  ``(grad L)_Single = E_q[sum_t grad KL(q(. | y_<t) || p(. | y_<t))]`` (grad through step t's distribution only).

Both pieces are implemented as surrogate losses whose gradient is the corresponding term:
``pg_loss`` (PPO-clipped policy gradient of the long-term term) and ``single_step_loss`` (exact
per-token reverse KL over the vocabulary).
"""

from __future__ import annotations

import math

import torch

from .divergences import reverse_kl, token_divergence
from .logprobs import token_logprobs
from .reduce import masked_mean, masked_whiten


def token_rewards(teacher_logprobs: torch.Tensor, student_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Per-token reward ``r_t = log p(y_t|.) - log q(y_t|.)`` (paper Sec. 2.2; code ``t_rewards + ent_rewards``).

    Args:
        teacher_logprobs, student_logprobs: ``(B, T)`` log-probs of the sampled tokens.
        mask: ``(B, T)`` bool.

    Returns:
        ``(B, T)`` fp32 (fp64 for fp64 input), detached, 0 where ``mask`` is False.
    """
    dtype = torch.float64 if torch.float64 in (teacher_logprobs.dtype, student_logprobs.dtype) else torch.float32
    r = teacher_logprobs.detach().to(dtype) - student_logprobs.detach().to(dtype)
    return torch.where(mask.bool(), r, torch.zeros_like(r))


def long_term_advantages(
    rewards: torch.Tensor,
    mask: torch.Tensor,
    *,
    length_norm: bool = True,
    gamma: float = 1.0,
    include_current: bool = False,
    whiten: bool = False,
) -> torch.Tensor:
    r"""Long-term returns used as advantages of the policy-gradient term.

    Positions are counted relative to each sequence's own response: with ``k`` the index of
    position t among sequence i's mask-True positions (0-based), ``k' > k`` its later tokens,

        ``R_{t+1} = sum_{k' > k} gamma^(k' - k - 1) r_{k'}``                  (``include_current=False``)
        ``R_t     = r_k + gamma * R_{t+1} = sum_{k' >= k} gamma^(k' - k) r_{k'}`` (``include_current=True``)

    so padding (anywhere, not only on the right) neither contributes nor counts as a discount step
    (cf. trl issues #6626 / #7024 on absolute-position discounting).

    Args:
        rewards: ``(B, T)`` per-token rewards (see :func:`token_rewards`); detached.
        mask: ``(B, T)`` bool.
        length_norm: paper Eq. 6, ``R^Norm_{t+1} = R_{t+1} / (T_i - k - 1)``: divide by the number of
            terms summed (``T_i - k - 1`` future tokens, or ``T_i - k`` with ``include_current``). The
            last token has no future tokens (``T_i - k - 1 = 0``, ``R = 0``) and gets advantage 0. The
            code (``losses.py::_get_advantages_and_returns``) always divides by ``T_i - k`` (it includes
            r_t) and its ``--length-norm`` flag only changes the logged reward statistics, so it cannot
            switch normalisation off; ours can.
        gamma: discount per response token. Paper: 1 (undiscounted); the code's default is 0.95. With
            ``length_norm`` we divide by the term count regardless of gamma, as the code does.
        include_current: include ``r_t`` in the return at t, as the code does. Then the single-step term
            must be off (or the r_t part is counted twice): the paper's decomposition uses ``R_{t+1}``.
        whiten: masked whitening of the result (the code whitens by default, over padding too; we whiten
            over masked entries only, see :func:`minillm.reduce.masked_whiten`).

    Returns:
        ``(B, T)`` advantages (fp32; fp64 for fp64 rewards), detached, 0 where ``mask`` is False.
    """
    if not 0.0 <= gamma <= 1.0:
        raise ValueError(f"gamma must be in [0.0, 1.0], got {gamma}.")
    mask = mask.bool()
    dtype = torch.float64 if rewards.dtype == torch.float64 else torch.float32
    r = torch.where(mask, rewards.detach().to(dtype), torch.zeros((), dtype=dtype, device=rewards.device))
    B, T = r.shape
    future = torch.zeros(B, dtype=dtype, device=r.device)  # sum_{k' > k} gamma^(k'-k-1) r_{k'}
    n_future = torch.zeros(B, dtype=dtype, device=r.device)  # number of later response tokens
    out = torch.zeros_like(r)
    for t in reversed(range(T)):  # T python steps on (B,) tensors: cheap next to the model
        m = mask[:, t]
        if include_current:
            value, count = r[:, t] + gamma * future, n_future + 1
        else:
            value, count = future, n_future
        if length_norm:
            value = torch.where(count > 0, value / count.clamp_min(1), torch.zeros_like(value))
        out[:, t] = torch.where(m, value, torch.zeros_like(value))
        future = torch.where(m, r[:, t] + gamma * future, future)
        n_future = n_future + m.to(dtype)
    if whiten:
        out = masked_whiten(out, mask)
    return out


def mixed_importance_weights(
    student_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    alpha: float,
    mask: torch.Tensor,
    *,
    mode: str = "token",
    max_weight: float | None = None,
) -> torch.Tensor:
    r"""Importance weights for teacher-mixed sampling (paper Sec. 2.3, Eq. 7; code ``sampler.py``).

    Responses are sampled token by token from ``p~(y_t | y_<t) = alpha p(y_t | y_<t) + (1 - alpha) q(y_t | y_<t)``.
    Per-token log-ratio ``l_t = log q(y_t|.) - log p~(y_t|.)``, with ``log p~`` by ``logaddexp`` (the code
    mixes in probability space). Modes:

    * ``"token"``: ``w_t = exp(l_t)``, the paper's single-token approximation (biased; the paper motivates it
      by variance).
    * ``"sequence"``: ``w_t = exp(sum_{k'} l_{k'})`` over the *whole* response (all ``T_i`` tokens, EOS
      included), the same for every t of a row. This is the exact weight for the long-term term at t: its
      integrand ``R_{t+1} grad log q(y_t|y_<t)`` depends on ``y_1..y_{T_i}`` (``R_{t+1}`` involves all later
      tokens and the length), so ``E_q[f] = E_p~[prod_{all k'} (q/p~)_{k'} f]``; fewer factors would leave the
      later tokens distributed as ``p~`` instead of ``q``.
    * ``"prefix"``: ``w_t = exp(sum_{k' < k} l_{k'})``, the exact weight for the single-step term at t, which
      depends on ``y_<t`` only (the expectation over ``y_t`` is computed exactly over the vocabulary).

    Args:
        student_logprobs, teacher_logprobs: ``(B, T)`` log q and log p of the sampled tokens (rollout time).
        alpha: teacher mixing weight in [0, 1]; 0 gives weights exactly 1.
        mask: ``(B, T)`` bool.
        mode: ``"token"``, ``"sequence"`` or ``"prefix"``.
        max_weight: optional upper clamp on the weights (variance control; introduces bias). The code at
            19f288d does not clamp ``w`` (it clips rewards with ``--cliprange-reward``).

    Returns:
        ``(B, T)`` detached weights (fp32; fp64 for fp64 inputs), 0 where ``mask`` is False.
    """
    alpha = float(alpha)
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"alpha must be in [0.0, 1.0], got {alpha}.")
    if mode not in ("token", "sequence", "prefix"):
        raise ValueError(f"mode must be one of 'token', 'sequence', 'prefix', got {mode!r}.")
    mask = mask.bool()
    dtype = torch.float64 if torch.float64 in (student_logprobs.dtype, teacher_logprobs.dtype) else torch.float32
    lq = student_logprobs.detach().to(dtype)
    lp = teacher_logprobs.detach().to(dtype)
    if alpha == 0.0:
        log_w = torch.zeros_like(lq)
    elif alpha == 1.0:
        log_w = lq - lp
    else:
        log_w = lq - torch.logaddexp(lp + math.log(alpha), lq + math.log1p(-alpha))
    log_w = torch.where(mask, log_w, torch.zeros_like(log_w))
    if mode == "sequence":
        log_w = log_w.sum(-1, keepdim=True).expand_as(log_w)
    elif mode == "prefix":
        log_w = log_w.cumsum(-1) - log_w
    w = log_w.exp()
    if max_weight is not None:
        w = w.clamp_max(max_weight)
    return torch.where(mask, w, torch.zeros_like(w))


def single_step_reverse_kl(
    student_logits: torch.Tensor,
    mask: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    chunk_tokens: int = 4096,
    temperature: float = 1.0,
) -> torch.Tensor:
    r"""Per-token exact ``KL(q(.|y_<t) || p(.|y_<t)) = sum_v q(v) log(q(v) / p(v))``.

    This is the negated single-step term of paper Eq. 4: its gradient w.r.t. the student logits at t is
    ``-(grad L)_Single``'s per-step integrand, i.e. minimising the masked *sum* of this gives
    ``(grad L)_Single``. The code computes the same quantity as cross-entropy minus entropy
    (``losses.py::_reg_loss``). Top-k teacher: exact reverse KL on the (K + 1)-outcome partition, a lower
    bound (see :mod:`minillm.divergences`). ``temperature`` divides the logits (the code divides the
    student logits by ``--temperature`` before everything).

    Returns:
        ``(B, T)`` fp32, 0 where ``mask`` is False.
    """
    return reverse_kl(
        student_logits,
        mask,
        teacher_logits=teacher_logits,
        teacher_topk_ids=teacher_topk_ids,
        teacher_topk_logprobs=teacher_topk_logprobs,
        temperature=temperature,
        chunk_tokens=chunk_tokens,
    )


def minillm_loss(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    mask: torch.Tensor,
    old_logprobs: torch.Tensor,
    teacher_logprobs: torch.Tensor,
    *,
    teacher_logits: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    alpha: float = 0.0,
    clip_eps: float | None = 0.2,
    length_norm: bool = True,
    gamma: float = 1.0,
    include_current: bool = False,
    whiten: bool = False,
    importance: str = "token",
    single_step: bool = True,
    num_tokens: int | float | torch.Tensor | None = None,
    chunk_tokens: int = 4096,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""MiniLLM loss: PPO-clipped long-term policy gradient + exact single-step reverse KL.

    ``loss = pg_loss + single_step_loss`` (paper Eq. 5 with the Eq. 6 length normalisation and Eq. 7
    teacher-mixed sampling; the code's ``ppo_loss`` = ``_pg_loss + _reg_loss``). The pre-training loss
    ``L_PT`` (:func:`lm_loss` / :func:`pt_loss_with_kd`) is added by the learner on its own batch.

    * Rewards ``r_t = teacher_logprobs - old_logprobs`` (rollout-time student, detached) and advantages
      ``A_t = long_term_advantages(r, mask, length_norm, gamma, include_current, whiten)``.
    * Ratio ``rho_t = exp(log q_theta(y_t) - old_logprobs)``; with importance weight ``w_t``
      (:func:`mixed_importance_weights`, 1 when ``alpha = 0``) the per-token surrogate follows the code
      (``losses.py::_pg_loss``): the weight multiplies the ratio *before* clipping,
      ``max(-A w rho, -A clip(w rho, 1 - eps, 1 + eps))``. Note that at ``rho = 1`` a weight outside
      ``[1 - eps, 1 + eps]`` already sits in the clipped branch for one sign of ``A`` and its gradient is
      dropped; for exact importance weighting pass ``clip_eps=None`` (no clipping: ``-A w rho``).
    * ``pg_loss = masked_mean(surrogate, mask, num_tokens)``.
    * ``single_step_loss = masked_mean(w_ss * KL_t(q || p), mask, num_tokens)``: ``w_ss = 1`` for
      ``importance="token"`` (as in the code's ``_reg_loss``, which is not importance weighted; the paper's
      Eq. 7 also puts ``w_t`` on this term) and the exact prefix weight ``W_<t`` for
      ``importance="sequence"``.

    Unbiasedness: with ``alpha = 0`` (or ``importance="sequence"``), ``clip_eps=None``, ``length_norm=False``,
    ``gamma = 1``, ``whiten=False``, ``old_logprobs`` equal to the current log-probs and
    ``num_tokens = B`` (sum over tokens / number of sequences), the gradient of ``loss`` is an unbiased
    estimate of ``grad KL(q_theta || p)`` at sequence level, both for (``include_current=False``,
    ``single_step=True``) and for (``include_current=True``, ``single_step=False``). Length normalisation,
    discounting, whitening, clipping and the token-level weights trade bias for variance as in the paper.

    Args:
        logits: ``(B, T, V)`` current student logits (requires grad), aligned with ``tokens``.
        tokens: ``(B, T)`` long sampled response tokens.
        mask: ``(B, T)`` bool, True on response tokens (EOS included).
        old_logprobs: ``(B, T)`` student log-probs at rollout time.
        teacher_logprobs: ``(B, T)`` teacher log-probs of ``tokens``.
        teacher_logits / teacher_topk_ids + teacher_topk_logprobs: teacher distribution for the single-step
            term and the exact ``reverse_kl`` metric (optional when ``single_step=False``).
        alpha: teacher-mix probability used at sampling (paper 0.2; code ``--teacher-mixed-alpha``).
        clip_eps: PPO clip range (code ``--cliprange``, 0.2); None disables clipping.
        length_norm, gamma, include_current, whiten: see :func:`long_term_advantages`.
        importance: ``"token"`` (paper/code) or ``"sequence"`` (exact, see :func:`mixed_importance_weights`).
        single_step: add the single-step term (code ``--single-step-reg``).
        num_tokens: denominator of the token mean (global token count under data parallelism).
        chunk_tokens: chunk size of the vocabulary-sized computations.

    Returns:
        ``(loss, metrics)``; metrics are detached scalars: ``loss``, ``pg_loss``, ``single_step_loss``,
        ``reward`` (mean r_t), ``reverse_kl`` (mean exact per-token KL(q || p) if a teacher distribution is
        given, else the estimate mean ``-r_t``), ``clip_frac``, ``ratio`` (mean rho), ``advantage``,
        ``importance_weight`` (mean w).
    """
    if importance not in ("token", "sequence"):
        raise ValueError(f"importance must be 'token' or 'sequence', got {importance!r}.")
    if clip_eps is not None and clip_eps <= 0:
        raise ValueError(f"clip_eps must be > 0 or None, got {clip_eps}.")
    mask = mask.bool()
    has_teacher = teacher_logits is not None or teacher_topk_ids is not None or teacher_topk_logprobs is not None
    if single_step and not has_teacher:
        raise ValueError("single_step=True needs teacher_logits or (teacher_topk_ids, teacher_topk_logprobs).")

    logq = token_logprobs(logits, tokens, chunk_tokens=chunk_tokens, mask=mask)  # (B, T), grad
    dtype = logq.dtype
    rewards = token_rewards(teacher_logprobs, old_logprobs, mask).to(dtype)
    adv = long_term_advantages(
        rewards, mask, length_norm=length_norm, gamma=gamma, include_current=include_current, whiten=whiten
    ).to(dtype)
    w_pg = mixed_importance_weights(old_logprobs, teacher_logprobs, alpha, mask, mode=importance).to(dtype)

    log_ratio = torch.where(mask, logq - old_logprobs.detach().to(dtype), torch.zeros_like(logq))
    ratio = log_ratio.exp()
    weighted = ratio * w_pg  # code: ratio = ratio * w, then clip
    surr = -adv * weighted
    if clip_eps is not None:
        surr_clipped = -adv * weighted.clamp(1.0 - clip_eps, 1.0 + clip_eps)
        clipped = surr_clipped > surr
        surr = torch.maximum(surr, surr_clipped)
    else:
        clipped = torch.zeros_like(mask)
    pg_loss = masked_mean(surr, mask, num_tokens)

    kl_tok = None
    if has_teacher:
        kl_tok = single_step_reverse_kl(
            logits,
            mask,
            teacher_logits=teacher_logits,
            teacher_topk_ids=teacher_topk_ids,
            teacher_topk_logprobs=teacher_topk_logprobs,
            chunk_tokens=chunk_tokens,
        )
    if single_step:
        w_ss = torch.ones_like(w_pg) if importance == "token" else mixed_importance_weights(
            old_logprobs, teacher_logprobs, alpha, mask, mode="prefix"
        ).to(dtype)
        single_step_loss = masked_mean(w_ss * kl_tok, mask, num_tokens)
    else:
        single_step_loss = torch.zeros((), dtype=dtype, device=logits.device)
    loss = pg_loss + single_step_loss

    with torch.no_grad():
        metrics = {
            "loss": loss.detach(),
            "pg_loss": pg_loss.detach(),
            "single_step_loss": single_step_loss.detach(),
            "reward": masked_mean(rewards, mask),
            "reverse_kl": masked_mean(kl_tok.detach() if kl_tok is not None else -rewards, mask),
            "clip_frac": masked_mean(clipped.to(dtype), mask),
            "ratio": masked_mean(ratio.detach(), mask),
            "advantage": masked_mean(adv, mask),
            "importance_weight": masked_mean(w_pg, mask),
        }
    return loss, metrics


def lm_loss(logits: torch.Tensor, labels: torch.Tensor, mask: torch.Tensor, *, num_tokens=None, chunk_tokens: int = 4096) -> torch.Tensor:
    """Pre-training loss ``L_PT`` (paper Sec. 2.3): mean next-token NLL over mask-True tokens.

    Args:
        logits: ``(B, T, V)`` aligned with ``labels`` (``logits[:, t]`` predicts ``labels[:, t]``).
        labels: ``(B, T)`` long; mask: ``(B, T)`` bool (no -100 markers).

    Returns:
        scalar.
    """
    return -masked_mean(token_logprobs(logits, labels, chunk_tokens=chunk_tokens, mask=mask), mask.bool(), num_tokens)


def pt_loss_with_kd(
    logits: torch.Tensor,
    labels: torch.Tensor,
    mask: torch.Tensor,
    *,
    kd_ratio: float = 0.0,
    divergence: str = "forward_kl",
    teacher_logits: torch.Tensor | None = None,
    teacher_topk_ids: torch.Tensor | None = None,
    teacher_topk_logprobs: torch.Tensor | None = None,
    temperature: float = 1.0,
    num_tokens=None,
    chunk_tokens: int = 4096,
    **params: float,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """Pre-training loss with optional KD mix: ``(1 - kd_ratio) L_PT + kd_ratio D``.

    Mirrors the code's ``losses.py::pt_loss`` (``--kd-ratio``), where ``D`` is the teacher-student
    cross-entropy ``-sum_v p log q``; the default ``divergence="forward_kl"`` differs from it only by the
    teacher entropy, a constant (same gradient). Any name of :func:`minillm.divergences.token_divergence`
    may be used, with its ``params``.

    Returns:
        ``(loss, metrics)`` with ``pt_loss``, ``lm_loss``, ``kd_loss`` (detached scalars).
    """
    if not 0.0 <= kd_ratio <= 1.0:
        raise ValueError(f"kd_ratio must be in [0.0, 1.0], got {kd_ratio}.")
    mask = mask.bool()
    lm = lm_loss(logits, labels, mask, num_tokens=num_tokens, chunk_tokens=chunk_tokens)
    if kd_ratio > 0.0:
        div = token_divergence(
            divergence,
            logits,
            mask,
            teacher_logits=teacher_logits,
            teacher_topk_ids=teacher_topk_ids,
            teacher_topk_logprobs=teacher_topk_logprobs,
            temperature=temperature,
            chunk_tokens=chunk_tokens,
            **params,
        )
        kd = masked_mean(div, mask, num_tokens)
    else:
        kd = torch.zeros((), dtype=lm.dtype, device=lm.device)
    loss = (1.0 - kd_ratio) * lm + kd_ratio * kd
    return loss, {"pt_loss": loss.detach(), "lm_loss": lm.detach(), "kd_loss": kd.detach()}
