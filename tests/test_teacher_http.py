"""HTTP teacher in a real uvicorn subprocess: equals direct log_softmax; errors; client retries."""

import os
import sys
import time

import httpx
import pytest
import torch

from teacher.http_client import HttpTeacherClient, TeacherUnavailableError
from teacher.testing import (assert_scores_over_vocabulary, free_port, random_batch, reference_scores, save_tiny_teacher,
                             serving, tiny_llama)
from teacher.wire import MEDIA_TYPE, decode_request, decode_scores, encode_request
from teacher.types import ScoreRequest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    path = save_tiny_teacher(str(tmp_path_factory.mktemp("teacher")))
    port = free_port()
    cmd = [sys.executable, "-m", "teacher.http_service", "--model-path", path, "--port", str(port), "--dtype", "float32", "--token-budget", "64"]
    url = f"http://127.0.0.1:{port}"
    with serving(cmd, url + "/v1/health", cwd=ROOT):
        yield url


@pytest.fixture(scope="module")
def client(server):
    c = HttpTeacherClient(server, timeout=30, retries=1, backoff=0.05)
    yield c
    c.close()


@pytest.fixture(scope="module")
def batch_and_ref():
    batch = random_batch(9, 64, seed=3)
    return batch, reference_scores(tiny_llama(), *batch, topk=6)


def test_http_matches_direct(client, batch_and_ref):
    batch, ref = batch_and_ref
    out = client.score(*batch, topk=6, return_full=True)
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.full_logprobs, ref.full_logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.topk_logprobs, ref.topk_logprobs, atol=ATOL, rtol=0)
    assert torch.equal(out.topk_ids, ref.topk_ids) and out.topk_ids.dtype == torch.int32
    plain = client.score(*batch)
    assert plain.topk_ids is None and plain.full_logprobs is None


def test_info_and_health(client):
    info = client.vocab_info()
    assert info["vocab_size"] == 64 and info["max_context"] == 128 and info["api_version"] == "1"
    assert info["special_token_ids"] == {"bos": 1, "eos": 2, "pad": 0, "unk": None}
    assert client.health()


def test_http_errors(server, batch_and_ref):
    (seqs, p, r), _ = batch_and_ref
    post = lambda body: httpx.post(server + "/v1/score", content=body, headers={"content-type": MEDIA_TYPE}, timeout=10)
    bad = post(b"not safetensors at all")
    assert bad.status_code == 400 and "safetensors" in bad.json()["detail"]
    empty = post(encode_request(ScoreRequest(seqs, p, torch.where(torch.arange(9) == 2, 0, r))))
    assert empty.status_code == 422 and "empty response in rows [2]" in empty.json()["detail"]
    long = torch.full((1, 300), 5)
    too_long = post(encode_request(ScoreRequest(long, torch.tensor([150]), torch.tensor([150]))))
    assert too_long.status_code == 413 and "max context 128" in too_long.json()["detail"]


def test_hostile_bodies_get_a_4xx_and_the_server_stays_up(server, batch_and_ref):
    """Bodies built to break decoding or allocation (a header that is not an object, byte-sized ids, lengths whose
    sum overflows int64, a vocabulary of 2^42, a temperature that is 0 in fp32, another content-type) get a 4xx
    naming the problem, never a 500; the next good request is answered."""
    import json
    import struct

    from safetensors.torch import save as st_save

    (seqs, p, r), ref = batch_and_ref
    post = lambda body, ct=MEDIA_TYPE: httpx.post(server + "/v1/score", content=body, headers={"content-type": ct},
                                                  timeout=10)
    header = json.dumps([1, 2]).encode()
    cases = [
        (struct.pack("<Q", len(header)) + header, 400, "header must be a JSON object"),
        (st_save({"sequences": seqs.to(torch.uint8), "prompt_lens": p, "response_lens": r}, metadata={"topk": "0"}),
         400, "sequences must be a 2-D int64"),
        (encode_request(ScoreRequest(seqs[:1], torch.tensor([2**62]), torch.tensor([2**62]))), 422,
         "prompt_lens beyond sequence length"),
        (encode_request(ScoreRequest(seqs, p, r, vocab_size=2**42)), 422, "vocab_size must be in [1, "),
        (st_save({"sequences": seqs, "prompt_lens": p, "response_lens": r}, metadata={"temperature": "1e-300"}), 400,
         "temperature must be finite and >= 1e-06"),
    ]
    for body, status, needle in cases:
        resp = post(body)
        assert resp.status_code == status and needle in resp.json()["detail"], (status, resp.status_code, resp.text)
    wrong_type = post(encode_request(ScoreRequest(seqs, p, r)), ct="text/plain")
    assert wrong_type.status_code == 415 and MEDIA_TYPE in wrong_type.json()["detail"]
    good = post(encode_request(ScoreRequest(seqs, p, r)))
    assert good.status_code == 200
    torch.testing.assert_close(decode_scores(good.content).token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)


def test_body_and_answer_size_limits(monkeypatch):
    """A chunked body (no length up front) over the limit and a full-distribution answer over the limit get 413."""
    from fastapi.testclient import TestClient

    from teacher import http_service
    from teacher.loading import describe_teacher

    model = tiny_llama()
    app = http_service.create_app(model, describe_teacher(model, "tiny"), max_body_bytes=4096)
    monkeypatch.setattr(http_service, "MAX_FULL_VALUES", 1000)
    seqs, p, r = random_batch(4, 64, seed=1)
    with TestClient(app) as tc:
        body = encode_request(ScoreRequest(seqs, p, r, return_full=True))
        assert len(body) < 4096
        full = tc.post("/v1/score", content=body, headers={"content-type": MEDIA_TYPE})
        assert full.status_code == 413 and "return_full asks for" in full.json()["detail"]
        chunked = tc.post("/v1/score", content=(b"x" * 1024 for _ in range(64)), headers={"content-type": MEDIA_TYPE})
        assert chunked.status_code == 413 and "over the server limit 4096" in chunked.json()["detail"]


def test_client_raises_value_error_on_4xx(client, batch_and_ref):
    long = torch.full((1, 300), 5)
    with pytest.raises(ValueError, match="HTTP 413"):
        client.score(long, torch.tensor([150]), torch.tensor([150]))


def test_unreachable_port_retries_then_clear_error():
    url = f"http://127.0.0.1:{free_port()}"
    c = HttpTeacherClient(url, timeout=2, retries=3, backoff=0.01)
    t0 = time.monotonic()
    with pytest.raises(TeacherUnavailableError, match=f"{url}/v1/info unavailable after 4 attempts"):
        c.vocab_info()
    assert time.monotonic() - t0 < 5


def test_wire_roundtrip():
    seqs, p, r = random_batch(3, 64)
    req, vd = decode_request(encode_request(ScoreRequest(seqs, p, r, topk=7, return_full=True, temperature=0.5), "bfloat16"))
    assert torch.equal(req.sequences, seqs) and req.topk == 7 and req.return_full and req.temperature == 0.5 and vd == "bfloat16"


def test_http_scores_over_the_clients_vocabulary(server):
    """The client sends the student's vocabulary size; the server's distributions are over those ids."""
    c = HttpTeacherClient(server, timeout=30, retries=1, backoff=0.05, vocab_size=50)
    try:
        assert_scores_over_vocabulary(c.score, 50, seed=8, atol=ATOL)
    finally:
        c.close()


def test_a_remote_teacher_is_checked_before_the_run_starts(server):
    """teacher.backend=http: the service must answer, with the student's BOS/EOS ids, before any role starts."""
    from types import SimpleNamespace

    from launch.config import load_config
    from teacher.tokenizer_check import TokenizerMismatchError
    from trainer.roles import check_remote_teacher

    def cfg(url):
        return load_config(None, ["teacher.backend=http", f"teacher.url={url}", "teacher.return_full=false",
                                  "teacher.topk=8"])

    check_remote_teacher(cfg(server), SimpleNamespace(bos_token_id=1, eos_token_id=2))  # the tiny teacher's ids
    with pytest.raises(TokenizerMismatchError, match=r"has eos id 2, the student's tokenizer 5"):
        check_remote_teacher(cfg(server), SimpleNamespace(bos_token_id=1, eos_token_id=5))
    t0 = time.perf_counter()
    with pytest.raises(TeacherUnavailableError, match="unavailable after 3 attempts"):
        check_remote_teacher(cfg(f"http://127.0.0.1:{free_port()}"), SimpleNamespace(bos_token_id=1, eos_token_id=2))
    assert time.perf_counter() - t0 < 10
