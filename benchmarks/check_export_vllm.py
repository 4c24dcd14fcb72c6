"""GPU check: an exported student folder (`minillm export` / a run's `final/`) loads in vLLM and generates,
and vLLM's log-probs of its own samples match a transformers forward of the same folder.

    python benchmarks/check_export_vllm.py runs/single_gpu/final --out results.json

Writes JSON: tokens generated, the mean/max absolute difference between vLLM's sampled-token log-probs
and transformers' recomputation (bf16 kernels differ by rounding), and whether the folder's files are
the ones `from_pretrained` expects. Exit status 1 when vLLM cannot load or generate.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model_dir")
    ap.add_argument("--out", default=None, help="JSON file for the results (default: print only)")
    ap.add_argument("--num-prompts", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--dtype", default="bfloat16")
    args = ap.parse_args(argv)

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from vllm import LLM, SamplingParams

    folder = Path(args.model_dir)
    files = sorted(p.name for p in folder.iterdir())
    tok = AutoTokenizer.from_pretrained(folder)
    # prompts from the tokenizer's own vocabulary: the folder may hold a random-weight benchmark model
    g = torch.Generator().manual_seed(0)
    special = set(tok.all_special_ids)
    pool = [i for i in range(min(len(tok), 5000)) if i not in special]
    prompts = [[pool[int(j)] for j in torch.randint(len(pool), (12,), generator=g)] for _ in range(args.num_prompts)]
    if tok.bos_token_id is not None:
        prompts = [[tok.bos_token_id] + p for p in prompts]

    t0 = time.perf_counter()
    llm = LLM(model=str(folder), dtype=args.dtype, gpu_memory_utilization=0.4, enforce_eager=True, seed=0,
              logprobs_mode="raw_logprobs")
    load_s = time.perf_counter() - t0
    params = SamplingParams(max_tokens=args.max_tokens, temperature=1.0, logprobs=0, seed=0, ignore_eos=True)
    t0 = time.perf_counter()
    outs = llm.generate([{"prompt_token_ids": p} for p in prompts], params, use_tqdm=False)
    gen_s = time.perf_counter() - t0
    samples = [list(o.outputs[0].token_ids) for o in outs]
    vllm_lp = [[step[t].logprob for t, step in zip(o.outputs[0].token_ids, o.outputs[0].logprobs)] for o in outs]
    text = tok.decode(samples[0])
    del llm
    torch.cuda.empty_cache()

    model = AutoModelForCausalLM.from_pretrained(folder, dtype=getattr(torch, args.dtype)).cuda().eval()
    diffs = []
    with torch.no_grad():
        for p, s, lp in zip(prompts, samples, vllm_lp):
            ids = torch.tensor([p + s], device="cuda")
            logits = model(ids).logits[0, len(p) - 1:-1].float()
            ref = torch.log_softmax(logits, -1).gather(-1, ids[0, len(p):, None])[:, 0].cpu()
            diffs.append((ref - torch.tensor(lp)).abs())
    d = torch.cat(diffs)
    result = {"model_dir": str(folder), "files": files, "vllm_load_s": load_s, "generate_s": gen_s,
              "tokens": sum(map(len, samples)), "logprob_mad": float(d.mean()), "logprob_max_abs_diff": float(d.max()),
              "sample_text": text, "device": torch.cuda.get_device_name(), "vllm": __import__("vllm").__version__}
    print(json.dumps(result, indent=2))
    if args.out:
        os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
        Path(args.out).write_text(json.dumps(result, indent=2))
    return 0 if result["tokens"] == args.num_prompts * args.max_tokens else 1


if __name__ == "__main__":
    sys.exit(main())
