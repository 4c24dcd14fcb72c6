"""Checkpoint layout helpers: commit/rotation/latest, corruption fallbacks, a SIGKILL mid-save, RNG."""
from __future__ import annotations

import json
import os
import random
import signal
import subprocess
import sys
import textwrap
import time
import zlib
from pathlib import Path

import numpy as np
import pytest
import torch

from trainer import checkpoint as ckpt

ROOT = Path(__file__).resolve().parents[1]


def _save(root: Path, step: int, keep_last=None, payload: bytes = b"x" * 100, big: int = 0) -> Path:
    """A checkpoint with the layout's parts (fake DeepSpeed files) at `step`."""
    tmp = ckpt.begin(root, step)
    ds = ckpt.deepspeed_dir(tmp) / ckpt.DS_TAG
    ds.mkdir(parents=True)
    (ds / "mp_rank_00_model_states.pt").write_bytes(payload + step.to_bytes(4, "little"))
    if big:
        (ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt").write_bytes(os.urandom(big))
    ckpt.save_rng(tmp, rank=0)
    ckpt.save_trainer_state(tmp, {"step": step, "metrics": [{"loss": 1.0 / (step + 1)}]})
    return ckpt.commit(root, tmp, step, keep_last=keep_last)


def test_commit_layout_latest_and_manifest(tmp_path):
    root = tmp_path / "checkpoints"
    final = _save(root, 3)
    assert final == root / "step_00000003"
    assert (root / "latest").read_text().strip() == "step_00000003"
    assert not list(root.glob(".tmp-*"))
    manifest = json.loads((final / "MANIFEST.json").read_text())
    listed = {e["path"]: e for e in manifest["files"]}
    on_disk = {p.relative_to(final).as_posix() for p in final.rglob("*") if p.is_file()} - {"MANIFEST.json"}
    assert set(listed) == on_disk
    assert {"deepspeed/state/mp_rank_00_model_states.pt", "rng/rank_0.pt", "trainer_state.json"} <= on_disk
    for path, entry in listed.items():  # size and CRC-32 of every file, against zlib on the bytes
        data = (final / path).read_bytes()
        assert (entry["size"], entry["crc32"]) == (len(data), f"{zlib.crc32(data):08x}")
    assert ckpt.is_complete(final) == (True, "ok")
    assert ckpt.find_latest(root) == final
    assert ckpt.load_trainer_state(final)["step"] == 3


def test_a_large_file_damaged_in_place_is_caught(tmp_path):
    """A multi-chunk file with bytes overwritten in the middle, size kept (a bad disk block, a partial copy):
    the resume scan skips that checkpoint; rotation's size-only check does not re-read it."""
    root = tmp_path / "checkpoints"
    prev = _save(root, 1, big=3 * 2**20)
    bad = _save(root, 2, big=3 * 2**20)
    target = bad / "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt"
    with open(target, "r+b") as f:
        f.seek(2**20 + 12345)
        f.write(b"\xff" * 4096)
    ok, why = ckpt.is_complete(bad)
    assert not ok and "zero_pp_rank_0_mp_rank_00_optim_states.pt is damaged" in why
    assert ckpt.is_complete(bad, verify_data=False) == (True, "ok")
    with pytest.warns(RuntimeWarning, match="step_00000002.*damaged"):
        assert ckpt.find_latest(root) == prev


def test_rotation_keeps_last_n_and_removes_stale_tmp(tmp_path):
    root = tmp_path / "checkpoints"
    stale = ckpt.begin(root, 99)  # a crashed save of a later step
    (stale / "junk").write_text("partial")
    for step in (1, 2, 3, 4):
        _save(root, step, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]


def test_rotation_never_counts_corrupt_checkpoints(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    _save(root, 2)
    (root / "step_00000002" / "MANIFEST.json").unlink()  # corrupt: must not push step 1 out
    _save(root, 3, keep_last=2)
    assert {"step_00000001", "step_00000003"} <= {p.name for p in root.iterdir()}


def test_resave_same_step_replaces_it(tmp_path):
    _save(tmp_path, 5, payload=b"old")
    final = _save(tmp_path, 5, payload=b"new")
    assert (final / "deepspeed/state/mp_rank_00_model_states.pt").read_bytes().startswith(b"new")
    assert ckpt.is_complete(final)[0] and not list(tmp_path.glob(".tmp-*"))


def test_begin_removes_stale_tmp(tmp_path):
    tmp = ckpt.begin(tmp_path, 7)
    (tmp / "half.pt").write_bytes(b"123")
    assert list(ckpt.begin(tmp_path, 7).iterdir()) == []


def test_commit_rejects_bad_keep_last(tmp_path):
    tmp = ckpt.begin(tmp_path, 1)
    with pytest.raises(ValueError, match="keep_last must be >= 1 or None, got 0"):
        ckpt.commit(tmp_path, tmp, 1, keep_last=0)


@pytest.mark.parametrize("corruption,reason", [
    ("truncate", "has 50 bytes, manifest says"),
    ("no_manifest", "no MANIFEST.json"),
    ("missing_file", "missing file rng/rank_0.pt"),
    ("same_size_garbage", "mp_rank_00_model_states.pt is damaged"),
    ("bad_manifest", "unreadable MANIFEST.json"),
])
def test_corrupt_latest_falls_back_to_previous(tmp_path, corruption, reason):
    root = tmp_path / "checkpoints"
    prev = _save(root, 1)
    bad = _save(root, 2)
    target = bad / "deepspeed/state/mp_rank_00_model_states.pt"
    if corruption == "truncate":
        target.write_bytes(b"y" * 50)
    elif corruption == "no_manifest":
        (bad / "MANIFEST.json").unlink()
    elif corruption == "missing_file":
        (bad / "rng/rank_0.pt").unlink()
    elif corruption == "same_size_garbage":
        target.write_bytes(b"z" * target.stat().st_size)
    else:
        (bad / "MANIFEST.json").write_text("{not json")
    ok, why = ckpt.is_complete(bad)
    assert not ok and reason in why
    with pytest.warns(RuntimeWarning, match="step_00000002"):
        assert ckpt.find_latest(root) == prev


def test_find_latest_without_pointer_scans_and_skips_tmp(tmp_path):
    root = tmp_path / "checkpoints"
    _save(root, 1)
    second = _save(root, 2)
    (root / "latest").unlink()  # crash between the rename and the pointer update
    (root / ".tmp-step_00000003").mkdir()
    assert ckpt.find_latest(root) == second
    assert ckpt.find_latest(tmp_path / "nowhere") is None


def test_a_pointer_left_one_behind_does_not_hide_the_newer_checkpoint(tmp_path):
    """Killed after the rename, before `latest` was replaced: `latest` still names step 1 and its temp file is
    left; the resume takes step 2 (complete), and the next commit clears the stray pointer file."""
    root = tmp_path / "checkpoints"
    _save(root, 1)
    second = _save(root, 2)
    (root / "latest").write_text("step_00000001\n")
    (root / ".latest.tmp-12345").write_text("step_00000002\n")
    assert ckpt.find_latest(root) == second
    _save(root, 3, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000002", "step_00000003"]


def test_rotation_deletes_out_of_sight(tmp_path, monkeypatch):
    """A crash in the middle of deleting an old checkpoint leaves a `.tmp-*` dir (removed at the next commit),
    never a half checkpoint under its step name."""
    import shutil

    root = tmp_path / "checkpoints"
    for step in (1, 2):
        _save(root, step)
    deleted = []

    def crash_mid_delete(path, ignore_errors=False):
        deleted.append(Path(path).name)
        (Path(path) / "MANIFEST.json").unlink()  # part of it gone, then the process dies
        raise KeyboardInterrupt

    monkeypatch.setattr(shutil, "rmtree", crash_mid_delete)
    with pytest.raises(KeyboardInterrupt):
        _save(root, 3, keep_last=2)
    monkeypatch.undo()
    assert deleted == [".tmp-deleting-step_00000001"]
    assert {p.name for p in root.iterdir() if p.name.startswith("step_")} == {"step_00000002", "step_00000003"}
    _save(root, 4, keep_last=2)
    assert sorted(p.name for p in root.iterdir()) == ["latest", "step_00000003", "step_00000004"]


def test_find_latest_none_when_all_corrupt(tmp_path):
    first = _save(tmp_path, 1)
    (first / "MANIFEST.json").unlink()
    with pytest.warns(RuntimeWarning, match="no MANIFEST.json"):
        assert ckpt.find_latest(tmp_path) is None


# The child saves step 2 the way the learner does (begin, then slow, large writes) and would
# commit at the end; it prints "writing" once the temp dir has data, and is SIGKILLed mid-write.
_KILLED_CHILD = textwrap.dedent("""
    import os, sys, time
    sys.path.insert(0, {root!r})
    from trainer import checkpoint as ckpt
    tmp = ckpt.begin({ckpts!r}, 2)
    ds = ckpt.deepspeed_dir(tmp) / ckpt.DS_TAG
    ds.mkdir(parents=True)
    with open(ds / "zero_pp_rank_0_mp_rank_00_optim_states.pt", "wb") as f:
        for i in range(1000):
            f.write(os.urandom(1 << 20))
            f.flush()
            if i == 2:
                print("writing", flush=True)
            time.sleep(0.05)
    ckpt.commit({ckpts!r}, tmp, 2, keep_last=1)
""")


def test_sigkill_mid_save_keeps_previous_checkpoint(tmp_path):
    root = tmp_path / "checkpoints"
    prev = _save(root, 1, keep_last=1)
    child = subprocess.Popen([sys.executable, "-c", _KILLED_CHILD.format(root=str(ROOT), ckpts=str(root))],
                             stdout=subprocess.PIPE, text=True)
    try:
        assert child.stdout.readline().strip() == "writing"
        time.sleep(0.2)
        child.send_signal(signal.SIGKILL)
        assert child.wait(timeout=30) == -signal.SIGKILL
    finally:
        if child.poll() is None:
            child.kill()
    partial = root / ".tmp-step_00000002"
    assert partial.is_dir() and (partial / "deepspeed/state/zero_pp_rank_0_mp_rank_00_optim_states.pt").stat().st_size > 0
    assert (root / "latest").read_text().strip() == "step_00000001"
    assert ckpt.find_latest(root) == prev
    assert ckpt.load_trainer_state(prev)["step"] == 1
    ckpt.load_rng(prev, rank=0)
    # The next save of that step (a resumed run) starts clean and rotation drops the partial dir.
    assert list(ckpt.begin(root, 2).iterdir()) == []
    new = _save(root, 2, keep_last=1)
    assert sorted(p.name for p in root.iterdir()) == ["latest", new.name]


def _draws():
    return (random.random(), np.random.rand(), torch.rand(3).tolist(), torch.randint(0, 1000, (2,)).tolist())


def test_rng_capture_restore_reproduces_draws(tmp_path):
    random.seed(1), np.random.seed(2), torch.manual_seed(3)
    _draws()
    state = ckpt.capture_rng()
    expected = _draws()
    assert _draws() != expected  # the generators moved on
    ckpt.restore_rng(state)
    assert _draws() == expected
    ckpt.restore_rng(state)
    ckpt.save_rng(tmp_path, rank=3)
    _draws()
    ckpt.load_rng(tmp_path, rank=3)
    assert _draws() == expected
    with pytest.raises(FileNotFoundError, match="rank 4"):
        ckpt.load_rng(tmp_path, rank=4)


def test_trainer_state_rejects_tensors(tmp_path):
    state = {"step": 4, "data": {"epoch": 0, "index": 17}, "mixer": {"rng": [1, 2]}, "loss": float("nan")}
    ckpt.save_trainer_state(tmp_path, state)
    loaded = ckpt.load_trainer_state(tmp_path)
    assert loaded["data"] == {"epoch": 0, "index": 17} and np.isnan(loaded["loss"])
    with pytest.raises(TypeError, match=r"got a Tensor .*\.item\(\)"):
        ckpt.save_trainer_state(tmp_path, {"loss": torch.tensor(1.0)})
    assert ckpt.load_trainer_state(tmp_path)["step"] == 4  # the failed save left the old file


def test_save_student_files(tmp_path):
    from transformers import AutoConfig, AutoTokenizer, LlamaConfig

    config = LlamaConfig(vocab_size=75, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, eos_token_id=2, bos_token_id=1)
    tokenizer = AutoTokenizer.from_pretrained(ROOT / "launch/assets/tokenizer")
    out = ckpt.save_student_files(tmp_path, config, None, tokenizer)
    assert out == tmp_path / "student"
    assert {"config.json", "generation_config.json", "tokenizer.json"} <= {p.name for p in out.iterdir()}
    assert AutoConfig.from_pretrained(out).hidden_size == 32
    assert json.loads((out / "generation_config.json").read_text())["eos_token_id"] == 2


def test_resume_under_another_learner_layout_names_the_key(tmp_path):
    """ZeRO stage, rank count, bf16 and CPU offload shape the saved learner state: a resume that changes one is
    refused before anything starts, naming the key; other changes (more steps) resume."""
    from launch.config import ConfigError, load_config
    from trainer.loop import find_resume

    run = tmp_path / "run"
    tmp = ckpt.begin(run / "checkpoints", 4)
    ds = ckpt.deepspeed_dir(tmp) / ckpt.DS_TAG
    ds.mkdir(parents=True)
    (ds / "mp_rank_00_model_states.pt").write_bytes(b"x")
    written = load_config(None, ["trainer.zero_stage=3", "trainer.num_ranks=2"]).to_dict()
    ckpt.save_trainer_state(tmp, {"step": 4, "config": written})
    saved = ckpt.commit(run / "checkpoints", tmp, 4, keep_last=2)

    def resume(*overrides):
        return find_resume(load_config(None, ["checkpoint.resume=auto", *overrides]), run)

    assert resume("trainer.zero_stage=3", "trainer.num_ranks=2", "trainer.steps=500") == saved
    with pytest.raises(ConfigError, match=r"trainer.num_ranks=2 \(now 4\)"):
        resume("trainer.zero_stage=3", "trainer.num_ranks=4")
    with pytest.raises(ConfigError, match=r"trainer.zero_stage=3 \(now 1\).*minillm export"):
        resume("trainer.zero_stage=1", "trainer.num_ranks=2")
    with pytest.raises(ConfigError, match=r"trainer.cpu_offload=False \(now True\)"):
        resume("trainer.zero_stage=3", "trainer.num_ranks=2", "trainer.cpu_offload=true")

    # written before the learner's two AdamW groups (its config has no trainer.disable_dropout): refused at start,
    # not deep in DeepSpeed's optimizer load after every role started
    del written["trainer"]["disable_dropout"]
    tmp = ckpt.begin(run / "checkpoints", 5)
    (ckpt.deepspeed_dir(tmp) / ckpt.DS_TAG).mkdir(parents=True)
    (ckpt.deepspeed_dir(tmp) / ckpt.DS_TAG / "mp_rank_00_model_states.pt").write_bytes(b"x")
    ckpt.save_trainer_state(tmp, {"step": 5, "config": written})
    ckpt.commit(run / "checkpoints", tmp, 5, keep_last=2)
    with pytest.raises(ConfigError, match=r"earlier minillm whose optimizer held one parameter group"):
        resume("trainer.zero_stage=3", "trainer.num_ranks=2")


def test_resume_with_other_steps_data_or_settings(tmp_path, caplog):
    """A checkpoint past trainer.steps, or data of another size (its saved position would index another order), is
    refused before anything starts, naming the key; at ZeRO 0 too, another rank count (one RNG state per rank).
    Other changed settings resume, each named in a warning."""
    import logging

    from transformers import AutoTokenizer

    from launch.config import ConfigError, load_config, resolve_path
    from trainer.loop import find_resume, load_data

    run = tmp_path / "run"
    written = load_config(None)
    tok = AutoTokenizer.from_pretrained(resolve_path("builtin:tokenizer"))
    data = load_data(written, tok)
    tmp = ckpt.begin(run / "checkpoints", 4)
    data.train.next_indices(4 * written.rollout.prompts_per_step)
    ckpt.save_trainer_state(tmp, {"step": 4, "config": written.to_dict(), "data": data.train.state_dict(),
                                  "pretrain_data": None})
    from transformers import AutoConfig
    ckpt.save_student_files(tmp, AutoConfig.from_pretrained(resolve_path(written.model.student)))
    saved = ckpt.commit(run / "checkpoints", tmp, 4)

    def resume(*overrides):
        cfg = load_config(None, ["checkpoint.resume=auto", *overrides])
        return find_resume(cfg, run, load_data(cfg, tok))

    with pytest.raises(ConfigError, match=r"at step 4, past trainer.steps=3; set trainer.steps >= 4"):
        resume("trainer.steps=3")
    with pytest.raises(ConfigError, match=r"trainer.num_ranks=1 \(now 2\)"):
        resume("trainer.num_ranks=2")
    fewer = tmp_path / "fewer.jsonl"
    fewer.write_text("".join(line + "\n" for line in
                             Path(resolve_path(written.data.prompts)).read_text().splitlines()[:12]))
    with pytest.raises(ConfigError, match=rf"written for {data.train.n} prompts, data.prompts now gives 12"):
        resume(f"data.prompts={fewer}")
    with pytest.raises(ConfigError, match=r"its student differs from model.student='builtin:tiny-teacher' in "
                                          r"hidden_size .*resume with the run's model.student"):
        resume("model.student=builtin:tiny-teacher")
    with caplog.at_level(logging.WARNING, logger="minillm"):
        assert resume("trainer.steps=4", "objective.name=gkd", "trainer.lr=0.001") == saved
    assert "objective.name: 'minillm' -> 'gkd'" in caplog.text and f"trainer.lr: {written.trainer.lr!r} -> 0.001" in caplog.text
    assert "trainer.steps" not in caplog.text  # more (or as many) steps is what a resume is for
