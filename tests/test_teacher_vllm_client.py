"""VllmServerTeacherClient against a fake vLLM server (real uvicorn process, real tiny HF model)."""

import os
import sys

import pytest
import torch

from teacher.http_client import TeacherUnavailableError
from teacher.testing import free_port, random_batch, reference_scores, serving, tiny_llama
from teacher.vllm_client import VllmServerTeacherClient

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
ATOL = 1e-5


@pytest.fixture(scope="module")
def server():
    port = free_port()
    code = f"from teacher.testing import serve_fake_vllm; serve_fake_vllm({port})"
    url = f"http://127.0.0.1:{port}"
    with serving([sys.executable, "-c", code], url + "/v1/models", cwd=ROOT):
        yield url


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
