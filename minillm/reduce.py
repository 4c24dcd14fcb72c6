"""Masked reductions shared by every objective.

Objectives in this package return per-token ``(B, T)`` values; the learner turns
them into one scalar with :func:`masked_mean`. Masks are boolean, True on real
response tokens (never ``-100`` label markers).
"""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor, num_tokens: int | float | torch.Tensor | None = None) -> torch.Tensor:
    """Token mean ``sum(values * mask) / num_tokens``.

    Args:
        values: ``(B, T)`` per-token values (any float dtype; summed in fp32, or fp64 for fp64 input).
        mask: ``(B, T)`` bool, True on tokens that count.
        num_tokens: denominator. Defaults to ``mask.sum()`` clamped to >= 1 (so an all-False mask
            gives 0, not NaN). In data-parallel training pass the *global* token count of the step so
            that the sum over ranks of the per-rank losses is the global token mean (cf. OpenRLHF
            ``aggregate_loss`` / TRL ``num_items_in_batch``).

    Returns:
        scalar tensor.
    """
    if values.shape != mask.shape:
        raise ValueError(f"values and mask must have the same shape, got {tuple(values.shape)} and {tuple(mask.shape)}.")
    mask = mask.bool()
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    # torch.where (not values * mask) so that a NaN/inf in a padded slot cannot leak into the sum.
    total = torch.where(mask, values.to(acc), torch.zeros((), dtype=acc, device=values.device)).sum()
    if num_tokens is None:
        num_tokens = mask.sum().clamp_min(1)
    return total / num_tokens


def masked_whiten(values: torch.Tensor, mask: torch.Tensor, *, shift_mean: bool = True, eps: float = 1e-8) -> torch.Tensor:
    """Whiten ``values`` with the mean and (population) variance of the masked entries only.

    ``(x - mean) / sqrt(var + eps)`` on masked entries, exactly 0 elsewhere. With
    ``shift_mean=False`` the mean is added back (scale-only whitening, as in trl's PPO).

    The official MiniLLM code (microsoft/LMOps ``minillm/minillm/utils.py::whiten``, called from
    ``losses.py::_get_advantages_and_returns`` at commit 7b14bef) whitens the whole padded
    ``(B, T)`` tensor, so padding zeros shift the statistics; we deliberately do not reproduce that.

    Args:
        values: ``(B, T)`` float.
        mask: ``(B, T)`` bool.

    Returns:
        ``(B, T)`` tensor of ``values``' dtype promoted to at least fp32.
    """
    mask = mask.bool()
    acc = torch.float64 if values.dtype == torch.float64 else torch.float32
    x = torch.where(mask, values.to(acc), torch.zeros((), dtype=acc, device=values.device))
    n = mask.sum().clamp_min(1)
    mean = x.sum() / n
    var = torch.where(mask, (x - mean) ** 2, torch.zeros_like(x)).sum() / n
    out = (x - mean) * torch.rsqrt(var + eps)
    if not shift_mean:
        out = out + mean
    return torch.where(mask, out, torch.zeros_like(out))
