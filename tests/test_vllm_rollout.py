"""vLLM rollout worker inside a Ray actor (GPU only; skipped without CUDA or vLLM).

Same checks as the CPU tests (tests/test_rollout_worker.py, tests/test_rollout_mixed_sampling.py) for the
vllm backend: log-probs against a HF recomputation of the same bf16 weights, weight sync on the same-GPU
(CUDA IPC) and CPU-staged paths, and the chi-square check of teacher-mixed sampling.
Run on the GPU machine with VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_FLASHINFER_SAMPLER=0.
"""
from __future__ import annotations

import importlib.util

import numpy as np
import pytest
import torch

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU"),
    pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="needs vLLM (GPU machine only)"),
]

EOS = 2
PROMPTS = [[1, 5, 6, 39], [1, 7], [1, 11, 12, 13, 14, 15]]
BF16_ATOL = 0.05  # bf16 rollout kernels vs a float32 HF forward of the same bf16 weights (mean |Δ| is far lower)


def save_llama(path, seed: int, std: float = 0.3) -> str:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=75, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=256, pad_token_id=0,
                      bos_token_id=1, eos_token_id=EOS, initializer_range=std)
    LlamaForCausalLM(cfg).to(torch.bfloat16).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def paths(tmp_path_factory):
    from transformers import AutoModelForCausalLM

    teacher = tmp_path_factory.mktemp("teacher")
    AutoModelForCausalLM.from_pretrained("launch/assets/tiny-teacher").to(torch.bfloat16).save_pretrained(teacher)
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


@torch.no_grad()
def hf_logprobs(model, batch) -> torch.Tensor:
    out = torch.zeros(len(batch), batch.max_response_len)
    for i in range(len(batch)):
        P, R = int(batch.prompt_lens[i]), int(batch.response_lens[i])
        seq = batch.sequences[i, :P + R].cuda()
        lp = torch.log_softmax(model(input_ids=seq[None]).logits[0].float(), -1)
        out[i, :R] = lp[P - 1:P + R - 1].gather(-1, seq[P:, None])[:, 0].cpu()
    return out


def load_fp32(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()


def test_vllm_sampled_logprobs_match_hf_recomputation(worker, paths):
    import ray

    from rollout.types import SamplingSettings

    batch = ray.get(worker.generate.remote(PROMPTS, SamplingSettings(max_new_tokens=16, n=4, seed=0, eos_token_id=EOS)))
    assert len(batch) == 12 and batch.source == "student"
    ref = hf_logprobs(load_fp32(paths[0]), batch)
    mask = batch.response_mask()
    torch.testing.assert_close(batch.student_logprobs[mask], ref[mask], atol=BF16_ATOL, rtol=0)
    rescored = ray.get(worker.logprobs.remote(batch))  # prompt_logprobs path
    torch.testing.assert_close(rescored[mask], ref[mask], atol=BF16_ATOL, rtol=0)


def test_same_gpu_ipc_weight_sync(worker, paths):
    import ray

    from rollout.types import SamplingSettings
    from rollout.vllm_backend import ipc_handle
    from rollout.weight_sync import bucket_plan, pack

    batch = ray.get(worker.generate.remote(PROMPTS, SamplingSettings(max_new_tokens=8, seed=1, eos_token_id=EOS)))
    learner = load_fp32(paths[0])
    torch.manual_seed(0)
    with torch.no_grad():
        for p in learner.parameters():
            p.add_(0.1 * torch.randn_like(p))  # perturb: a "training step"
    named = [(n, t.to(torch.bfloat16)) for n, t in learner.state_dict().items()]
    plan = bucket_plan([(n, t.shape, t.dtype) for n, t in named], bucket_bytes=256 * 1024)
    tensors = dict(named)
    flats = [pack([tensors[m["name"]] for m in metas], metas, device="cuda") for metas in plan]
    torch.cuda.synchronize()
    before = ray.get(worker.weights_version.remote())
    n = ray.get(worker.update_weights_ipc.remote([(ipc_handle(f), metas) for f, metas in zip(flats, plan)]))
    assert n > 0 and ray.get(worker.weights_version.remote()) == before + 1
    ref = hf_logprobs(learner.to(torch.bfloat16).float(), batch)  # the learner's recomputation, synced weights
    mask = batch.response_mask()
    torch.testing.assert_close(ray.get(worker.logprobs.remote(batch))[mask], ref[mask], atol=BF16_ATOL, rtol=0)


def test_cpu_staged_weight_sync_back_to_the_original(worker, paths):
    import ray

    from rollout.types import SamplingSettings
    from rollout.weight_sync import bucket_plan, pack

    original = load_fp32(paths[0]).to(torch.bfloat16)
    named = [(n, t.cpu()) for n, t in original.state_dict().items()]
    plan = bucket_plan([(n, t.shape, t.dtype) for n, t in named], bucket_bytes=256 * 1024)
    tensors = dict(named)
    buckets = [(ray.put(pack([tensors[m["name"]] for m in metas], metas)), metas) for metas in plan]
    ray.get(worker.update_weights.remote(buckets))
    batch = ray.get(worker.generate.remote(PROMPTS, SamplingSettings(max_new_tokens=8, seed=2, eos_token_id=EOS)))
    mask = batch.response_mask()
    ref = hf_logprobs(original.float(), batch)
    torch.testing.assert_close(batch.student_logprobs[mask], ref[mask], atol=BF16_ATOL, rtol=0)


def test_vllm_mixed_sampling_first_token_matches_mixture(worker, paths):
    import ray
    from scipy.stats import chisquare

    from rollout.types import SamplingSettings

    alpha, prompt = 0.4, PROMPTS[0]
    batch = ray.get(worker.generate.remote([prompt], SamplingSettings(max_new_tokens=1, n=3000, seed=3,
                                                                      eos_token_id=EOS, mix_alpha=alpha)))
    assert batch.source == "mixed" and batch.mix_alpha == alpha
    with torch.no_grad():
        p = torch.softmax(load_fp32(paths[1])(input_ids=torch.tensor([prompt]).cuda()).logits[0, -1], -1).cpu().numpy()
        q = torch.softmax(load_fp32(paths[0])(input_ids=torch.tensor([prompt]).cuda()).logits[0, -1], -1).cpu().numpy()
    tokens = batch.response_tokens()[:, 0].numpy()

    def pvalue(a):
        probs = a * p + (1 - a) * q
        exp = len(tokens) * probs / probs.sum()
        obs = np.bincount(tokens, minlength=len(probs)).astype(float)
        big = exp >= 5
        return chisquare(np.append(obs[big], obs[~big].sum()), np.append(exp[big], exp[~big].sum())).pvalue

    assert pvalue(alpha) > 1e-3
    assert pvalue(alpha - 0.2) < 1e-6 and pvalue(alpha + 0.2) < 1e-6  # power

