"""Data types exchanged between the teacher backends and the training loop.

Layout shared with the rest of the system (right-padded batches):

    sequences      (N, L) int64   row i = prompt_i tokens, response_i tokens, then pad
    prompt_lens    (N,)   int64
    response_lens  (N,)   int64
    T = max(response_lens)

Response position t of row i is ``sequences[i, prompt_lens[i] + t]``; the teacher
distribution that predicts it comes from the logits at ``prompt_lens[i] + t - 1``.

Every backend (``score_sequences``, ``TeacherPool``, ``HttpTeacherClient``,
``VllmServerTeacherClient``) returns a ``TeacherScores`` in this layout.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, fields

from typing import Optional

import torch

# below this, fp32 logits / temperature overflow or round the temperature to 0 (NaN log-probs)
MIN_TEMPERATURE = 1e-6


@dataclass
class ScoreRequest:
    """One scoring call, as plain data (what crosses a process boundary).

    Args:
        sequences (`torch.Tensor`): (N, L) int64, right-padded prompt+response rows.
        prompt_lens (`torch.Tensor`): (N,) int64, >= 1 (the first response token needs a predecessor).
        response_lens (`torch.Tensor`): (N,) int64, >= 1.
        topk (`int`, *optional*, defaults to 0): top-k ids/log-probs per position; 0 = none.
        return_full (`bool`, *optional*, defaults to False): also return the (N, T, V) log-softmax.
        temperature (`float`, *optional*, defaults to 1.0): logits are divided by it before the softmax.
        vocab_size (`int`, *optional*): the vocabulary the distribution is over (the student's embedding rows);
            None = the teacher's (``teacher.scoring.score_sequences``).
    """

    sequences: torch.Tensor
    prompt_lens: torch.Tensor
    response_lens: torch.Tensor
    topk: int = 0
    return_full: bool = False
    temperature: float = 1.0
    vocab_size: Optional[int] = None

    def __post_init__(self) -> None:
        if self.topk < 0:
            raise ValueError(f"topk must be >= 0, got {self.topk}.")
        if self.vocab_size is not None and self.vocab_size < 1:
            raise ValueError(f"vocab_size must be >= 1, got {self.vocab_size}.")
        if not (math.isfinite(self.temperature) and self.temperature >= MIN_TEMPERATURE):
            raise ValueError(f"temperature must be finite and >= {MIN_TEMPERATURE}, got {self.temperature}.")


@dataclass
class TeacherScores:
    """Teacher log-probs on the response positions of a batch.

    Fields:
        token_logprobs: (N, T) float32, log p(y_t | y_<t, x) of the sampled token; 0 beyond response_lens.
        topk_ids: (N, T, K) int32, teacher's top-k token ids per position (descending log-prob); 0 beyond.
        topk_logprobs: (N, T, K) values dtype (fp32/bf16/fp16), log-probs under the *full*
            distribution (not renormalised over the k); 0 beyond response_lens.
        full_logprobs: (N, T, V) float32 full log-softmax; 0 beyond response_lens.
    """

    token_logprobs: torch.Tensor
    topk_ids: torch.Tensor | None = None
    topk_logprobs: torch.Tensor | None = None
    full_logprobs: torch.Tensor | None = None

    @property
    def num_rows(self) -> int:
        return self.token_logprobs.shape[0]

    @property
    def max_response_len(self) -> int:
        return self.token_logprobs.shape[1]

    def to(self, device: torch.device | str) -> TeacherScores:
        """Copy every present tensor to ``device``."""
        return TeacherScores(**{f.name: _maybe(getattr(self, f.name), lambda x: x.to(device)) for f in fields(self)})

    def pad_to(self, T: int) -> TeacherScores:
        """Zero-pad (or keep) the time dimension to length ``T`` (>= current T)."""
        cur = self.max_response_len
        if T < cur:
            raise ValueError(f"pad_to({T}) would drop positions: these scores have T={cur}.")
        if T == cur:
            return self

        def pad(x: torch.Tensor) -> torch.Tensor:
            out = x.new_zeros((x.shape[0], T, *x.shape[2:]))
            out[:, :cur] = x
            return out

        return TeacherScores(**{f.name: _maybe(getattr(self, f.name), pad) for f in fields(self)})

    def index_rows(self, index: torch.Tensor | list[int]) -> TeacherScores:
        """Rows ``index`` (any order), keeping T."""
        index = torch.as_tensor(index, dtype=torch.long)
        return TeacherScores(**{f.name: _maybe(getattr(self, f.name), lambda x: x[index.to(x.device)]) for f in fields(self)})


def _maybe(x, fn):
    return None if x is None else fn(x)


def split_scores(scores: TeacherScores, sizes: list[int]) -> list[TeacherScores]:
    """Split along N into consecutive parts of ``sizes`` rows (T is kept for every part)."""
    if sum(sizes) != scores.num_rows:
        raise ValueError(f"split sizes {sizes} sum to {sum(sizes)}, but the scores have {scores.num_rows} rows.")
    parts = {f.name: _maybe(getattr(scores, f.name), lambda x: torch.split(x, sizes)) for f in fields(scores)}
    return [TeacherScores(**{k: (None if v is None else v[i]) for k, v in parts.items()}) for i in range(len(sizes))]


def concat_scores(parts: list[TeacherScores], T: int | None = None) -> TeacherScores:
    """Concatenate along N; parts with a shorter T are zero-padded to ``T`` (default: the max)."""
    if not parts:
        raise ValueError("concat_scores needs at least one part.")
    T = max(p.max_response_len for p in parts) if T is None else T
    if len(parts) == 1:  # no copy: full distributions are hundreds of MB a step
        return parts[0].pad_to(T)
    parts = [p.pad_to(T) for p in parts]
    out = {}
    for f in fields(TeacherScores):
        present = [getattr(p, f.name) is not None for p in parts]
        if any(present) and not all(present):
            raise ValueError(f"cannot concat scores: field {f.name!r} is present in only some parts {present}.")
        out[f.name] = torch.cat([getattr(p, f.name) for p in parts]) if all(present) else None
    return TeacherScores(**out)


def scatter_rows(parts: list[TeacherScores], row_indices: list[torch.Tensor], num_rows: int, T: int) -> TeacherScores:
    """Inverse of taking rows ``row_indices[j]`` into part j: rebuild the (num_rows, T, ...) batch in order."""
    merged = concat_scores(parts, T)
    order = torch.cat([torch.as_tensor(ix, dtype=torch.long) for ix in row_indices])
    if order.numel() != num_rows or not torch.equal(order.sort().values, torch.arange(num_rows)):
        raise ValueError(f"row_indices must be a partition of range({num_rows}), got {order.tolist()}.")
    if torch.equal(order, torch.arange(num_rows)):  # parts already in row order (one replica): no copy
        return merged
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(num_rows)
    return merged.index_rows(inverse)
