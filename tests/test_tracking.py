"""Weights & Biases logging: config checks, a clear early error without a login, and an offline run whose
records (read back from W&B's own file with an independent reader) equal metrics.jsonl, across a resume."""
import json
import struct
from pathlib import Path

import pytest
import ray

from launch.config import ConfigError, load_config
from trainer.loop import Hooks, train

FAST = ["rollout.prompts_per_step=8", "rollout.max_new_tokens=8", "data.num_eval_prompts=4",
        "rollout.num_cpus=1", "teacher.num_cpus=1", "trainer.num_cpus=1"]


def wandb_records(path: Path):
    """Records of an offline run's `.wandb` file: a 7-byte W&B header, then LevelDB log blocks of 32 KiB
    (each record: crc32, length (2 bytes), type (1 = full, 2 = first, 3 = middle, 4 = last)) holding
    wandb's protobuf `Record`s."""
    from wandb.proto import wandb_internal_pb2 as pb

    data = path.read_bytes()
    assert data[:4] == b":W&B", data[:7]
    pos, buf = 7, b""
    while pos + 7 <= len(data):
        left = 32768 - pos % 32768
        if left < 7:  # a block's tail too short for a header is padding
            pos += left
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if length == 0 and kind == 0:
            break
        buf += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(buf)
            buf = b""
            yield record


def read_offline_run(run_dir: Path) -> dict:
    """{"id", "config", "history": [row per log call], "summary": {key: last value}} of one offline run."""
    (path,) = run_dir.glob("run-*.wandb")
    out = {"history": [], "summary": {}}
    for r in wandb_records(path):
        kind = r.WhichOneof("record_type")
        if kind == "run":
            out["id"] = r.run.run_id
            out["config"] = {u.key: json.loads(u.value_json) for u in r.run.config.update}
        elif kind == "history":
            out["history"].append({i.key or "/".join(i.nested_key): json.loads(i.value_json) for i in r.history.item})
        elif kind == "summary":
            out["summary"].update({u.key or "/".join(u.nested_key): json.loads(u.value_json) for u in r.summary.update})
    return out


def test_wandb_section_is_checked():
    with pytest.raises(ConfigError, match="logging.wandb_mode must be one of 'online', 'offline'"):
        load_config(None, ["logging.wandb_mode=cloud"])
    with pytest.raises(ConfigError, match="unknown config key logging.wandb_projcet"):
        load_config(None, ["logging.wandb_projcet=x"])


def test_wandb_project_without_wandb_installed_names_the_extra(monkeypatch):
    import importlib.util

    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a))
    with pytest.raises(ConfigError, match=r'pip install -e "\.\[wandb\]"'):
        load_config(None, ["logging.wandb_project=p"])


def _no_wandb_login(monkeypatch, tmp_path):
    """No API key anywhere wandb looks (env, ~/.netrc, its settings folder)."""
    for var in ("WANDB_API_KEY", "WANDB_MODE", "WANDB_DIR", "NETRC"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    monkeypatch.setenv("WANDB_CONFIG_DIR", str(tmp_path / "home" / ".config" / "wandb"))


def test_online_wandb_without_login_fails_before_any_actor_and_leaves_no_run_folder(monkeypatch, tmp_path):
    _no_wandb_login(monkeypatch, tmp_path)
    out = tmp_path / "run"
    cfg = load_config(None, FAST + [f"output_dir={out}", "logging.wandb_project=p"])
    with pytest.raises(ConfigError, match="wandb login.*WANDB_API_KEY.*logging.wandb_mode=offline"):
        train(cfg, Hooks(progress=False))
    assert not out.exists()
    assert not ray.is_initialized()  # failed before the cluster started
    from launch.cli import main  # through the CLI: one line, exit 2
    assert main(["train", f"output_dir={out}", "logging.wandb_project=p", *FAST]) == 2


@pytest.mark.slow
def test_offline_wandb_run_holds_the_metrics_and_continues_after_resume(tmp_path):
    out = tmp_path / "run"
    overrides = FAST + ["trainer.steps=3", "checkpoint.every=2", f"output_dir={out}", "logging.wandb_project=distill",
                        "logging.wandb_mode=offline", "trainer.lr=3e-4"]
    ray.init(num_cpus=6, include_dashboard=False)
    try:
        first = train(load_config(None, overrides), Hooks(progress=False, stop_after=2))
        assert first == {"stopped_at": 2}
        train(load_config(None, overrides + ["checkpoint.resume=auto"]), Hooks(progress=False))
    finally:
        ray.shutdown()

    run_id = (out / "wandb_run_id").read_text().strip()
    run_dirs = sorted((out / "wandb").glob("offline-run-*"))
    assert len(run_dirs) == 2 and all(d.name.endswith(f"-{run_id}") for d in run_dirs)  # one W&B run, two starts
    started, resumed = (read_offline_run(d) for d in run_dirs)
    assert started["id"] == resumed["id"] == run_id
    assert started["config"]["trainer"]["lr"] == 3e-4 and started["config"]["logging"]["wandb_mode"] == "offline"

    metrics = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    logged = started["history"] + resumed["history"]
    assert [row["step"] for row in logged] == [m["step"] for m in metrics] == [1, 2, 3]
    for row, m in zip(logged, metrics):
        numeric = {k: v for k, v in m.items() if isinstance(v, (int, float))}
        assert {k: row[k] for k in numeric} == numeric
        assert "rollout/source" not in row  # strings stay in metrics.jsonl only

    summary = json.loads((out / "summary.json").read_text())
    assert resumed["summary"]["eval_after/reverse_kl"] == summary["eval_after"]["reverse_kl"]
    assert resumed["summary"]["eval_before/reverse_kl"] == summary["eval_before"]["reverse_kl"]
    assert resumed["summary"]["model_dir"] == str(out / "final")
