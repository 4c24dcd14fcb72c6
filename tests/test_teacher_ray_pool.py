"""TeacherPool: 2 replicas on a local 2-CPU Ray cluster equal direct log_softmax; restart on death."""

import pytest
import torch

ray = pytest.importorskip("ray")

from teacher.ray_pool import TeacherPool, balance_rows  # noqa: E402
from teacher.testing import (assert_scores_over_vocabulary, random_batch, reference_scores, save_tiny_teacher,  # noqa: E402
                             tiny_llama)

ATOL = 1e-5


@pytest.fixture(scope="module")
def teacher_path(tmp_path_factory):
    return save_tiny_teacher(str(tmp_path_factory.mktemp("teacher")))


@pytest.fixture(scope="module")
def pool(teacher_path):
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    pool = TeacherPool(teacher_path, num_replicas=2, num_cpus_per_replica=0.5, token_budget=64)  # leaves 1 CPU for the placement test
    yield pool
    pool.shutdown()
    ray.shutdown()


@pytest.fixture(scope="module")
def batch_and_ref():
    batch = random_batch(10, 64, seed=2)
    return batch, reference_scores(tiny_llama(), *batch, topk=4)


def test_pool_matches_direct(pool, batch_and_ref):
    batch, ref = batch_and_ref
    out = pool.score(*batch, topk=4, return_full=True)
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.full_logprobs, ref.full_logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(out.topk_logprobs, ref.topk_logprobs, atol=ATOL, rtol=0)
    assert torch.equal(out.topk_ids, ref.topk_ids)


def test_score_async_and_single_row(pool, batch_and_ref):
    (seqs, p, r), ref = batch_and_ref
    pending = pool.score_async(seqs, p, r)
    one = pool.score(seqs[3:4], p[3:4], r[3:4])  # fewer rows than replicas
    out = pending.result()
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)
    torch.testing.assert_close(one.token_logprobs[0], ref.token_logprobs[3, : int(r[3])], atol=ATOL, rtol=0)


def test_pool_rejects_bad_rows_before_sending(pool, batch_and_ref):
    """Errors name the caller's rows, also those only a replica's limits catch (context, vocabulary): each replica
    sees its own slice, numbered from 0."""
    (seqs, p, r), _ = batch_and_ref
    with pytest.raises(ValueError, match="empty response in rows \\[4\\]"):
        pool.score(seqs, p, torch.where(torch.arange(10) == 4, 0, r))
    long = torch.full((10, 200), 5)
    lens = torch.full((10,), 10)
    with pytest.raises(ValueError, match=r"max context 128 in rows \[8\]"):
        pool.score(long, lens, torch.where(torch.arange(10) == 8, 150, 10))
    with pytest.raises(ValueError, match=r"ids outside \[0, 64\).* rows \[6\]"):
        pool.score(torch.where(torch.arange(10)[:, None] == 6, 70, seqs), p, r)


def test_vocab_info(pool):
    info = pool.vocab_info()
    assert info["vocab_size"] == 64 and info["max_context"] == 128
    assert info["special_token_ids"]["eos"] == 2


def test_dead_replica_is_restarted_and_request_retried(pool, batch_and_ref):
    batch, ref = batch_and_ref
    ray.kill(pool.actors[1], no_restart=False)
    out = pool.score(*batch)
    torch.testing.assert_close(out.token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)
    pending = pool.score_async(*batch)  # killed while in flight
    ray.kill(pool.actors[0], no_restart=False)
    torch.testing.assert_close(pending.result().token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)


def test_score_handoff_leaves_the_scores_in_the_object_store(pool, teacher_path, batch_and_ref):
    """One replica: token log-probs come back, the whole result stays an ObjectRef (for the learner to fetch);
    both equal the direct log_softmax, and a replica that died before the call is restarted and retried."""
    batch, ref = batch_and_ref
    single = TeacherPool(teacher_path, num_replicas=1, num_cpus_per_replica=0, token_budget=64)
    try:
        token_lp, whole = single.score_handoff(*batch, topk=4, return_full=True)
        assert isinstance(whole, ray.ObjectRef)
        torch.testing.assert_close(token_lp, ref.token_logprobs, atol=ATOL, rtol=0)
        out = ray.get(whole)
        torch.testing.assert_close(out.full_logprobs, ref.full_logprobs, atol=ATOL, rtol=0)
        assert torch.equal(out.topk_ids, ref.topk_ids)
        ray.kill(single.actors[0], no_restart=False)
        token_lp, whole = single.score_handoff(*batch)
        torch.testing.assert_close(ray.get(whole).token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)
        torch.testing.assert_close(token_lp, ref.token_logprobs, atol=ATOL, rtol=0)
    finally:
        single.shutdown()
    with pytest.raises(ValueError, match="score_handoff needs a single replica"):
        pool.score_handoff(*batch)


def test_balance_rows_partitions_by_tokens():
    lens = torch.tensor([100, 1, 1, 50, 50, 2])
    groups = balance_rows(lens, 2)
    assert sorted(torch.cat(groups).tolist()) == list(range(6))
    assert sorted(int(lens[g].sum()) for g in groups) == [102, 102]


def test_replica_out_of_restarts_raises_clear_error(pool, teacher_path, batch_and_ref):
    batch, _ = batch_and_ref
    fragile = TeacherPool(teacher_path, num_replicas=1, num_cpus_per_replica=0, max_restarts=0)
    ray.kill(fragile.actors[0], no_restart=False)
    with pytest.raises(RuntimeError, match="replica 0 died and cannot be restarted"):
        fragile.score(*batch)
    fragile.shutdown()


def test_pool_argument_errors(teacher_path):
    with pytest.raises(ValueError, match="num_gpus_per_replica > 0"):
        TeacherPool(teacher_path, device="cuda")
    with pytest.raises(ValueError, match="one \\(placement_group, bundle_index\\) per replica"):
        TeacherPool(teacher_path, num_replicas=2, placement=[None])


def test_placement_group_bundles(pool, teacher_path, batch_and_ref):
    from ray.util.placement_group import placement_group, remove_placement_group

    batch, ref = batch_and_ref
    pg = placement_group([{"CPU": 1}])
    ray.get(pg.ready(), timeout=30)
    placed = TeacherPool(teacher_path, num_replicas=1, num_cpus_per_replica=1, placement=[(pg, 0)])
    torch.testing.assert_close(placed.score(*batch).token_logprobs, ref.token_logprobs, atol=ATOL, rtol=0)
    placed.shutdown()
    remove_placement_group(pg)


def test_pool_scores_over_the_students_vocabulary(pool, teacher_path):
    """vocab_size reaches every replica: distributions over the student's ids, as score_sequences gives them."""
    narrow = TeacherPool(teacher_path, num_replicas=1, num_cpus_per_replica=0, token_budget=64, vocab_size=50)
    try:
        assert_scores_over_vocabulary(narrow.score, 50, seed=9, atol=ATOL)
    finally:
        narrow.shutdown()
