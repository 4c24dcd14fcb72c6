"""DeepSpeed round trip: real single-process engines (ZeRO 0-3, tied and untied embeddings) on CPU
save into the checkpoint layout; `export_checkpoint` must give back exactly the engine's weights.

The engines run in one child process (this file run as a script), not in pytest's process:
`deepspeed.init_distributed` sets a process-wide gloo group that would leak into other tests. The
child writes, per case, a committed checkpoint plus the reference the export is compared to: the
engine's unsharded weights (gathered with `GatheredParameters` under ZeRO-3) and its logits on a
fixed input. The first DeepSpeed init on a machine builds its CPU shm op (~95 s, cached after).
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
TOKENIZER = ROOT / "launch" / "assets" / "tokenizer"
CASES = [(stage, tied) for stage in (0, 1, 2, 3) for tied in (False, True)]
INPUT_IDS = [[1, 5, 9, 14, 3, 22, 40, 7, 11, 2]]


def _case_name(stage: int, tied: bool) -> str:
    return f"zero{stage}_{'tied' if tied else 'untied'}"


def _child(out_root: str) -> None:
    """Runs in the subprocess: one engine per case, two optimizer steps, then a checkpoint."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK="0", WORLD_SIZE="1", LOCAL_RANK="0")
    import deepspeed
    import transformers

    sys.path.insert(0, str(ROOT))
    from trainer import checkpoint as ckpt

    deepspeed.init_distributed(dist_backend="gloo", auto_mpi_discovery=False, verbose=False)
    tokenizer = transformers.AutoTokenizer.from_pretrained(TOKENIZER)
    for stage, tied in CASES:
        torch.manual_seed(stage)
        config = transformers.LlamaConfig(
            vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
            num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=64,
            tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2, pad_token_id=0)
        model = transformers.AutoModelForCausalLM.from_config(config)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)  # a client optimizer: no JIT op build
        ds_config = {"train_micro_batch_size_per_gpu": 1, "zero_optimization": {"stage": stage},
                     "steps_per_print": 10**9}
        engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        for _ in range(2):  # move the weights away from their init, so the export can't pass by accident
            ids = torch.randint(0, config.vocab_size, (1, 12))
            engine.backward(engine(input_ids=ids, labels=ids).loss)
            engine.step()

        ckpts = Path(out_root) / _case_name(stage, tied) / "checkpoints"
        tmp = ckpt.begin(ckpts, step=2)
        engine.save_checkpoint(str(ckpt.deepspeed_dir(tmp)), tag=ckpt.DS_TAG)
        ckpt.save_rng(tmp, rank=0)
        ckpt.save_trainer_state(tmp, {"step": 2, "config": {
            "model": {"student": "HuggingFaceTB/SmolLM2-135M", "student_init": "pretrained",
                      "teacher": "builtin:tiny-teacher"},
            "objective": {"name": "minillm", "clip_eps": 0.2},
            "trainer": {"lr": 1e-2, "zero_stage": stage}},
            "metrics": [{"step": 1, "loss/total": 4.5}, {"step": 2, "loss/total": 4.25}]})
        ckpt.save_student_files(tmp, config, None, tokenizer)
        ckpt.commit(ckpts, tmp, step=2, keep_last=2)

        engine.eval()
        params = [p for _, p in engine.module.named_parameters()]
        with deepspeed.zero.GatheredParameters(params, enabled=stage == 3), torch.no_grad():
            ref = {n: t.detach().clone() for n, t in engine.module.state_dict().items()}
            logits = engine.module(input_ids=torch.tensor(INPUT_IDS)).logits
        torch.save({"state_dict": ref, "logits": logits}, ckpts.parent / "reference.pt")
        engine.destroy()


@pytest.fixture(scope="module")
def ds_runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("ds")
    proc = subprocess.run([sys.executable, __file__, str(root)], capture_output=True, text=True,
                          timeout=600, cwd=ROOT)
    if proc.returncode != 0:
        pytest.fail(f"DeepSpeed child failed ({proc.returncode}):\n{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
    return root


@pytest.mark.parametrize("stage,tied", CASES, ids=[_case_name(s, t) for s, t in CASES])
def test_export_matches_engine_weights_and_logits(ds_runs, tmp_path, stage, tied):
    from transformers import AutoModelForCausalLM

    from trainer.export import consolidated_state_dict, export_checkpoint

    run = ds_runs / _case_name(stage, tied)
    reference = torch.load(run / "reference.pt")
    # The run dir (not the checkpoint) is passed: export must follow checkpoints/latest.
    out = export_checkpoint(run, tmp_path / "export")

    assert {p.name for p in out.iterdir()} >= {"model.safetensors", "config.json", "generation_config.json",
                                              "tokenizer.json", "tokenizer_config.json", "README.md"}
    sd = consolidated_state_dict(run / "checkpoints" / "step_00000002")
    assert not any(k.startswith("module.") for k in sd)
    assert all(v.dtype == torch.float32 for v in sd.values())

    model, info = AutoModelForCausalLM.from_pretrained(out, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"], info
    loaded = model.state_dict()
    assert loaded.keys() == reference["state_dict"].keys()
    for name, ref in reference["state_dict"].items():
        torch.testing.assert_close(loaded[name], ref, rtol=0, atol=0, msg=name)
    if tied:
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = model.eval()(input_ids=torch.tensor(INPUT_IDS)).logits
    torch.testing.assert_close(logits, reference["logits"], rtol=0, atol=0)

    card = (out / "README.md").read_text()
    assert card.startswith("---\nlibrary_name: transformers\ntags:\n- distillation\n- minillm\n")
    assert "base_model: HuggingFaceTB/SmolLM2-135M" in card and "4.25" in card


def test_export_refuses_non_empty_dir_and_overwrites_on_request(ds_runs, tmp_path):
    from transformers import AutoModelForCausalLM

    from trainer.export import export_checkpoint

    run = ds_runs / _case_name(2, False)
    out = tmp_path / "export"
    out.mkdir()
    (out / "keep.txt").write_text("user data")
    with pytest.raises(FileExistsError, match="not empty"):
        export_checkpoint(run, out)
    assert [p.name for p in out.iterdir()] == ["keep.txt"]
    assert [p.name for p in tmp_path.iterdir()] == ["export"]  # no temp sibling left behind

    export_checkpoint(run, out, overwrite=True)
    assert not (out / "keep.txt").exists()
    assert AutoModelForCausalLM.from_pretrained(out) is not None
    assert [p.name for p in tmp_path.iterdir()] == ["export"]


def test_export_dtype_bfloat16(ds_runs, tmp_path):
    from safetensors import safe_open

    from trainer.export import export_checkpoint

    out = export_checkpoint(ds_runs / _case_name(0, True), tmp_path / "bf16", dtype="bfloat16")
    with safe_open(out / "model.safetensors", "pt") as f:
        assert {f.get_tensor(k).dtype for k in f.keys()} == {torch.bfloat16}


if __name__ == "__main__":
    _child(sys.argv[1])
