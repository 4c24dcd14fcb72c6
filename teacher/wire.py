"""Binary encoding of score requests and responses for the HTTP teacher (see teacher/API.md).

Bodies are plain safetensors files (``safetensors.torch.save``), media type
``application/x-safetensors``: an 8-byte little-endian header length, a JSON header
with each tensor's dtype/shape/offsets and a string->string ``__metadata__`` map, then
the raw little-endian buffers. Scalars (topk, return_full, ...) travel in ``__metadata__``.
No per-token Python objects are built on either side.
"""

from __future__ import annotations

import json
import struct

import torch
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

from teacher.types import ScoreRequest, TeacherScores

MEDIA_TYPE = "application/x-safetensors"
API_VERSION = "1"
_SCORE_FIELDS = ("token_logprobs", "topk_ids", "topk_logprobs", "full_logprobs")


class WireFormatError(ValueError):
    """The body is not a well-formed request/response (HTTP 400)."""


def read_metadata(body: bytes) -> dict[str, str]:
    """The ``__metadata__`` map of a safetensors body, without loading the tensors."""
    if len(body) < 8:
        raise WireFormatError(f"body too short for safetensors ({len(body)} bytes).")
    (n,) = struct.unpack("<Q", body[:8])
    if n > len(body) - 8:
        raise WireFormatError(f"safetensors header length {n} exceeds body size {len(body)}.")
    try:
        header = json.loads(body[8 : 8 + n])
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise WireFormatError(f"safetensors header is not JSON: {e}") from e
    if not isinstance(header, dict):
        raise WireFormatError(f"safetensors header must be a JSON object, got a {type(header).__name__}.")
    meta = header.get("__metadata__") or {}
    if not isinstance(meta, dict) or not all(isinstance(k, str) and isinstance(v, str) for k, v in meta.items()):
        raise WireFormatError("safetensors __metadata__ must map strings to strings.")
    return meta


def _load(body: bytes) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    meta = read_metadata(body)
    try:
        tensors = st_load(body)
    except Exception as e:  # safetensors raises its own SafetensorError
        raise WireFormatError(f"body is not a valid safetensors file: {e}") from e
    return tensors, meta


def encode_request(req: ScoreRequest, values_dtype: str = "float32") -> bytes:
    """ScoreRequest -> bytes. Tensors: sequences (N, L) int64, prompt_lens (N,) int64, response_lens (N,) int64."""
    tensors = {
        "sequences": req.sequences.to("cpu", torch.int64).contiguous(),
        "prompt_lens": req.prompt_lens.to("cpu", torch.int64).contiguous(),
        "response_lens": req.response_lens.to("cpu", torch.int64).contiguous(),
    }
    meta = {"api_version": API_VERSION, "topk": str(req.topk), "return_full": str(int(req.return_full)),
            "temperature": repr(float(req.temperature)), "values_dtype": values_dtype}
    if req.vocab_size is not None:
        meta["vocab_size"] = str(req.vocab_size)
    return st_save(tensors, metadata=meta)


def decode_request(body: bytes) -> tuple[ScoreRequest, str]:
    """bytes -> (ScoreRequest, values_dtype name). Raises WireFormatError (400) on malformed bodies."""
    tensors, meta = _load(body)
    missing = [k for k in ("sequences", "prompt_lens", "response_lens") if k not in tensors]
    if missing:
        raise WireFormatError(f"request is missing tensors {missing}; expected sequences, prompt_lens, response_lens.")
    if meta.get("api_version", API_VERSION) != API_VERSION:
        raise WireFormatError(f"api_version {meta['api_version']!r} not supported, this server speaks {API_VERSION!r}.")
    for name in ("sequences", "prompt_lens", "response_lens"):  # int32 is accepted and widened
        t = tensors[name]
        if t.dtype not in (torch.int64, torch.int32) or t.dim() != (2 if name == "sequences" else 1):
            raise WireFormatError(f"{name} must be a {'2' if name == 'sequences' else '1'}-D int64 (or int32) tensor, "
                                  f"got {t.dim()}-D {t.dtype}.")
        tensors[name] = t.long()
    try:
        topk = int(meta.get("topk", "0"))
        return_full = bool(int(meta.get("return_full", "0")))
        temperature = float(meta.get("temperature", "1.0"))
        vocab_size = int(meta["vocab_size"]) if "vocab_size" in meta else None
        req = ScoreRequest(tensors["sequences"], tensors["prompt_lens"], tensors["response_lens"], topk, return_full,
                           temperature, vocab_size)
    except ValueError as e:
        raise WireFormatError(f"bad scalar in request metadata {meta}: {e}") from e
    return req, meta.get("values_dtype", "float32")


def encode_scores(scores: TeacherScores) -> bytes:
    """TeacherScores -> bytes (absent optional fields are omitted)."""
    tensors = {k: getattr(scores, k).to("cpu").contiguous() for k in _SCORE_FIELDS if getattr(scores, k) is not None}
    return st_save(tensors, metadata={"api_version": API_VERSION})


def decode_scores(body: bytes) -> TeacherScores:
    """bytes -> TeacherScores (CPU tensors)."""
    tensors, _ = _load(body)
    if "token_logprobs" not in tensors:
        raise WireFormatError("response has no token_logprobs tensor.")
    return TeacherScores(**{k: tensors.get(k) for k in _SCORE_FIELDS})
