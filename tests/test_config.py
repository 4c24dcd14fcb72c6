"""Config validation: bad keys, types and values fail before any model loads, naming the key."""
import subprocess
import sys

import pytest

from launch.config import ConfigError, RunConfig, config_from_dict, load_config, resolve_path, ASSETS_DIR


def test_embedded_default_loads_and_points_at_shipped_assets():
    cfg = load_config()
    assert isinstance(cfg, RunConfig)
    assert cfg.objective.name == "minillm"
    for path in (cfg.model.teacher, cfg.model.student, cfg.data.prompts, cfg.data.eval_prompts):
        assert resolve_path(path).startswith(str(ASSETS_DIR))
    assert (ASSETS_DIR / "tiny-teacher" / "model.safetensors").exists()


def test_dotted_overrides_are_typed():
    cfg = load_config(None, ["trainer.lr=1e-5", "rollout.max_new_tokens=7", "objective.whiten=true", "cluster.address=auto"])
    assert cfg.trainer.lr == 1e-5 and isinstance(cfg.trainer.lr, float)
    assert cfg.rollout.max_new_tokens == 7
    assert cfg.objective.whiten is True
    assert cfg.cluster.address == "auto"


@pytest.mark.parametrize("override, needle", [
    ("trainer.lrr=1e-5", "trainer.lrr (did you mean trainer.lr?)"),
    ("trainr.lr=1e-5", "unknown config key trainr"),
    ("lmbda=0.5", "unknown config key lmbda (TRL's lmbda is objective.lam here)"),
    ("save_steps=10", "save_steps (TRL's save_steps is checkpoint.every here)"),
    ("lr=1e-5", "unknown config key lr (did you mean trainer.lr?)"),
    ("objective.top_k=5", "objective.top_k (TRL's top_k is rollout.top_k here)"),
    ("trainer.akl_mu=0.3", "trainer.akl_mu (did you mean objective.akl_mu?)"),
    ("trainer.lr=fast", "trainer.lr must be a number, got 'fast'"),
    ("trainer.lr=0", "trainer.lr must be in (0.0, inf], got 0.0"),
    ("trainer.zero_stage=4", "trainer.zero_stage must be one of 0, 1, 2, 3, got 4"),
    ("trainer.steps=2.5", "trainer.steps must be an integer, got 2.5"),
    ("objective.name=kl", "objective.name must be one of 'minillm', 'gkd'"),
    ("objective.beta=1.5", "objective.beta must be in [0.0, 1.0], got 1.5"),
    ("objective.whiten=maybe", "objective.whiten must be true or false, got 'maybe'"),
    ("rollout.backend=sglang", "rollout.backend must be one of 'hf', 'vllm', got 'sglang'"),
    ("rollout.mix_alpha=-0.1", "rollout.mix_alpha must be in [0.0, 1.0], got -0.1"),
    ("trainer.lr", "must look like section.key=value"),
    ("trainer.lr=nan", "trainer.lr must be a finite number, got nan"),
    ("trainer.warmup_ratio=1.5", "trainer.warmup_ratio must be in [0.0, 1.0], got 1.5"),
    ("objective.beta=.inf", "objective.beta must be a finite number, got inf"),
    ("trainer.num_gpus=-1", "trainer.num_gpus must be in [0.0, inf], got -1.0"),
    ("teacher.num_cpus=-2", "teacher.num_cpus must be in [0.0, inf], got -2.0"),
    ("rollout.num_cpus=-1", "rollout.num_cpus must be in [0.0, inf], got -1.0"),
    ("cluster.num_cpus=0", "cluster.num_cpus must be > 0, got 0"),
    ("teacher.url=localhost:8000", "teacher.url must start with http:// or https://, got 'localhost:8000'"),
    ("trainer.steps=[1", "override 'trainer.steps=[1': the value is not valid YAML"),
    ("objective.ppo_epochs=0", "objective.ppo_epochs must be > 0, got 0"),
])
def test_bad_values_name_the_key(override, needle):
    with pytest.raises(ConfigError) as e:
        load_config(None, [override])
    assert needle in str(e.value)


def test_text_keys_take_what_yaml_reads_as_dates_or_numbers():
    cfg = load_config(None, ["logging.wandb_run_name=2024-01-01", "data.prompt_key=1", "output_dir=123"])
    assert (cfg.logging.wandb_run_name, cfg.data.prompt_key, cfg.output_dir) == ("2024-01-01", "1", "123")


def test_config_files_that_are_not_yaml_or_not_valid(tmp_path, monkeypatch):
    (tmp_path / "notes.txt").write_text("trainer: {}")
    with pytest.raises(ConfigError, match="is not a YAML file"):
        load_config(str(tmp_path / "notes.txt"))
    (tmp_path / "dir.yaml").mkdir()
    with pytest.raises(ConfigError, match="is not a YAML file"):
        load_config(str(tmp_path / "dir.yaml"))
    monkeypatch.chdir(tmp_path)
    (tmp_path / "gkd_cpu").mkdir()  # a folder named like a shipped config does not hide it
    assert load_config("gkd_cpu").objective.name == "gkd"
    (tmp_path / "bad.yaml").write_text("trainer: {steps: [1}")
    with pytest.raises(ConfigError, match="bad.yaml is not valid YAML"):
        load_config(str(tmp_path / "bad.yaml"))



def test_cross_field_rules():
    with pytest.raises(ConfigError, match="rollout.backend=vllm needs a GPU"):
        load_config(None, ["rollout.backend=vllm"])
    with pytest.raises(ConfigError, match="needs data.pretrain"):
        load_config(None, ["objective.pt_weight=0.5"])
    with pytest.raises(ConfigError, match="teacher.url is required"):
        load_config(None, ["teacher.backend=http", "teacher.return_full=false"])
    with pytest.raises(ConfigError, match="mix_alpha .* is for objective.name=minillm"):
        load_config(None, ["objective.name=gkd", "rollout.mix_alpha=0.2"])
    for sampler in ("rollout.temperature=0.7", "rollout.top_p=0.9", "rollout.top_k=50"):
        with pytest.raises(ConfigError, match="minillm samples from the student itself"):
            load_config(None, [sampler])
        load_config(None, ["objective.name=gkd", sampler])  # a divergence objective takes any sampler
    with pytest.raises(ConfigError, match="leave objective.temperature=1.0 for objective.name=minillm"):
        load_config(None, ["objective.temperature=2"])
    with pytest.raises(ConfigError, match="prompt_logprobs come from raw logits"):
        load_config(None, ["objective.name=gkd", "objective.temperature=2", "teacher.backend=vllm_server",
                           "teacher.url=http://x", "teacher.return_full=false", "teacher.topk=20"])
    load_config(None, ["objective.name=gkd", "objective.temperature=2", "teacher.backend=http", "teacher.url=http://x",
                       "teacher.return_full=false", "teacher.topk=20"])  # a scorer of ours tempers its top-k
    with pytest.raises(ConfigError, match="data.pretrain_max_len must be >= 2"):
        load_config(None, ["data.pretrain_max_len=1"])
    with pytest.raises(ConfigError, match="pt_kd_ratio=0.5 mixes KD into the pretraining term, which is off"):
        load_config(None, ["objective.pt_kd_ratio=0.5"])
    with pytest.raises(ConfigError, match=r"objective.pt_kd_ratio must be in \[0.0, 1.0\]"):
        load_config(None, ["objective.pt_kd_ratio=1.5"])
    # a loss that reads the teacher's distribution with a teacher asked for the sampled token only
    only_token = ["teacher.return_full=false", "teacher.topk=0"]
    for what, extra in [("objective.name=gkd", ["objective.name=gkd"]),
                        ("objective.single_step=true", []),
                        ("objective.pt_kd_ratio > 0", ["objective.single_step=false", "objective.pt_weight=1",
                                                       "data.pretrain=builtin:corpus/pretrain.jsonl",
                                                       "objective.pt_kd_ratio=0.5"])]:
        with pytest.raises(ConfigError, match=f"{what} needs the teacher's distribution"):
            load_config(None, only_token + extra)
    load_config(None, only_token + ["objective.single_step=false"])  # MiniLLM's policy gradient alone: token log-probs
    with pytest.raises(ConfigError, match="sleep_mode is a vLLM feature"):
        load_config(None, ["rollout.sleep_mode=true"])
    with pytest.raises(ConfigError, match="weight_sync=cuda_ipc is for vLLM workers"):
        load_config(None, ["rollout.weight_sync=cuda_ipc"])


def test_weight_sync_auto_picks_the_path_of_the_setup():
    from trainer.sync import resolve_sync_path as sync_path

    assert sync_path(load_config(None, [])) == "object_store"  # CPU
    assert sync_path(load_config(None, ["rollout.weight_sync=broadcast"])) == "broadcast"
    assert sync_path(load_config("single_gpu", [])) == "cuda_ipc"  # one learner rank + vLLM sharing one GPU
    multi = load_config("qwen2.5-7b_to_0.5b", [])
    assert sync_path(multi) == "broadcast"
    assert sync_path(load_config("single_gpu", ["rollout.backend=hf", "rollout.sleep_mode=false"])) == "object_store"


def test_two_vllm_engines_must_fit_one_gpu():
    base = ["rollout.backend=vllm", "trainer.device=cuda", "rollout.mix_alpha=0.2"]
    with pytest.raises(ConfigError, match=r"rollout.gpu_memory_utilization \(0.7\) \+ rollout.teacher_gpu_memory_utilization \(0.35\) > 1"):
        load_config(None, base + ["rollout.gpu_memory_utilization=0.7"])
    load_config(None, base + ["rollout.gpu_memory_utilization=0.6"])  # 0.6 + 0.35 fits
    load_config(None, ["rollout.backend=vllm", "trainer.device=cuda", "rollout.gpu_memory_utilization=0.9"])  # no teacher engine
    with pytest.warns(UserWarning, match="the vLLM engines take 75% of a GPU they share with other roles"):
        load_config(None, base + ["rollout.gpu_memory_utilization=0.4", "rollout.teacher_gpu_memory_utilization=0.35",
                                  "rollout.num_gpus=0.5"])


def test_weight_sync_fits_the_gpus_ray_assigned():
    from trainer.sync import fit_to_gpus

    # auto: every worker on the learner's GPU → IPC; all on GPUs of their own → NCCL; any GPU shared → object store
    assert fit_to_gpus("cuda_ipc", True, "g0", ["g0", "g0"]) == "cuda_ipc"
    assert fit_to_gpus("cuda_ipc", True, "g0", ["g1", "g2"]) == "broadcast"
    assert fit_to_gpus("cuda_ipc", True, "g0", ["g0", "g1"]) == "object_store"
    assert fit_to_gpus("broadcast", True, "g0", ["g1", "g1"]) == "object_store"
    assert fit_to_gpus("broadcast", False, "g0", ["g1", "g2"]) == "broadcast"
    with pytest.raises(RuntimeError, match="cuda_ipc needs every rollout worker on learner rank 0's GPU"):
        fit_to_gpus("cuda_ipc", False, "g0", ["g0", "g1"])
    with pytest.raises(RuntimeError, match="one rank per GPU"):
        fit_to_gpus("broadcast", False, "g0", ["g0"])
    with pytest.raises(RuntimeError, match="one rank per GPU"):
        fit_to_gpus("broadcast", False, "g0", ["g1", "g1"])


def test_unknown_section_and_non_mapping():
    with pytest.raises(ConfigError, match="unknown config key 'nope'|unknown config key nope"):
        config_from_dict({"nope": {}})
    with pytest.raises(ConfigError, match="trainer must be a mapping"):
        config_from_dict({"trainer": 3})


def test_missing_config_file_lists_shipped_configs():
    with pytest.raises(ConfigError, match="cpu_tiny"):
        load_config("no_such_config")


def test_cli_rejects_bad_key_before_loading_anything(tmp_path):
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "launch.cli", "train", "trainer.lrr=1", f"output_dir={out}"],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "unknown config key trainer.lrr" in proc.stderr
    assert not out.exists()  # nothing half-written


def test_every_unknown_key_is_reported_at_once():
    with pytest.raises(ConfigError) as e:
        load_config(None, ["lmbda=0.5", "trainer.lrr=1", "objective.bta=0.3"])
    msg = str(e.value)
    assert msg.startswith("3 unknown config keys: ")
    for needle in ("lmbda (TRL's lmbda is objective.lam here)", "trainer.lrr (did you mean trainer.lr?)",
                   "objective.bta (did you mean objective.beta?)"):
        assert needle in msg


def test_trl_names_point_at_real_keys():
    import dataclasses
    from launch.config import TRL_NAMES, RunConfig
    cfg = dataclasses.asdict(RunConfig())
    for trl, ours in TRL_NAMES.items():
        for target in (t for t in ours.replace("+", " ").split() if "." in t and not t.startswith("(")):
            section, _, key = target.partition("=")[0].partition(".")
            assert key in cfg[section], (trl, target)


def test_a_hub_id_resolves_to_its_local_cache_snapshot_and_a_missing_one_says_how_to_get_it(tmp_path, monkeypatch):
    """The layout `hf download` writes: models--ORG--NAME/refs/main names the snapshot folder."""
    import shutil

    from huggingface_hub import constants

    from launch.config import ASSETS_DIR, resolve_path
    from trainer.roles import check_paths

    cache = tmp_path / "hub"
    snap = cache / "models--acme--tiny-student" / "snapshots" / "0123abcd"
    shutil.copytree(ASSETS_DIR / "tiny-student", snap)
    (cache / "models--acme--tiny-student" / "refs").mkdir()
    (cache / "models--acme--tiny-student" / "refs" / "main").write_text("0123abcd")
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(cache))
    monkeypatch.chdir(tmp_path)  # no local folder named acme/...

    assert resolve_path("acme/tiny-student") == str(snap)
    assert resolve_path("acme/absent") == "acme/absent"  # not cached: unchanged, and check_paths says what to do
    check_paths(load_config(None, ["model.student=acme/tiny-student"]))
    with pytest.raises(FileNotFoundError, match=r"not in the local Hugging Face cache .* `hf download acme/absent"):
        check_paths(load_config(None, ["model.student=acme/absent"]))
    (tmp_path / "acme" / "tiny-student").mkdir(parents=True)  # a local folder of that name wins over the cache
    assert resolve_path("acme/tiny-student") == "acme/tiny-student"


@pytest.mark.parametrize("text, needle", [
    ("trainer.lr: 0.001\n", "unknown config key trainer.lr (in a YAML file sections nest: trainer: then the key"),
    ("foo.bar: 1\n", "unknown config key foo.bar; valid keys: output_dir, model"),
    ("trainer:\n  foo.bar: 1\n", "unknown config key trainer.foo.bar; valid keys in trainer: steps, lr"),
])
def test_dotted_keys_in_a_yaml_file_are_named(tmp_path, text, needle):
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as e:
        load_config(str(path))
    assert needle in str(e.value)


def test_warmup_is_given_once():
    with pytest.raises(ConfigError, match="trainer.warmup_steps=3 and trainer.warmup_ratio=0.1 both set the warm-up"):
        load_config(None, ["trainer.warmup_steps=3", "trainer.warmup_ratio=0.1"])
    assert load_config(None, ["trainer.warmup_steps=0", "trainer.warmup_ratio=0.1", "trainer.steps=11"]).trainer.warmup_updates(2) == 3  # ceil(2.2)
