"""Every shipped YAML in launch/configs loads and validates; bad YAML fails naming the key."""
from __future__ import annotations

from pathlib import Path

import pytest

from launch.config import CONFIG_DIR, ConfigError, load_config
from launch.placement import role_bundles

SHIPPED = sorted(p.stem for p in CONFIG_DIR.glob("*.yaml"))


def test_the_expected_configs_ship():
    assert {"cpu_tiny", "gkd_cpu", "single_gpu", "qwen2.5-7b_to_0.5b", "llama3-8b_to_1b"} <= set(SHIPPED)


@pytest.mark.parametrize("name", SHIPPED)
def test_shipped_config_loads(name):
    cfg = load_config(str(CONFIG_DIR / f"{name}.yaml"))
    assert cfg.output_dir
    if cfg.cluster.address is not None:
        # Ray refuses num_cpus when joining an existing cluster
        assert cfg.cluster.num_cpus is None


def test_single_gpu():
    cfg = load_config("single_gpu")
    assert (cfg.rollout.backend, cfg.rollout.sleep_mode, cfg.rollout.mix_alpha) == ("vllm", True, 0.2)
    assert 0.2 <= cfg.rollout.gpu_memory_utilization <= 0.4
    assert cfg.objective.name == "minillm"
    assert (cfg.trainer.device, cfg.trainer.bf16, cfg.model.dtype) == ("cuda", True, "bfloat16")
    assert cfg.trainer.num_ranks == 1 and 0 < cfg.trainer.num_gpus < 1
    assert cfg.teacher.backend == "ray" and 0 < cfg.teacher.num_gpus < 1
    assert cfg.cluster.address is None


def test_single_gpu_fits_one_gpu():
    gpus = sum(b.get("GPU", 0) for bundles in role_bundles(load_config("single_gpu")).values() for b in bundles)
    assert gpus <= 1.0


@pytest.mark.parametrize("name, gpus", [("qwen2.5-7b_to_0.5b", 8), ("llama3-8b_to_1b", 8)])
def test_multi_node(name, gpus):
    cfg = load_config(name)
    assert (cfg.cluster.address, cfg.cluster.spread_roles) == ("auto", True)
    assert (cfg.trainer.num_ranks, cfg.trainer.zero_stage) == (4, 3)
    assert (cfg.rollout.backend, cfg.rollout.num_workers, cfg.teacher.num_replicas) == ("vllm", 2, 2)
    # the header's GPU count is what the placement groups ask for
    assert sum(b.get("GPU", 0) for bundles in role_bundles(cfg).values() for b in bundles) == gpus
    assert f"on {gpus} GPUs" in (CONFIG_DIR / f"{name}.yaml").read_text().splitlines()[0]


def test_gkd_cpu():
    cfg = load_config("gkd_cpu")
    assert (cfg.objective.name, cfg.objective.lam, cfg.objective.beta) == ("gkd", 0.5, 0.5)
    assert cfg.trainer.device == "cpu" and cfg.rollout.backend == "hf"
    assert cfg.model.teacher.startswith("builtin:")


def _write(tmp_path: Path, text: str) -> str:
    p = tmp_path / "run.yaml"
    p.write_text(text)
    return str(p)


@pytest.mark.parametrize("text, key", [
    ("trainer:\n  stepz: 3\n", "trainer.stepz"),                 # unknown key, with a suggestion
    ("rolout:\n  backend: hf\n", "rolout"),                       # unknown section
    ("trainer:\n  steps: -1\n", "trainer.steps"),                 # out of range
    ("trainer:\n  steps: many\n", "trainer.steps"),               # wrong type
    ("rollout:\n  backend: sglang\n", "rollout.backend"),         # not a choice
    ("objective:\n  beta: 1.5\n", "objective.beta"),
    ("rollout:\n  mix_alpha: 0.2\nobjective:\n  name: gkd\n", "rollout.mix_alpha"),  # cross-section rule
])
def test_bad_yaml_names_the_key(tmp_path, text, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        load_config(_write(tmp_path, text))


def test_unknown_key_suggests_the_right_one(tmp_path):
    with pytest.raises(ConfigError, match=r"did you mean trainer\.steps\?"):
        load_config(_write(tmp_path, "trainer:\n  stepz: 3\n"))
