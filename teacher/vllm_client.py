"""Score with an external vLLM OpenAI-compatible server (``vllm serve <teacher>``).

Request (vLLM >= 0.6, checked against the 0.26 ``CompletionRequest``): POST ``/v1/completions`` with

    {"model": name, "prompt": [[ids of row 0], [ids of row 1], ...],   # token ids, no re-tokenisation
     "max_tokens": 1, "temperature": 0, "prompt_logprobs": K}          # K = 0: only the actual token

Each choice (``index`` = position in the prompt list) carries the vLLM extension
``prompt_logprobs``: a list, one entry per prompt token, whose first entry is ``null``
(nothing predicts token 0) and whose entry j is a
``{str(token_id): {"logprob": float, "rank": int, "decoded_token": str | null}}`` map whose
first key is the actual token j (rank = how many vocabulary entries have a log-prob >= its
own), followed by the top-K tokens (ranks 1..K; the actual token keeps its first position if
it is among them). A -inf log-prob is sent as -9999.0. (0.26: ``append_logprobs_for_next_position``
in vllm/logprobs.py, ``CompletionResponseChoice`` and ``clamp_prompt_logprobs`` in the
completion server.) Response position t of row i is prompt entry ``prompt_lens[i] + t``.

Assumptions, documented because they can't be tested here: ``max_tokens=1`` (0 is
rejected without ``echo``; the one greedy token is discarded), so every row must be shorter
than the server's max_model_len (else HTTP 400); K is capped by the
server's ``--max-logprobs`` (default 20: start the server with ``--max-logprobs 64`` for
K=64); prompt log-probs come from the raw logits (``--logprobs-mode raw_logprobs``, the
default), so ``temperature`` must be 1. The full distribution is not offered.
"""

from __future__ import annotations

import httpx
import torch

from teacher.http_client import request_with_retries
from teacher.types import TeacherScores


class VllmServerTeacherClient:
    """Args:
        base_url (`str`): server root, e.g. "http://10.0.0.7:8000" (``/v1/completions`` is appended).
        model_name (`str`): the served model name (``--served-model-name`` or the path given to ``vllm serve``).
        topk (`int`, *optional*, defaults to 0): default K when ``score`` is called without one.
        rows_per_request (`int`, *optional*, defaults to 64): prompts batched into one HTTP request.
        timeout, retries, backoff: as ``HttpTeacherClient``.
        vocab_size (`int`, *optional*): the student's vocabulary size. vLLM ranks the teacher's whole vocabulary,
            embedding padding included: top-k ids at or past it (rows the student lacks) are dropped, and a
            position left with fewer than K ids is an error naming the fix. Unlike the Ray and HTTP scorers, which
            renormalise over the student's ids, the log-probs stay normalised over the teacher's whole vocabulary
            (vLLM returns no logits to renormalise with): the gap is the log of the mass on the padding rows, which
            a trained teacher puts near zero.
    """

    def __init__(self, base_url: str, model_name: str, topk: int = 0, rows_per_request: int = 64,
                 timeout: float = 300.0, retries: int = 5, backoff: float = 0.5, values_dtype: torch.dtype = torch.float32,
                 vocab_size: int | None = None):
        if topk < 0 or rows_per_request < 1:
            raise ValueError(f"need topk >= 0 and rows_per_request >= 1, got topk={topk}, rows_per_request={rows_per_request}.")
        self.base_url, self.model_name, self.topk = base_url.rstrip("/"), model_name, topk
        self.rows_per_request, self.retries, self.backoff, self.values_dtype = rows_per_request, retries, backoff, values_dtype
        self.vocab_size = vocab_size
        self._http = httpx.Client(timeout=timeout)

    def score(self, sequences, prompt_lens, response_lens, topk: int | None = None, return_full: bool = False, temperature: float = 1.0) -> TeacherScores:
        """Shapes as ``teacher.scoring.score_sequences``; result on CPU, top-k sorted by rank."""
        from teacher.scoring import validate_lengths

        if return_full:
            raise ValueError("VllmServerTeacherClient cannot return the full distribution; use TeacherPool or the HTTP teacher for return_full.")
        if temperature != 1.0:
            raise ValueError(f"vLLM prompt_logprobs are taken from raw logits; temperature must be 1.0, got {temperature}.")
        K = self.topk if topk is None else topk
        sequences, prompt_lens, response_lens = sequences.cpu(), prompt_lens.long().cpu(), response_lens.long().cpu()
        validate_lengths(sequences, prompt_lens, response_lens)
        N, T = sequences.shape[0], int(response_lens.max())
        token_lp = torch.zeros(N, T)
        topk_ids = torch.zeros(N, T, K, dtype=torch.int32) if K else None
        topk_lp = torch.zeros(N, T, K) if K else None
        for start in range(0, N, self.rows_per_request):
            rows = range(start, min(N, start + self.rows_per_request))
            prompts = [sequences[i, : int(prompt_lens[i] + response_lens[i])].tolist() for i in rows]
            choices = self._complete(prompts, K)
            for i, prompt, choice in zip(rows, prompts, choices):
                P, R = int(prompt_lens[i]), int(response_lens[i])
                entries = choice.get("prompt_logprobs")
                if entries is None or len(entries) != len(prompt):
                    raise ValueError(f"vLLM returned {None if entries is None else len(entries)} prompt_logprobs for a {len(prompt)}-token prompt (row {i}); is prompt_logprobs supported by this server?")
                for t in range(R):
                    entry = entries[P + t]
                    token_lp[i, t] = entry[str(prompt[P + t])]["logprob"]
                    if K:
                        ranked = sorted((v.get("rank") or 0, -v["logprob"], int(k)) for k, v in entry.items())
                        top = [e for e in ranked if self.vocab_size is None or e[2] < self.vocab_size][:K]
                        if len(top) < K:
                            dropped = len(ranked) - len([e for e in ranked if self.vocab_size is None or e[2] < self.vocab_size])
                            raise ValueError(
                                f"vLLM returned {len(top)} < K={K} usable log-probs at row {i}, position {t}"
                                + (f" ({dropped} ranked ids are past the student's vocabulary size {self.vocab_size}: "
                                   f"use teacher.backend=ray or http, which score over the student's ids)" if dropped else
                                   "; raise the server's --max-logprobs"))
                        topk_ids[i, t] = torch.tensor([tid for _, _, tid in top], dtype=torch.int32)
                        topk_lp[i, t] = torch.tensor([-neg for _, neg, _ in top])
        return TeacherScores(token_lp, topk_ids, None if topk_lp is None else topk_lp.to(self.values_dtype))

    def vocab_info(self) -> dict:
        """What ``/v1/models`` tells: model_name and max_context (vLLM does not expose the vocabulary size)."""
        data = request_with_retries(self._http, "GET", self.base_url + "/v1/models", self.retries, self.backoff).json()["data"]
        match = [m for m in data if m.get("id") == self.model_name]
        if not match:
            raise ValueError(f"model {self.model_name!r} is not served at {self.base_url}; served: {[m.get('id') for m in data]}.")
        return {"model_name": self.model_name, "vocab_size": None, "tokenizer_len": None,
                "max_context": match[0].get("max_model_len"), "special_token_ids": {}}

    def close(self) -> None:
        self._http.close()

    def _complete(self, prompts: list[list[int]], K: int) -> list[dict]:
        payload = {"model": self.model_name, "prompt": prompts, "max_tokens": 1, "temperature": 0.0, "prompt_logprobs": K}
        resp = request_with_retries(self._http, "POST", self.base_url + "/v1/completions", self.retries, self.backoff, json=payload)
        choices = sorted(resp.json()["choices"], key=lambda c: c["index"])
        if len(choices) != len(prompts):
            raise ValueError(f"vLLM returned {len(choices)} choices for {len(prompts)} prompts.")
        return choices
