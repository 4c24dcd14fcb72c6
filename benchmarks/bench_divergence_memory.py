"""Peak memory and time of chunked vs naive per-token divergences (forward + backward).

Each case runs in a fresh subprocess so that CPU peak memory can be read from
``resource.getrusage(RUSAGE_SELF).ru_maxrss`` (a process-lifetime high-water mark): the child
allocates its inputs, reads the mark, runs forward + backward, reads it again; the difference is
the extra peak of the loss computation (it includes the logits' gradient buffer, which both
implementations need). On CUDA, ``torch.cuda.max_memory_allocated`` is reset after the inputs are
allocated.

naive   = full fp32 ``log_softmax`` of student and teacher over (B, T, V), elementwise terms, sum
          (what TRL's ``generalized_jsd_loss`` does); autograd keeps its intermediates.
chunked = ``minillm.token_divergence`` with ``--chunk-tokens`` rows per chunk.

Usage:
    python benchmarks/bench_divergence_memory.py --device cpu
    python benchmarks/bench_divergence_memory.py --device cuda
Writes benchmarks/results/divergence_memory_{device}.json and prints a table.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def naive(name: str, s, t, mask, beta: float):
    import torch

    ls = torch.log_softmax(s.float(), -1)  # (B, T, V) fp32
    lt = torch.log_softmax(t.float(), -1)
    if name == "reverse_kl":
        per_tok = (ls.exp() * (ls - lt)).sum(-1)
    else:  # jsd, as in TRL's generalized_jsd_loss
        b = torch.tensor(beta)
        m = torch.logsumexp(torch.stack([ls + torch.log1p(-b), lt + torch.log(b)]), dim=0)
        per_tok = b * (lt.exp() * (lt - m)).sum(-1) + (1 - b) * (ls.exp() * (ls - m)).sum(-1)
    return per_tok


def child(args) -> None:
    import torch

    sys.path.insert(0, ROOT)
    from minillm import masked_mean, token_divergence

    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype)
    g = torch.Generator(device="cpu").manual_seed(0)
    N, V = args.tokens, args.vocab
    B = 2
    s = torch.randn(B, N // B, V, generator=g).to(dev, dtype).requires_grad_(True)
    t = torch.randn(B, N // B, V, generator=g).to(dev, dtype)
    mask = torch.ones(B, N // B, dtype=torch.bool, device=dev)
    params = {"beta": 0.5} if args.name == "jsd" else {}

    def step(s, t, mask):
        if args.impl == "naive":
            per_tok = naive(args.name, s, t, mask, 0.5)
        else:
            per_tok = token_divergence(args.name, s, mask, teacher_logits=t, chunk_tokens=args.chunk_tokens, **params)
        loss = masked_mean(per_tok, mask)
        loss.backward()
        s.grad = None
        return float(loss)

    # warm-up on a tiny problem: lazy initialisation (kernels, thread pools) must not count as peak
    sw = torch.randn(2, 4, 64, device=dev).to(dtype).requires_grad_(True)
    step(sw, torch.randn(2, 4, 64, device=dev).to(dtype), torch.ones(2, 4, dtype=torch.bool, device=dev))

    if dev.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    else:
        base = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux
    times = []
    for _ in range(args.repeats):
        t0 = time.perf_counter()
        step(s, t, mask)
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
    if dev.type == "cuda":
        peak = torch.cuda.max_memory_allocated() - base
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 - base
    print(json.dumps({"peak_bytes": peak, "time_s": min(times)}))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--tokens", type=int, default=1024, help="B*T (B = 2)")
    ap.add_argument("--vocabs", default="32768,131072")
    ap.add_argument("--names", default="reverse_kl,jsd")
    ap.add_argument("--dtype", default="float32", help="logits dtype (bfloat16 is slow on CPU)")
    ap.add_argument("--chunk-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=2)
    ap.add_argument("--out", default=None)
    # child mode
    ap.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--impl", default="chunked", help=argparse.SUPPRESS)
    ap.add_argument("--name", default="reverse_kl", help=argparse.SUPPRESS)
    ap.add_argument("--vocab", type=int, default=32768, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        child(args)
        return

    rows = []
    for name in args.names.split(","):
        for vocab in map(int, args.vocabs.split(",")):
            res = {}
            for impl in ("naive", "chunked"):
                cmd = [sys.executable, os.path.abspath(__file__), "--child", "--impl", impl, "--name", name, "--vocab", str(vocab),
                       "--tokens", str(args.tokens), "--device", args.device, "--dtype", args.dtype,
                       "--chunk-tokens", str(args.chunk_tokens), "--repeats", str(args.repeats)]
                # A fixed mmap threshold stops glibc from raising it dynamically after large frees, so freed
                # tensors go back to the OS instead of staying in the heap and inflating ru_maxrss.
                env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
                proc = subprocess.run(cmd, capture_output=True, text=True, env=env)
                if proc.returncode != 0:  # e.g. the naive form out of memory: a result too, the other rows go on
                    res[impl] = {"peak_bytes": None, "time_s": None,
                                 "error": (proc.stderr.strip().splitlines() or ["exit %d" % proc.returncode])[-1][-300:]}
                    continue
                res[impl] = json.loads(proc.stdout.strip().splitlines()[-1])
            if any("error" in r for r in res.values()):
                row = {"name": name, "vocab": vocab, "tokens": args.tokens, "dtype": args.dtype,
                       "chunk_tokens": args.chunk_tokens, **{f"{impl}_error": r["error"] for impl, r in res.items() if "error" in r},
                       **{f"{impl}_peak_bytes": r["peak_bytes"] for impl, r in res.items()},
                       **{f"{impl}_time_s": r["time_s"] for impl, r in res.items()}}
                rows.append(row)
                print(f"{name:>10} V={vocab:>6} N={args.tokens}: failed: "
                      f"{ {k: v for k, v in row.items() if k.endswith('_error')} }", flush=True)
                continue
            row = {
                "name": name, "vocab": vocab, "tokens": args.tokens, "dtype": args.dtype, "chunk_tokens": args.chunk_tokens,
                "logits_bytes": args.tokens * vocab * {"float32": 4, "bfloat16": 2, "float16": 2}[args.dtype],
                "naive_peak_bytes": res["naive"]["peak_bytes"], "chunked_peak_bytes": res["chunked"]["peak_bytes"],
                "naive_time_s": res["naive"]["time_s"], "chunked_time_s": res["chunked"]["time_s"],
            }
            row["peak_ratio_naive_over_chunked"] = row["naive_peak_bytes"] / max(row["chunked_peak_bytes"], 1)
            row["time_ratio_naive_over_chunked"] = row["naive_time_s"] / row["chunked_time_s"]
            rows.append(row)
            gib = 2**30
            print(f"{name:>10} V={vocab:>6} N={args.tokens}: peak naive {row['naive_peak_bytes']/gib:6.2f} GiB, "
                  f"chunked {row['chunked_peak_bytes']/gib:6.2f} GiB (x{row['peak_ratio_naive_over_chunked']:.2f}); "
                  f"time naive {row['naive_time_s']:.2f}s, chunked {row['chunked_time_s']:.2f}s "
                  f"(naive/chunked {row['time_ratio_naive_over_chunked']:.2f})", flush=True)
    out = args.out or os.path.join(ROOT, "benchmarks", "results", f"divergence_memory_{args.device}.json")
    meta = {"device": args.device, "torch_threads": None, "platform": platform.platform(), "python": platform.python_version()}
    try:
        import torch

        meta["torch"] = torch.__version__
        meta["torch_threads"] = torch.get_num_threads()
    except ImportError:
        pass
    with open(out, "w") as f:
        json.dump({"meta": meta, "rows": rows}, f, indent=2)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
