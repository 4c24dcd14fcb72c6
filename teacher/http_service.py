"""HTTP teacher: one model replica behind a small FastAPI app (API reference: teacher/API.md).

Routes (api version 1):
    GET  /v1/health  -> {"status": "ok"}
    GET  /v1/info    -> {model_name, vocab_size, tokenizer_len, max_context, special_token_ids, api_version, ...}
    POST /v1/score   body: safetensors (sequences, prompt_lens, response_lens + metadata topk, return_full,
                     temperature, values_dtype [, vocab_size]) -> safetensors (token_logprobs [, topk_ids, topk_logprobs, full_logprobs])

Errors are JSON ``{"detail": message}``: 400 malformed body or metadata scalar (e.g. a temperature that is
not finite or below 1e-6), 413 body (or a full-distribution answer) too large or sequence longer than the
model's context, 415 another content-type, 422 invalid lengths (empty response, span beyond L, ...) or a
vocab_size far beyond the teacher's rows.

Run it:  ``python -m teacher.http_service --model-path /ckpt/teacher --port 8000 --device cuda --dtype bfloat16``
or from Python: ``serve_teacher(model_path, host, port, device, dtype, token_budget)``.
"""

from __future__ import annotations

import argparse
import threading

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response
from starlette.concurrency import run_in_threadpool

from teacher.wire import API_VERSION, MEDIA_TYPE, decode_request, encode_scores

DEFAULT_MAX_BODY_BYTES = 256 * 2**20  # 256 MiB ~ 32M int64 tokens in the request
MAX_FULL_VALUES = 2**30  # return_full: at most 4 GiB of fp32 log-probs in one response


def create_app(model, info: dict, token_budget: int = 16384, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES):
    """FastAPI app around an already-loaded model; ``info`` comes from ``teacher.loading.describe_teacher``."""
    from teacher.loading import parse_dtype
    from teacher.scoring import score_sequences, validate_lengths

    app = FastAPI(title="minillm teacher", version=API_VERSION)
    # One forward at a time: concurrent requests would multiply activation memory.
    lock = threading.Lock()
    max_context = info.get("max_context")

    def error(status: int, message: str):
        return JSONResponse(status_code=status, content={"detail": message})

    @app.get("/v1/health")
    def health():
        return {"status": "ok"}

    @app.get("/v1/info")
    def get_info():
        return {**info, "api_version": API_VERSION, "media_type": MEDIA_TYPE, "token_budget": token_budget}

    @app.post("/v1/score")
    async def score(request: Request):
        content_type = request.headers.get("content-type")
        if content_type is not None and content_type.split(";")[0].strip() != MEDIA_TYPE:
            return error(415, f"content-type {content_type!r}: send the request as {MEDIA_TYPE} (see teacher/API.md).")
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > max_body_bytes:
            return error(413, f"request body of {declared} bytes exceeds the server limit {max_body_bytes}; split the batch.")
        chunks, size = [], 0
        async for chunk in request.stream():  # a chunked body has no length up front: stop reading at the limit
            size += len(chunk)
            if size > max_body_bytes:
                return error(413, f"request body over the server limit {max_body_bytes} bytes; split the batch.")
            chunks.append(chunk)
        body = b"".join(chunks)
        try:
            req, values_dtype = decode_request(body)
            dtype = parse_dtype(values_dtype)
        except Exception as e:  # anything a body can make decoding raise is the body's fault
            return error(400, f"{e}" if isinstance(e, ValueError) else f"malformed request ({type(e).__name__}: {e})")
        try:
            validate_lengths(req.sequences, req.prompt_lens, req.response_lens)
        except ValueError as e:
            return error(422, str(e))
        if req.return_full:
            values = len(req.prompt_lens) * int(req.response_lens.max()) * (req.vocab_size or info["vocab_size"])
            if values > MAX_FULL_VALUES:
                return error(413, f"return_full asks for {values} values (N x T x V), over the server limit "
                                  f"{MAX_FULL_VALUES}; split the batch or ask for top-k.")
        if max_context is not None:
            too_long = (req.prompt_lens + req.response_lens) > max_context
            if bool(too_long.any()):
                rows = too_long.nonzero().flatten().tolist()[:8]
                return error(413, f"sequence longer than the teacher's max context {max_context} in rows {rows}; truncate prompts or lower the generation max length.")

        def run():
            with lock:
                return score_sequences(
                    model, req.sequences, req.prompt_lens, req.response_lens, topk=req.topk, return_full=req.return_full,
                    values_dtype=dtype, token_budget=token_budget, temperature=req.temperature,
                    vocab_size=req.vocab_size,
                )

        try:
            scores = await run_in_threadpool(run)
        except ValueError as e:
            return error(422, str(e))
        return Response(content=encode_scores(scores), media_type=MEDIA_TYPE)

    return app


def serve_teacher(model_path: str, host: str = "127.0.0.1", port: int = 8000, device: str = "cpu", dtype: str = "bfloat16", token_budget: int = 16384) -> None:
    """Load the teacher from a local folder and serve it (blocks). CLI hook for ``minillm serve-teacher``."""
    import uvicorn

    from teacher.loading import describe_teacher, load_teacher, load_tokenizer_if_present

    model = load_teacher(model_path, device, dtype)
    info = describe_teacher(model, model_path, load_tokenizer_if_present(model_path))
    uvicorn.run(create_app(model, info, token_budget), host=host, port=port, log_level="warning")


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description="Serve a teacher model over HTTP (see teacher/API.md).")
    ap.add_argument("--model-path", required=True)
    ap.add_argument("--host", default="127.0.0.1")
    ap.add_argument("--port", type=int, default=8000)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="bfloat16")
    ap.add_argument("--token-budget", type=int, default=16384)
    a = ap.parse_args(argv)
    serve_teacher(a.model_path, a.host, a.port, a.device, a.dtype, a.token_budget)


if __name__ == "__main__":
    main()
