"""Per-token log-probabilities and entropies without a full fp32 ``(B, T, V)`` copy.

Both functions go through :func:`minillm._chunking.chunked_rows`: a custom autograd
Function that evaluates chunks of flattened tokens and *recomputes* each chunk in backward,
so forward and backward hold at most one ``(chunk_tokens, V)`` set of fp32 temporaries
(plus the gradient buffer of the logits themselves).
"""

from __future__ import annotations

import functools

import torch

from ._chunking import chunked_rows, compute_dtype


def _logprob_rows(x: torch.Tensor, tok: torch.Tensor, *, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    z = x.to(dtype) / temperature  # (n, V)
    return z.gather(-1, tok.unsqueeze(-1)).squeeze(-1) - torch.logsumexp(z, dim=-1)  # (n,)


def token_logprobs(
    logits: torch.Tensor,
    tokens: torch.Tensor,
    temperature: float = 1.0,
    chunk_tokens: int = 4096,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    r"""``log softmax(logits / temperature)[tokens]`` per token.

    Logits are aligned: ``logits[:, t]`` is the distribution that produced ``tokens[:, t]``.
    Memory: chunked custom autograd Function with per-chunk recomputation in backward
    (see ``minillm/_chunking.py``); no full fp32 ``(B, T, V)`` tensor is created.

    Args:
        logits: ``(B, T, V)`` any float dtype (accumulated in fp32; fp64 stays fp64).
        tokens: ``(B, T)`` long token ids.
        temperature: logits are divided by it before the softmax.
        chunk_tokens: tokens per chunk.
        mask: optional ``(B, T)`` bool; positions with False are skipped and return 0.
            Defaults to all True.

    Returns:
        ``(B, T)`` fp32 (fp64 for fp64 logits) log-probabilities.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    if tokens.shape != logits.shape[:2]:
        raise ValueError(f"tokens {tuple(tokens.shape)} must match logits[:2] {tuple(logits.shape[:2])}.")
    if mask is None:
        mask = torch.ones(tokens.shape, dtype=torch.bool, device=logits.device)
    dtype = compute_dtype(logits)
    fn = functools.partial(_logprob_rows, temperature=temperature, dtype=dtype)
    return chunked_rows(fn, logits, mask, (tokens.long(),), chunk_tokens=chunk_tokens, out_dtype=dtype)


def _entropy_rows(x: torch.Tensor, *, temperature: float, dtype: torch.dtype) -> torch.Tensor:
    lq = torch.log_softmax(x.to(dtype) / temperature, dim=-1)
    # -sum q log q, with 0 * log 0 = 0 for -inf (masked-vocabulary) entries.
    return -torch.where(lq > float("-inf"), lq.exp() * lq.clamp_min(-1e4), torch.zeros_like(lq)).sum(-1)


def entropy(logits: torch.Tensor, mask: torch.Tensor, temperature: float = 1.0, chunk_tokens: int = 4096) -> torch.Tensor:
    """Per-token entropy ``H(q_t) = -sum_v q_t(v) log q_t(v)`` of ``softmax(logits / temperature)``.

    Args:
        logits: ``(B, T, V)``; ``-inf`` entries (masked vocabulary) contribute 0.
        mask: ``(B, T)`` bool.

    Returns:
        ``(B, T)`` fp32, 0 where ``mask`` is False.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}.")
    dtype = compute_dtype(logits)
    fn = functools.partial(_entropy_rows, temperature=temperature, dtype=dtype)
    return chunked_rows(fn, logits, mask, chunk_tokens=chunk_tokens, out_dtype=dtype)
