"""Export without DeepSpeed: checkpoint resolution, model card, export_main, failure atomicity.

The checkpoints here are hand-built in ZeRO-0's on-disk shape (`mp_rank_00_model_states.pt`
holding {"module": state_dict}); real engines are in test_export_deepspeed.py.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig

from trainer import checkpoint as ckpt
from trainer import model_card
from trainer.export import consolidated_state_dict, export_checkpoint, export_main, resolve_checkpoint

ROOT = Path(__file__).resolve().parents[1]

STATE = {
    "step": 7,
    "config": {
        "model": {"student": "builtin:tiny-student", "student_init": "from_config", "teacher": "builtin:tiny-teacher"},
        "objective": {"name": "gkd", "lam": 0.5, "beta": 0.5, "temperature": 1.0},
        "rollout": {"max_new_tokens": 32, "mix_alpha": 0.0},
        "trainer": {"steps": 7, "lr": 1e-5, "zero_stage": 0, "bf16": False},
    },
    "metrics": [{"step": 6, "loss/total": 0.5}, {"step": 7, "loss/total": 0.25, "eval/reverse_kl": 0.125}],
}


def _tiny(tied: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(vocab_size=75, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                         num_attention_heads=2, num_key_value_heads=2, tie_word_embeddings=tied)
    return AutoModelForCausalLM.from_config(config)


def _checkpoint(root: Path, step: int, model, module_prefix: str = "", state=STATE, config=None) -> Path:
    tmp = ckpt.begin(root, step)
    ds = ckpt.deepspeed_dir(tmp) / ckpt.DS_TAG
    ds.mkdir(parents=True)
    sd = {module_prefix + k: v for k, v in model.state_dict().items()}
    torch.save({"module": sd}, ds / "mp_rank_00_model_states.pt")
    ckpt.save_trainer_state(tmp, state)
    ckpt.save_student_files(tmp, config or model.config, None, AutoTokenizer.from_pretrained(ROOT / "launch/assets/tokenizer"))
    return ckpt.commit(root, tmp, step, keep_last=3)


@pytest.mark.parametrize("tied", [False, True])
def test_stage0_layout_exports_exact_weights(tmp_path, tied):
    model = _tiny(tied)
    c = _checkpoint(tmp_path / "checkpoints", 7, model, module_prefix="module.")
    sd = consolidated_state_dict(c)
    assert set(sd) == set(model.state_dict())  # "module." stripped
    out = export_checkpoint(c, tmp_path / "out")
    loaded, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"]
    for k, v in model.state_dict().items():
        torch.testing.assert_close(loaded.state_dict()[k], v, rtol=0, atol=0)


def test_resolve_checkpoint_accepts_run_checkpoints_and_step_dirs(tmp_path):
    model = _tiny(False)
    first = _checkpoint(tmp_path / "checkpoints", 1, model)
    second = _checkpoint(tmp_path / "checkpoints", 2, model)
    assert resolve_checkpoint(tmp_path) == second
    assert resolve_checkpoint(tmp_path / "checkpoints") == second
    assert resolve_checkpoint(first) == first
    (second / "trainer_state.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match="incomplete or corrupt: .*trainer_state.json"):
        resolve_checkpoint(second)
    with pytest.warns(RuntimeWarning, match="step_00000002"):
        assert resolve_checkpoint(tmp_path) == first
    with pytest.raises(FileNotFoundError, match="does not exist"):
        resolve_checkpoint(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(FileNotFoundError, match="neither a checkpoint"):
        resolve_checkpoint(tmp_path / "empty")


def test_failed_export_leaves_nothing(tmp_path):
    model = _tiny(False)
    config = LlamaConfig.from_dict(model.config.to_dict())
    config.hidden_size = 48  # the weights do not fit the config: the strict load fails
    c = _checkpoint(tmp_path / "checkpoints", 1, model, config=config)
    with pytest.raises(RuntimeError, match="size mismatch"):
        export_checkpoint(c, tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoints"]


def test_export_never_replaces_the_checkpoint_it_reads(tmp_path):
    """`minillm export RUN --out RUN --overwrite` would have swapped the whole run (checkpoints included) for the
    export; an export into the checkpoint is refused too. Both leave every file in place."""
    model = _tiny(False)
    c = _checkpoint(tmp_path / "run" / "checkpoints", 1, model)
    before = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*"))
    for target, how in [(tmp_path / "run", "contains"), (tmp_path / "run" / "checkpoints", "contains"),
                        (c, "contains"), (c / "export", "is inside")]:
        with pytest.raises(FileExistsError, match=f"export target .* {how} the checkpoint being exported"):
            export_checkpoint(tmp_path / "run", target, overwrite=True)
    assert sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*")) == before
    assert ckpt.is_complete(c) == (True, "ok")
    export_checkpoint(tmp_path / "run", tmp_path / "run" / "final")  # beside the checkpoints: fine


def test_model_card_content():
    card = model_card.render(STATE, model_name="tiny-gkd")
    front, body = card.split("---\n")[1], card.split("---\n", 2)[2]
    assert front == "library_name: transformers\ntags:\n- distillation\n- minillm\n- gkd\n"
    assert "base_model" not in card  # builtin: and from_config students are not Hub models
    assert "# tiny-gkd" in body and "`builtin:tiny-teacher`" in body and "GKD" in body
    assert "| `objective.lam` | 0.5 |" in body and "| `trainer.lr` | 1e-05 |" in body
    assert "| `loss/total` | 0.25 |" in body and "| `eval/reverse_kl` | 0.125 |" in body
    assert "**Training steps completed:** 7" in body


def test_model_card_lists_only_the_objectives_settings():
    full = {"objective": {"name": None, "lam": 0.5, "seq_kd": True, "beta": 0.3, "skew_alpha": 0.1, "akl_mu": 0.5,
                          "temperature": 0.9, "clip_eps": 0.2, "ppo_epochs": 2, "pt_weight": 0.0},
            "rollout": {"mix_alpha": 0.2}}
    expected = {  # from ObjectiveConfig's docstring: which keys each objective reads
        "minillm": {"clip_eps", "ppo_epochs", "pt_weight", "mix_alpha"},
        "gkd": {"lam", "seq_kd", "beta", "temperature", "ppo_epochs", "pt_weight"},
        "skew_kl": {"lam", "seq_kd", "skew_alpha", "temperature", "ppo_epochs", "pt_weight"},
        "akl": {"lam", "seq_kd", "akl_mu", "temperature", "ppo_epochs", "pt_weight"},
    }
    for name, keys in expected.items():
        cfg = {"objective": {**full["objective"], "name": name}, "rollout": full["rollout"]}
        card = model_card.render({"config": cfg})
        shown = {line.split("`")[1].split(".")[1] for line in card.splitlines() if line.startswith("| `")}
        assert shown == keys | {"name"}, name


@pytest.mark.parametrize("name,expected", [
    ("Qwen/Qwen2.5-0.5B", "Qwen/Qwen2.5-0.5B"), ("gpt2", "gpt2"), ("builtin:tiny-student", None),
    ("/models/qwen", None), ("./student", None), ("~/student", None), ("a/b/c", None), (None, None),
])
def test_hub_id(name, expected):
    assert model_card.hub_id(name) == expected


def test_model_card_base_model_and_empty_state():
    state = {"config": {"model": {"student": "Qwen/Qwen2.5-0.5B", "student_init": "pretrained"}}}
    assert "base_model: Qwen/Qwen2.5-0.5B\n---" in model_card.render(state)
    assert model_card.render({}).startswith("---\nlibrary_name: transformers\n")


def test_export_main_with_dry_run_push(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("HF_TOKEN", raising=False)
    _checkpoint(tmp_path / "run" / "checkpoints", 3, _tiny(True))
    out = tmp_path / "final"
    export_main(str(tmp_path / "run"), str(out), overwrite=False, push_to_hub="me/tiny",
                private=True, dry_run=True)
    text = capsys.readouterr().out
    assert f"-> {out}" in text and "[dry run] would upload" in text and "model.safetensors" in text
    assert (out / "model.safetensors").is_file()
    with pytest.raises(FileExistsError, match="--overwrite"):
        export_main(str(tmp_path / "run"), str(out))
    export_main(str(tmp_path / "run"), str(out), overwrite=True)


def test_export_main_dry_run_without_push_writes_nothing(tmp_path, capsys):
    _checkpoint(tmp_path / "run" / "checkpoints", 3, _tiny(False))
    export_main(str(tmp_path / "run"), str(tmp_path / "final"), dry_run=True)
    assert "[dry run] would export" in capsys.readouterr().out
    assert not (tmp_path / "final").exists()


def test_export_main_checks_the_push_before_exporting(tmp_path, monkeypatch):
    """A bad repo id or a missing login is found before the export is written, not after."""
    from launch.config import ConfigError

    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.delenv("HUGGING_FACE_HUB_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))  # no stored login
    _checkpoint(tmp_path / "run" / "checkpoints", 3, _tiny(True))
    out = tmp_path / "final"
    with pytest.raises(ConfigError, match="'bad name//x' is not a Hub repo id"):
        export_main(str(tmp_path / "run"), str(out), push_to_hub="bad name//x", dry_run=True)
    with pytest.raises(PermissionError, match="hf auth login"):
        export_main(str(tmp_path / "run"), str(out), push_to_hub="me/tiny")
    assert not out.exists()
