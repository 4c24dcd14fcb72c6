"""Teacher-mixed sampling: every response token is drawn from p̃ = α·p + (1−α)·q_θ (MiniLLM, arXiv 2306.08543 §2.2).

Exact construction. A draw from a two-component mixture is "pick a component, then sample from it":
pre-draw z_t ~ Bernoulli(α) for every sequence and position t, then take y_t ~ p(· | y_<t, x) if z_t = 1,
else y_t ~ q(· | y_<t, x). Because z_t is independent of the tokens, P(y_t | y_<t) = α·p + (1−α)·q at every
step, so the sequence law is the product of per-token mixtures — the MiniLLM proposal, with no approximation.

Two schedulers realise it:

* `lockstep_mixed_sample` (HF backend): student and teacher advance together one token per step, each with
  its own KV cache; row i takes its token from the teacher where z[i, t]. Both models process every token.
* `alternating_mixed_sample` (engines such as vLLM): the z's split a response into student runs and single
  teacher tokens. A student run up to the next z_t = 1 is one ordinary request (max_tokens = run length,
  stops at EOS), then the teacher samples one token, and so on. Each request is an ancestral sample given
  the full prefix, so the tokens have the same law as in lockstep. Rounds ≈ α·T + 1 instead of T.

Sampling settings (temperature, top-k, top-p) apply to each model's distribution before mixing, which is
what two engines each sampling with those settings do; the defaults (1, 0, 1) give the exact mixture.
Unlike the plain HF path (`min_new_tokens=1`), EOS is allowed as the first token here, as p̃ says.
"""
from __future__ import annotations

import inspect
from typing import Optional, Protocol, Sequence

import torch

from rollout.types import SamplingSettings


class TokenEngine(Protocol):
    """What the alternating scheduler needs from an inference engine (HF or vLLM).

    generate(prompt_ids_list, max_tokens_list, stop_ids) returns, per request, the sampled token ids:
    an ancestral sample of at most max_tokens_list[i] tokens that ends early right after the first token
    in `stop_ids` (that token is kept). Sampling settings are the engine's own.
    """

    def generate(self, prompt_ids_list: list[list[int]], max_tokens_list: list[int],
                 stop_ids: Sequence[int]) -> list[list[int]]: ...


def draw_teacher_positions(num_rows: int, max_new_tokens: int, alpha: float,
                           generator: Optional[torch.Generator] = None) -> torch.Tensor:
    """(N, T) bool z: z[i, t] = True means response token t of row i comes from the teacher (prob α)."""
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"mix_alpha must be in [0.0, 1.0], got {alpha}.")
    return torch.rand(num_rows, max_new_tokens, generator=generator) < alpha


def processed_probs(logits: torch.Tensor, settings: SamplingSettings) -> torch.Tensor:
    """(N, V) float32 sampling probabilities after temperature, top-k (0 = off) and top-p (1 = off)."""
    logits = logits.float() / settings.temperature
    if settings.top_k and settings.top_k < logits.shape[-1]:
        kth = logits.topk(settings.top_k, dim=-1).values[..., -1:]  # (N, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    if settings.top_p < 1.0:
        sorted_p, order = probs.sort(dim=-1, descending=True)
        # keep a token if the mass strictly before it is < top_p (so the top token always survives)
        drop_sorted = (sorted_p.cumsum(-1) - sorted_p) >= settings.top_p
        drop = torch.zeros_like(drop_sorted).scatter(-1, order, drop_sorted)
        probs = probs.masked_fill(drop, 0.0)
        probs = probs / probs.sum(-1, keepdim=True)
    return probs


class _CachedLM:
    """One HF causal LM stepping over a left-padded batch with its own KV cache."""

    def __init__(self, model, ids: torch.Tensor, attn: torch.Tensor):
        self.model = model
        self.attn = attn
        self.pos = (attn.cumsum(-1) - 1).clamp(min=0)  # (N, L) position ids that skip the left padding
        self.next_ids, self.cache = ids, None
        # transformers 5.24 renamed `past_key_values` to `cache` (the GPU image has 5.17): use what forward takes
        self.cache_kw = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"

    def logits(self) -> torch.Tensor:
        """(N, V) next-token logits for the tokens fed so far."""
        out = self.model(input_ids=self.next_ids, attention_mask=self.attn, position_ids=self.pos,
                         use_cache=True, logits_to_keep=1, **{self.cache_kw: self.cache})
        self.cache = out[self.cache_kw]
        return out.logits[:, -1]

    def feed(self, tokens: torch.Tensor) -> None:
        """Append one token per row (N,)."""
        self.next_ids = tokens[:, None]
        self.pos = self.pos[:, -1:] + 1
        self.attn = torch.cat([self.attn, torch.ones_like(self.attn[:, :1])], dim=1)


def left_pad(prompts: list[list[int]], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(N, L) ids and attention mask, prompts right-aligned (for generation)."""
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_token_id, dtype=torch.long)
    attn = torch.zeros_like(ids)
    for i, p in enumerate(prompts):
        ids[i, width - len(p):] = torch.tensor(p, dtype=torch.long)
        attn[i, width - len(p):] = 1
    return ids, attn


@torch.no_grad()
def lockstep_mixed_sample(student, teacher, prompts: list[list[int]], settings: SamplingSettings,
                          alpha: float, stop_ids: Sequence[int], pad_token_id: int,
                          z: Optional[torch.Tensor] = None) -> list[list[int]]:
    """Responses (lists of token ids) with every token drawn from α·p + (1−α)·q; see the module docstring.

    student, teacher: HF causal LMs on the same device sharing a vocabulary (if their output sizes differ,
        e.g. padded embeddings, only the common first V ids are sampled). z: optional pre-drawn (N, T) bool
        teacher positions (tests); drawn from the global torch RNG otherwise, as are the tokens.
    """
    device = next(student.parameters()).device
    N, T = len(prompts), settings.max_new_tokens
    if z is None:
        z = draw_teacher_positions(N, T, alpha)
    z = z.to(device)
    ids, attn = left_pad(prompts, pad_token_id)
    lms = [_CachedLM(m, ids.to(device), attn.to(device)) for m in (student, teacher)]
    stop = torch.tensor(sorted(set(stop_ids)), dtype=torch.long, device=device)
    done = torch.zeros(N, dtype=torch.bool, device=device)
    out = torch.full((N, T), pad_token_id, dtype=torch.long, device=device)
    lengths = torch.zeros(N, dtype=torch.long, device=device)
    for t in range(T):
        logits_q, logits_p = (lm.logits() for lm in lms)
        V = min(logits_q.shape[-1], logits_p.shape[-1])
        q = processed_probs(logits_q[:, :V], settings)
        p = processed_probs(logits_p[:, :V], settings)
        probs = torch.where(z[:, t, None], p, q)  # (N, V): the component z picked
        tok = torch.multinomial(probs, 1)[:, 0]
        tok = tok.masked_fill(done, pad_token_id)
        out[:, t] = tok
        lengths += (~done).long()
        done |= torch.isin(tok, stop)
        if bool(done.all()):  # note: a CPU-GPU sync point, once per token
            break
        for lm in lms:
            lm.feed(tok)
    return [row[:n].tolist() for row, n in zip(out.cpu(), lengths.cpu().tolist())]


def alternating_mixed_sample(student: TokenEngine, teacher: TokenEngine, prompts: list[list[int]],
                             max_new_tokens: int, alpha: float, stop_ids: Sequence[int],
                             z: Optional[torch.Tensor] = None) -> list[list[int]]:
    """Responses with every token drawn from α·p + (1−α)·q, by alternating engine requests.

    Each round: (1) every unfinished row whose next position has z = 0 asks the student for the run of
    tokens up to its next z = 1 (one request, stopping at a stop id); (2) every unfinished row now at a
    z = 1 position asks the teacher for one token. Rounds ≈ number of teacher tokens + 1.
    """
    N, T = len(prompts), max_new_tokens
    if z is None:
        z = draw_teacher_positions(N, T, alpha)
    z_rows = z.tolist()
    stop = set(stop_ids)
    responses: list[list[int]] = [[] for _ in range(N)]
    done = [False] * N

    def run_length(i: int) -> int:
        t = len(responses[i])
        k = 0
        while t + k < T and not z_rows[i][t + k]:
            k += 1
        return k

    def take(engine: TokenEngine, rows: list[int], max_tokens: list[int], who: str) -> None:
        if not rows:
            return
        outs = engine.generate([prompts[i] + responses[i] for i in rows], max_tokens, sorted(stop))
        if len(outs) != len(rows):
            raise RuntimeError(f"mixed sampling: the {who} engine returned {len(outs)} responses for {len(rows)} requests")
        for i, k, toks in zip(rows, max_tokens, outs):
            toks = list(toks)
            stopped = bool(toks) and toks[-1] in stop
            if len(toks) > k or (len(toks) < k and not stopped):
                raise RuntimeError(f"mixed sampling: the {who} engine returned {len(toks)} tokens for max_tokens={k} "
                                   f"without a stop token; it must sample exactly up to max_tokens or a stop id")
            responses[i].extend(toks)
            done[i] = stopped or len(responses[i]) >= T

    while not all(done):
        rows = [i for i in range(N) if not done[i] and run_length(i) > 0]
        take(student, rows, [run_length(i) for i in rows], "student")
        rows = [i for i in range(N) if not done[i]]  # each is now at a z = 1 position
        take(teacher, rows, [1] * len(rows), "teacher")
    return responses


class HFTokenEngine:
    """`TokenEngine` over an HF model's `generate` (CPU tests of the alternating scheduler; a GPU fallback).

    Requests are grouped by max_tokens (one `generate` per group). No `min_new_tokens`: a stop id may be
    the first token, as in an engine's ancestral sampling.
    """

    def __init__(self, model, settings: SamplingSettings, pad_token_id: int):
        self.model, self.settings, self.pad_token_id = model, settings, pad_token_id

    @torch.no_grad()
    def generate(self, prompt_ids_list: list[list[int]], max_tokens_list: list[int],
                 stop_ids: Sequence[int]) -> list[list[int]]:
        device = next(self.model.parameters()).device
        stop = set(stop_ids)
        results: list[Optional[list[int]]] = [None] * len(prompt_ids_list)
        for k in sorted(set(max_tokens_list)):
            rows = [i for i, m in enumerate(max_tokens_list) if m == k]
            ids, attn = left_pad([prompt_ids_list[i] for i in rows], self.pad_token_id)
            s = self.settings
            gen = self.model.generate(
                input_ids=ids.to(device), attention_mask=attn.to(device), do_sample=True,
                temperature=s.temperature, top_p=s.top_p, top_k=s.top_k or None, max_new_tokens=k,
                eos_token_id=sorted(stop) or None, pad_token_id=self.pad_token_id,
            )[:, ids.shape[1]:].tolist()
            for i, row in zip(rows, gen):
                cut = next((j + 1 for j, t in enumerate(row) if t in stop), len(row))
                results[i] = row[:cut]
        return results  # type: ignore[return-value]
