"""Teacher scoring throughput: TeacherPool vs vLLM prompt_logprobs vs a plain HF forward.

    # H100 (what the figures in BENCHMARKS.md come from)
    python benchmarks/bench_teacher_scoring.py --device cuda --size 134m
    # CPU smoke check (vLLM is skipped when not importable)
    python benchmarks/bench_teacher_scoring.py --device cpu --size tiny

Steps: build a random-weight Llama from config (134m: 12 x 768, vocab 32000, ~134M params),
save it to a tmp folder (every backend loads the same weights), draw random right-padded
sequences, then for each backend and k in --topk time ``--reps`` scoring passes after one warm-up:

    pool  TeacherPool(1 replica, --dtype) -> score(..., topk=k)         (Ray actor, includes transfer)
    vllm  LLM(...).generate(TokensPrompt, SamplingParams(max_tokens=1, prompt_logprobs=k, flat_logprobs=True))
          (k=0 still returns the actual token's log-prob; vLLM scores every prompt position)
    hf    model(seq).logits -> fp32 log_softmax over (B, L, V) -> gather / topk  (the naive baseline)

Figures: seq_tok/s = (prompt + response) tokens per second (the forward cost every backend pays),
resp_tok/s = response tokens per second. Also reports max |logprob - hf| as a sanity check.
Writes JSON to --out-dir and appends one row per (backend, k) to --markdown.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import statistics
import sys
import tempfile
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import versions  # noqa: E402
from teacher.loading import parse_dtype  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SIZES = {
    # name: (vocab, hidden, layers, heads, intermediate)
    "tiny": (256, 64, 2, 4, 128),
    "134m": (32000, 768, 12, 12, 2048),  # 2 x 24.6M embeddings (untied) + 12 x 7.1M = ~134M
}


def build_model(size: str, max_context: int, path: str) -> int:
    """Save a random Llama of ``size`` to ``path``; return its parameter count."""
    from transformers import LlamaConfig, LlamaForCausalLM

    V, H, layers, heads, inter = SIZES[size]
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=V, hidden_size=H, num_hidden_layers=layers, num_attention_heads=heads, num_key_value_heads=heads,
                      intermediate_size=inter, max_position_embeddings=max_context, tie_word_embeddings=False,
                      bos_token_id=1, eos_token_id=2, pad_token_id=0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(path)
    return sum(p.numel() for p in model.parameters())


def make_batch(n: int, prompt_len: int, response_len: int, vocab: int, seed: int = 0):
    """sequences (n, L), prompt_lens (n,) in [P/2, P], response_lens (n,) in [R/2, R]."""
    g = torch.Generator().manual_seed(seed)
    p = torch.randint(max(1, prompt_len // 2), prompt_len + 1, (n,), generator=g)
    r = torch.randint(max(1, response_len // 2), response_len + 1, (n,), generator=g)
    L = int((p + r).max())
    seqs = torch.randint(3, vocab, (n, L), generator=g)
    seqs[torch.arange(L)[None, :] >= (p + r)[:, None]] = 0
    return seqs, p, r


def timed(fn, reps: int, device: str) -> tuple[float, object]:
    """Median seconds over ``reps`` calls after one warm-up, and the last result."""
    out = fn()
    times = []
    for _ in range(reps):
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = fn()
        if device.startswith("cuda"):
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), out


def bench_hf(path, batch, ks, args):
    """Plain HF forward + full fp32 log_softmax on micro-batches of the same token budget."""
    from transformers import AutoModelForCausalLM

    from teacher.scoring import plan_micro_batches

    model = AutoModelForCausalLM.from_pretrained(path, dtype=parse_dtype(args.dtype)).to(args.device).eval()
    seqs, p, r = batch
    total = p + r
    groups = plan_micro_batches(total, args.token_budget)

    @torch.inference_mode()
    def run(k):
        T = int(r.max())
        tok = torch.zeros(len(seqs), T, device=args.device)
        for g in groups:
            L = int(total[g].max())
            ids = seqs[g, :L].to(args.device)
            mask = (torch.arange(L)[None] < total[g][:, None]).to(args.device)
            logp = torch.log_softmax(model(input_ids=ids, attention_mask=mask).logits.float(), -1)  # (B, L, V)
            if k:
                torch.topk(logp, k, dim=-1)
            for j, i in enumerate(g.tolist()):
                P, R = int(p[i]), int(r[i])
                tok[i, :R] = logp[j, P - 1 : P + R - 1].gather(-1, ids[j, P : P + R, None]).squeeze(-1)
        return tok.cpu()

    results = {k: timed(lambda: run(k), args.reps, args.device) for k in ks}
    model = None  # free its memory before the next backend
    if args.device.startswith("cuda"):
        torch.cuda.empty_cache()
    return results


def bench_pool(path, batch, ks, args):
    import ray

    from teacher.ray_pool import TeacherPool

    ray.init(num_cpus=2, num_gpus=1 if args.device.startswith("cuda") else 0, include_dashboard=False, log_to_driver=False)
    try:
        pool = TeacherPool(path, 1, device=args.device, dtype=args.dtype, num_gpus_per_replica=1 if args.device.startswith("cuda") else 0,
                           token_budget=args.token_budget)
        results = {k: timed(lambda: pool.score(*batch, topk=k).token_logprobs, args.reps, "cpu") for k in ks}
        pool.shutdown()
    finally:
        ray.shutdown()
    return results


def bench_vllm(path, batch, ks, args):
    from vllm import LLM, SamplingParams
    from vllm.inputs import TokensPrompt

    seqs, p, r = batch
    total = p + r
    prompts = [TokensPrompt(prompt_token_ids=seqs[i, : int(total[i])].tolist()) for i in range(len(seqs))]
    # max_model_len: one free position after the longest row for the single (discarded) generated token
    llm = LLM(model=path, dtype=args.dtype, skip_tokenizer_init=True, max_model_len=int(total.max()) + 1,
              max_logprobs=max(ks + [1]), gpu_memory_utilization=args.vllm_gpu_util, max_num_batched_tokens=args.token_budget,
              seed=0)

    def run(k):
        # flat_logprobs: 0.26's FlatLogprobs container (a few flat lists per request instead of one dict of k+1
        # Logprob objects per position); entry j starts with the actual token j, then the top-k.
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=k, flat_logprobs=True, detokenize=False)
        outs = llm.generate(prompts, params, use_tqdm=False)
        T = int(r.max())
        tok = torch.zeros(len(seqs), T)
        for i, o in enumerate(outs):
            P, R = int(p[i]), int(r[i])
            plp = o.prompt_logprobs
            tok[i, :R] = torch.tensor([plp.logprobs[plp.start_indices[P + t]] for t in range(R)])
        return tok

    return {k: timed(lambda: run(k), args.reps, "cpu") for k in ks}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", default="cuda", choices=["cuda", "cpu"])
    ap.add_argument("--size", default="134m", choices=sorted(SIZES))
    ap.add_argument("--dtype", default=None, help="default bfloat16 on cuda, float32 on cpu")
    ap.add_argument("--num-seqs", type=int, default=None, help="default 256 (cuda) / 8 (cpu)")
    ap.add_argument("--prompt-len", type=int, default=None, help="default 512 (cuda) / 16 (cpu)")
    ap.add_argument("--response-len", type=int, default=None, help="default 512 (cuda) / 16 (cpu)")
    ap.add_argument("--topk", type=int, nargs="+", default=[0, 64])
    ap.add_argument("--backends", nargs="+", default=["pool", "vllm", "hf"], choices=["pool", "vllm", "hf"])
    ap.add_argument("--token-budget", type=int, default=16384)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--vllm-gpu-util", type=float, default=0.5)
    ap.add_argument("--out-dir", default=os.path.join(REPO, "benchmarks", "results"))
    ap.add_argument("--markdown", default=os.path.join(REPO, "BENCHMARKS.md"), help="'' to skip")
    args = ap.parse_args(argv)
    cuda = args.device == "cuda"
    if cuda and not torch.cuda.is_available():
        sys.exit("--device cuda but CUDA is not available; run with --device cpu --size tiny for a smoke check.")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    n = args.num_seqs or (256 if cuda else 8)
    P = args.prompt_len or (512 if cuda else 16)
    R = args.response_len or (512 if cuda else 16)

    tmp = tempfile.mkdtemp(prefix="bench_teacher_")
    n_params = build_model(args.size, P + R + 8, tmp)
    batch = make_batch(n, P, R, SIZES[args.size][0])
    seq_tokens, resp_tokens = int((batch[1] + batch[2]).sum()), int(batch[2].sum())
    device_name = torch.cuda.get_device_name() if cuda else platform.processor() or platform.machine()
    print(f"model {args.size} ({n_params / 1e6:.1f}M params, {args.dtype}) on {device_name}; {n} seqs, "
          f"{seq_tokens} tokens ({resp_tokens} response); k in {args.topk}")

    runners = {"hf": bench_hf, "pool": bench_pool, "vllm": bench_vllm}
    order = [b for b in ("hf", "pool", "vllm") if b in args.backends]  # vLLM last: it reserves GPU memory
    rows, skipped, ref = [], {}, {}
    for name in order:
        if name == "vllm":
            try:
                import vllm  # noqa: F401
            except ImportError as e:
                skipped[name] = f"vllm not importable ({e})"
                print(f"skipping vllm: {skipped[name]}")
                continue
            if not cuda:
                skipped[name] = "vllm benchmark needs --device cuda"
                print(f"skipping vllm: {skipped[name]}")
                continue
        if cuda:
            torch.cuda.empty_cache()  # the previous runner's cached blocks: vLLM needs its share free at start
        try:
            measured = runners[name](tmp, batch, args.topk, args)
        except Exception as e:  # keep the other backends' figures; say what failed
            skipped[name] = f"failed: {type(e).__name__}: {e}"
            print(f"{name} failed: {skipped[name]}")
            continue
        for k, (sec, tok) in measured.items():
            ref.setdefault(k, tok)
            row = {"backend": name, "topk": k, "seconds": sec, "seq_tok_per_s": seq_tokens / sec,
                   "resp_tok_per_s": resp_tokens / sec, "max_abs_diff_vs_first": float((tok - ref[k]).abs().max())}
            rows.append(row)
            print(f"{name:5s} k={k:3d}  {sec * 1e3:9.1f} ms  {row['seq_tok_per_s']:12.0f} seq_tok/s  "
                  f"{row['resp_tok_per_s']:12.0f} resp_tok/s  max|diff vs {order[0]}|={row['max_abs_diff_vs_first']:.3g}")

    by = {(r["backend"], r["topk"]): r["seq_tok_per_s"] for r in rows}
    ratios = {f"pool/{b}@k={k}": by[("pool", k)] / by[(b, k)] for (b, k) in by if b != "pool" and ("pool", k) in by}
    for key, val in ratios.items():
        print(f"ratio {key} = {val:.2f}")

    stamp = dt.datetime.now(dt.timezone.utc)
    result = {"date": stamp.isoformat(timespec="seconds"), "device": device_name, "versions": versions("ray", "vllm"), "size": args.size,
              "params": n_params, "dtype": args.dtype, "num_seqs": n, "prompt_len": P, "response_len": R,
              "token_budget": args.token_budget, "seq_tokens": seq_tokens, "resp_tokens": resp_tokens,
              "rows": rows, "ratios": ratios, "skipped": skipped}
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, f"teacher_scoring_{args.size}_{args.device}_{stamp:%Y%m%dT%H%M%S}.json")
    with open(out, "w") as f:
        json.dump(result, f, indent=2)
    print(f"wrote {out}")

    if args.markdown:
        new = not os.path.exists(args.markdown)
        v = result["versions"]
        with open(args.markdown, "a") as f:
            if new:
                f.write("# Benchmarks\n\n## Teacher scoring (benchmarks/bench_teacher_scoring.py)\n\n"
                        "| date | device | versions | model | seqs x (P, R) | backend | k | seq tok/s | resp tok/s | pool / this |\n"
                        "|---|---|---|---|---|---|---|---|---|---|\n")
            for r in rows:
                ratio = by[("pool", r["topk"])] / r["seq_tok_per_s"] if ("pool", r["topk"]) in by else float("nan")
                f.write(f"| {stamp:%Y-%m-%d} | {device_name} | torch {v['torch']}, tf {v['transformers']}, vllm {v['vllm']} | "
                        f"{args.size} {args.dtype} | {n} x ({P}, {R}) | {r['backend']} | {r['topk']} | {r['seq_tok_per_s']:.0f} | "
                        f"{r['resp_tok_per_s']:.0f} | {ratio:.2f} |\n")
        print(f"appended {len(rows)} rows to {args.markdown}")


if __name__ == "__main__":
    main()
