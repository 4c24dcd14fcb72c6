"""Scoring that overlaps the tail of generation (teacher.overlap): same numbers as scoring the whole batch
after generation, and the teacher really starts on a finished shard while another is still sampling."""
from __future__ import annotations

import json
import time

import pytest
import ray
import torch

import trainer.loop as loop
from launch.config import load_config
from rollout.types import SamplingSettings
from rollout.worker import RolloutWorker, RolloutWorkerActor
from teacher.ray_pool import TeacherPool

STUDENT, TEACHER = "launch/assets/tiny-student", "launch/assets/tiny-teacher"
PROMPTS = [[1, 5, 6, 39], [1, 7], [1, 11, 12, 13, 14, 15], [1, 9, 9], [1, 20, 21]]
SETTINGS = SamplingSettings(max_new_tokens=7, eos_token_id=2, seed=3)


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=6, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def teacher(cluster):
    pool = TeacherPool(TEACHER, num_replicas=2)
    yield pool
    pool.shutdown()


def _cfg(**teacher):
    return load_config(None, [f"teacher.{k}={v}" for k, v in teacher.items()])


def test_overlapped_scores_equal_one_call_on_the_whole_batch(cluster, teacher):
    workers = [RolloutWorkerActor.remote(STUDENT, backend="hf", num_threads=1) for _ in range(2)]
    cfg = _cfg(topk=5, return_full="true")
    batch, scores, generate_s, tail_s = loop.generate_and_score(workers, PROMPTS, SETTINGS, teacher, cfg)

    reference_batch = loop.generate(workers, PROMPTS, SETTINGS)  # same seeds: the same samples
    reference = loop.score(teacher, reference_batch, cfg)
    assert torch.equal(batch.sequences, reference_batch.sequences)
    assert torch.equal(batch.response_lens, reference_batch.response_lens)
    assert torch.equal(batch.student_logprobs, reference_batch.student_logprobs)
    assert scores.token_logprobs.shape == (len(PROMPTS), batch.max_response_len)
    torch.testing.assert_close(scores.token_logprobs, reference.token_logprobs, atol=1e-5, rtol=1e-5)  # float32, other batch shapes
    torch.testing.assert_close(scores.full_logprobs, reference.full_logprobs, atol=1e-5, rtol=1e-5)  # float32, other batch shapes
    torch.testing.assert_close(scores.topk_logprobs, reference.topk_logprobs, atol=1e-5, rtol=1e-5)  # float32, other batch shapes
    # ids may only differ where two log-probs tie to rounding
    assert (scores.topk_ids == reference.topk_ids).float().mean() > 0.99
    assert generate_s > 0 and tail_s >= 0
    for w in workers:
        ray.kill(w)


@ray.remote
class Gate:
    def __init__(self):
        self.opened = False

    def open(self) -> None:
        self.opened = True

    def is_open(self) -> bool:
        return self.opened


@ray.remote
class GatedWorker(RolloutWorker):
    """Samples only after the teacher has been called: without overlap this shard would wait forever."""

    def __init__(self, gate, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.gate = gate

    def generate(self, prompts, settings):
        deadline = time.monotonic() + 120  # a deadlock guard, not a speed requirement
        while not ray.get(self.gate.is_open.remote()):
            if time.monotonic() > deadline:
                raise TimeoutError("the teacher was not called while this shard was still generating")
            time.sleep(0.02)
        return super().generate(prompts, settings)


class SignallingTeacher:
    """Opens the gate on its first call, then scores with the real pool."""

    def __init__(self, pool, gate):
        self.pool, self.gate, self.rows_per_call = pool, gate, []

    def score(self, sequences, *args, **kwargs):
        ray.get(self.gate.open.remote())
        self.rows_per_call.append(sequences.shape[0])
        return self.pool.score(sequences, *args, **kwargs)


def test_scoring_starts_before_the_last_shard_is_sampled(cluster, teacher):
    gate = Gate.remote()
    workers = [RolloutWorkerActor.remote(STUDENT, backend="hf", num_threads=1),
               GatedWorker.remote(gate, STUDENT, backend="hf", num_threads=1)]
    signalling = SignallingTeacher(teacher, gate)
    batch, scores, _, _ = loop.generate_and_score(workers, PROMPTS, SETTINGS, signalling, _cfg())
    # contiguous shards: worker 0 has rows 0-1, worker 1 rows 2-4, each scored on its own
    assert signalling.rows_per_call == [2, 3]
    assert len(batch) == len(PROMPTS) and scores.num_rows == len(PROMPTS)
    for w in workers:
        ray.kill(w)


def test_overlap_applies_only_with_several_workers_and_no_sleep_mode():
    two = [object(), object()]
    assert loop.overlaps_scoring(_cfg(), two)
    assert not loop.overlaps_scoring(_cfg(), two[:1])
    assert not loop.overlaps_scoring(_cfg(overlap="false"), two)
    sleeping = load_config(None, ["rollout.backend=vllm", "rollout.sleep_mode=true", "trainer.device=cuda"])
    assert not loop.overlaps_scoring(sleeping, two)


@pytest.mark.slow
def test_the_loop_with_overlap_trains_as_the_loop_without(cluster, tmp_path, monkeypatch):
    """Two rollout workers, 2 steps: overlapped scoring takes the overlap path and gives the same losses."""
    calls = []
    real = loop.generate_and_score
    monkeypatch.setattr(loop, "generate_and_score", lambda *a, **k: calls.append(1) or real(*a, **k))
    common = ["trainer.steps=2", "rollout.num_workers=2", "rollout.prompts_per_step=6", "rollout.max_new_tokens=6",
              "data.eval_prompts=null", "trainer.warmup_steps=0", "rollout.num_cpus=1", "teacher.num_cpus=1",
              "trainer.num_cpus=1"]
    losses = {}
    for overlap in ("true", "false"):
        out = tmp_path / overlap
        loop.train(load_config(None, common + [f"teacher.overlap={overlap}", f"output_dir={out}"]),
                   loop.Hooks(progress=False))
        losses[overlap] = [json.loads(line)["loss/loss"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert len(calls) == 2  # both steps of the overlap run, none of the other
    assert losses["true"] == pytest.approx(losses["false"], rel=1e-5)
