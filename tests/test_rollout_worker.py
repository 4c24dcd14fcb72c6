"""The HF rollout worker through its Ray actor interface: tokens, log-probs and weight sync.

References are a plain full forward of a locally loaded model (float64), independent of
`rollout.forward.response_logits`.
"""
from __future__ import annotations

import pytest
import ray
import torch
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rollout.hf_backend import HFRolloutBackend
from rollout.types import RolloutBatch, SamplingSettings
from rollout.weight_sync import bucket_plan, pack
from rollout.worker import RolloutWorkerActor

TEACHER = "launch/assets/tiny-teacher"
EOS = 2
PROMPTS = [[1, 5, 6, 39], [1, 7], [1, 11, 12, 13, 14, 15]]


def save_random_llama(path, seed: int) -> str:
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=75, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=EOS, initializer_range=0.3)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    return (save_random_llama(tmp_path_factory.mktemp("student"), 0),
            save_random_llama(tmp_path_factory.mktemp("other"), 1))


@pytest.fixture(scope="module")
def cluster():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


@pytest.fixture(scope="module")
def worker(cluster, paths):
    w = RolloutWorkerActor.remote(paths[0], backend="hf", teacher_path=TEACHER, num_threads=1)
    ray.get(w.ready.remote())
    return w


@torch.no_grad()
def reference_logprobs(path: str, batch: RolloutBatch) -> torch.Tensor:
    """(N, T) log q(y_t) from one unpadded full forward per row, float64 weights."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    out = torch.zeros(len(batch), batch.max_response_len)
    for i in range(len(batch)):
        P, R = int(batch.prompt_lens[i]), int(batch.response_lens[i])
        seq = batch.sequences[i, :P + R]
        lp = torch.log_softmax(model(input_ids=seq[None]).logits[0], -1)
        out[i, :R] = lp[P - 1:P + R - 1].gather(-1, seq[P:, None])[:, 0].float()
    return out


SETTINGS = SamplingSettings(max_new_tokens=8, n=2, seed=0, eos_token_id=EOS)


def test_actor_tokens_and_logprobs_equal_a_direct_forward(worker, paths):
    batch = ray.get(worker.generate.remote(PROMPTS, SETTINGS))
    assert batch.source == "student" and len(batch) == len(PROMPTS) * SETTINGS.n
    for i in range(len(batch)):  # prompts come back in order, each repeated n times
        assert batch.sequences[i, :batch.prompt_lens[i]].tolist() == PROMPTS[i // SETTINGS.n]
    # Same weights, same seed, same code in this process: the same tokens.
    local = HFRolloutBackend(paths[0]).generate(PROMPTS, SETTINGS)
    assert torch.equal(batch.sequences, local.sequences)
    ref = reference_logprobs(paths[0], batch)
    torch.testing.assert_close(batch.student_logprobs, ref, atol=5e-5, rtol=0)  # float32 rollout vs float64 reference
    torch.testing.assert_close(ray.get(worker.logprobs.remote(batch)), ref, atol=5e-5, rtol=0)  # float32 rollout vs float64 reference


def test_cpu_worker_reports_no_gpu(worker):
    assert ray.get(worker.gpu_uuid.remote()) is None  # the weight sync then never picks a GPU path


def test_actor_mixed_sampling_returns_raw_student_logprobs(worker, paths):
    settings = SamplingSettings(max_new_tokens=8, n=2, seed=1, eos_token_id=EOS, mix_alpha=0.3)
    batch = ray.get(worker.generate.remote(PROMPTS, settings))
    assert batch.source == "mixed" and batch.mix_alpha == 0.3
    torch.testing.assert_close(batch.student_logprobs, reference_logprobs(paths[0], batch), atol=5e-5, rtol=0)  # float32 rollout vs float64 reference


@pytest.mark.parametrize("alpha", [0.0, 0.3])
def test_responses_end_at_the_first_stop_token(worker, alpha):
    """stop_token_ids end a response like EOS does (kept as its last token), in plain and teacher-mixed
    sampling. The stop set is the three tokens sampled most often without one, so it is hit."""
    free = ray.get(worker.generate.remote(PROMPTS, SamplingSettings(max_new_tokens=16, n=8, seed=4, mix_alpha=alpha)))
    counts = torch.bincount(free.response_tokens()[free.response_mask()], minlength=75)
    counts[EOS] = 0
    stops = counts.topk(3).indices.tolist()
    settings = SamplingSettings(max_new_tokens=16, n=8, seed=4, eos_token_id=EOS, stop_token_ids=stops, mix_alpha=alpha)
    batch = ray.get(worker.generate.remote(PROMPTS, settings))
    ended = set(stops) | {EOS}
    early = 0
    for i in range(len(batch)):
        resp = batch.response_tokens()[i, :int(batch.response_lens[i])].tolist()
        assert not ended & set(resp[:-1]), (resp, stops)  # nothing sampled after a stop token
        if len(resp) < 16:
            assert resp[-1] in ended, resp
            early += resp[-1] in stops
    assert early > 0  # the stop set was hit


def test_update_weights_from_buckets_of_another_model(worker, paths):
    batch = ray.get(worker.generate.remote(PROMPTS, SETTINGS))
    other = AutoModelForCausalLM.from_pretrained(paths[1])
    named = list(other.state_dict().items())
    # 64 KiB buckets: several buckets, and tensors larger than a bucket travel alone
    plan = bucket_plan([(n, t.shape, t.dtype) for n, t in named], bucket_bytes=64 * 1024)
    assert len(plan) > 3
    tensors = dict(named)
    buckets = [(ray.put(pack([tensors[m["name"]] for m in metas], metas)), metas) for metas in plan]
    version = ray.get(worker.weights_version.remote())
    loaded = ray.get(worker.update_weights.remote(buckets))
    assert loaded == len(named)
    assert ray.get(worker.weights_version.remote()) == version + 1
    after = ray.get(worker.logprobs.remote(batch))
    torch.testing.assert_close(after, reference_logprobs(paths[1], batch), atol=5e-5, rtol=0)  # float32 rollout vs float64 reference
    assert (after - reference_logprobs(paths[0], batch)).abs().max() > 0.1  # the weights really changed


def test_model_folder_sampling_defaults_do_not_change_the_policy(tmp_path, paths):
    """A folder's generation_config.json (Qwen2.5-Instruct: repetition_penalty=1.1, top_k=20, top_p=0.8) must not
    reach the rollout: samples follow q exactly, as the policy gradient's raw log q assumes. Same weights and seed
    with and without such defaults (here extreme ones): the same tokens."""
    import shutil

    from transformers import GenerationConfig

    biased = tmp_path / "biased"
    shutil.copytree(paths[0], biased)
    GenerationConfig(do_sample=True, repetition_penalty=5.0, top_k=2, top_p=0.3, temperature=0.2, no_repeat_ngram_size=1,
                     min_new_tokens=8, bad_words_ids=[[5]]).save_pretrained(biased)
    settings = SamplingSettings(max_new_tokens=8, n=8, seed=3, eos_token_id=EOS)
    plain = HFRolloutBackend(paths[0]).generate(PROMPTS, settings)
    with_defaults = HFRolloutBackend(str(biased)).generate(PROMPTS, settings)
    assert torch.equal(plain.sequences, with_defaults.sequences)


def test_a_config_with_several_eos_ids_and_no_pad_token(tmp_path):
    """Llama 3 folders list several EOS ids and no pad id: rows are padded with the first EOS id."""
    path = save_random_llama(tmp_path / "llama3_like", 0)
    cfg = LlamaConfig.from_pretrained(path)
    cfg.pad_token_id, cfg.eos_token_id = None, [EOS, 3]
    cfg.save_pretrained(path)
    backend = HFRolloutBackend(path)
    assert backend.pad_token_id == EOS
    batch = backend.generate(PROMPTS, SETTINGS)
    torch.testing.assert_close(batch.student_logprobs, reference_logprobs(path, batch), atol=5e-5, rtol=0)


def test_sampling_restricted_to_a_smaller_vocabulary(tmp_path):
    """vocab_size: a teacher sampling for a student with fewer embedding rows (sequence-level KD) draws only the
    student's ids, even where its extra rows carry the largest logits."""
    model = LlamaForCausalLM.from_pretrained(save_random_llama(tmp_path / "padded", 0))
    V = model.config.vocab_size
    model.resize_token_embeddings(V + 8, mean_resizing=False)
    with torch.no_grad():
        model.lm_head.weight[V:] = 50.0 * torch.randn(8, model.config.hidden_size)
    model.save_pretrained(tmp_path / "padded")
    settings = SamplingSettings(max_new_tokens=8, n=4, seed=0, eos_token_id=EOS)
    unrestricted = HFRolloutBackend(str(tmp_path / "padded")).generate(PROMPTS, settings)
    assert int(unrestricted.response_tokens()[unrestricted.response_mask()].max()) >= V  # the rows do get drawn
    restricted = HFRolloutBackend(str(tmp_path / "padded"), vocab_size=V).generate(PROMPTS, settings)
    assert int(restricted.response_tokens()[restricted.response_mask()].max()) < V
