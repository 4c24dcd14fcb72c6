"""Memory-bounded row-wise evaluation over flattened tokens (private helper).

Every vocabulary-sized objective in this package is a *row function*
``fn(x_rows (n, V), *aux_rows) -> (n,)``: it only couples entries of the same token.
:class:`_ChunkedRows` evaluates such a function over chunks of rows inside one custom
``torch.autograd.Function``:

* forward runs under no-grad, chunk by chunk, and keeps only the (n,) outputs;
* backward recomputes each chunk with grad enabled (activation recomputation, like
  ``torch.utils.checkpoint`` but writing each chunk's gradient straight into one
  preallocated ``grad_x`` instead of materialising a full-size zero tensor per chunk,
  which is what slicing + checkpoint would do).

Peak extra memory is therefore ``grad_x`` (one copy of the logits in their own dtype, which
any backward needs) plus the fp32 temporaries of one ``(chunk, V)`` chunk.
Only the first tensor (the student logits) receives a gradient; aux tensors (teacher
logits / ids / log-probs, tokens) are treated as constants.
"""

from __future__ import annotations

from typing import Callable, Sequence

import torch

RowFn = Callable[..., torch.Tensor]


def compute_dtype(*tensors: torch.Tensor | None) -> torch.dtype:
    """fp64 if any floating input is fp64 (tests, gradcheck), else fp32 (bf16/fp16 are upcast)."""
    return torch.float64 if any(t is not None and t.dtype == torch.float64 for t in tensors) else torch.float32


def _take(t: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """Rows ``idx`` of ``t``: a view when they are consecutive (the common all-True-mask case),
    else an advanced-indexing copy. (``index_select`` on wide rows is very slow on CPU.)"""
    lo, hi = int(idx[0]), int(idx[-1])  # note: CPU-GPU sync point, once per chunk
    if hi - lo + 1 == idx.numel():
        return t[lo : hi + 1]
    return t[idx]


class _ChunkedRows(torch.autograd.Function):
    @staticmethod
    def forward(ctx, fn: RowFn, chunk: int, out_dtype: torch.dtype, rows: torch.Tensor, x: torch.Tensor, *aux: torch.Tensor):
        # rows: (M,) long indices into the N flattened tokens that are evaluated (mask True).
        # x: (N, V) student logits; aux: tensors with leading dim N.
        out = torch.empty(rows.numel(), dtype=out_dtype, device=x.device)
        for a in range(0, rows.numel(), chunk):
            idx = rows[a : a + chunk]
            out[a : a + chunk] = fn(_take(x, idx), *(_take(t, idx) for t in aux))
        ctx.fn, ctx.chunk = fn, chunk
        ctx.save_for_backward(rows, x, *aux)
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        rows, x, *aux = ctx.saved_tensors
        grad_x = None
        if ctx.needs_input_grad[4]:
            grad_x = torch.zeros_like(x)
            for a in range(0, rows.numel(), ctx.chunk):
                idx = rows[a : a + ctx.chunk]
                with torch.enable_grad():
                    xc = _take(x, idx).detach().requires_grad_(True)
                    yc = ctx.fn(xc, *(_take(t, idx) for t in aux))
                    (gc,) = torch.autograd.grad(yc, xc, grad_out[a : a + ctx.chunk])
                grad_x[idx] = gc.to(x.dtype)
        return (None, None, None, None, grad_x) + (None,) * len(aux)


def chunked_rows(
    fn: RowFn,
    x: torch.Tensor,
    mask: torch.Tensor,
    aux: Sequence[torch.Tensor] = (),
    *,
    chunk_tokens: int = 4096,
    out_dtype: torch.dtype = torch.float32,
) -> torch.Tensor:
    """Evaluate ``fn`` on the masked tokens of ``x`` in chunks; returns ``(B, T)`` zeros elsewhere.

    Args:
        fn: row function ``fn(x (n, V), *aux (n, ...)) -> (n,)``; must be pure.
        x: ``(B, T, V)`` logits (differentiable).
        mask: ``(B, T)`` bool; rows with False are never evaluated (so padded rows full of
            ``-inf`` or garbage cannot produce NaN) and get exactly 0 value and 0 gradient.
        aux: tensors shaped ``(B, T, ...)`` aligned with ``x``; no gradient flows to them.
        chunk_tokens: rows per chunk (>= 1).
    """
    if chunk_tokens < 1:
        raise ValueError(f"chunk_tokens must be >= 1, got {chunk_tokens}.")
    if x.dim() != 3 or mask.shape != x.shape[:2]:
        raise ValueError(f"expected logits (B, T, V) and mask (B, T), got {tuple(x.shape)} and {tuple(mask.shape)}.")
    B, T, V = x.shape
    for t in aux:
        if t.shape[:2] != (B, T):
            raise ValueError(f"aux tensor of shape {tuple(t.shape)} is not aligned with logits {tuple(x.shape)}.")
    flat_mask = mask.reshape(-1).bool()
    rows = flat_mask.nonzero().squeeze(1)  # note: CPU-GPU sync point (size of the selection)
    x_flat = x.reshape(B * T, V)
    aux_flat = [t.reshape(B * T, *t.shape[2:]) for t in aux]
    vals = _ChunkedRows.apply(fn, chunk_tokens, out_dtype, rows, x_flat, *aux_flat)  # (M,)
    out = torch.zeros(B * T, dtype=out_dtype, device=x.device).index_put((rows,), vals)
    return out.view(B, T)
