"""End-to-end on-policy distillation: seconds per step, per phase, and GPU utilisation, for our system and for
TRL 1.16's `DistillationTrainer`, on the same models, prompts, batch, generation length and optimizer.

    # one H100: 0.5B student (Qwen2.5-0.5B shape) <- 1.5B teacher (Qwen2.5-1.5B shape), vocab 32000
    python benchmarks/bench_e2e.py --device cuda --shape 0.5b
    python benchmarks/bench_e2e.py --device cuda --shape 0.5b --systems ours_minillm_a0,ours_minillm_a02 --reuse
    # CPU smoke check (tiny models, HF generation everywhere; TRL's vLLM needs a GPU)
    python benchmarks/bench_e2e.py --device cpu --shape tiny --systems ours_gkd,ours_minillm_a0,ours_minillm_a02,trl_hf

Systems (each in its own subprocess, so GPU memory is clean between them):
    ours_gkd          our loop (trainer/loop.py `train`), GKD λ=1 (fully on-policy), JSD β=0.5
    ours_minillm_a0   our loop, MiniLLM (reverse-KL policy gradient), plain student sampling (α=0)
    ours_minillm_a02  our loop, MiniLLM with teacher-mixed sampling α=0.2
    trl_vllm          trl.DistillationTrainer, JSD β=0.5, colocated vLLM generation (use_vllm, vllm_mode="colocate")
    trl_hf            trl.DistillationTrainer, JSD β=0.5, transformers `generate`
    ours_gkd_hf       (extra, not run by default) ours_gkd with HF `generate` rollouts instead of vLLM
TRL 1.16's DistillationTrainer is always on-policy (its config has no λ; GKD's `lmbda` lives in the
experimental GKDTrainer), i.e. GKD with λ=1, the setting `ours_gkd` runs.

Same for every system: the student and teacher folders (benchmarks/models.py, random weights, one
tokenizer), the prompts (--prompt-len tokens each, text that tokenises identically for both), prompts per
step (TRL: per_device_train_batch_size, gradient_accumulation_steps=1), one sample per prompt, sampling at
temperature 1 without top-p/top-k, --max-new-tokens generated tokens per response, AdamW (torch) with
constant lr, no weight decay, gradient clipping at 1.0, bf16 on GPU, gradient checkpointing off (--grad-ckpt on
for all), the vLLM engines at --vllm-gpu-memory-utilization with CUDA graphs (--enforce-eager: ours only, refused with trl_vllm).
Ours on the GPU: Ray shares 0.4 learner / 0.3 vLLM rollout / 0.2 teacher of the one GPU, weights synced by
CUDA IPC, vLLM awake throughout (TRL's default vllm_enable_sleep_mode=False), the teacher returning full
distributions (--teacher-topk 0: the exact JSD, as TRL computes it), one learner micro-batch per step (as
TRL's single forward), bf16 weights with DeepSpeed's fp32 master copy. TRL: student weights fp32 under bf16
autocast (TRL's default; --trl-student-dtype bfloat16 loads them in bf16), teacher bf16, optim="adamw_torch".

Fixed generation length: every response is exactly --max-new-tokens tokens, checked per step (tokens_ok).
  ours: the driver's SamplingSettings carry no EOS id (`trainer.loop.sampling` is wrapped in the child), and
        the model folders' generation_config has none, so HF `generate` runs to max_new_tokens and vLLM
        (ignore_eos=True, no stop ids) too;
  TRL + HF: generation_kwargs={"min_new_tokens": N} (HF masks EOS until N tokens), max_completion_length=N;
  TRL + vLLM: generation_kwargs={"ignore_eos": True} into SamplingParams, max_completion_length=N.

Timing. --warmup steps, then --steps measured steps (one more runs so the last has an end). A step's wall
time runs from the start of its generation to the start of the next step's. Phases:
  ours: the loop's own time/generate, time/score, time/train, time/sync (and time/offload in sleep mode) from
        metrics.jsonl; phase boundaries for the GPU windows come from wrappers around the same calls.
  TRL:  generate = `_generate_and_score_completions` less the weight sync inside it; sync = the vLLM
        engine's `sync_weights`; score = the teacher's backbone forward (`_get_last_hidden_state` under
        no_grad; the teacher's LM head runs inside TRL's fused chunked-JSD loss and counts as train);
        train = the rest of the optimizer step (between the `on_step_begin` and `on_step_end` callbacks).
        CUDA is synchronised at each boundary.
  idle = wall − Σ phases (logging, data loading, driver work between steps).
GPU utilisation: one GPU sampled every --sample-interval s (NVML, else nvidia-smi) over the measured steps,
overall and by phase (each sample attributed to the phase running at its time stamp).

Figures: median s/step, generated tokens/s (median), per-phase means (they add up to the mean step), GPU
utilisation, peak GPU memory (whole GPU), start-up seconds (process start to first step), and the speed-up
of each system over the baseline (--baseline; default trl_vllm on cuda, trl_hf on cpu): baseline s/step ÷
system s/step, both measured on this machine with this configuration: in this invocation, or with --reuse in
an earlier one whose parts are still in --work-dir (same models, sizes and settings; a run split over
several device calls). --from-json merges the JSONs of such calls when the parts are gone.

Writes benchmarks/results/e2e_{device}_{student}-{teacher}_v{vocab}.json (or --out-dir) and, on cuda, appends a
section to BENCHMARKS.md (--markdown '' skips; CPU smoke runs write no row unless --markdown is given).
"""
from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import os
import signal
import subprocess
import sys
import tempfile
import time
import traceback

T_START = time.perf_counter()
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import (ROOT, GpuSampler, append_markdown, fmt, mean, median, now_iso,  # noqa: E402
                               wait_gpu_released)

SYSTEMS = {
    "ours_gkd": {"kind": "ours", "objective": "gkd", "mix_alpha": 0.0},
    "ours_minillm_a0": {"kind": "ours", "objective": "minillm", "mix_alpha": 0.0},
    "ours_minillm_a02": {"kind": "ours", "objective": "minillm", "mix_alpha": 0.2},
    "trl_vllm": {"kind": "trl", "use_vllm": True},
    "trl_hf": {"kind": "trl", "use_vllm": False},
    # extra, not in the default list: our loop with HF `generate` rollouts on the GPU (vs trl_hf)
    "ours_gkd_hf": {"kind": "ours", "objective": "gkd", "mix_alpha": 0.0, "backend": "hf"},
}
DEFAULT_SYSTEMS = ["ours_gkd", "ours_minillm_a0", "ours_minillm_a02", "trl_vllm", "trl_hf"]
PRESETS = {"tiny": ("tiny", "tiny-teacher"), "0.5b": ("0.5b", "1.5b"), "1b": ("1b", "3b")}
PHASES = ("generate", "score", "train", "sync", "offload")


# ---- attributing time and GPU samples to phases -----------------------------------------------


def label_at(t: float, intervals: list[tuple[str, float, float]], priority: list[str]):
    """The highest-priority label among the intervals that contain t (None: idle)."""
    best = None
    for label, a, b in intervals:
        if a <= t < b and label in priority and (best is None or priority.index(label) < priority.index(best)):
            best = label
    return best


def attribute(window: tuple[float, float], intervals, priority: list[str]) -> dict[str, float]:
    """Seconds of `window` under each label (nested intervals: the higher priority wins; rest = idle)."""
    t0, t1 = window
    cuts = sorted({t0, t1} | {x for _, a, b in intervals for x in (a, b) if t0 < x < t1})
    out: dict[str, float] = {}
    for a, b in zip(cuts, cuts[1:]):
        lab = label_at((a + b) / 2, intervals, priority) or "idle"
        out[lab] = out.get(lab, 0.0) + (b - a)
    return out


def gpu_by_phase(sampler: GpuSampler, windows: list[tuple[float, float]], intervals, priority) -> dict:
    if sampler.source is None:
        return {"source": None}
    util: dict[str, list[float]] = {}
    for w0, w1 in windows:
        for t, u, _ in sampler.window(w0, w1):
            util.setdefault(label_at(t, intervals, priority) or "idle", []).append(u)
    every = [u for vals in util.values() for u in vals]
    return {"source": sampler.source, "util_mean": mean(every), "util_by_phase": {k: mean(v) for k, v in util.items()},
            "samples": len(every), "mem_peak_gb": sampler.peak_mem_gb(),
            "mem_peak_gb_measured_steps": max((m for w0, w1 in windows for _, _, m in sampler.window(w0, w1)), default=None)}


def summarize(steps: list[dict], B: int, L: int) -> dict:
    """Medians/means over the measured steps; tokens_ok: every step generated exactly B·L tokens."""
    walls = [s["wall_s"] for s in steps]
    phases = sorted({k for s in steps for k in s["phases"]})
    return {
        "step_s_median": median(walls), "step_s_mean": mean(walls), "step_s_min": min(walls), "step_s_max": max(walls),
        "phase_mean_s": {p: mean([s["phases"].get(p, 0.0) for s in steps]) for p in phases},
        "phase_median_s": {p: median([s["phases"].get(p, 0.0) for s in steps]) for p in phases},
        "tokens_per_step": mean([s["tokens"] for s in steps]),
        "loss_mean": mean([s["loss"] for s in steps if s.get("loss") is not None]),  # GKD: ours and TRL agree
        "gen_tokens_per_s_median": median([s["tokens"] / s["wall_s"] for s in steps]),
        "tokens_ok": all(s["tokens"] == B * L for s in steps),
    }


# ---- child: our system ------------------------------------------------------------------------


def ours_config(spec: dict, objective: str, mix_alpha: float, out_dir: str, backend: str | None = None) -> dict:
    """Our run config for a system; rollout `backend` defaults to vllm on cuda, hf on cpu."""
    cuda = spec["device"] == "cuda"
    backend = backend or ("vllm" if cuda else "hf")
    B, P, L = spec["prompts_per_step"], spec["prompt_len"], spec["max_new_tokens"]
    topk = spec["teacher_topk"]
    obj = {"name": "gkd", "lam": 1.0, "beta": 0.5} if objective == "gkd" else {"name": "minillm"}
    cpus = 2 if cuda else 1
    return {
        "output_dir": out_dir,
        "model": {"student": spec["student"], "teacher": spec["teacher"], "student_init": "pretrained",
                  "dtype": "bfloat16" if cuda else "float32"},
        "data": {"prompts": spec["prompts_file"], "eval_prompts": None, "chat_template": False, "max_prompt_len": P},
        "rollout": {"backend": backend, "num_workers": 1, "prompts_per_step": B, "n_samples": 1,
                    "max_new_tokens": L, "mix_alpha": mix_alpha, "seed": spec["seed"],
                    "gpu_memory_utilization": spec["vllm_gpu_memory_utilization"], "sleep_mode": False,
                    # α > 0's teacher engine: 1.5b bf16 weights (~3 GB) + a KV cache for one step's 16 rows
                    "teacher_gpu_memory_utilization": 0.15,
                    "enforce_eager": spec["enforce_eager"], "num_cpus": cpus,
                    "num_gpus": 0.3 if cuda else 1.0},  # Ray's shares of the one GPU: 0.3 + 0.2 + 0.4
        "teacher": {"backend": "ray", "num_replicas": 1, "topk": topk, "return_full": topk == 0,
                    "token_budget": max(16384, B * (P + L)), "num_gpus": 0.2 if cuda else 0.0, "num_cpus": cpus,
                    "overlap": False},  # one rollout worker: nothing to overlap; phases stay separate
        "objective": obj,
        "trainer": {"steps": spec["warmup"] + spec["steps"] + 2, "lr": spec["lr"], "weight_decay": 0.0,
                    "lr_schedule": "constant", "warmup_steps": 0, "grad_clip": 1.0, "zero_stage": 0, "num_ranks": 1,
                    "micro_batch_tokens": B * (P + L), "bf16": cuda, "gradient_checkpointing": spec["grad_ckpt"],
                    "device": spec["device"], "num_gpus": 0.4 if cuda else 0.0, "num_cpus": cpus,
                    "seed": spec["seed"], "eval_every": 0},
        "checkpoint": {"every": 0},
        "cluster": {"num_cpus": None if cuda else 4},
    }


def run_ours(spec: dict, system: str) -> dict:
    import ray

    import trainer.loop as loop
    from launch.config import config_from_dict
    from trainer.sync import WeightSync

    sysdef = SYSTEMS[system]
    total = spec["warmup"] + spec["steps"] + 1
    out_dir = os.path.join(spec["work_dir"], f"run_{system}")
    cfg = config_from_dict(ours_config(spec, sysdef["objective"], sysdef["mix_alpha"], out_dir, sysdef.get("backend")))
    stamps: list[tuple[str, float, float]] = []

    def timed(label, fn):
        def wrapper(*a, **k):
            t0 = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                stamps.append((label, t0, time.perf_counter()))
        return wrapper

    # fixed-length responses: no EOS id in the driver's sampling settings (see the module docstring)
    sampling = loop.sampling
    loop.sampling = lambda *a, **k: dataclasses.replace(sampling(*a, **k), eos_token_id=None, stop_token_ids=[])
    loop.generate, loop.score_for_update, loop.train_on = (
        timed("generate", loop.generate), timed("score", loop.score_for_update), timed("train", loop.train_on))
    WeightSync.__call__ = timed("sync", WeightSync.__call__)

    sampler = GpuSampler(spec["sample_interval"]).start() if spec["device"] == "cuda" else GpuSampler()
    try:
        out = loop.train(cfg, loop.Hooks(progress=False, stop_after=total))  # stops before the final checkpoint
    finally:
        sampler.stop()
        ray.shutdown()
    if out != {"stopped_at": total}:
        raise RuntimeError(f"train() returned {out}, expected to stop after {total} steps")

    with open(os.path.join(out_dir, "metrics.jsonl")) as f:
        records = [json.loads(line) for line in f]
    gens = [s for s in stamps if s[0] == "generate"]
    if len(records) != total or len(gens) != total:
        raise RuntimeError(f"expected {total} steps, got {len(records)} metrics lines and {len(gens)} generate calls")
    starts = [g[1] for g in gens]
    steps, windows, check = [], [], []
    for i in range(spec["warmup"], total - 1):
        r = records[i]
        phases = {k[len("time/"):]: v for k, v in r.items() if k.startswith("time/") and k != "time/step"}
        window = (starts[i], starts[i + 1])
        wall = window[1] - window[0]
        steps.append({"step": r["step"], "wall_s": wall, "phases": {**phases, "idle": wall - sum(phases.values())},
                      "tokens": int(r["rollout/tokens"]), "loss": r.get("loss/loss"),
                      "loop_gpu": {k: v for k, v in r.items() if k.startswith("gpu/")}})
        windows.append(window)
        wrapped = attribute(window, stamps, list(PHASES))
        check.append(max(abs(wrapped.get(p, 0.0) - phases.get(p, 0.0)) for p in ("generate", "score", "train", "sync")))
    return {"steps": steps, "startup_s": starts[0] - T_START,
            "gpu": gpu_by_phase(sampler, windows, stamps, list(PHASES)),
            "max_abs_diff_wrapper_vs_loop_phase_s": max(check), "config": cfg.to_dict()}


# ---- child: TRL -------------------------------------------------------------------------------


def trl_config_kwargs(spec: dict, use_vllm: bool, out_dir: str) -> dict:
    """DistillationConfig keyword arguments (the caller drops, and reports, fields its TRL version lacks)."""
    cuda = spec["device"] == "cuda"
    B, P, L = spec["prompts_per_step"], spec["prompt_len"], spec["max_new_tokens"]
    kw = dict(
        output_dir=out_dir, per_device_train_batch_size=B, gradient_accumulation_steps=1,
        max_steps=spec["warmup"] + spec["steps"] + 1, learning_rate=spec["lr"], lr_scheduler_type="constant",
        warmup_steps=0, weight_decay=0.0, max_grad_norm=1.0, optim="adamw_torch",
        beta=0.5, temperature=1.0, top_p=1.0, top_k=0, max_completion_length=L,
        # fixed length: HF masks EOS until min_new_tokens; vLLM keeps sampling past EOS
        generation_kwargs={"ignore_eos": True} if use_vllm else {"min_new_tokens": L},
        use_vllm=use_vllm, vllm_mode="colocate", vllm_gpu_memory_utilization=spec["vllm_gpu_memory_utilization"],
        vllm_max_model_length=P + L + 16, vllm_enable_sleep_mode=False,
        bf16=cuda, gradient_checkpointing=spec["grad_ckpt"], use_cpu=not cuda,
        model_init_kwargs={"dtype": spec["trl_student_dtype"] if cuda else "float32"},
        teacher_model_init_kwargs={"dtype": "bfloat16" if cuda else "float32"},
        logging_steps=1, report_to="none", save_strategy="no", disable_tqdm=True, seed=spec["seed"],
        dataloader_num_workers=0, remove_unused_columns=False,
        lmbda=1.0,  # GKDConfig's on-policy fraction; DistillationConfig 1.16 has none (always on-policy)
    )
    return kw


def run_trl(spec: dict, system: str) -> dict:
    import datasets
    import torch
    from transformers import AutoTokenizer, TrainerCallback
    from trl import DistillationConfig, DistillationTrainer

    use_vllm = SYSTEMS[system]["use_vllm"]
    cuda = spec["device"] == "cuda"
    total = spec["warmup"] + spec["steps"] + 1
    stamps: list[tuple[str, float, float]] = []
    log_records: list[dict] = []

    def sync_cuda():
        if cuda:
            torch.cuda.synchronize()

    class TimedDistillationTrainer(DistillationTrainer):
        """DistillationTrainer with phase time stamps (see the module docstring); the work is unchanged."""

        def __init__(self, *a, **k):
            super().__init__(*a, **k)
            if self.use_vllm:
                inner = self.vllm_generation.sync_weights

                def sync_weights():
                    t0 = time.perf_counter()
                    inner()
                    sync_cuda()
                    stamps.append(("sync", t0, time.perf_counter()))
                self.vllm_generation.sync_weights = sync_weights

        def _generate_and_score_completions(self, inputs):
            sync_cuda()
            t0 = time.perf_counter()
            out = super()._generate_and_score_completions(inputs)
            sync_cuda()
            stamps.append(("generate", t0, time.perf_counter()))
            return out

        def _get_last_hidden_state(self, unwrapped_model, *a, **k):
            if torch.is_grad_enabled():  # the student's forward: part of train
                return super()._get_last_hidden_state(unwrapped_model, *a, **k)
            sync_cuda()
            t0 = time.perf_counter()
            out = super()._get_last_hidden_state(unwrapped_model, *a, **k)
            sync_cuda()
            stamps.append(("score", t0, time.perf_counter()))
            return out

    class StepClock(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            sync_cuda()
            t = time.perf_counter()
            stamps.append(("step_begin", t, t))

        def on_step_end(self, args, state, control, **kw):
            sync_cuda()
            t = time.perf_counter()
            stamps.append(("step_end", t, t))

        def on_log(self, args, state, control, logs=None, **kw):
            log_records.append(dict(logs or {}))

    with open(spec["prompts_file"]) as f:
        prompts = [json.loads(line)["prompt"] for line in f]
    fields = {f.name for f in dataclasses.fields(DistillationConfig)}
    out_dir = os.path.join(spec["work_dir"], f"run_{system}")
    wanted = trl_config_kwargs(spec, use_vllm, out_dir)
    kwargs = {k: v for k, v in wanted.items() if k in fields}
    args = DistillationConfig(**kwargs)
    tok = AutoTokenizer.from_pretrained(spec["student"], padding_side="left")
    sampler = GpuSampler(spec["sample_interval"]).start() if cuda else GpuSampler()
    try:
        trainer = TimedDistillationTrainer(model=spec["student"], teacher_model=spec["teacher"], args=args,
                                           train_dataset=datasets.Dataset.from_list([{"prompt": p} for p in prompts]),
                                           processing_class=tok, callbacks=[StepClock()])
        trainer.train()
    finally:
        sampler.stop()

    begins = [s[1] for s in stamps if s[0] == "step_begin"]
    ends = [s[1] for s in stamps if s[0] == "step_end"]
    step_logs = [lg for lg in log_records if "completions/mean_length" in lg]
    if len(begins) != total or len(ends) != total or len(step_logs) != total:
        raise RuntimeError(f"expected {total} steps, got {len(begins)} begins, {len(ends)} ends, {len(step_logs)} logs")
    intervals = [s for s in stamps if s[0] in ("generate", "score", "sync")]
    intervals += [("train", b, e) for b, e in zip(begins, ends)]
    priority = ["sync", "score", "generate", "train"]
    steps, windows = [], []
    for i in range(spec["warmup"], total - 1):
        window = (begins[i], begins[i + 1])
        phases = attribute(window, intervals, priority)
        phases.setdefault("idle", 0.0)
        lg = step_logs[i]
        steps.append({"step": i + 1, "wall_s": window[1] - window[0], "phases": phases,
                      "tokens": round(lg["completions/mean_length"] * spec["prompts_per_step"]),
                      "loss": lg.get("loss"), "trl_step_time": lg.get("step_time")})
        windows.append(window)
    used = {k: v for k, v in kwargs.items() if k != "output_dir"}
    return {"steps": steps, "startup_s": begins[0] - T_START, "gpu": gpu_by_phase(sampler, windows, intervals, priority),
            "trl_config": used, "trl_config_fields_missing": sorted(set(wanted) - fields)}


def child_main(system: str, spec_path: str, part_path: str) -> None:
    import torch

    from benchmarks.common import device_name, versions

    with open(spec_path) as f:
        spec = json.load(f)
    kind = SYSTEMS[system]["kind"]
    part = {"system": system, "kind": kind, "device_name": device_name(spec["device"]),
            "versions": versions("vllm", "ray", "deepspeed", "trl", "datasets", "accelerate")}
    try:
        res = run_ours(spec, system) if kind == "ours" else run_trl(spec, system)
        part.update(res)
        part["summary"] = summarize(res["steps"], spec["prompts_per_step"], spec["max_new_tokens"])
        if spec["device"] == "cuda" and kind == "trl":  # TRL trains in this process (ours: in Ray actors)
            part["summary"]["torch_peak_mem_gb_this_process"] = torch.cuda.max_memory_allocated() / 2**30
    except Exception as e:  # the parent reports it and goes on with the next system
        part["error"] = f"{type(e).__name__}: {e}"
        part["traceback"] = traceback.format_exc()
        print(part["traceback"], file=sys.stderr, flush=True)
    with open(part_path, "w") as f:
        json.dump(part, f, indent=2, default=str)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)  # engines and Ray leave threads behind that can hang a normal exit; the result is written


# ---- parent -----------------------------------------------------------------------------------


def spec_key(spec: dict) -> str:
    keep = {k: v for k, v in spec.items() if k not in ("work_dir", "prompts_file", "sample_interval")}
    return hashlib.sha1(json.dumps(keep, sort_keys=True).encode()).hexdigest()[:12]


def build_models(spec: dict, student_shape: str, teacher_shape: str, vocab: int, models_dir: str) -> dict:
    """The two folders (built once; later runs reuse them), each by `python -m benchmarks.models` in a subprocess
    so this process never holds a CUDA context."""
    cuda = spec["device"] == "cuda"
    infos = {}
    for role, shape, seed in (("student", student_shape, 0), ("teacher", teacher_shape, 1)):
        folder = os.path.join(models_dir, f"{shape}_v{vocab}_s{seed}")
        cmd = [sys.executable, "-m", "benchmarks.models", "--out", folder, "--shape", shape, "--vocab", str(vocab),
               "--seed", str(seed), "--device", spec["device"], "--dtype", "bfloat16" if cuda else "float32",
               "--max-position-embeddings", str(max(4096, spec["prompt_len"] + spec["max_new_tokens"]))]
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        if proc.returncode != 0:
            raise RuntimeError(f"building the {role} failed:\n{proc.stderr[-3000:]}")
        infos[role] = json.loads(proc.stdout.strip().splitlines()[-1])
        spec[role] = folder
    return infos


_RUNNING: list[subprocess.Popen] = []  # the child being measured, killed with us (an outer `timeout`)


def kill_session(proc: subprocess.Popen) -> None:
    """Kill the child's whole session (its Ray workers and engines too); it runs in a session of its own."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def on_term(signum, frame) -> None:
    for proc in list(_RUNNING):
        kill_session(proc)
    raise SystemExit(128 + signum)


def run_child(system: str, spec: dict, parts_dir: str, python: str, timeout_s: float) -> dict:
    spec_path = os.path.join(parts_dir, "spec.json")
    kept_path = os.path.join(parts_dir, f"{system}.json")  # a good earlier part is only replaced by a good new one
    part_path = kept_path + ".new"
    log_path = os.path.join(parts_dir, f"{system}.log")
    if os.path.exists(part_path):
        os.remove(part_path)
    gpu_used_before = wait_gpu_released() if spec["device"] == "cuda" else None  # the last system's memory gone
    cmd = [python, os.path.abspath(__file__), "--child", system, "--spec", spec_path, "--part", part_path]
    print(f"[{system}] running: {' '.join(cmd)}  (log: {log_path})", flush=True)
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"), start_new_session=True)
        _RUNNING.append(proc)
        try:
            proc.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            kill_session(proc)
        finally:
            _RUNNING.remove(proc)
    elapsed = time.perf_counter() - t0
    if os.path.exists(part_path):
        with open(part_path) as f:
            part = json.load(f)
    else:
        with open(log_path) as f:
            tail = f.read()[-3000:]
        part = {"system": system, "error": f"no result (exit code {proc.returncode}, {elapsed:.0f} s; timeout "
                                           f"{timeout_s:.0f} s)", "log_tail": tail}
    part["wall_s_process"] = elapsed
    part["gpu_used_gb_before"] = gpu_used_before
    kept_is_good = False
    if os.path.exists(kept_path):
        with open(kept_path) as f:
            kept_is_good = "error" not in json.load(f)
    if "error" not in part or not kept_is_good:  # a failure is kept too: a later --reuse report shows it failed
        with open(kept_path, "w") as f:
            json.dump(part, f, indent=2, default=str)
    if os.path.exists(part_path):
        os.remove(part_path)
    if "error" in part:
        print(f"[{system}] FAILED: {part['error']}\n{part.get('traceback', part.get('log_tail', ''))[-2000:]}", flush=True)
    else:
        s = part["summary"]
        print(f"[{system}] {s['step_s_median']:.3f} s/step, {s['gen_tokens_per_s_median']:.0f} gen tok/s, phases "
              f"{ {k: round(v, 3) for k, v in s['phase_mean_s'].items()} }, tokens_ok={s['tokens_ok']} "
              f"({elapsed:.0f} s in all)", flush=True)
    return part


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    ap.add_argument("--shape", choices=list(PRESETS), default=None,
                    help="student/teacher pair: tiny (tiny <- tiny-teacher), 0.5b (0.5b <- 1.5b), 1b (1b <- 3b); "
                         "default 0.5b on cuda, tiny on cpu")
    ap.add_argument("--student-shape", default=None, help="override the preset's student shape (benchmarks/models.py)")
    ap.add_argument("--teacher-shape", default=None, help="override the preset's teacher shape")
    ap.add_argument("--vocab", type=int, default=None, help="default 32000 (512 for tiny)")
    ap.add_argument("--systems", default=None, help=f"comma-separated, of {','.join(SYSTEMS)} (default: "
                                                     f"{','.join(DEFAULT_SYSTEMS)}; on cpu without trl_vllm; 'none' "
                                                     "with --reuse: gather earlier parts only)")
    ap.add_argument("--prompts-per-step", type=int, default=None, help="default 16 on cuda, 4 on cpu")
    ap.add_argument("--prompt-len", type=int, default=None, help="tokens per prompt, BOS included (default 64 / 8)")
    ap.add_argument("--max-new-tokens", type=int, default=None, help="generated tokens per response (default 256 / 8)")
    ap.add_argument("--warmup", type=int, default=2)
    ap.add_argument("--steps", type=int, default=None, help="measured steps (default 5 on cuda, 2 on cpu)")
    ap.add_argument("--lr", type=float, default=1e-6)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--teacher-topk", type=int, default=0,
                    help="ours: teacher top-k scores instead of full distributions (0 = full, exact like TRL's JSD)")
    ap.add_argument("--trl-student-dtype", default="float32", choices=["float32", "bfloat16"],
                    help="TRL's student weights on cuda: float32 + bf16 autocast (TRL's default; fp32 master weights "
                         "like DeepSpeed's bf16 optimizer) or bfloat16 (no master copy)")
    ap.add_argument("--vllm-gpu-memory-utilization", type=float, default=0.3)
    ap.add_argument("--enforce-eager", action="store_true", help="vLLM without CUDA graphs (ours only: refused with trl_vllm)")
    ap.add_argument("--grad-ckpt", action="store_true", help="gradient checkpointing (ours and TRL)")
    ap.add_argument("--sample-interval", type=float, default=0.1, help="GPU sampling period (s)")
    ap.add_argument("--baseline", default=None, help="system the speed-ups are relative to")
    ap.add_argument("--reuse", action="store_true", help="take systems measured with this exact config from --work-dir")
    ap.add_argument("--system-timeout", type=float, default=900.0, help="seconds per system before it is killed")
    ap.add_argument("--trl-python", default=sys.executable, help="python that runs the TRL systems")
    ap.add_argument("--models-dir", default=os.path.join(tempfile.gettempdir(), "bench_models"))
    ap.add_argument("--work-dir", default=os.path.join(tempfile.gettempdir(), "bench_e2e"))
    ap.add_argument("--out-dir", default=os.path.join(ROOT, "benchmarks", "results"))
    ap.add_argument("--markdown", default=None, help="file to append a section to (default BENCHMARKS.md on cuda, "
                                                     "none on cpu; '' skips)")
    ap.add_argument("--from-json", nargs="+", default=None,
                    help="no runs: merge earlier result JSONs of one configuration (later files win per system), "
                         "write the merged JSON to --out-dir and its section to --markdown (default BENCHMARKS.md)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--spec", default=None, help=argparse.SUPPRESS)
    ap.add_argument("--part", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.child:
        child_main(args.child, args.spec, args.part)
        return
    if args.from_json:
        result = merge_results(args.from_json)
        os.makedirs(args.out_dir, exist_ok=True)
        c = result["config"]
        out = os.path.join(args.out_dir, f"e2e_{result['device']}_{c['student_shape']}-{c['teacher_shape']}_v{c['vocab']}.json")
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=str)
        md = args.markdown or os.path.join(ROOT, "BENCHMARKS.md")
        write_markdown(result, md)
        print(f"wrote {out}; appended a section to {md}")
        return

    signal.signal(signal.SIGTERM, on_term)
    signal.signal(signal.SIGINT, on_term)
    cuda = args.device == "cuda"
    preset = args.shape or ("0.5b" if cuda else "tiny")
    student_shape = args.student_shape or PRESETS[preset][0]
    teacher_shape = args.teacher_shape or PRESETS[preset][1]
    vocab = args.vocab or (512 if preset == "tiny" else 32000)
    if args.systems == "none":  # with --reuse: only gather what was measured before
        systems = []
    else:
        systems = (args.systems.split(",") if args.systems else [s for s in DEFAULT_SYSTEMS if cuda or s != "trl_vllm"])
    unknown = [s for s in systems if s not in SYSTEMS]
    if unknown:
        sys.exit(f"unknown systems {unknown}; choose from {', '.join(SYSTEMS)}")
    if not cuda and "trl_vllm" in systems:
        sys.exit("trl_vllm needs --device cuda (vLLM)")
    if args.enforce_eager and "trl_vllm" in systems:
        # TRL 1.16 builds its LLM without enforce_eager (trl/generation/vllm_generation.py): it would keep CUDA graphs
        sys.exit("--enforce-eager cannot reach TRL's colocated vLLM (it always captures CUDA graphs); "
                 "drop it or leave trl_vllm out of --systems")
    spec = {
        "device": args.device, "student_shape": student_shape, "teacher_shape": teacher_shape, "vocab": vocab,
        "prompts_per_step": args.prompts_per_step or (16 if cuda else 4), "prompt_len": args.prompt_len or (64 if cuda else 8),
        "max_new_tokens": args.max_new_tokens or (256 if cuda else 8), "warmup": args.warmup,
        "steps": args.steps or (5 if cuda else 2), "lr": args.lr, "seed": args.seed, "teacher_topk": args.teacher_topk,
        "trl_student_dtype": args.trl_student_dtype, "vllm_gpu_memory_utilization": args.vllm_gpu_memory_utilization,
        "enforce_eager": args.enforce_eager, "grad_ckpt": args.grad_ckpt, "sample_interval": args.sample_interval,
    }
    if spec["steps"] < 1 or spec["warmup"] < 0:
        sys.exit("--steps must be >= 1 and --warmup >= 0")
    key = spec_key(spec)
    parts_dir = os.path.join(args.work_dir, key)
    os.makedirs(parts_dir, exist_ok=True)
    print(f"config {key}: {json.dumps(spec)}", flush=True)

    t0 = time.perf_counter()
    model_info = build_models(spec, student_shape, teacher_shape, vocab, args.models_dir)
    print(f"models ({time.perf_counter() - t0:.0f} s): {json.dumps(model_info)}", flush=True)
    from benchmarks.models import prompt_texts
    n_prompts = spec["prompts_per_step"] * (spec["warmup"] + spec["steps"] + 2)
    spec["prompts_file"] = os.path.join(parts_dir, "prompts.jsonl")
    with open(spec["prompts_file"], "w") as f:
        for p in prompt_texts(n_prompts, spec["prompt_len"], vocab, seed=args.seed):
            f.write(json.dumps({"prompt": p}) + "\n")
    spec["work_dir"] = parts_dir
    with open(os.path.join(parts_dir, "spec.json"), "w") as f:
        json.dump(spec, f, indent=2)

    parts = {}
    if args.reuse:  # every system measured earlier with this config, asked for now or not
        for name in SYSTEMS:
            path = os.path.join(parts_dir, f"{name}.json")
            if os.path.exists(path) and name not in systems:
                with open(path) as f:
                    part = json.load(f)
                part["reused"] = True  # a failed one too: the report says it failed rather than leaving it out
                parts[name] = part
    os.makedirs(args.out_dir, exist_ok=True)
    out = os.path.join(args.out_dir, f"e2e_{args.device}_{student_shape}-{teacher_shape}_v{vocab}.json")
    result = None
    for name in systems:  # the JSON is rewritten after every system: a run cut short keeps what it measured
        python = args.trl_python if SYSTEMS[name]["kind"] == "trl" else sys.executable
        parts[name] = run_child(name, spec, parts_dir, python, args.system_timeout)
        result = aggregate(parts, spec, key, model_info, args.baseline)
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    if result is None:
        result = aggregate(parts, spec, key, model_info, args.baseline)
        with open(out, "w") as f:
            json.dump(result, f, indent=2, default=str)
    print(f"wrote {out}")
    header, rows, _ = markdown_table(result)
    print(" | ".join(header))
    for r in rows:
        print(" | ".join(fmt(x) for x in r))
    md = args.markdown if args.markdown is not None else (os.path.join(ROOT, "BENCHMARKS.md") if cuda else "")
    if md:
        write_markdown(result, md)
        print(f"appended a section to {md}")


def aggregate(parts: dict, spec: dict, key: str, model_info: dict, baseline: str | None) -> dict:
    """The result JSON: every system's part, and speed-ups over the baseline (same invocation / config)."""
    ok = {n: p for n, p in parts.items() if "error" not in p}
    cuda = spec["device"] == "cuda"
    requested = baseline
    baseline = baseline or next((b for b in (["trl_vllm", "trl_hf"] if cuda else ["trl_hf"]) if b in ok), None)
    speedups = {}
    if baseline in ok:
        base = ok[baseline]["summary"]["step_s_median"]
        speedups = {n: base / p["summary"]["step_s_median"] for n, p in ok.items()}
    versions = {}  # ours and TRL may run in different pythons: every module any system saw
    for p in parts.values():
        versions.update({k: v for k, v in p.get("versions", {}).items() if v is not None})
    return {
        "benchmark": "e2e", "date": now_iso(), "device": spec["device"],
        "device_name": ", ".join(sorted({p["device_name"] for p in ok.values()})) or "?",
        "versions": versions, "config_key": key,
        "config": {k: v for k, v in spec.items() if k not in ("work_dir", "prompts_file", "student", "teacher")}
        | {"student_params": model_info["student"]["params"], "teacher_params": model_info["teacher"]["params"]},
        "baseline": baseline, "baseline_requested": requested, "speedup_vs_baseline": speedups,
        "systems": {n: {k: v for k, v in p.items() if k != "config"} for n, p in parts.items()},
        "our_run_config": next((p["config"] for p in parts.values() if "config" in p), None),
    }


def merge_results(paths: list[str]) -> dict:
    """One result from several JSONs of the same configuration (a run split over several device calls)."""
    results = []
    for path in paths:
        with open(path) as f:
            results.append(json.load(f))
    keys = {r["config_key"] for r in results}
    if len(keys) != 1:
        raise SystemExit(f"--from-json: the files measure different configurations ({sorted(keys)}); merge only one")
    parts = {}
    for r in results:
        for name, part in r["systems"].items():
            if "error" not in part or name not in parts:
                parts[name] = {**part, "reused": False}
    last = results[-1]
    spec = {**last["config"]}
    info = {"student": {"params": spec["student_params"]}, "teacher": {"params": spec["teacher_params"]}}
    merged = aggregate(parts, spec, last["config_key"], info, last.get("baseline_requested"))
    merged["merged_from"] = list(paths)
    return merged


def markdown_table(result: dict) -> tuple[list[str], list[list], list[str]]:
    baseline, speedups, c = result["baseline"], result["speedup_vs_baseline"], result["config"]
    header = ["system", "s/step (median)", "gen tok/s", "generate s", "score s", "train s", "sync s", "idle s",
              "GPU util %", "util gen/score/train %", "GPU mem peak GiB (measured steps)", "start-up s", f"speed-up vs {baseline}"]
    rows = []
    for n in SYSTEMS:
        p = result["systems"].get(n)
        if p is None:
            continue
        if "error" in p:
            rows.append([n, "failed: " + p["error"][:100].replace("|", "/").replace("\n", " ")] + [None] * (len(header) - 2))
            continue
        s, g = p["summary"], p.get("gpu", {})
        ph, ub = s["phase_mean_s"], g.get("util_by_phase") or {}
        split = "/".join(f"{ub[k]:.0f}" if ub.get(k) is not None else "–" for k in ("generate", "score", "train"))
        rows.append([n + (" (reused)" if p.get("reused") else ""), s["step_s_median"], s["gen_tokens_per_s_median"],
                     ph.get("generate"), ph.get("score"), ph.get("train"), ph.get("sync"), ph.get("idle"),
                     g.get("util_mean"), split if g.get("source") else None, g.get("mem_peak_gb_measured_steps"), p.get("startup_s"),
                     speedups.get(n)])
    ok = {n: p for n, p in result["systems"].items() if "error" not in p}
    notes = [f"Student {c['student_shape']} ({c['student_params'] / 1e9:.2f}B) <- teacher {c['teacher_shape']} "
             f"({c['teacher_params'] / 1e9:.2f}B), vocab {c['vocab']}; {c['prompts_per_step']} prompts x "
             f"({c['prompt_len']} prompt + {c['max_new_tokens']} generated) tokens a step; median of {c['steps']} "
             f"steps after {c['warmup']} warm-up. Phase columns are means (they add up to the mean step); "
             f"speed-up = {baseline} s/step / system s/step, same machine and configuration "
             f"(config {result['config_key']}). Systems in separate processes, one after another.",
             "Every response exactly max_new_tokens long (tokens_ok: " +
             ", ".join(f"{n}={p['summary']['tokens_ok']}" for n, p in ok.items()) + "); mean loss (GKD JSD for "
             "ours_gkd and TRL, same objective): " +
             ", ".join(f"{n}={fmt(p['summary'].get('loss_mean'), 4)}" for n, p in ok.items()) + "."]
    return header, rows, notes


def write_markdown(result: dict, path: str) -> None:
    header, rows, notes = markdown_table(result)
    title = "bench_e2e" + ("" if result["device"] == "cuda" else " (CPU smoke, not a performance figure)")
    append_markdown(path, title, result, header, rows, notes)

if __name__ == "__main__":
    main()
