"""Rollout throughput, weight-sync cost and log-prob agreement, one model, one prompt set, one run.

Figures (GPU, `--device cuda --size 134m`):
  worker_tok_s        VllmRolloutBackend.generate (what the training loop calls), generated tokens/s
  bare_vllm_tok_s     plain `LLM.generate` on the same prompts/settings (no logprobs, no RolloutBatch)
  hf_tok_s            HFRolloutBackend.generate (HF `generate` + one log-prob forward)
  sync_s_per_gb       same-GPU CUDA-IPC weight sync (`update_weights_ipc`), seconds per GB of bf16 weights
  mixed_tok_s         teacher-mixed sampling at α=0.2 (alternating scheduler, teacher = same-size model)
  lp_mean_abs_diff_*  mean |Δ| between vLLM's sampled-token raw log-probs and a HF fp32 / bf16 recomputation
  lp_*_after_sync_*   the same after an IPC sync of changed weights (the reload reaches the CUDA-graph engine:
                      small against the new weights, large against the old ones)
CPU smoke mode (`--device cpu --size tiny`) runs the HF parts only and prints why vLLM parts are skipped.

Usage:
    python benchmarks/bench_rollout.py --device cuda --size 134m
    python benchmarks/bench_rollout.py --device cpu --size tiny
Writes benchmarks/results/rollout_{device}_{size}.json and appends a row to BENCHMARKS.md.
Run on the GPU machine with VLLM_WORKER_MULTIPROC_METHOD=spawn VLLM_USE_FLASHINFER_SAMPLER=0.
"""
from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import os
import platform
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks.common import append_markdown, versions  # noqa: E402

# ~134M: the Llama shape of SmolLM-135M (30 layers, 576 hidden, 9 heads / 3 KV heads, vocab 49152).
SIZES = {
    "134m": dict(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                 num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=2048),
    "tiny": dict(vocab_size=512, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                 num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512),
}


def build_model(size: str, path: str, seed: int, dtype) -> int:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(**SIZES[size], pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=True)
    model = LlamaForCausalLM(cfg).to(dtype)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def make_prompts(num: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import random

    rng = random.Random(seed)
    return [[1] + [rng.randrange(3, vocab) for _ in range(length - 1)] for _ in range(num)]


def timed(fn):
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def generated_tokens(batch) -> int:
    return int(batch.response_lens.sum())


def bench_hf(path, prompts, settings, device, dtype_name) -> dict:
    import torch

    from rollout.hf_backend import HFRolloutBackend

    backend = HFRolloutBackend(path, dtype=dtype_name, device=device)
    backend.generate(prompts[:2], settings)  # warm-up
    if device == "cuda":
        torch.cuda.synchronize()
    batch, sec = timed(lambda: backend.generate(prompts, settings))
    backend = None  # free its memory before the next benchmark
    return {"hf_tok_s": generated_tokens(batch) / sec, "hf_s": sec, "hf_tokens": generated_tokens(batch)}


def bench_hf_mixed(path, teacher_path, prompts, settings, device, dtype_name) -> dict:
    from dataclasses import replace

    from rollout.hf_backend import HFRolloutBackend

    backend = HFRolloutBackend(path, dtype=dtype_name, device=device, teacher_path=teacher_path)
    mixed = replace(settings, mix_alpha=0.2)
    batch, sec = timed(lambda: backend.generate(prompts, mixed))
    return {"hf_mixed_tok_s": generated_tokens(batch) / sec}


def hf_response_logprobs(model, batch, rows: int = 16):
    """(N, T) log q of the batch's response tokens under a HF model, `rows` sequences at a time (bounded memory:
    the full (N, T, V) fp32 logits of 256 x 256 x 49152 would be 13 GB)."""
    import torch

    from rollout.forward import response_logits

    out = torch.zeros(len(batch), batch.max_response_len)
    for lo in range(0, len(batch), rows):
        part = batch.select(list(range(lo, min(lo + rows, len(batch)))))
        with torch.no_grad():
            logits = response_logits(model, part).float()
        lp = torch.log_softmax(logits, -1).gather(-1, part.response_tokens().to(logits.device)[..., None])[..., 0]
        out[lo:lo + len(part), :part.max_response_len] = lp.masked_fill(~part.response_mask().to(lp.device), 0.0).cpu()
    return out


def bench_vllm(path, teacher_path, prompts, settings, args, out: dict) -> None:
    """Figures go into `out` as they are measured: a later failure keeps the earlier ones."""
    import torch
    from dataclasses import replace

    from transformers import AutoModelForCausalLM
    from vllm import SamplingParams

    from rollout.vllm_backend import VllmRolloutBackend, _tokens_prompt, ipc_handle
    from rollout.weight_sync import bucket_plan, pack

    backend = VllmRolloutBackend(path, dtype="bfloat16", gpu_memory_utilization=0.3, enforce_eager=args.enforce_eager,
                                 seed=0, teacher_path=teacher_path, teacher_gpu_memory_utilization=0.3)
    backend.generate(prompts[:4], settings)  # warm-up
    # every timed run starts from an empty prefix cache: none reuses the prompts an earlier run cached
    backend.llm.reset_prefix_cache()
    batch, sec = timed(lambda: backend.generate(prompts, settings))
    out["worker_tok_s"] = generated_tokens(batch) / sec

    # bare LLM.generate, same requests without logprobs and without building a RolloutBatch
    bare = SamplingParams(n=settings.n, temperature=1.0, max_tokens=settings.max_new_tokens, ignore_eos=True,
                          stop_token_ids=[2], detokenize=False, seed=0)
    backend.llm.reset_prefix_cache()
    res, sec = timed(lambda: backend.llm.generate([_tokens_prompt(p) for p in prompts], bare, use_tqdm=False))
    out["bare_vllm_tok_s"] = sum(len(c.token_ids) for r in res for c in r.outputs) / sec
    out["worker_vs_bare"] = out["worker_tok_s"] / out["bare_vllm_tok_s"]

    # teacher-mixed sampling at α=0.2 vs pure sampling, same weights as the pure run (the sync test changes them)
    backend.llm.reset_prefix_cache()
    backend.teacher.reset_prefix_cache()
    mixed, sec = timed(lambda: backend.generate(prompts, replace(settings, mix_alpha=0.2)))
    out["mixed_tok_s"] = generated_tokens(mixed) / sec
    out["mixed_vs_pure"] = out["mixed_tok_s"] / out["worker_tok_s"]
    del mixed

    # log-prob agreement: vLLM sampled-token raw log-probs vs HF recomputation of the same bf16 weights
    mask = batch.response_mask()
    for name, dt in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
        hf = AutoModelForCausalLM.from_pretrained(path, dtype=dt).cuda().eval()
        diff = (hf_response_logprobs(hf, batch) - batch.student_logprobs)[mask].abs()
        out[f"lp_mean_abs_diff_{name}"] = float(diff.mean())
        out[f"lp_max_abs_diff_{name}"] = float(diff.max())
        del hf
        torch.cuda.empty_cache()

    # same-GPU weight sync through CUDA IPC (the learner's bf16 parameters packed into 256 MB buckets;
    # named_parameters: tied embeddings travel once, as the learner exports them)
    learner = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    named = [(n, p.detach()) for n, p in learner.named_parameters()]
    plan = bucket_plan([(n, t.shape, t.dtype) for n, t in named], bucket_bytes=256 << 20)
    tensors = dict(named)
    gb = sum(t.numel() * t.element_size() for _, t in named) / 1e9
    times = []
    for _ in range(3):
        torch.cuda.synchronize()
        t = time.perf_counter()
        flats = [pack([tensors[m["name"]] for m in metas], metas, device="cuda") for metas in plan]
        for flat, metas in zip(flats, plan):
            backend.load_bucket_ipc(ipc_handle(flat), metas)
        times.append(time.perf_counter() - t)
        del flats
    out["sync_s_per_gb"] = min(times) / gb
    out["sync_gb"] = gb

    # the sync really reaches the CUDA-graph / compiled engine: change the model visibly (final norm x4 sharpens
    # the near-uniform random-init logits; 5% noise everywhere), sync, sample, compare with HF of new and old weights
    with torch.no_grad():
        for p in learner.parameters():
            p.mul_(1 + 0.05 * torch.randn_like(p))
        learner.model.norm.weight.mul_(4.0)
    flats = [pack([tensors[m["name"]] for m in metas], metas, device="cuda") for metas in plan]
    for flat, metas in zip(flats, plan):
        backend.load_bucket_ipc(ipc_handle(flat), metas)
    del flats
    check = backend.generate(prompts[:16], replace(settings, seed=1))
    cmask = check.response_mask()
    diff = (hf_response_logprobs(learner.float().eval(), check) - check.student_logprobs)[cmask].abs()
    out["lp_mean_abs_diff_after_sync_fp32"] = float(diff.mean())
    out["lp_max_abs_diff_after_sync_fp32"] = float(diff.max())
    del learner
    old = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).cuda().eval()
    out["lp_mean_abs_diff_after_sync_vs_old_weights"] = float(
        (hf_response_logprobs(old, check) - check.student_logprobs)[cmask].abs().mean())  # must be far larger
    del old
    torch.cuda.empty_cache()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--size", choices=list(SIZES), default="134m")
    ap.add_argument("--num-prompts", type=int, default=None, help="default: 256 on cuda, 8 on cpu")
    ap.add_argument("--prompt-len", type=int, default=64)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 256 on cuda, 16 on cpu")
    ap.add_argument("--n", type=int, default=1)
    ap.add_argument("--enforce-eager", action="store_true")
    args = ap.parse_args()

    import torch

    from rollout.types import SamplingSettings

    cuda = args.device == "cuda"
    num_prompts = args.num_prompts or (256 if cuda else 8)
    max_new = args.max_new_tokens or (256 if cuda else 16)
    dtype_name = "bfloat16" if cuda else "float32"
    tmp = tempfile.mkdtemp(prefix="bench_rollout_")
    student, teacher = os.path.join(tmp, "student"), os.path.join(tmp, "teacher")
    n_params = build_model(args.size, student, 0, getattr(torch, dtype_name))
    build_model(args.size, teacher, 1, getattr(torch, dtype_name))
    prompts = make_prompts(num_prompts, args.prompt_len, SIZES[args.size]["vocab_size"], seed=0)
    # eos 2 is a stop id, but random weights rarely emit it: responses run to max_new_tokens
    settings = SamplingSettings(max_new_tokens=max_new, n=args.n, seed=0, eos_token_id=2)

    figures, skipped = {}, []
    figures.update(bench_hf(student, prompts, settings, args.device, dtype_name))
    figures.update(bench_hf_mixed(student, teacher, prompts, settings, args.device, dtype_name))
    if not cuda:
        skipped.append("vLLM parts (worker/bare vLLM tokens/s, IPC weight sync, vLLM mixed sampling, log-prob "
                       "agreement) need --device cuda")
    elif importlib.util.find_spec("vllm") is None:
        skipped.append("vLLM parts: vllm is not installed")
    else:
        import gc
        gc.collect()
        torch.cuda.empty_cache()  # the HF parts' cached logits: each vLLM engine needs its share free at start
        try:
            bench_vllm(student, teacher, prompts, settings, args, figures)
        except Exception as err:  # keep what was measured; say what failed
            skipped.append(f"vLLM parts stopped: {type(err).__name__}: {err}")
        if "worker_tok_s" in figures:
            figures["worker_vs_hf"] = figures["worker_tok_s"] / figures["hf_tok_s"]
    for reason in skipped:
        print(f"skipped: {reason}")

    row = {
        "date": datetime.datetime.now().isoformat(timespec="seconds"),
        "device_name": torch.cuda.get_device_name() if cuda else f"cpu ({platform.processor() or platform.machine()})",
        "versions": versions("vllm"),
        "config": {"size": args.size, "params": n_params, "num_prompts": num_prompts, "prompt_len": args.prompt_len,
                   "max_new_tokens": max_new, "n": args.n, "dtype": dtype_name, "enforce_eager": args.enforce_eager},
        "figures": figures,
        "skipped": skipped,
    }
    os.makedirs(os.path.join(ROOT, "benchmarks", "results"), exist_ok=True)
    out = os.path.join(ROOT, "benchmarks", "results", f"rollout_{args.device}_{args.size}.json")
    with open(out, "w") as f:
        json.dump(row, f, indent=2)
    append_markdown(os.path.join(ROOT, "BENCHMARKS.md"), "bench_rollout", row, ["figure", "value"],
                    list(row["figures"].items()), [f"skipped: {reason}" for reason in row["skipped"]])
    for k, v in figures.items():
        print(f"{k:>24}: {v:.4g}" if isinstance(v, float) else f"{k:>24}: {v}")
    print(f"wrote {out} and a row in BENCHMARKS.md")


if __name__ == "__main__":
    main()
