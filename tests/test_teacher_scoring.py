"""score_sequences and the TeacherScores helpers against a naive per-row log_softmax reference."""

import pytest
import torch

from teacher.scoring import plan_micro_batches, score_sequences
from teacher.testing import random_batch, reference_scores, tiny_llama
from teacher.types import TeacherScores, concat_scores, scatter_rows, split_scores

ATOL = 1e-5


@pytest.fixture(scope="module")
def model():
    return tiny_llama()


@pytest.fixture(scope="module")
def batch():
    return random_batch(12, 64, seed=1)


@pytest.fixture(scope="module")
def ref(model, batch):
    return reference_scores(model, *batch, topk=5)


@pytest.mark.parametrize("token_budget", [1, 40, 16384])  # 1: every row alone; 40: mixed groups; big: one pass
def test_matches_direct_log_softmax(model, batch, ref, token_budget):
    out = score_sequences(model, *batch, topk=5, return_full=True, token_budget=token_budget)
    T = int(batch[2].max())
    assert out.token_logprobs.shape == (12, T) and out.token_logprobs.dtype == torch.float32
    assert out.topk_ids.shape == (12, T, 5) and out.topk_ids.dtype == torch.int32
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.full_logprobs, ref.full_logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.topk_logprobs, ref.topk_logprobs, atol=ATOL, rtol=0)
    assert torch.equal(out.topk_ids, ref.topk_ids)


def test_zero_beyond_response_and_optional_fields(model, batch):
    seqs, p, r = batch
    out = score_sequences(model, seqs, p, r)
    assert out.topk_ids is None and out.full_logprobs is None
    beyond = torch.arange(out.max_response_len)[None, :] >= r[:, None]
    assert (out.token_logprobs[beyond] == 0).all() and (out.token_logprobs[~beyond] < 0).all()


def test_sliced_logits_fallback_matches(model, batch, ref, monkeypatch):
    # a model without get_decoder goes through model(...).logits
    monkeypatch.setattr(type(model), "get_decoder", lambda self: self)
    out = score_sequences(model, *batch)
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)


def test_bf16_values_and_temperature(model, batch, ref):
    out = score_sequences(model, *batch, topk=3, values_dtype=torch.bfloat16)
    assert out.topk_logprobs.dtype == torch.bfloat16
    torch.testing.assert_close(out.topk_logprobs.float(), ref.topk_logprobs[..., :3], atol=0.05, rtol=0.01)
    hot = score_sequences(model, *batch, temperature=2.0)
    assert not torch.allclose(hot.token_logprobs, ref.token_logprobs)


def test_bad_inputs(model, batch):
    seqs, p, r = batch
    with pytest.raises(ValueError, match="empty response"):
        score_sequences(model, seqs, p, torch.where(torch.arange(12) == 3, 0, r))
    with pytest.raises(ValueError, match="negative"):
        score_sequences(model, seqs, p, torch.where(torch.arange(12) == 3, -1, r))
    with pytest.raises(ValueError, match="beyond sequence length"):
        score_sequences(model, seqs[:, :5], p, r)
    with pytest.raises(ValueError, match="max context"):
        score_sequences(model, seqs, p, r, max_context=6)
    long = torch.full((1, 200), 5)
    with pytest.raises(ValueError, match="max context 128"):  # default: config.max_position_embeddings
        score_sequences(model, long, torch.tensor([100]), torch.tensor([100]))
    with pytest.raises(ValueError, match="prompt_lens must be >= 1"):
        score_sequences(model, seqs, torch.zeros(12, dtype=torch.long), r)
    with pytest.raises(ValueError, match=r"\[0, 64\)"):
        score_sequences(model, seqs + 100, p, r)
    with pytest.raises(ValueError, match="topk"):
        score_sequences(model, seqs, p, r, topk=65)


def test_plan_micro_batches_respects_budget():
    lens = torch.tensor([5, 30, 7, 12, 30, 1])
    groups = plan_micro_batches(lens, token_budget=40)
    assert sorted(torch.cat(groups).tolist()) == list(range(6))
    for g in groups:
        assert len(g) == 1 or len(g) * int(lens[g].max()) <= 40


def test_split_concat_scatter_roundtrip(ref):
    parts = split_scores(ref, [5, 7])
    assert [p.num_rows for p in parts] == [5, 7]
    whole = concat_scores(parts)
    assert torch.equal(whole.full_logprobs, ref.full_logprobs)
    idx = [torch.tensor([0, 3, 11]), torch.tensor([1, 2, 4, 5, 6, 7, 8, 9, 10])]
    back = scatter_rows([ref.index_rows(i) for i in idx], idx, 12, ref.max_response_len)
    assert torch.equal(back.topk_ids, ref.topk_ids)
    short = TeacherScores(torch.ones(2, 3))
    assert concat_scores([short, TeacherScores(torch.ones(1, 5))]).token_logprobs.shape == (3, 5)
    # in-order and single-part cases hand the tensors through without copying them (same storage)
    same = scatter_rows([ref], [torch.arange(12)], 12, ref.max_response_len)
    assert same.full_logprobs.data_ptr() == ref.full_logprobs.data_ptr()
    assert concat_scores([ref]).full_logprobs.data_ptr() == ref.full_logprobs.data_ptr()
    padded = concat_scores([short], T=5)
    assert padded.token_logprobs.shape == (2, 5) and torch.equal(padded.token_logprobs[:, 3:], torch.zeros(2, 2))


def test_select_scores_copies_only_what_it_must(ref):
    from trainer.objective import select_scores

    T = ref.max_response_len
    assert select_scores(ref, list(range(12)), T) is ref
    part = select_scores(ref, [3, 1], T - 1)
    assert torch.equal(part.full_logprobs, ref.full_logprobs[[3, 1], :T - 1])
    assert torch.equal(part.topk_ids, ref.topk_ids[[3, 1], :T - 1])
    assert torch.equal(select_scores(ref, list(range(12)), T - 1).token_logprobs, ref.token_logprobs[:, :T - 1])


@pytest.mark.parametrize("vocab", [57, 70])  # the model has 64 rows: a smaller and a larger student vocabulary
def test_distribution_over_the_students_vocabulary(model, vocab):
    """vocab_size: the teacher's distribution over the student's ids (Qwen2.5-7B vs 0.5B differ in embedding
    padding): extra teacher rows dropped before the softmax, missing ones at probability 0."""
    batch = random_batch(10, min(vocab, 64), seed=7)
    out = score_sequences(model, *batch, topk=5, return_full=True, vocab_size=vocab)
    ref = reference_scores(model, *batch, topk=5, vocab_size=vocab)
    assert out.full_logprobs.shape[-1] == vocab and int(out.topk_ids.max()) < min(vocab, 64)
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.full_logprobs, ref.full_logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.topk_logprobs, ref.topk_logprobs, atol=ATOL, rtol=0)
    assert torch.equal(out.topk_ids, ref.topk_ids)
    # each position's distribution sums to 1 over the student's ids
    mask = torch.arange(out.full_logprobs.shape[1])[None, :] < batch[2][:, None]
    torch.testing.assert_close(out.full_logprobs.exp().sum(-1)[mask], torch.ones(int(mask.sum())), atol=1e-5, rtol=0)
    if vocab < 64:  # the teacher's rows past the student's would otherwise show up
        plain = score_sequences(model, *batch, topk=5)
        assert not torch.allclose(plain.token_logprobs, out.token_logprobs)
        with pytest.raises(ValueError, match=r"token ids outside \[0, 57\) for this teacher in rows"):
            score_sequences(model, *random_batch(10, 64, seed=7), vocab_size=vocab)
