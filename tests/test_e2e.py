"""End to end on CPU: the real CLI, a local Ray cluster, DeepSpeed, the shipped tiny teacher."""
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import ray
import torch

from launch.config import load_config
from trainer.loop import Hooks, train

from pretrain_reference import first_step_pretrain_losses  # tests/

FAST = ["trainer.steps=3", "rollout.prompts_per_step=8", "rollout.max_new_tokens=8", "data.num_eval_prompts=4",
        "rollout.num_cpus=1", "teacher.num_cpus=1", "trainer.num_cpus=1", "trainer.warmup_steps=0"]


def _metrics(run_dir):
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_cli_train_runs_and_exports_a_loadable_model(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", "--no-progress", f"output_dir={run}", *FAST,
                           "trainer.eval_every=2"],
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "held-out reverse KL before training" in proc.stdout and "after training" in proc.stdout

    rows = _metrics(run)
    assert [r["step"] for r in rows] == [1, 2, 3]
    for r in rows:
        assert math.isfinite(r["loss/loss"]) and r["rollout/tokens"] > 0 and r["throughput/tokens_per_s"] > 0
        assert {"time/generate", "time/score", "time/train", "time/sync"} <= set(r)
    assert list((run / "tensorboard").glob("events.out.tfevents.*"))
    # trainer.eval_every=2: the held-out estimate at step 2 only, between the ones before and after training
    assert [r["step"] for r in rows if "eval/reverse_kl" in r] == [2]
    assert math.isfinite(rows[1]["eval/reverse_kl"]) and rows[1]["eval/reverse_kl_stderr"] >= 0

    summary = json.loads((run / "summary.json").read_text())
    assert math.isfinite(summary["eval_before"]["reverse_kl"]) and math.isfinite(summary["eval_after"]["reverse_kl"])

    final = run / "final"
    for name in ("model.safetensors", "config.json", "generation_config.json", "tokenizer.json", "README.md"):
        assert (final / name).exists(), name
    # the student folder's own generation defaults, not the rollout's (max_new_tokens=8 would cut every generate)
    from launch.config import resolve_path
    def gen(folder):
        return {k: v for k, v in json.loads((folder / "generation_config.json").read_text()).items()
                if k != "transformers_version"}
    assert gen(final) == gen(Path(resolve_path(load_config(None).model.student)))
    assert "max_new_tokens" not in gen(final)
    model = AutoModelForCausalLM.from_pretrained(final)
    tok = AutoTokenizer.from_pretrained(final)
    out = model.generate(**tok(["the big cat"], return_tensors="pt"), max_new_tokens=4, do_sample=False)
    assert out.shape[1] > 4
    # the export holds the trained weights: they differ from the run's initial ones
    init = AutoModelForCausalLM.from_pretrained(run / "rollout_init")
    assert not torch.equal(init.lm_head.weight, model.lm_head.weight)


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=6, include_dashboard=False)
    yield
    ray.shutdown()


@pytest.mark.slow
def test_resume_reproduces_the_uninterrupted_losses(local_ray, tmp_path):
    """6 steps straight vs 3 steps, a stop, and a resume for the other 3: the same losses."""
    overrides = [o for o in FAST if not o.startswith("trainer.steps")] + [
        "trainer.steps=6", "checkpoint.every=3", "data.eval_prompts=null", "trainer.lr_schedule=cosine"]
    straight = tmp_path / "straight"
    train(load_config(None, overrides + [f"output_dir={straight}"]), Hooks(progress=False))

    resumed = tmp_path / "resumed"
    first = train(load_config(None, overrides + [f"output_dir={resumed}"]), Hooks(progress=False, stop_after=3))
    assert first == {"stopped_at": 3}
    assert [r["step"] for r in _metrics(resumed)] == [1, 2, 3]
    train(load_config(None, overrides + [f"output_dir={resumed}", "checkpoint.resume=auto"]), Hooks(progress=False))

    a, b = _metrics(straight), _metrics(resumed)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b):
        for key in ("loss/loss", "loss/pg_loss", "loss/single_step_loss", "train/reward", "rollout/tokens", "train/lr"):
            assert ra[key] == rb[key], (ra["step"], key, ra[key], rb[key])


@pytest.mark.slow
def test_resume_adding_the_pretraining_loss(local_ray, tmp_path, caplog):
    """A resume may add L_PT (objective.pt_weight + data.pretrain) to a run saved without it: a warning names the
    change, and its pretraining order starts fresh (the checkpoint has no position for it)."""
    import logging

    overrides = [o for o in FAST if not o.startswith("trainer.steps")] + [
        "trainer.steps=2", "checkpoint.every=1", "data.eval_prompts=null", f"output_dir={tmp_path}"]
    assert train(load_config(None, overrides), Hooks(progress=False, stop_after=1)) == {"stopped_at": 1}
    with caplog.at_level(logging.WARNING, logger="minillm"):
        train(load_config(None, overrides + ["checkpoint.resume=auto", "objective.pt_weight=0.5",
                                             "data.pretrain=builtin:corpus/pretrain.jsonl"]), Hooks(progress=False))
    assert "objective.pt_weight: 0.0 -> 0.5" in caplog.text
    rows = _metrics(tmp_path)
    assert [r["step"] for r in rows] == [1, 2] and "loss/pt_loss" not in rows[0] and rows[1]["loss/pt_loss"] > 0


@pytest.mark.slow
def test_sequence_level_kd_trains_on_teacher_samples(local_ray, tmp_path):
    """objective.seq_kd with λ=0: every batch is sampled by the teacher (checked on the batches)."""
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM
    from launch.config import resolve_path

    cfg = load_config(None, [o for o in FAST if not o.startswith("trainer.steps")] + [
        "trainer.steps=2", "objective.name=forward_kl", "objective.lam=0", "objective.seq_kd=true",
        "data.eval_prompts=null", f"output_dir={tmp_path}"])
    batches = []
    train(cfg, Hooks(progress=False, on_batch=lambda step, b: batches.append(b)))
    assert [b.source for b in batches] == ["teacher", "teacher"]
    # teacher samples are likely under the teacher and unlikely under the (weaker) student
    teacher = AutoModelForCausalLM.from_pretrained(resolve_path("builtin:tiny-teacher"))
    student = AutoModelForCausalLM.from_pretrained(resolve_path("builtin:tiny-student"))

    def mean_logprob(model, b):
        with torch.no_grad():
            logits = model(b.sequences, attention_mask=b.attention_mask()).logits
        lp = F.log_softmax(logits[:, :-1], -1).gather(-1, b.sequences[:, 1:, None])[..., 0]
        pos = torch.arange(1, b.sequences.shape[1])
        resp = (pos[None] >= b.prompt_lens[:, None]) & (pos[None] < (b.prompt_lens + b.response_lens)[:, None])
        return float((lp * resp).sum() / resp.sum())

    for b in batches:
        assert b.student_logprobs is None
        assert mean_logprob(teacher, b) > mean_logprob(student, b) + 0.5


@pytest.mark.slow
@pytest.mark.parametrize("objective", [["objective.name=gkd"],  # full distributions
                                       ["teacher.return_full=false", "teacher.topk=8", "rollout.mix_alpha=0.2"],
                                       ["objective.name=forward_kl", "objective.lam=0", "objective.seq_kd=true"]])
def test_a_teacher_with_more_embedding_rows_trains(local_ray, tmp_path, objective):
    """Teacher and student of one family differ in embedding padding (Qwen2.5-7B: 152064 rows, 0.5B: 151936).
    Here the teacher has 16 extra rows with large random weights, which no token id reaches: the run
    trains on the student's ids (before, the full form failed on shape and top-k ids ran past the student).
    Sequence-level KD samples from the teacher: only the student's ids (before, it drew the padding rows)."""
    import shutil

    from transformers import AutoModelForCausalLM
    from launch.config import resolve_path

    teacher_dir = tmp_path / "teacher"
    teacher = AutoModelForCausalLM.from_pretrained(resolve_path("builtin:tiny-teacher"))
    V = teacher.config.vocab_size
    teacher.resize_token_embeddings(V + 16, mean_resizing=False)
    with torch.no_grad():  # large random padding rows: some get the top logits at most positions
        teacher.lm_head.weight[V:] = 50.0 * torch.randn(16, teacher.config.hidden_size)
    teacher.save_pretrained(teacher_dir)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copy(resolve_path(f"builtin:tiny-teacher/{name}"), teacher_dir / name)
    cfg = load_config(None, [o for o in FAST if not o.startswith("trainer.steps")] + [
        "trainer.steps=2", f"model.teacher={teacher_dir}", f"output_dir={tmp_path / 'run'}",
        *([] if objective == ["objective.name=gkd"] else ["data.eval_prompts=null"]), *objective])
    batches = []
    train(cfg, Hooks(progress=False, on_batch=lambda step, b: batches.append(b)))
    assert all(math.isfinite(r["loss/loss"]) for r in _metrics(tmp_path / "run"))
    assert all(int(b.sequences.max()) < V for b in batches)
    if "objective.seq_kd=true" in objective:
        assert [b.source for b in batches] == ["teacher", "teacher"]
    if objective == ["objective.name=gkd"]:  # held-out: the objective's own loss beside the reverse KL
        summary = json.loads((tmp_path / "run" / "summary.json").read_text())
        assert all(math.isfinite(summary[k]["loss"]) and summary[k]["loss"] >= 0 for k in ("eval_before", "eval_after"))


@pytest.mark.slow
def test_teacher_mixed_sampling_and_pretraining_loss_in_the_loop(local_ray, tmp_path):
    """MiniLLM with α=0.2 samples mixed batches (importance weights ≠ 1) and adds L_PT on the corpus, mixed with
    KD from the teacher on the same windows (objective.pt_kd_ratio, the code's --kd-ratio). The first step's
    pretraining figures (taken before its update) equal a direct fp64 computation with the initial models on
    the windows the seeded pretraining order serves first."""
    cfg = load_config(None, [o for o in FAST if not o.startswith("trainer.steps")] + [
        "trainer.steps=2", "rollout.mix_alpha=0.2", "objective.pt_weight=0.5", "objective.pt_kd_ratio=0.25",
        "data.pretrain=builtin:corpus/pretrain.jsonl", "data.pretrain_max_len=24", "data.eval_prompts=null",
        f"output_dir={tmp_path}"])
    batches = []
    train(cfg, Hooks(progress=False, on_batch=lambda step, b: batches.append(b)))
    assert [(b.source, b.mix_alpha) for b in batches] == [("mixed", 0.2), ("mixed", 0.2)]
    rows = _metrics(tmp_path)
    for r in rows:
        assert math.isfinite(r["loss/pt_loss"]) and r["loss/pt_loss"] > 0
        # q/p̃ differs from 1 wherever teacher and student disagree
        assert abs(r["train/importance_weight"] - 1.0) > 1e-3

    nll, kl = first_step_pretrain_losses(cfg)
    first = rows[0]
    assert first["loss/pt_lm_loss"] == pytest.approx(nll, rel=1e-4)
    assert first["loss/pt_kd_loss"] == pytest.approx(kl, rel=1e-4)
    assert first["loss/pt_loss"] == pytest.approx(0.75 * nll + 0.25 * kl, rel=1e-4)


def test_bad_inputs_fail_before_any_actor_starts(tmp_path):
    import shutil

    from transformers import LlamaConfig
    from launch.config import resolve_path

    missing = load_config(None, ["model.teacher=/nonexistent/teacher", f"output_dir={tmp_path / 'a'}"])
    with pytest.raises(FileNotFoundError, match=r"model.teacher='/nonexistent/teacher': no config.json"):
        train(missing, Hooks(progress=False))

    # a teacher folder whose tokenizer maps words to other ids
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast
    from launch.build_assets import vocabulary
    words = vocabulary()
    swapped = words[:4] + list(reversed(words[4:]))
    tok = PreTrainedTokenizerFast(tokenizer_object=Tokenizer(models.WordLevel({w: i for i, w in enumerate(swapped)}, unk_token="<unk>")),
                                  bos_token="<s>", eos_token="</s>", pad_token="<pad>", unk_token="<unk>")
    tok.backend_tokenizer.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    teacher_dir = tmp_path / "teacher"
    LlamaConfig(vocab_size=len(words), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                num_attention_heads=2).save_pretrained(teacher_dir)
    tok.save_pretrained(teacher_dir)
    mismatched = load_config(None, [f"model.teacher={teacher_dir}", f"output_dir={tmp_path / 'b'}"])
    from teacher.tokenizer_check import TokenizerMismatchError
    with pytest.raises(TokenizerMismatchError):
        train(mismatched, Hooks(progress=False))

    # a prompt longer than data.max_prompt_len names the row and the key
    long = load_config(None, ["data.max_prompt_len=3", f"output_dir={tmp_path / 'c'}"])
    from launch.config import ConfigError
    with pytest.raises(ConfigError, match=r"data.prompts row \d+: prompt of \d+ tokens exceeds data.max_prompt_len=3"):
        train(long, Hooks(progress=False))
    # a prompt that fits data.max_prompt_len but, with the generated tokens, not the models' context (256 tokens)
    too_long = load_config(None, ["rollout.max_new_tokens=255", f"output_dir={tmp_path / 'd'}"])
    with pytest.raises(ConfigError, match=r"data.prompts: a prompt of \d+ tokens \+ rollout.max_new_tokens=255 exceeds "
                                          r"the student's context of 256 tokens; lower data.max_prompt_len"):
        train(too_long, Hooks(progress=False))
    short_teacher = tmp_path / "short_teacher"
    shutil.copytree(resolve_path("builtin:tiny-teacher"), short_teacher)
    conf = json.loads((short_teacher / "config.json").read_text())
    (short_teacher / "config.json").write_text(json.dumps({**conf, "max_position_embeddings": 30}))
    with pytest.raises(ConfigError, match="exceeds the teacher's context of 30 tokens"):
        train(load_config(None, [f"model.teacher={short_teacher}", "rollout.max_new_tokens=32", f"output_dir={tmp_path / 'e'}"]),
              Hooks(progress=False))
    long_doc = tmp_path / "pretrain.jsonl"
    long_doc.write_text(json.dumps({"text": "the red fox follows the rabbit . " * 60}) + "\n")
    with pytest.raises(ConfigError, match=r"windows of 300 tokens exceed the student's context of 256 tokens; "
                                          r"set data.pretrain_max_len <= 256"):
        train(load_config(None, ["objective.pt_weight=0.5", f"data.pretrain={long_doc}", "data.pretrain_max_len=300",
                                 f"output_dir={tmp_path / 'f'}"]), Hooks(progress=False))
    # nothing half-written: the run folders were never created
    assert not any((tmp_path / name).exists() for name in ("a", "b", "c", "d", "e", "f"))
