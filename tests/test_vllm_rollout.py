"""vLLM rollout worker inside a Ray actor (GPU only; skipped without CUDA or vLLM).

Same checks as the CPU tests (tests/test_rollout_worker.py, tests/test_rollout_mixed_sampling.py) for the
vllm backend, all through `rollout.worker.RolloutWorkerActor`: sampled tokens' log-probs against a HF
recomputation of the same bf16 weights, α=0 against plain sampling, the chi-square check of teacher-mixed
sampling, then weight sync on the same-GPU (CUDA IPC) and object-store paths against the learner's forward
of the new weights. Engines run with enforce_eager=True (fast start); the CUDA-graph path is measured by
benchmarks/bench_rollout.py. Run on the GPU machine with VLLM_WORKER_MULTIPROC_METHOD=spawn
VLLM_USE_FLASHINFER_SAMPLER=0. Tests before the sync tests rely on the worker still holding the saved student.
"""
from __future__ import annotations

import dataclasses
import importlib.util
import os

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (GPU machine only)"),
]

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EOS = 2
PROMPTS = [[1, 5, 6, 39], [1, 7], [1, 11, 12, 13, 14, 15]]
# bf16 engine kernels vs a float32 HF forward of the same bf16 weights. Weights ~N(0, 0.1) keep logits O(1):
# a HF bf16 forward of this model is off by 0.01 on average and < 0.07 at worst on sampled tokens.
MAX_ABS, MEAN_ABS = 0.1, 0.02


def save_llama(path, seed: int, std: float = 0.1) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=75, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=EOS, initializer_range=std, tie_word_embeddings=False)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    teacher = tmp_path_factory.mktemp("teacher")  # same 75-token vocabulary as the student
    AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "launch/assets/tiny-teacher")).to(torch.bfloat16).save_pretrained(teacher)
    return save_llama(tmp_path_factory.mktemp("student"), 0), str(teacher)


@pytest.fixture(scope="module")
def worker(paths):
    import ray

    from rollout.worker import RolloutWorkerActor

    ray.init(num_cpus=4, num_gpus=1, include_dashboard=False,
             runtime_env={"env_vars": {"VLLM_WORKER_MULTIPROC_METHOD": "spawn", "VLLM_USE_FLASHINFER_SAMPLER": "0"}})
    # 0.5 GPU for the actor: the test process itself is the "learner" on the same GPU (IPC path).
    w = RolloutWorkerActor.options(num_gpus=0.5).remote(
        paths[0], backend="vllm", dtype="bfloat16", gpu_memory_utilization=0.2, enforce_eager=True,
        teacher_path=paths[1], teacher_gpu_memory_utilization=0.2, seed=0)
    ray.get(w.ready.remote())
    yield w
    ray.shutdown()


def kill_and_wait_for_memory(actor, timeout_s: float = 30.0) -> None:
    """Kill an engine's actor and wait until the GPU's free memory stops rising: a next engine profiling its memory
    while the killed one still frees its share fails vLLM's start-up check (`gpu_worker.py`)."""
    import time

    import ray

    ray.kill(actor)
    last, deadline = -1, time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        time.sleep(1.0)
        free = torch.cuda.mem_get_info()[0]
        if free == last:
            return
        last = free


def load_fp32(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()


@torch.no_grad()
def hf_logprobs(model, batch) -> torch.Tensor:
    out = torch.zeros(len(batch), batch.max_response_len)
    for i in range(len(batch)):
        P, R = int(batch.prompt_lens[i]), int(batch.response_lens[i])
        seq = batch.sequences[i, :P + R].cuda()
        lp = torch.log_softmax(model(input_ids=seq[None]).logits[0].float(), -1)
        out[i, :R] = lp[P - 1:P + R - 1].gather(-1, seq[P:, None])[:, 0].cpu()
    return out


def assert_bf16_close(actual: torch.Tensor, ref: torch.Tensor, mask: torch.Tensor) -> None:
    d = (actual - ref)[mask].abs()
    assert d.max() < MAX_ABS and d.mean() < MEAN_ABS, f"|Δ| max {d.max():.4f}, mean {d.mean():.4f}"


@torch.no_grad()
def perturbed(path, seed: int):
    """The learner after a "training step": fp32 weights that are exactly bf16 numbers (what the sync sends)."""
    model = load_fp32(path)
    g = torch.Generator(device="cuda").manual_seed(seed)
    for p in model.parameters():
        p.add_(0.05 * torch.randn(p.shape, generator=g, device=p.device))
        p.copy_(p.to(torch.bfloat16).float())
    return model


def bf16_buckets(model, device: str):
    """(flat bf16 bucket, metas) pairs of the model's state dict, as the learner exports them."""
    from rollout.weight_sync import bucket_plan, pack

    named = {n: t.to(torch.bfloat16) for n, t in model.state_dict().items()}
    plan = bucket_plan([(n, t.shape, t.dtype) for n, t in named.items()], bucket_bytes=256 * 1024)
    return [(pack([named[m["name"]] for m in metas], metas, device=device), metas) for metas in plan]


def test_sampled_tokens_and_logprobs_match_hf(worker, paths):
    import ray

    from rollout.types import SamplingSettings

    batch = ray.get(worker.generate.remote(PROMPTS, SamplingSettings(max_new_tokens=16, n=4, seed=0, eos_token_id=EOS)))
    assert len(batch) == 12 and batch.source == "student"
    for i in range(len(batch)):  # the HF backend's stop rule: EOS ends a row and is kept
        r = batch.sequences[i, int(batch.prompt_lens[i]):int(batch.prompt_lens[i] + batch.response_lens[i])].tolist()
        assert EOS not in r[:-1] and (len(r) == 16 or r[-1] == EOS)
        assert batch.sequences[i, :int(batch.prompt_lens[i])].tolist() == PROMPTS[i // 4]
    ref = hf_logprobs(load_fp32(paths[0]), batch)
    mask = batch.response_mask()
    assert_bf16_close(batch.student_logprobs, ref, mask)  # sampled-token logprobs (logprobs=0)
    assert_bf16_close(ray.get(worker.logprobs.remote(batch)), ref, mask)  # prompt_logprobs path


def test_alpha_zero_is_plain_sampling(worker):
    import ray

    from rollout.types import SamplingSettings

    plain = SamplingSettings(max_new_tokens=8, n=2, seed=7, eos_token_id=EOS)
    a = ray.get(worker.generate.remote(PROMPTS, plain))
    b = ray.get(worker.generate.remote(PROMPTS, dataclasses.replace(plain, mix_alpha=0.0)))
    assert b.source == "student" and b.mix_alpha == 0.0
    assert torch.equal(a.sequences, b.sequences)  # same seeds, same requests: the same samples
    torch.testing.assert_close(a.student_logprobs, b.student_logprobs, atol=1e-4, rtol=0)


def test_mixed_sampling_token_frequencies_match_mixture(worker, paths):
    """First-token frequencies: α·p + (1−α)·q at α=0.4 (teacher-mixed), q at α=0 (plain); chi-square."""
    import ray
    from scipy.stats import chisquare

    from rollout.types import SamplingSettings

    alpha, prompt, N = 0.4, PROMPTS[0], 3000
    settings = SamplingSettings(max_new_tokens=1, n=N, seed=3, eos_token_id=EOS)
    mixed = ray.get(worker.generate.remote([prompt], dataclasses.replace(settings, mix_alpha=alpha)))
    plain = ray.get(worker.generate.remote([prompt], settings))
    assert mixed.source == "mixed" and mixed.mix_alpha == alpha and len(mixed) == N == len(plain)
    with torch.no_grad():
        logq = torch.log_softmax(load_fp32(paths[0])(input_ids=torch.tensor([prompt]).cuda()).logits[0, -1].double(), -1).cpu()
        p = torch.softmax(load_fp32(paths[1])(input_ids=torch.tensor([prompt]).cuda()).logits[0, -1].double(), -1).cpu().numpy()
    q = logq.exp().numpy()  # float64: chisquare checks that observed and expected sums agree to 1.5e-8

    def pvalue(tokens, a):
        probs = a * p + (1 - a) * q
        exp = len(tokens) * probs / probs.sum()
        obs = np.bincount(tokens, minlength=len(probs)).astype(float)
        big = exp >= 5
        return chisquare(np.append(obs[big], obs[~big].sum()), np.append(exp[big], exp[~big].sum())).pvalue

    tokens = mixed.response_tokens()[:, 0].numpy()
    assert pvalue(tokens, alpha) > 1e-3
    assert pvalue(tokens, alpha - 0.2) < 1e-6 and pvalue(tokens, alpha + 0.2) < 1e-6  # power
    assert pvalue(plain.response_tokens()[:, 0].numpy(), 0.0) > 1e-3
    # the mixed batch's behaviour log-probs are the student's raw log q, teacher-drawn tokens included
    first = mixed.response_tokens()[:, :1]
    assert_bf16_close(mixed.student_logprobs[:, :1], logq[first], torch.ones_like(first, dtype=torch.bool))


def test_same_gpu_ipc_weight_sync(worker, paths):
    import ray

    from rollout.types import SamplingSettings
    from rollout.vllm_backend import ipc_handle

    # the engine reports the GPU it runs on, as the learner names it (the single GPU of this machine)
    assert ray.get(worker.gpu_uuid.remote()) == str(torch.cuda.get_device_properties(0).uuid)
    batch = ray.get(worker.generate.remote(PROMPTS, SamplingSettings(max_new_tokens=8, n=2, seed=1, eos_token_id=EOS)))
    learner = perturbed(paths[0], seed=1)
    buckets = bf16_buckets(learner, "cuda")  # kept alive until the call returns
    torch.cuda.synchronize()
    before = ray.get(worker.weights_version.remote())
    n = ray.get(worker.update_weights_ipc.remote([(ipc_handle(flat), metas) for flat, metas in buckets]))
    assert n == sum(len(metas) for _, metas in buckets) and ray.get(worker.weights_version.remote()) == before + 1
    ref, mask = hf_logprobs(learner, batch), batch.response_mask()
    assert (batch.student_logprobs - ref)[mask].abs().max() > 2 * MAX_ABS  # the update is visible at all
    assert_bf16_close(ray.get(worker.logprobs.remote(batch)), ref, mask)


def test_object_store_weight_sync(worker, paths):
    import ray

    from rollout.types import SamplingSettings

    learner = perturbed(paths[0], seed=2)
    buckets = [(ray.put(flat), metas) for flat, metas in bf16_buckets(learner, "cpu")]
    n = ray.get(worker.update_weights.remote(buckets))
    assert n == sum(len(metas) for _, metas in buckets)
    batch = ray.get(worker.generate.remote(PROMPTS, SamplingSettings(max_new_tokens=8, n=2, seed=2, eos_token_id=EOS)))
    ref, mask = hf_logprobs(learner, batch), batch.response_mask()
    assert_bf16_close(batch.student_logprobs, ref, mask)  # sampling with the new weights
    assert_bf16_close(ray.get(worker.logprobs.remote(batch)), ref, mask)
    assert (hf_logprobs(perturbed(paths[0], seed=1), batch) - ref)[mask].abs().max() > 2 * MAX_ABS


def test_sleep_wake_and_ipc_sync_in_the_loops_order(worker, paths):
    """Single-GPU mode's step (trainer/loop.py) on an engine built with sleep_mode: sleep(2) drops weights and KV
    cache, wake_up(["weights"]), the new weights bucket by bucket through CUDA IPC, wake_up(["kv_cache"]); the
    engine then samples and scores with the new weights."""
    import ray

    from rollout.types import SamplingSettings
    from rollout.vllm_backend import ipc_handle
    from rollout.worker import RolloutWorkerActor

    w = RolloutWorkerActor.options(num_gpus=0.4).remote(paths[0], backend="vllm", dtype="bfloat16",
                                                        gpu_memory_utilization=0.15, enforce_eager=True,
                                                        sleep_mode=True, seed=0)
    try:
        settings = SamplingSettings(max_new_tokens=8, n=2, seed=4, eos_token_id=EOS)
        ray.get(w.generate.remote(PROMPTS, settings))
        ray.get(w.sleep.remote(2))
        with pytest.raises(ray.exceptions.RayTaskError, match="asleep"):
            ray.get(w.generate.remote(PROMPTS, settings))
        ray.get(w.wake_up.remote(["weights"]))
        learner = perturbed(paths[0], seed=3)
        buckets = bf16_buckets(learner, "cuda")  # kept alive until the calls return
        torch.cuda.synchronize()
        n = sum(ray.get(w.update_weights_ipc.remote([(ipc_handle(flat), metas)], complete=i == len(buckets) - 1))
                for i, (flat, metas) in enumerate(buckets))
        assert n == sum(len(metas) for _, metas in buckets) and ray.get(w.weights_version.remote()) == 1
        ray.get(w.wake_up.remote(["kv_cache"]))
        batch = ray.get(w.generate.remote(PROMPTS, settings))
        ref, mask = hf_logprobs(learner, batch), batch.response_mask()
        assert_bf16_close(batch.student_logprobs, ref, mask)
        assert_bf16_close(ray.get(w.logprobs.remote(batch)), ref, mask)
    finally:
        kill_and_wait_for_memory(w)


def test_mixed_sampling_engines_sleep_and_wake_together(worker, paths):  # worker: the module's Ray cluster
    """Single-GPU mode with teacher-mixed sampling: sleep(2) frees the student's and the teacher engine's memory
    (the teacher's weights wait in CPU memory), and after the loop's wake/sync order both sample again."""
    import ray

    from rollout.types import SamplingSettings
    from rollout.vllm_backend import ipc_handle
    from rollout.worker import RolloutWorkerActor

    share = 0.15
    w = RolloutWorkerActor.options(num_gpus=0.4).remote(paths[0], backend="vllm", dtype="bfloat16",
                                                        gpu_memory_utilization=share, teacher_path=paths[1],
                                                        teacher_gpu_memory_utilization=share, enforce_eager=True,
                                                        sleep_mode=True, seed=0)
    try:
        settings = SamplingSettings(max_new_tokens=8, n=2, seed=4, eos_token_id=EOS, mix_alpha=0.2)
        ray.get(w.generate.remote(PROMPTS, settings))
        free_awake, total = torch.cuda.mem_get_info()
        ray.get(w.sleep.remote(2))
        free_asleep, _ = torch.cuda.mem_get_info()
        # both engines' shares (weights + KV cache) come back, less what CUDA contexts and graphs keep
        assert free_asleep - free_awake > 1.5 * share * total, (free_awake, free_asleep, total)
        ray.get(w.wake_up.remote(["weights"]))
        learner = perturbed(paths[0], seed=5)
        buckets = bf16_buckets(learner, "cuda")
        torch.cuda.synchronize()
        for i, (flat, metas) in enumerate(buckets):
            ray.get(w.update_weights_ipc.remote([(ipc_handle(flat), metas)], complete=i == len(buckets) - 1))
        ray.get(w.wake_up.remote(["kv_cache"]))
        batch = ray.get(w.generate.remote(PROMPTS, settings))
        assert batch.source == "mixed" and len(batch) == len(PROMPTS) * 2
        ref, mask = hf_logprobs(learner, batch), batch.response_mask()
        assert_bf16_close(batch.student_logprobs, ref, mask)  # the student engine rescored with the new weights
    finally:
        kill_and_wait_for_memory(w)


def test_teacher_sampling_restricted_to_the_students_vocabulary(worker, tmp_path):  # worker: the module's cluster
    """Sequence-level KD: a teacher with more embedding rows (Qwen2.5-7B over 0.5B) samples only the student's
    ids (logit_bias), even where its extra rows carry the largest logits."""
    import ray

    from rollout.types import SamplingSettings
    from rollout.worker import RolloutWorkerActor
    from transformers import AutoModelForCausalLM

    padded = tmp_path / "padded_teacher"
    model = AutoModelForCausalLM.from_pretrained(os.path.join(ROOT, "launch/assets/tiny-teacher"))
    V = model.config.vocab_size
    model.resize_token_embeddings(V + 16, mean_resizing=False)
    with torch.no_grad():
        model.lm_head.weight[V:] = 50.0 * torch.randn(16, model.config.hidden_size)
    model.to(torch.bfloat16).save_pretrained(padded)
    w = RolloutWorkerActor.options(num_gpus=0.4).remote(str(padded), backend="vllm", dtype="bfloat16",
                                                        gpu_memory_utilization=0.15, enforce_eager=True, seed=0,
                                                        vocab_size=V)
    try:
        batch = ray.get(w.generate.remote(PROMPTS, SamplingSettings(max_new_tokens=8, n=4, seed=0, eos_token_id=EOS)))
        assert int(batch.response_lens.sum()) > 0
        assert int(batch.response_tokens()[batch.response_mask()].max()) < V
    finally:
        kill_and_wait_for_memory(w)
