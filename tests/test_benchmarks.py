"""Benchmarks' pieces on CPU: the model folders (parameter count, tokenizer), the FLOP formula against
torch's FlopCounterMode, the learner MFU script, and the end-to-end benchmark's bookkeeping and its `ours` path."""
import json
import math
import os
import subprocess
import sys

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

from benchmarks import bench_e2e, models  # noqa: E402
from benchmarks.bench_learner_mfu import random_batch  # noqa: E402
from benchmarks.common import GpuSampler  # noqa: E402


def meta_model(cfg, **kw):
    """The model with no storage (shapes only): any size counts in milliseconds."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return AutoModelForCausalLM.from_config(cfg, **kw)


# ---- models.py --------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", list(models.SHAPES))
@pytest.mark.parametrize("vocab", [32000, 128256])
def test_param_count_closed_form_equals_numel(shape, vocab):
    cfg = models.llama_config(shape, vocab)
    model = meta_model(cfg)
    assert models.param_count(cfg) == sum(p.numel() for p in model.parameters())  # tied weights counted once
    # matmul weights: every nn.Linear, the LM head included even when it is the (tied) embedding
    linear = sum(m.weight.numel() for m in model.modules() if isinstance(m, torch.nn.Linear))
    assert models.matmul_params(cfg) == linear


def test_named_shapes_have_their_published_sizes():
    # with the vocabularies of the models they copy, the counts are the published ones (Llama-3.2-1B: 1.24B,
    # Qwen2.5-0.5B without its QKV biases: 0.494B - 0.37M biases, SmolLM-135M: 134.5M)
    assert models.param_count(models.llama_config("1b", 128256)) == 1_235_814_400
    assert models.param_count(models.llama_config("135m", 49152)) == 134_515_008
    qwen_05b_biases = 24 * (896 + 2 * 128)  # q (14*64) + k, v (2*64 each) per layer
    assert models.param_count(models.llama_config("0.5b", 151936)) == 494_032_768 - qwen_05b_biases


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory):
    out = tmp_path_factory.mktemp("models") / "tiny"
    info = models.build(str(out), "tiny", 1000, seed=0, dtype="float32")
    return out, info


def test_model_folder_loads_with_matching_tokenizer(tiny_folder):
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    out, info = tiny_folder
    cfg = AutoConfig.from_pretrained(out)
    tok = AutoTokenizer.from_pretrained(out)
    assert cfg.vocab_size == 1000 == len(tok) == tok.vocab_size == info["vocab"]
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id) == (0, 1, 2) == (cfg.pad_token_id, cfg.bos_token_id, cfg.eos_token_id)
    assert tok.chat_template is None
    assert tok("w4 w999 w17")["input_ids"] == [1, 4, 999, 17]  # BOS prepended, word i -> id i
    assert tok.decode([4, 999, 17]) == "w4 w999 w17"
    model = AutoModelForCausalLM.from_pretrained(out)
    assert sum(p.numel() for p in model.parameters()) == info["params"] == models.param_count(cfg)
    assert model.generation_config.eos_token_id is None  # generate() given no EOS runs to max_new_tokens
    out_ids = model.generate(torch.tensor([[1, 5, 6]]), max_new_tokens=12, do_sample=True, pad_token_id=0)
    assert out_ids.shape[1] == 3 + 12


def test_prompt_texts_tokenise_to_the_exact_length(tiny_folder):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(tiny_folder[0])
    prompts = models.prompt_texts(20, 9, 1000, seed=3)
    ids = tok(prompts)["input_ids"]
    assert all(len(x) == 9 and x[0] == 1 and min(x[1:]) >= 4 for x in ids)
    assert prompts == models.prompt_texts(20, 9, 1000, seed=3) != models.prompt_texts(20, 9, 1000, seed=4)


def test_full_size_tokenizers_have_the_vocab_size():
    for vocab in (32000, 128256):
        tok = models.build_tokenizer(vocab)
        assert len(tok) == vocab
        assert tok.convert_ids_to_tokens(vocab - 1) == f"w{vocab - 1}"


def test_ensure_reuses_a_matching_folder_and_rebuilds_another(tiny_folder, tmp_path):
    out, info = tiny_folder
    stamp = os.path.getmtime(out / "model.safetensors")
    assert models.ensure(str(out), "tiny", 1000, seed=0, dtype="float32") == info
    assert os.path.getmtime(out / "model.safetensors") == stamp
    other = models.ensure(str(tmp_path / "t"), "tiny", 600, seed=1, dtype="float32")
    assert other["vocab"] == 600 and other["seed"] == 1


def test_cli_builds_a_folder(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "benchmarks.models", "--out", str(tmp_path / "m"), "--shape", "tiny",
                           "--vocab", "300", "--dtype", "float32"], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    info = json.loads(proc.stdout.strip().splitlines()[-1])
    assert info["params"] == info["params_closed_form"] == models.param_count(models.llama_config("tiny", 300))


# ---- the FLOP formula vs torch's FLOP counter -------------------------------------------------


def counted_flops(fn) -> int:
    from torch.utils.flop_counter import FlopCounterMode

    counter = FlopCounterMode(display=False)
    with counter:
        fn()
    return counter.get_total_flops()


@pytest.mark.parametrize("shape,tied", [("tiny", False), ("tiny-teacher", False), ("tiny", True)])
def test_train_flops_equal_the_flop_counter_full_forward_backward(shape, tied):
    """FlopCounterMode counts every matmul of a real forward + backward (eager attention: QKᵀ and AV are
    visible matmuls over the full T×T scores; backward = 2 × forward). It must equal the closed form."""
    from transformers import AutoModelForCausalLM

    cfg = models.llama_config(shape, 300)
    cfg.tie_word_embeddings = tied
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    B, T = 3, 24
    ids = torch.randint(4, 300, (B, T))
    got = counted_flops(lambda: model(input_ids=ids).logits.float().sum().backward())
    assert got == models.train_flops(cfg, T, num_seqs=B)
    assert got == B * T * models.train_flops_per_token(cfg, T)  # PaLM's per-token form, LM head at every position


def test_train_flops_equal_the_flop_counter_on_the_learners_forward():
    """Our learner applies the LM head at the R response positions only (rollout.forward.response_logits)."""
    from transformers import AutoModelForCausalLM

    from rollout.forward import response_logits
    from rollout.types import RolloutBatch

    cfg = models.llama_config("tiny-teacher", 300)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    g = torch.Generator().manual_seed(0)
    B, P, R = 4, 7, 13
    batch = RolloutBatch.from_lists(torch.randint(4, 300, (B, P), generator=g).tolist(),
                                    torch.randint(4, 300, (B, R), generator=g).tolist(), pad_token_id=0)
    got = counted_flops(lambda: response_logits(model, batch).float().logsumexp(-1).sum().backward())
    assert got == models.train_flops(cfg, P + R, logit_positions=R, num_seqs=B)
    # hand check of the parts for this shape: d=128, I=256, L=4, H=4, KV=2, hd=32, V=300
    d, inter, L, H, kv, hd, V, T = 128, 256, 4, 4, 2, 32, 300, P + R
    per_seq = 6 * L * (d * hd * (2 * H + 2 * kv) + 3 * d * inter) * T + 6 * V * d * R + 12 * L * H * hd * T * T
    assert got == B * per_seq


# ---- bench_learner_mfu.py ---------------------------------------------------------------------


def test_random_teacher_scores_are_a_valid_top_k():
    batch, scores = random_batch(3, 5, 7, vocab=200, topk=16)
    assert batch.sequences.shape == (3, 12) and batch.response_lens.tolist() == [7, 7, 7]
    ids, lp = scores.topk_ids.long(), scores.topk_logprobs
    assert ids.shape == lp.shape == (3, 7, 16)
    assert all(len(set(row.tolist())) == 16 for row in ids.reshape(-1, 16))  # distinct ids per position
    assert ids.min() >= 4 and ids.max() < 200
    assert torch.allclose(lp.exp().sum(-1), torch.full((3, 7), 0.9), atol=1e-5)  # a sub-distribution
    assert (lp[..., :-1] >= lp[..., 1:]).all()  # descending, as the teacher returns them


def test_learner_mfu_cpu_run(tmp_path):
    out_dir = tmp_path / "res"
    proc = subprocess.run([sys.executable, "benchmarks/bench_learner_mfu.py", "--device", "cpu", "--shape", "tiny",
                           "--seqs", "2", "--prompt-len", "8", "--response-len", "24", "--warmup", "1", "--steps", "2",
                           "--peak-tflops", "0.5", "--models-dir", str(tmp_path / "models"), "--out-dir", str(out_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    res = json.loads((out_dir / "learner_mfu_cpu_tiny_v512.json").read_text())
    f, c = res["figures"], res["config"]
    cfg = models.llama_config("tiny", 512)
    flops = models.train_flops(cfg, 32, 24, 2)
    assert math.isclose(f["model_tflop_per_step"], flops / 1e12)
    assert len(res["step_times_s"]) == 2 and f["step_s_median"] > 0
    assert math.isclose(f["tokens_per_s"], 2 * 32 / f["step_s_median"])
    assert math.isclose(f["achieved_tflops"], flops / f["step_s_median"] / 1e12)
    assert math.isclose(f["mfu"], f["achieved_tflops"] / 0.5)
    assert c["params"] == models.param_count(cfg)


# ---- bench_e2e.py -----------------------------------------------------------------------------


def test_attribute_splits_a_window_by_priority():
    # a step 0..10: generate 0..4 with a sync 1..2 inside; score 4..6; train 3..9 (overlaps: lower priority)
    iv = [("generate", 0.0, 4.0), ("sync", 1.0, 2.0), ("score", 4.0, 6.0), ("train", 3.0, 9.0)]
    got = bench_e2e.attribute((0.0, 10.0), iv, ["sync", "score", "generate", "train"])
    assert got == pytest.approx({"generate": 3.0, "sync": 1.0, "score": 2.0, "train": 3.0, "idle": 1.0})
    assert sum(got.values()) == pytest.approx(10.0)
    # intervals outside the window do not count; a window inside one interval is all that interval
    assert bench_e2e.attribute((1.2, 1.8), iv, ["sync", "generate"]) == pytest.approx({"sync": 0.6})


def test_gpu_samples_are_attributed_to_phases():
    s = GpuSampler()
    s.source = "test"
    s.samples = [(0.5, 10.0, 1.0), (1.5, 90.0, 3.0), (2.5, 50.0, 2.0), (3.5, 0.0, 1.0), (9.0, 100.0, 7.0)]
    iv = [("generate", 0.0, 2.0), ("train", 2.0, 3.0)]
    g = bench_e2e.gpu_by_phase(s, [(0.0, 4.0)], iv, ["generate", "train"])
    assert g["util_by_phase"] == {"generate": 50.0, "train": 50.0, "idle": 0.0}
    assert g["util_mean"] == pytest.approx(37.5) and g["samples"] == 4
    assert g["mem_peak_gb_measured_steps"] == 3.0 and g["mem_peak_gb"] == 7.0


def test_summary_checks_the_generation_length():
    steps = [{"wall_s": w, "phases": {"generate": w / 2, "idle": w / 2}, "tokens": 32, "loss": 1.0} for w in (1.0, 3.0, 2.0)]
    s = bench_e2e.summarize(steps, B=4, L=8)
    assert s["step_s_median"] == 2.0 and s["tokens_ok"] and s["phase_mean_s"]["generate"] == pytest.approx(1.0)
    assert s["gen_tokens_per_s_median"] == pytest.approx(16.0)
    steps[1]["tokens"] = 31
    assert not bench_e2e.summarize(steps, B=4, L=8)["tokens_ok"]


def gpu_spec(**kw):
    spec = {"device": "cuda", "student": "/m/s", "teacher": "/m/t", "prompts_file": "/p.jsonl", "prompts_per_step": 16,
            "prompt_len": 64, "max_new_tokens": 256, "warmup": 2, "steps": 5, "lr": 1e-6, "seed": 0, "teacher_topk": 0,
            "trl_student_dtype": "float32", "vllm_gpu_memory_utilization": 0.3, "enforce_eager": False,
            "grad_ckpt": False, "sample_interval": 0.1, "work_dir": "/w"}
    return {**spec, **kw}


def backend_is_vllm(system_def: dict) -> bool:
    return system_def.get("backend", "vllm") == "vllm"


@pytest.mark.parametrize("system", ["ours_gkd", "ours_minillm_a0", "ours_minillm_a02", "ours_gkd_hf"])
def test_our_gpu_configs_validate_and_share_one_gpu(system):
    """The configs the GPU run will use: valid, one GPU shared by Ray fractions, CUDA-IPC weight sync for vLLM."""
    from launch.config import config_from_dict
    from launch.placement import role_bundles
    from trainer.sync import resolve_sync_path

    d = bench_e2e.SYSTEMS[system]
    cfg = config_from_dict(bench_e2e.ours_config(gpu_spec(), d["objective"], d["mix_alpha"], "/o", d.get("backend")))
    gpus = sum(b.get("GPU", 0.0) for bundles in role_bundles(cfg).values() for b in bundles)
    assert gpus <= 1.0
    # vLLM's fixed shares leave at least half the GPU to the learner and the teacher scorer
    engines = cfg.rollout.gpu_memory_utilization + (cfg.rollout.teacher_gpu_memory_utilization if d["mix_alpha"] > 0 else 0)
    if backend_is_vllm(d):
        assert engines <= 0.5
    backend = d.get("backend", "vllm")
    assert resolve_sync_path(cfg) == ("cuda_ipc" if backend == "vllm" else "object_store")
    assert (cfg.rollout.backend, cfg.model.dtype, cfg.trainer.bf16) == (backend, "bfloat16", True)
    assert cfg.rollout.max_new_tokens == 256 and cfg.rollout.prompts_per_step == 16 and cfg.rollout.n_samples == 1
    assert cfg.trainer.micro_batch_tokens == 16 * (64 + 256)  # the whole step in one micro-batch, as TRL's
    assert (cfg.trainer.lr, cfg.trainer.grad_clip, cfg.trainer.weight_decay, cfg.trainer.lr_schedule) == (1e-6, 1.0, 0.0, "constant")
    assert cfg.teacher.return_full and cfg.rollout.mix_alpha == d["mix_alpha"]
    if system == "ours_gkd":
        assert (cfg.objective.name, cfg.objective.lam, cfg.objective.beta) == ("gkd", 1.0, 0.5)


@pytest.mark.parametrize("use_vllm", [True, False])
def test_trl_kwargs_match_ours(use_vllm):
    spec = gpu_spec()
    kw = bench_e2e.trl_config_kwargs(spec, use_vllm, "/o")
    ours = bench_e2e.ours_config(spec, "gkd", 0.0, "/o")
    assert kw["per_device_train_batch_size"] == ours["rollout"]["prompts_per_step"] and kw["gradient_accumulation_steps"] == 1
    assert kw["max_completion_length"] == ours["rollout"]["max_new_tokens"]
    assert kw["beta"] == ours["objective"]["beta"] == 0.5 and kw["lmbda"] == ours["objective"]["lam"] == 1.0
    assert (kw["learning_rate"], kw["max_grad_norm"], kw["weight_decay"]) == (1e-6, 1.0, 0.0)
    assert kw["optim"] == "adamw_torch" and kw["lr_scheduler_type"] == "constant" and kw["bf16"]
    assert kw["gradient_checkpointing"] is ours["trainer"]["gradient_checkpointing"] is False
    assert (kw["temperature"], kw["top_p"], kw["top_k"]) == (1.0, 1.0, 0)
    assert kw["vllm_gpu_memory_utilization"] == ours["rollout"]["gpu_memory_utilization"]
    assert kw["use_vllm"] is use_vllm and kw["vllm_mode"] == "colocate"
    # fixed length: vLLM ignores EOS, HF forbids it until the last token
    assert kw["generation_kwargs"] == ({"ignore_eos": True} if use_vllm else {"min_new_tokens": 256})


def fake_part(step_s: float, tokens: int = 32) -> dict:
    steps = [{"wall_s": step_s, "phases": {"generate": step_s, "idle": 0.0}, "tokens": tokens, "loss": 0.1}]
    return {"device_name": "cpu", "versions": {"torch": "x"}, "steps": steps, "summary": bench_e2e.summarize(steps, 4, 8)}


def test_results_of_split_runs_merge_with_speedups_over_the_baseline(tmp_path):
    spec = {**gpu_spec(device="cpu"), "student_shape": "tiny", "teacher_shape": "tiny-teacher", "vocab": 512}
    info = {"student": {"params": 1}, "teacher": {"params": 2}}
    first = bench_e2e.aggregate({"trl_hf": fake_part(2.0), "ours_gkd": {"error": "boom"}}, spec, "k1", info, None)
    second = bench_e2e.aggregate({"ours_gkd": fake_part(0.5), "ours_minillm_a0": fake_part(1.0)}, spec, "k1", info, None)
    assert first["baseline"] == "trl_hf" and first["speedup_vs_baseline"] == {"trl_hf": 1.0}
    assert second["baseline"] is None  # no TRL system in this part of the run
    paths = []
    for i, r in enumerate((first, second)):
        paths.append(str(tmp_path / f"r{i}.json"))
        with open(paths[-1], "w") as f:
            json.dump(r, f)
    merged = bench_e2e.merge_results(paths)
    assert sorted(merged["systems"]) == ["ours_gkd", "ours_minillm_a0", "trl_hf"] and "error" not in merged["systems"]["ours_gkd"]
    assert merged["speedup_vs_baseline"] == {"trl_hf": 1.0, "ours_gkd": 4.0, "ours_minillm_a0": 2.0}
    md = tmp_path / "b.md"
    bench_e2e.write_markdown(merged, str(md))
    text = md.read_text()
    assert "| ours_gkd | 0.5 |" in text and "speed-up vs trl_hf" in text and "CPU smoke" in text
    other = bench_e2e.aggregate({"trl_hf": fake_part(2.0)}, spec, "k2", info, None)
    with open(tmp_path / "other.json", "w") as f:
        json.dump(other, f)
    with pytest.raises(SystemExit):
        bench_e2e.merge_results([paths[0], str(tmp_path / "other.json")])


@pytest.mark.slow
def test_e2e_ours_cpu_smoke(tmp_path):
    """The `ours_gkd` system end to end on tiny CPU models (Ray, DeepSpeed, HF rollout), through the CLI."""
    out_dir = tmp_path / "res"
    proc = subprocess.run([sys.executable, "benchmarks/bench_e2e.py", "--device", "cpu", "--shape", "tiny", "--systems",
                           "ours_gkd", "--warmup", "1", "--steps", "2", "--models-dir", str(tmp_path / "models"),
                           "--work-dir", str(tmp_path / "work"), "--out-dir", str(out_dir)],
                          cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    res = json.loads((out_dir / "e2e_cpu_tiny-tiny-teacher_v512.json").read_text())
    part = res["systems"]["ours_gkd"]
    assert "error" not in part, part.get("traceback")
    steps, s = part["steps"], part["summary"]
    assert [st["step"] for st in steps] == [2, 3]  # after 1 warm-up step; one more step ran to close the last
    for st in steps:
        assert st["tokens"] == 4 * 8  # 4 prompts x 8 new tokens: EOS never ends a response early
        assert st["phases"]["idle"] >= -1e-6  # the loop's phases fit inside the wall time
        assert sum(st["phases"].values()) == pytest.approx(st["wall_s"])
        assert set(st["phases"]) == {"generate", "score", "train", "sync", "idle"}
        assert math.isfinite(st["loss"]) and st["loss"] > 0
    assert s["tokens_ok"] and s["step_s_median"] == pytest.approx(sorted(st["wall_s"] for st in steps)[0] / 2 +
                                                                  sorted(st["wall_s"] for st in steps)[1] / 2)
    # our wrappers' time stamps and the loop's own phase times (metrics.jsonl) agree
    assert part["max_abs_diff_wrapper_vs_loop_phase_s"] < 0.05
    assert res["config"]["student_params"] == models.param_count(models.llama_config("tiny", 512))


def test_gpu_runbook_parses_and_its_debug_step_runs_in_smoke_mode(tmp_path):
    """The runbook is what a lent GPU session runs, once: a syntax error or a step the case statement does not
    know would waste it. Every step the header names must be handled; the debug step runs on CPU (tiny models)."""
    import re
    from pathlib import Path

    script = Path(bench_e2e.__file__).parent / "gpu_runbook.sh"
    subprocess.run(["bash", "-n", str(script)], check=True)
    text = script.read_text()
    handled = set(re.findall(r"^\s{4}([a-z_0-9]+)\)", text, flags=re.M))
    named = set()
    for line in re.findall(r"gpu_runbook\.sh((?: [a-z_0-9]+)+)", text):  # steps: single spaces; notes after 2+
        named |= set(line.split())
    assert named and named <= handled, named - handled
    out = tmp_path / "out"
    env = {**os.environ, "RUNBOOK_SMOKE": "1", "OUT": str(out)}
    subprocess.run(["bash", str(script), "debug"], check=True, env=env, timeout=300)
    log = (out / "runbook.log").read_text()
    assert "debug_student: rc=0" in log and "debug_teacher: rc=0" in log, log
