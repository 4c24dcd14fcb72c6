"""The `minillm` subcommands other than `train` (tested in test_e2e), through the real entry point."""
import json
import sys
from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM

from launch.cli import main
from launch.config import resolve_path
from teacher.http_client import HttpTeacherClient
from teacher.testing import assert_scores_match, free_port, random_batch, reference_scores, serving

ROOT = Path(__file__).resolve().parents[1]


def test_config_prints_the_resolved_config_and_names_a_bad_key(capsys):
    assert main(["config", "--config", "gkd_cpu", "objective.beta=0.3", "logging.wandb_mode=offline"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert printed["objective"]["name"] == "gkd" and printed["objective"]["beta"] == 0.3
    assert printed["logging"]["wandb_mode"] == "offline"
    assert main(["config", "objective.bta=0.3"]) == 2
    assert "unknown config key objective.bta (did you mean objective.beta?)" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # a TRL / HF Trainer style flag: argparse's exit, with the override meant
        main(["train", "--learning_rate", "1e-5"])
    assert "--learning_rate is trainer.lr here" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # every flag gets its hint
        main(["config", "--foo", "1", "--max-new-tokens", "2", "--lr=3"])
    err = capsys.readouterr().err
    assert "--max-new-tokens is rollout.max_new_tokens here; --lr is trainer.lr here" in err
    with pytest.raises(SystemExit):  # export takes no overrides: no hint to write one
        main(["export", "ck", "--out", "o", "--learning_rate", "1"])
    err = capsys.readouterr().err
    assert "unrecognized arguments: --learning_rate 1" in err and "key=value" not in err


def test_export_refuses_a_non_empty_folder_and_a_missing_checkpoint(tmp_path, capsys):
    out = tmp_path / "out"
    out.mkdir()
    (out / "keep.txt").write_text("x")
    assert main(["export", str(tmp_path / "no_run"), "--out", str(out)]) == 2
    assert "no_run" in capsys.readouterr().err
    assert (out / "keep.txt").read_text() == "x"


def test_serve_teacher_command_serves_the_teachers_log_probs():
    """`minillm serve-teacher MODEL` in its own process (the console script's module), scored over HTTP."""
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    cmd = [sys.executable, "-m", "launch.cli", "serve-teacher", "builtin:tiny-teacher", "--port", str(port),
           "--dtype", "float32", "--token-budget", "64"]
    teacher = AutoModelForCausalLM.from_pretrained(resolve_path("builtin:tiny-teacher"), dtype=torch.float32).eval()
    batch = random_batch(5, teacher.config.vocab_size, seed=11)
    with serving(cmd, url + "/v1/health", cwd=str(ROOT)):
        client = HttpTeacherClient(url, timeout=30, retries=1, backoff=0.05)
        try:
            info = client.vocab_info()
            out = client.score(*batch, topk=3)
        finally:
            client.close()
    assert info["vocab_size"] == teacher.config.vocab_size
    assert_scores_match(out, reference_scores(teacher, *batch, topk=3))


def test_options_and_overrides_in_any_order(capsys):
    assert main(["config", "objective.beta=0.3", "--config", "gkd_cpu", "logging.wandb_mode=offline"]) == 0
    printed = json.loads(capsys.readouterr().out)
    assert (printed["objective"]["name"], printed["objective"]["beta"]) == ("gkd", 0.3)


def test_train_errors_a_user_fixes_are_one_line_and_leave_no_run_folder(tmp_path, capsys):
    """Found before Ray (a student folder without tokenizer files, an unreachable HTTP teacher, an output_dir
    holding another run) or when the roles are placed (a cluster too small): one line each, exit 2, and no
    half-made run folder (an existing one is left as it was)."""
    import shutil

    import ray

    student = tmp_path / "student"
    student.mkdir()
    for name in ("config.json", "model.safetensors"):
        shutil.copy(Path(resolve_path("builtin:tiny-student")) / name, student / name)
    earlier = tmp_path / "earlier"
    (earlier / "checkpoints" / "step_00000001").mkdir(parents=True)
    (earlier / "metrics.jsonl").write_text('{"step": 1}\n')
    cases = [
        ([f"model.student={student}"], "has no tokenizer files"),
        (["teacher.backend=http", f"teacher.url=http://127.0.0.1:{free_port()}", "teacher.return_full=false",
          "teacher.topk=8"], "unavailable after 3 attempts"),
        (["cluster.num_cpus=1"], "the roles need"),
    ]
    try:
        for overrides, needle in cases:
            run = tmp_path / "run"
            assert main(["train", "--no-progress", f"output_dir={run}", *overrides]) == 2
            err = capsys.readouterr().err
            ours = [line for line in err.splitlines() if line.startswith("minillm:")]  # Ray may log a line too
            assert len(ours) == 1 and needle in ours[0] and "Traceback" not in err, err
            assert not run.exists()
    finally:
        ray.shutdown()
    assert main(["train", f"output_dir={earlier}"]) == 2
    assert "holds checkpoints of an earlier run: pass --resume" in capsys.readouterr().err
    assert sorted(p.name for p in earlier.rglob("*")) == ["checkpoints", "metrics.jsonl", "step_00000001"]


def test_resume_flag_keeps_a_given_checkpoint_path(monkeypatch):
    import trainer.loop

    seen = []
    monkeypatch.setattr(trainer.loop, "train", lambda cfg, hooks: seen.append(cfg.checkpoint.resume))
    assert main(["train", "--resume"]) == 0
    assert main(["train", "checkpoint.resume=runs/old/checkpoints/step_00000004", "--resume"]) == 0
    assert seen == ["auto", "runs/old/checkpoints/step_00000004"]
