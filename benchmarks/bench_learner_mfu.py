"""Learner MFU: our DeepSpeed `Learner.train_step` on a random-weight student, tokens/s and model FLOP utilisation.

    # H100 (bf16): Llama-3.2-1B shape, 128k vocabulary, 8 sequences of 2048 tokens a step
    python benchmarks/bench_learner_mfu.py --device cuda --shape 1b --vocab 128256
    # CPU smoke check (no MFU unless --peak-tflops is given)
    python benchmarks/bench_learner_mfu.py --device cpu --shape tiny

The learner is the one the training loop runs (trainer/learner.py, ZeRO --zero-stage, bf16 on GPU), built
in this process as a single rank. Each step is one `train_step` on a batch of --seqs sequences of
--prompt-len + --response-len random tokens (every sequence full length: no padding) with random teacher
scores (top-k, --teacher-topk; 0 = full distributions) under --objective (default GKD, JSD β=0.5):
forward, loss, backward and the AdamW update. Steps are timed after --warmup steps; the figure is the median.

Model FLOPs per step (benchmarks.models.train_flops; PaLM appendix B / Chinchilla appendix F):

    seqs · (6·N_dec·T + 6·V·d·R + 12·L·H·hd·T²)

T = prompt + response tokens, R = response tokens (the learner applies the LM head at the response
positions only), N_dec the decoder's matmul weights, L layers, H query heads of width hd. The attention
term counts full T×T products (no causal discount); the divergence's elementwise work is not counted.
MFU = model FLOPs per second / peak (--peak-tflops: H100 SXM dense bf16 989 TFLOP/s; H100 PCIe is 756).
Gradient checkpointing (--grad-ckpt) recomputes the forward: MFU stays model FLOPs over peak, so it drops.

Writes benchmarks/results/learner_mfu_{device}_{shape}_v{vocab}.json (or --out-dir) and, on cuda, appends a
row to BENCHMARKS.md (--markdown '' skips; CPU runs write no row unless --markdown is given).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks import models  # noqa: E402
from benchmarks.common import ROOT, append_markdown, device_name, median, now_iso, versions  # noqa: E402

H100_SXM_BF16_TFLOPS = 989.0  # dense (no 2:4 sparsity), NVIDIA H100 SXM datasheet


def random_batch(num_seqs: int, prompt_len: int, response_len: int, vocab: int, topk: int, seed: int = 0):
    """A RolloutBatch of full-length random rows and random teacher scores of the right shapes.

    Teacher top-k log-probs are a valid sub-distribution: log-softmax over k random logits plus log(0.9)
    (the top-k hold 90% of the mass), in descending order, on k distinct ids per position."""
    import torch

    from rollout.types import RolloutBatch
    from teacher.types import TeacherScores

    g = torch.Generator().manual_seed(seed)
    N, P, R = num_seqs, prompt_len, response_len
    seqs = torch.randint(4, vocab, (N, P + R), generator=g)
    batch = RolloutBatch(sequences=seqs, prompt_lens=torch.full((N,), P), response_lens=torch.full((N,), R),
                         pad_token_id=models.PAD_ID, student_logprobs=-torch.rand(N, R, generator=g) * 5)
    token_lp = -torch.rand(N, R, generator=g) * 5
    if topk == 0:  # full distributions (N, R, V): only for small vocabularies
        full = torch.log_softmax(torch.randn(N, R, vocab, generator=g), -1)
        return batch, TeacherScores(token_logprobs=token_lp, full_logprobs=full)
    k = min(topk, vocab - 4)
    base = torch.randint(0, vocab - 4, (N, R, 1), generator=g)
    ids = (4 + (base + torch.arange(k)) % (vocab - 4)).to(torch.int32)  # k consecutive (distinct) non-special ids
    lp = torch.log_softmax(torch.randn(N, R, k, generator=g), -1).sort(-1, descending=True).values + torch.log(torch.tensor(0.9))
    return batch, TeacherScores(token_logprobs=token_lp, topk_ids=ids, topk_logprobs=lp)


def make_learner(student: str, device: str, args):
    import torch

    from launch.config import ObjectiveConfig, TrainerConfig
    from trainer.learner import Learner, free_port

    cuda = device == "cuda"
    trainer = TrainerConfig(steps=args.warmup + args.steps, lr=1e-6, zero_stage=args.zero_stage,
                            micro_batch_tokens=args.micro_batch_tokens or args.seqs * (args.prompt_len + args.response_len),
                            bf16=cuda, gradient_checkpointing=args.grad_ckpt, device=device, num_gpus=1.0 if cuda else 0.0,
                            num_cpus=float(torch.get_num_threads() if not cuda else 4))
    objective = ObjectiveConfig(name=args.objective, lam=1.0, beta=0.5)
    trainer.validate()
    objective.validate()
    return Learner(rank=0, world_size=1, master_addr="127.0.0.1", master_port=free_port(), student=student,
                   student_init="pretrained", dtype="bfloat16" if cuda else "float32",
                   trainer=dataclasses.asdict(trainer), objective=dataclasses.asdict(objective))


def run(args) -> dict:
    import torch

    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available; run --device cpu --shape tiny for a smoke check")
    vocab = models.llama_config(args.shape, args.vocab).vocab_size
    folder = os.path.join(args.models_dir, f"{args.shape}_v{vocab}_s0")
    info = models.ensure(folder, args.shape, vocab, seed=0, device=args.device, dtype="bfloat16" if cuda else "float32",
                         max_position_embeddings=max(4096, args.prompt_len + args.response_len))
    cfg = models.llama_config(args.shape, vocab, info["max_position_embeddings"])
    learner = make_learner(folder, args.device, args)
    batch, scores = random_batch(args.seqs, args.prompt_len, args.response_len, vocab, args.teacher_topk)
    T, R = args.prompt_len + args.response_len, args.response_len
    global_tokens = int(batch.response_lens.sum())

    times, out = [], None
    for i in range(args.warmup + args.steps):
        if cuda:
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = learner.train_step(batch, scores, global_tokens)  # ends in engine.step() and .item()s: synchronous
        if cuda:
            torch.cuda.synchronize()
        dt = time.perf_counter() - t0
        if i >= args.warmup:
            times.append(dt)
        print(f"step {i + 1}: {dt:.3f} s  loss {out['sums'].get('loss', float('nan')) / max(global_tokens, 1):.4f}"
              f"{'  (warm-up)' if i < args.warmup else ''}", flush=True)

    step_s = median(times)
    flops = models.train_flops(cfg, T, R, args.seqs)
    attn_flops = 12.0 * cfg.num_hidden_layers * cfg.num_attention_heads * cfg.head_dim * T ** 2 * args.seqs
    peak = args.peak_tflops if args.peak_tflops is not None else (H100_SXM_BF16_TFLOPS if cuda else None)
    achieved = flops / step_s / 1e12
    figures = {
        "step_s_median": step_s, "step_s_min": min(times), "step_s_max": max(times),
        "tokens_per_s": args.seqs * T / step_s, "response_tokens_per_s": args.seqs * R / step_s,
        "model_tflop_per_step": flops / 1e12, "attention_share_of_flops": attn_flops / flops,
        "achieved_tflops": achieved, "peak_tflops": peak, "mfu": achieved / peak if peak else None,
        "peak_mem_gb": (torch.cuda.max_memory_allocated() / 2**30) if cuda else None,
    }
    return {
        "benchmark": "learner_mfu", "date": now_iso(), "device": args.device, "device_name": device_name(args.device),
        "versions": versions("deepspeed"),
        "config": {"shape": args.shape, "vocab": vocab, "params": info["params"], "matmul_params": models.matmul_params(cfg),
                   "seqs": args.seqs, "prompt_len": args.prompt_len, "response_len": args.response_len,
                   "objective": args.objective, "teacher_topk": args.teacher_topk, "zero_stage": args.zero_stage,
                   "grad_ckpt": args.grad_ckpt, "dtype": "bf16" if cuda else "fp32",
                   "micro_batch_tokens": args.micro_batch_tokens or args.seqs * T, "warmup": args.warmup,
                   "steps": args.steps},
        "flops_formula": "seqs*(6*N_dec*T + 6*V*d*R + 12*L*H*hd*T^2) (PaLM app. B, Chinchilla app. F; full T^2)",
        "figures": figures, "step_times_s": times,
    }


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--shape", choices=list(models.SHAPES), default=None, help="default 1b on cuda, tiny on cpu")
    ap.add_argument("--vocab", type=int, default=None, help="default: the shape's (1b: 128256)")
    ap.add_argument("--seqs", type=int, default=None, help="sequences per step (default 8 on cuda, 4 on cpu)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 256 on cuda, 16 on cpu")
    ap.add_argument("--response-len", type=int, default=None, help="default 1792 on cuda, 48 on cpu")
    ap.add_argument("--objective", default="gkd", choices=["gkd", "forward_kl", "reverse_kl", "minillm"])
    ap.add_argument("--teacher-topk", type=int, default=64, help="teacher top-k scores (0 = full distributions)")
    ap.add_argument("--zero-stage", type=int, default=0, choices=[0, 1, 2, 3])
    ap.add_argument("--grad-ckpt", action="store_true")
    ap.add_argument("--micro-batch-tokens", type=int, default=None, help="default: the whole step in one micro-batch")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=5)
    ap.add_argument("--peak-tflops", type=float, default=None,
                    help=f"accelerator peak (default {H100_SXM_BF16_TFLOPS} on cuda: H100 SXM dense bf16; none on cpu)")
    ap.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "bench_models"))
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--markdown", default=None, help="file to append a row to (default BENCHMARKS.md on cuda, none on cpu)")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    args.shape = args.shape or ("1b" if cuda else "tiny")
    args.seqs = args.seqs or (8 if cuda else 4)
    args.prompt_len = args.prompt_len or (256 if cuda else 16)
    args.response_len = args.response_len or (1792 if cuda else 48)

    result = run(args)
    f = result["figures"]
    print(json.dumps(f, indent=2))
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, f"learner_mfu_{args.device}_{args.shape}_v{result['config']['vocab']}.json")
    with open(out, "w") as fh:
        json.dump(result, fh, indent=2)
    print(f"wrote {out}")
    md = args.markdown if args.markdown is not None else (os.path.join(ROOT, "BENCHMARKS.md") if cuda else "")
    if md:
        c = result["config"]
        append_markdown(md, "bench_learner_mfu" + ("" if cuda else " (CPU smoke, not a performance figure)"), result,
                        ["model", "tokens/step", "step s (median)", "tokens/s", "model TFLOP/step", "achieved TFLOP/s",
                         "peak TFLOP/s", "MFU", "peak mem GiB"],
                        [[f"{c['shape']} ({c['params'] / 1e9:.2f}B, V={c['vocab']})", c["seqs"] * (c["prompt_len"] + c["response_len"]),
                          f["step_s_median"], f["tokens_per_s"], f["model_tflop_per_step"], f["achieved_tflops"],
                          f["peak_tflops"], f["mfu"], f["peak_mem_gb"]]],
                        [f"FLOPs: {result['flops_formula']}; attention share {f['attention_share_of_flops']:.1%}."])
        print(f"appended a row to {md}")


if __name__ == "__main__":
    main()
