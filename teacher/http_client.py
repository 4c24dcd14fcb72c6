"""Client for the HTTP teacher (``teacher.http_service``); same ``score``/``vocab_info`` as ``TeacherPool``.

Connection errors, timeouts and 5xx answers are retried with exponential backoff
(``backoff * 2**attempt`` seconds); after ``retries`` retries a ``TeacherUnavailableError``
names the URL and what each attempt saw. 4xx answers are the caller's fault and raise
``ValueError`` with the server's message at once.
"""

from __future__ import annotations

import time

import httpx

from teacher.types import ScoreRequest, TeacherScores
from teacher.wire import MEDIA_TYPE, decode_scores, encode_request


class TeacherUnavailableError(RuntimeError):
    """The teacher server could not be reached (or kept failing) after all retries."""


class HttpTeacherClient:
    """Args:
        url (`str`): server root, e.g. "http://10.0.0.5:8000" (routes /v1/... are appended).
        timeout (`float`, *optional*, defaults to 300): seconds per request (a big batch on a big teacher is slow).
        retries (`int`, *optional*, defaults to 5): retries after the first attempt.
        backoff (`float`, *optional*, defaults to 0.5): first wait in seconds, doubled every retry.
        values_dtype (`str`, *optional*, defaults to "float32"): dtype of returned top-k log-probs.
        vocab_size (`int`, *optional*): the student's vocabulary size, sent with every request (distributions over
            the student's ids; ``teacher.scoring.score_sequences``).
    """

    def __init__(self, url: str, timeout: float = 300.0, retries: int = 5, backoff: float = 0.5, values_dtype: str = "float32",
                 vocab_size: int | None = None):
        if retries < 0 or backoff < 0:
            raise ValueError(f"retries and backoff must be >= 0, got retries={retries}, backoff={backoff}.")
        self.url = url.rstrip("/")
        self.retries, self.backoff, self.values_dtype, self.vocab_size = retries, backoff, values_dtype, vocab_size
        self._http = httpx.Client(timeout=timeout)

    def score(self, sequences, prompt_lens, response_lens, topk: int = 0, return_full: bool = False, temperature: float = 1.0) -> TeacherScores:
        """Shapes as ``teacher.scoring.score_sequences``; the result is on CPU."""
        from teacher.scoring import validate_lengths

        validate_lengths(sequences, prompt_lens, response_lens)  # fail before the round trip
        body = encode_request(ScoreRequest(sequences, prompt_lens, response_lens, topk, return_full, temperature,
                                          self.vocab_size), self.values_dtype)
        resp = self._request("POST", "/v1/score", content=body, headers={"content-type": MEDIA_TYPE})
        return decode_scores(resp.content)

    def vocab_info(self) -> dict:
        """The server's /v1/info: model_name, vocab_size, tokenizer_len, max_context, special_token_ids, api_version."""
        return self._request("GET", "/v1/info").json()

    def health(self) -> bool:
        return self._request("GET", "/v1/health").json().get("status") == "ok"

    def close(self) -> None:
        self._http.close()

    def _request(self, method: str, route: str, **kwargs) -> httpx.Response:
        return request_with_retries(self._http, method, self.url + route, self.retries, self.backoff, **kwargs)


def request_with_retries(http: httpx.Client, method: str, url: str, retries: int, backoff: float, **kwargs) -> httpx.Response:
    """One HTTP call, retried on transport errors and 5xx; 4xx -> ValueError with the server's message."""
    seen = []
    for attempt in range(retries + 1):
        if attempt:
            time.sleep(backoff * 2 ** (attempt - 1))
        try:
            resp = http.request(method, url, **kwargs)
        except httpx.TransportError as e:  # connect refused, reset, timeouts
            seen.append(f"{type(e).__name__}: {e}")
            continue
        if resp.status_code >= 500:
            seen.append(f"HTTP {resp.status_code}: {resp.text[:200]}")
            continue
        if resp.status_code >= 400:
            try:
                body = resp.json()
                detail = body.get("detail") or body.get("error") or body if isinstance(body, dict) else body
            except ValueError:
                detail = resp.text
            raise ValueError(f"teacher at {url} rejected the request (HTTP {resp.status_code}): {detail}")
        return resp
    raise TeacherUnavailableError(
        f"teacher at {url} unavailable after {len(seen)} attempts (backoff {backoff}s doubling); "
        f"last errors: {seen[-3:]}. Check that the server is running and reachable from this node."
    )
