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


def test_fake_server_matches_vllm_026_shape(server):
    """The shape the client parses: entry 0 null, actual token first with its >= rank, then top-K ranks 1..K."""
    import httpx

    ids = [1, 5, 9, 13, 40, 41]
    body = httpx.post(server + "/v1/completions", json={"model": "tiny-teacher", "prompt": [ids], "max_tokens": 1,
                                                       "temperature": 0.0, "prompt_logprobs": 3}).json()
    (choice,) = body["choices"]
    entries = choice["prompt_logprobs"]
    assert choice["index"] == 0 and len(entries) == len(ids) and entries[0] is None
    for j in range(1, len(ids)):
        keys = list(entries[j])
        assert keys[0] == str(ids[j]) and len(keys) in (3, 4)
        assert sorted(v["rank"] for v in entries[j].values() if v["rank"] <= 3) == [1, 2, 3]
        assert set(entries[j][keys[0]]) == {"logprob", "rank", "decoded_token"}


def test_vllm_client_server_limits(server):
    client = VllmServerTeacherClient(server, "tiny-teacher", retries=0)
    seq, p, r = random_batch(2, 64, seed=5)
    with pytest.raises(ValueError, match="greater than max allowed"):  # vLLM's default --max-logprobs 20
        client.score(seq, p, r, topk=21)
    long = torch.randint(3, 64, (1, 128))  # max_model_len 128: no room for the one generated token
    with pytest.raises(ValueError, match="maximum context length"):
        client.score(long, torch.tensor([100]), torch.tensor([28]))


def test_vllm_client_keeps_only_the_students_ids(server, batch_and_ref):
    """vLLM ranks the teacher's whole vocabulary: with the student's vocabulary size given, ids past it are
    dropped; a position left with fewer than K ids is an error naming the backends that score over it."""
    batch, ref = batch_and_ref
    top_ids = int(ref.topk_ids.max())
    wide = VllmServerTeacherClient(server, "tiny-teacher", topk=5, vocab_size=top_ids + 1).score(*batch)
    assert torch.equal(wide.topk_ids, ref.topk_ids)  # nothing past the vocabulary: the same scores
    torch.testing.assert_close(wide.topk_logprobs, ref.topk_logprobs, atol=ATOL, rtol=0)
    with pytest.raises(ValueError, match=r"ranked ids are past the student's vocabulary size 40: use teacher.backend=ray or http"):
        VllmServerTeacherClient(server, "tiny-teacher", topk=5, vocab_size=40).score(*random_batch(7, 40, seed=4))


def test_the_served_model_name_is_checked_before_the_run_starts(server):
    from types import SimpleNamespace

    from launch.config import ConfigError, load_config
    from trainer.roles import check_remote_teacher

    def cfg(name):
        return load_config(None, ["teacher.backend=vllm_server", f"teacher.url={server}", "teacher.return_full=false",
                                  "teacher.topk=8", f"teacher.served_model_name={name}"])

    check_remote_teacher(cfg("tiny-teacher"), SimpleNamespace())
    with pytest.raises(ConfigError, match=r"serves \['tiny-teacher'\], not 'Qwen/Qwen2.5-7B'.*teacher.served_model_name"):
        check_remote_teacher(cfg("Qwen/Qwen2.5-7B"), SimpleNamespace())
