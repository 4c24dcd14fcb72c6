"""Tiny random teachers, random batches and a naive reference, for tests and smoke benchmarks.

Nothing here touches the network: models are built from ``LlamaConfig`` with random weights.
"""

from __future__ import annotations

import contextlib

import torch

from teacher.types import TeacherScores


def tiny_llama(vocab_size: int = 64, hidden: int = 32, layers: int = 2, heads: int = 2, max_context: int = 128, seed: int = 0):
    """Random-weight ``LlamaForCausalLM`` in eval mode (fp32, CPU)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(
        vocab_size=vocab_size, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=max_context,
        bos_token_id=1, eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )
    model = LlamaForCausalLM(cfg).eval()
    # random init is N(0, 0.02): logits are nearly flat and top-k would be full of near-ties
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.5)
    return model


def save_tiny_teacher(path: str, **kwargs) -> str:
    """Save ``tiny_llama(**kwargs)`` to ``path`` (safetensors) and return the path."""
    tiny_llama(**kwargs).save_pretrained(path)
    return path


def random_batch(n: int, vocab_size: int, max_prompt: int = 7, max_response: int = 9, pad_extra: int = 3, seed: int = 0, pad_id: int = 0):
    """Right-padded random batch with variable prompt/response lengths.

    Returns sequences (n, L) int64, prompt_lens (n,), response_lens (n,), L = max total + pad_extra.
    """
    g = torch.Generator().manual_seed(seed)
    prompt_lens = torch.randint(1, max_prompt + 1, (n,), generator=g)
    response_lens = torch.randint(1, max_response + 1, (n,), generator=g)
    L = int((prompt_lens + response_lens).max()) + pad_extra
    sequences = torch.full((n, L), pad_id, dtype=torch.long)
    for i in range(n):
        k = int(prompt_lens[i] + response_lens[i])
        sequences[i, :k] = torch.randint(3, vocab_size, (k,), generator=g)
    return sequences, prompt_lens, response_lens


@torch.no_grad()
def reference_scores(model, sequences, prompt_lens, response_lens, topk: int = 0, vocab_size: int | None = None) -> TeacherScores:
    """Deliberately naive: one unpadded full forward per row, log_softmax over all logits, then slice.
    vocab_size: the distribution over ids 0..vocab_size-1 (logits cut, or extended with -inf, first)."""
    N, T = sequences.shape[0], int(response_lens.max())
    V = vocab_size or model.config.vocab_size
    tok = torch.zeros(N, T)
    full = torch.zeros(N, T, V)
    for i in range(N):
        p, r = int(prompt_lens[i]), int(response_lens[i])
        seq = sequences[i, : p + r][None]
        logits = model(seq).logits.float()[0]
        if V <= logits.shape[-1]:
            logits = logits[:, :V]
        else:
            logits = torch.cat([logits, torch.full((logits.shape[0], V - logits.shape[-1]), float("-inf"))], -1)
        logp = torch.log_softmax(logits, dim=-1)  # (p + r, V)
        full[i, :r] = logp[p - 1 : p + r - 1]
        tok[i, :r] = full[i, :r].gather(1, seq[0, p:, None]).squeeze(1)
    ids = vals = None
    if topk:
        vals, ids = full.topk(topk, dim=-1)
        mask = (torch.arange(T)[None, :] < response_lens[:, None])[..., None]
        vals, ids = vals * mask, (ids * mask).int()
    return TeacherScores(tok, ids, vals, full)


def assert_scores_match(out: TeacherScores, ref: TeacherScores, atol: float = 1e-5) -> None:
    """Every field the reference has: values within `atol`, top-k ids exactly."""
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, atol=atol, rtol=0)
    for name in ("full_logprobs", "topk_logprobs"):
        if getattr(ref, name) is not None and getattr(out, name) is not None:
            torch.testing.assert_close(getattr(out, name), getattr(ref, name), atol=atol, rtol=0)
    if out.topk_ids is not None:
        assert torch.equal(out.topk_ids, ref.topk_ids)


def assert_scores_over_vocabulary(score, vocab_size: int, seed: int, atol: float = 1e-5) -> None:
    """`score(sequences, prompt_lens, response_lens, topk=, return_full=)` of a backend built for a student of
    `vocab_size` ids gives the direct reference's distributions over those ids (ids of the batch stay below it)."""
    batch = random_batch(6, vocab_size, seed=seed)
    out = score(*batch, topk=4, return_full=True)
    assert out.full_logprobs.shape[-1] == vocab_size
    assert_scores_match(out, reference_scores(tiny_llama(), *batch, topk=4, vocab_size=vocab_size), atol)


def fake_vllm_app(model, model_name: str, max_model_len: int, max_logprobs: int = 20):
    """FastAPI app mimicking vLLM 0.26's ``/v1/completions`` (token-id prompts, ``prompt_logprobs``) from a real HF model.

    Reproduces the 0.26 response shape: each choice is a ``CompletionResponseChoice``
    (vllm/entrypoints/openai/completion/protocol.py) whose ``prompt_logprobs`` is
    ``list[dict[int, Logprob] | None]``, serialised by ``model_dump()`` + JSON (int keys become strings):

    * entry 0 is ``None`` (``vllm.logprobs.create_prompt_logprobs`` appends None first);
    * entry j >= 1 is built by ``vllm.logprobs.append_logprobs_for_next_position`` from the row
      [actual token j, top-1, ..., top-K] with ranks ``chain((rank_of_actual,), range(1, K + 1))``: the actual
      token is the first key and its rank is the number of vocabulary entries whose log-prob is >= its own
      (``_ranks_kernel`` in vllm/v1/worker/gpu/sample/logprob.py); if it is also among the top-K, the later
      top-K entry overwrites its value (same logprob, positional rank) but not its key position;
    * ``Logprob`` is a dataclass ``{logprob, rank, decoded_token}``; -inf log-probs are sent as -9999.0
      (``clamp_prompt_logprobs``, vllm/entrypoints/generate/base/serving.py).
    Errors use vLLM's ``ErrorResponse`` body ``{"error": {message, type, param, code}}``: an unknown model is
    404 NotFoundError; K > ``max_logprobs`` (the server's ``--max-logprobs``, default 20), max_tokens < 1 without
    echo, and prompt + max_tokens > max_model_len are 400s. Not reproduced: text prompts, sampling (the
    generated token and ``text`` are placeholders), and the echo ``logprobs`` object.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    def error(code: int, err_type: str, message: str, param: str | None = None):
        return JSONResponse(status_code=code, content={"error": {"message": message, "type": err_type, "param": param, "code": code}})

    @app.get("/v1/models")
    def models():
        card = {"id": model_name, "object": "model", "created": 0, "owned_by": "vllm", "root": model_name, "parent": None,
                "max_model_len": max_model_len, "permission": []}
        return {"object": "list", "data": [card]}

    @app.post("/v1/completions")
    def completions(body: dict):
        if body.get("model") not in (None, model_name):
            return error(404, "NotFoundError", f"The model `{body.get('model')}` does not exist.", "model")
        prompt = body.get("prompt")
        if not isinstance(prompt, list) or not prompt or not all(isinstance(x, (int, list)) for x in prompt):
            return error(400, "BadRequestError", "this fake server takes token-id prompts only", "prompt")
        prompts = prompt if isinstance(prompt[0], list) else [prompt]
        max_tokens = body.get("max_tokens")
        max_tokens = 16 if max_tokens is None else int(max_tokens)
        echo = bool(body.get("echo"))
        K = body.get("prompt_logprobs")
        if K is None and echo:
            K = body.get("logprobs")
        if max_tokens < 1 and not (echo and max_tokens == 0):
            return error(400, "BadRequestError", f"max_tokens must be at least 1, got {max_tokens}.", "max_tokens")
        if K is not None and (K < -1 or (K if K != -1 else model.config.vocab_size) > max_logprobs):
            return error(400, "BadRequestError", f"Requested prompt logprobs of {K}, which is greater than max allowed: {max_logprobs}", "prompt_logprobs")
        choices = []
        for ids in prompts:
            n_out = max(max_tokens, 1)
            if len(ids) + n_out > max_model_len:
                return error(400, "BadRequestError", f"This model's maximum context length is {max_model_len} tokens. However, you "
                             f"requested {n_out} output tokens and your prompt contains {len(ids)} input tokens, for a total of "
                             f"{len(ids) + n_out} tokens. Please reduce the length of the input prompt or the number of requested output tokens.", "input_tokens")
            entries = None
            if K is not None:
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([ids])).logits.float(), dim=-1)[0]  # (len, V)
                k = logp.shape[-1] if K == -1 else K
                entries = [None]
                for j in range(1, len(ids)):
                    row = logp[j - 1]
                    actual = int(ids[j])
                    top = torch.topk(row, k).indices.tolist() if k else []
                    ranks = [int((row >= row[actual]).sum())] + list(range(1, k + 1))
                    entry = {}
                    for t, r in zip([actual] + top, ranks):
                        v = float(row[t])
                        entry[str(t)] = {"logprob": -9999.0 if v == float("-inf") else v, "rank": r, "decoded_token": f"<{t}>"}
                    entries.append(entry)
            choices.append({"index": len(choices), "text": "<x>", "logprobs": None, "finish_reason": "length", "stop_reason": None,
                            "token_ids": None, "prompt_logprobs": entries, "prompt_token_ids": None, "routed_experts": None})
        n_prompt = sum(len(p) for p in prompts)
        n_gen = 0 if (echo and max_tokens == 0) else len(prompts) * max_tokens
        return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model_name, "choices": choices,
                "service_tier": None, "system_fingerprint": None,
                "usage": {"prompt_tokens": n_prompt, "total_tokens": n_prompt + n_gen, "completion_tokens": n_gen, "prompt_tokens_details": None},
                "kv_transfer_params": None, "ec_transfer_params": None, "metrics": None}

    return app


def serve_fake_vllm(port: int, model_name: str = "tiny-teacher") -> None:
    """Serve ``fake_vllm_app(tiny_llama())`` on 127.0.0.1:port (blocks; for tests in a subprocess)."""
    import uvicorn

    model = tiny_llama()
    uvicorn.run(fake_vllm_app(model, model_name, model.config.max_position_embeddings), host="127.0.0.1", port=port, log_level="warning")


def free_port() -> int:
    """A free TCP port on loopback."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def serving(cmd: list[str], probe_url: str, cwd: str | None = None, timeout_s: float = 60.0):
    """Run a server subprocess until `probe_url` answers 200; yield; terminate it.

    Fails (RuntimeError with the server's stderr tail) if it exits or does not answer in time.
    """
    import subprocess
    import time

    import httpx

    proc = subprocess.Popen(cmd, cwd=cwd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        deadline = time.monotonic() + timeout_s
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"server {cmd[:3]} exited: {proc.stderr.read().decode()[-2000:]}")
            try:
                if httpx.get(probe_url, timeout=1).status_code == 200:
                    break
            except httpx.TransportError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError(f"server {cmd[:3]} did not answer {probe_url} within {timeout_s:.0f} s")
            time.sleep(0.2)
        yield proc
    finally:
        proc.terminate()
        proc.wait(timeout=10)
