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
def reference_scores(model, sequences, prompt_lens, response_lens, topk: int = 0) -> TeacherScores:
    """Deliberately naive: one unpadded full forward per row, log_softmax over all logits, then slice."""
    N, T = sequences.shape[0], int(response_lens.max())
    V = model.config.vocab_size
    tok = torch.zeros(N, T)
    full = torch.zeros(N, T, V)
    for i in range(N):
        p, r = int(prompt_lens[i]), int(response_lens[i])
        seq = sequences[i, : p + r][None]
        logp = torch.log_softmax(model(seq).logits.float(), dim=-1)[0]  # (p + r, V)
        full[i, :r] = logp[p - 1 : p + r - 1]
        tok[i, :r] = full[i, :r].gather(1, seq[0, p:, None]).squeeze(1)
    ids = vals = None
    if topk:
        vals, ids = full.topk(topk, dim=-1)
        mask = (torch.arange(T)[None, :] < response_lens[:, None])[..., None]
        vals, ids = vals * mask, (ids * mask).int()
    return TeacherScores(tok, ids, vals, full)


def fake_vllm_app(model, model_name: str, max_model_len: int):
    """FastAPI app mimicking vLLM's ``/v1/completions`` prompt_logprobs output from a real HF model.

    Entry j of ``prompt_logprobs`` is None for j = 0, else ``{str(id): {logprob, rank, decoded_token}}``
    for the top-K ids (ranks 1..K) plus the actual token j with its true 1-based rank.
    """
    from fastapi import FastAPI
    from fastapi.responses import JSONResponse

    app = FastAPI()

    @app.get("/v1/models")
    def models():
        return {"object": "list", "data": [{"id": model_name, "object": "model", "max_model_len": max_model_len}]}

    @app.post("/v1/completions")
    def completions(body: dict):
        if body.get("model") != model_name:
            return JSONResponse(status_code=404, content={"error": {"message": f"The model `{body.get('model')}` does not exist."}})
        prompts = body["prompt"] if isinstance(body["prompt"][0], list) else [body["prompt"]]
        K = int(body.get("prompt_logprobs") or 0)
        choices = []
        for index, ids in enumerate(prompts):
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([ids])).logits.float(), dim=-1)[0]  # (len, V)
            entries = [None]
            for j in range(1, len(ids)):
                row = logp[j - 1]
                order = torch.argsort(row, descending=True)
                ranks = torch.empty_like(order)
                ranks[order] = torch.arange(1, row.numel() + 1)
                keep = set(order[:K].tolist()) | {ids[j]}
                entries.append({str(t): {"logprob": float(row[t]), "rank": int(ranks[t]), "decoded_token": f"<{t}>"} for t in keep})
            choices.append({"index": index, "text": "<x>", "logprobs": None, "finish_reason": "length", "prompt_logprobs": entries})
        n_prompt = sum(len(p) for p in prompts)
        return {"id": "cmpl-fake", "object": "text_completion", "created": 0, "model": model_name, "choices": choices,
                "usage": {"prompt_tokens": n_prompt, "completion_tokens": len(prompts), "total_tokens": n_prompt + len(prompts)}}

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
