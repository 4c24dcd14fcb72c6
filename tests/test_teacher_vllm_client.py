"""VllmServerTeacherClient against a fake vLLM server (real uvicorn process, real tiny HF model)."""

import os
import socket
import subprocess
import sys
import time

import httpx
import pytest
import torch

from teacher.http_client import TeacherUnavailableError
from teacher.testing import random_batch, reference_scores, tiny_llama
from teacher.vllm_client import VllmServerTeacherClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server():
    port = free_port()
    code = f"from teacher.testing import serve_fake_vllm; serve_fake_vllm({port})"
    proc = subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            pytest.fail(f"fake vLLM server exited: {proc.stderr.read().decode()[-2000:]}")
        try:
            if httpx.get(url + "/v1/models", timeout=1).status_code == 200:
                break
        except httpx.TransportError:
            time.sleep(0.2)
    yield url
    proc.terminate()
    proc.wait(timeout=10)


@pytest.fixture(scope="module")
def batch_and_ref():
    batch = random_batch(7, 64, seed=4)
    return batch, reference_scores(tiny_llama(), *batch, topk=5)


def test_vllm_client_matches_direct(server, batch_and_ref):
    batch, ref = batch_and_ref
    client = VllmServerTeacherClient(server, "tiny-teacher", topk=5, rows_per_request=3)
    out = client.score(*batch)
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.topk_logprobs, ref.topk_logprobs, atol=ATOL, rtol=0)
    assert torch.equal(out.topk_ids, ref.topk_ids)
    k0 = client.score(*batch, topk=0)
    assert k0.topk_ids is None
    torch.testing.assert_close(k0.token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)
    assert client.vocab_info()["max_context"] == 128


def test_vllm_client_errors(server, batch_and_ref):
    batch, _ = batch_and_ref
    with pytest.raises(ValueError, match="HTTP 404"):
        VllmServerTeacherClient(server, "wrong-name", retries=0).score(*batch)
    with pytest.raises(ValueError, match="full distribution"):
        VllmServerTeacherClient(server, "tiny-teacher").score(*batch, return_full=True)
    with pytest.raises(TeacherUnavailableError, match="after 3 attempts"):
        VllmServerTeacherClient(f"http://127.0.0.1:{free_port()}", "x", retries=2, backoff=0.01).score(*batch)
