"""Checkpoint → Hugging Face model folder → (optionally) the Hub.

`export_checkpoint` reads a checkpoint in the layout of `trainer/checkpoint.py`, consolidates the
DeepSpeed weights into one fp32 state dict (any ZeRO stage, any number of ranks), and writes a
folder that `AutoModelForCausalLM.from_pretrained` loads: model.safetensors, config.json,
generation_config.json, tokenizer files and a README.md model card. `push_to_hub` uploads such a
folder. `export_main` is what `minillm export` calls.

Nothing here needs the training processes: it reads files only, on CPU.
"""
from __future__ import annotations

import contextlib
import io
import os
import shutil
import uuid
from pathlib import Path
from typing import Optional

import torch

from launch.config import ConfigError
from trainer import checkpoint as ckpt
from trainer import model_card

# ---- locating a checkpoint -------------------------------------------------------------------


def resolve_checkpoint(path: str | os.PathLike, verify_data: bool = True) -> Path:
    """A complete checkpoint dir from any of: a checkpoint dir (`.../step_00000003`), a
    checkpoints dir (`.../checkpoints`), or a run's output dir (`<output_dir>`): for the last two, the newest
    complete checkpoint (`checkpoint.find_latest`). Raises if nothing complete is found."""
    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"checkpoint path {p} does not exist.")
    if (p / ckpt.MANIFEST).exists() or ckpt._STEP_RE.match(p.name):
        ok, reason = ckpt.is_complete(p, verify_data=verify_data)
        if not ok:
            raise FileNotFoundError(f"checkpoint {p} is incomplete or corrupt: {reason}.")
        return p
    for root in (p / "checkpoints", p):
        if (root / ckpt.LATEST).exists() or ckpt.step_dirs(root):
            found = ckpt.find_latest(root)
            if found is None:
                raise FileNotFoundError(f"no complete checkpoint under {root} (see the warnings above).")
            return found
    raise FileNotFoundError(f"{p} is neither a checkpoint, a checkpoints dir, nor a run dir with "
                            f"checkpoints/ in it.")


# ---- weights -----------------------------------------------------------------------------------


def consolidated_state_dict(checkpoint_dir: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Full fp32 weights (names as in the HF model, no "module." prefix) from `<ckpt>/deepspeed`.

    ZeRO 1-3 (`zero_pp_rank_*_optim_states.pt` present): DeepSpeed's own
    `get_fp32_state_dict_from_zero_checkpoint`, which merges every rank's fp32 master partition
    and restores tied weights from the saved `shared_params`. ZeRO 0 writes no such files (the
    optimizer state sits inside `mp_rank_00_model_states.pt` and zero_to_fp32 raises
    FileNotFoundError), so the "module" entry of that file is used: the module's own state dict,
    already full, tied keys included. With bf16 at stage 0 that entry is bf16 (the fp32 master
    copy sits in the same file's "optimizer" entry, as FP16_UnfusedOptimizer state) and is upcast: the
    bf16 weights are exactly the master copy's rounding, which is what the engine computes with.
    """
    tag_dir = ckpt.deepspeed_dir(checkpoint_dir) / ckpt.DS_TAG
    if not tag_dir.is_dir():
        raise FileNotFoundError(f"no DeepSpeed checkpoint at {tag_dir} (expected "
                                f"engine.save_checkpoint(<ckpt>/deepspeed, tag={ckpt.DS_TAG!r})).")
    if any(tag_dir.glob("zero_pp_rank_*_optim_states.pt")):
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
        with contextlib.redirect_stdout(io.StringIO()):  # it prints a progress report per call
            sd = get_fp32_state_dict_from_zero_checkpoint(str(tag_dir.parent), tag=ckpt.DS_TAG)
    else:
        model_file = tag_dir / "mp_rank_00_model_states.pt"
        if not model_file.is_file():
            raise FileNotFoundError(f"{tag_dir} has neither zero_pp_rank_*_optim_states.pt (ZeRO 1-3) "
                                    f"nor mp_rank_00_model_states.pt (ZeRO 0).")
        # weights_only=False: DeepSpeed pickles its config object into the same file.
        sd = torch.load(model_file, map_location="cpu", weights_only=False)["module"]
    out = {}
    for name, t in sd.items():
        name = name[len("module."):] if name.startswith("module.") else name
        out[name] = t.detach().to(torch.float32) if t.is_floating_point() else t.detach()
    return out


def _fill_tied(model: torch.nn.Module, sd: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Add keys the model ties to another parameter (lm_head.weight ↔ embed_tokens.weight) and
    drop non-persistent buffers, so a strict load_state_dict sees exactly the model's keys."""
    sd = dict(sd)
    by_id: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        by_id.setdefault(id(p), []).append(name)
    for names in by_id.values():
        have = [n for n in names if n in sd]
        for n in names:
            if n not in sd and have:
                sd[n] = sd[have[0]]
    expected = set(model.state_dict().keys())
    non_persistent = {n for n, _ in model.named_buffers()} - expected
    return {k: v for k, v in sd.items() if k not in non_persistent}


def _build_model(student_dir: Path, sd: dict[str, torch.Tensor], dtype: Optional[torch.dtype]):
    """An HF model from `student/config.json` holding exactly `sd` (strict), in `dtype`."""
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(student_dir)
    if dtype is None:
        dtype = getattr(config, "dtype", None) or torch.float32
        dtype = getattr(torch, dtype) if isinstance(dtype, str) else dtype
    # Built on the meta device (no random init of billions of weights), then given the loaded
    # tensors themselves (assign=True); tie_weights() re-links lm_head to the embeddings.
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    sd = _fill_tied(model, sd)
    model.load_state_dict(sd, strict=True, assign=True)
    model.tie_weights()
    model.to(dtype)
    model.config.dtype = dtype
    return model


# ---- export ------------------------------------------------------------------------------------


def export_checkpoint(checkpoint_dir: str | os.PathLike, out_dir: str | os.PathLike,
                      overwrite: bool = False, dtype: Optional[torch.dtype | str] = None,
                      verify_data: bool = True) -> Path:
    """Write a Hugging Face model folder for a checkpoint; return `out_dir`.

    `checkpoint_dir` may be a checkpoint, a checkpoints dir or a run's output dir (its latest
    complete checkpoint is used, see `resolve_checkpoint`). `dtype` (e.g. "bfloat16") defaults to
    the student config's dtype. A non-empty `out_dir` is refused unless `overwrite`. The folder is
    written to a temp sibling and renamed into place, so an interrupted export leaves no
    half-written `out_dir`. `verify_data=False` checks file sizes only, not their CRC-32 sums (for a
    checkpoint the caller has just written or verified).
    """
    src = resolve_checkpoint(checkpoint_dir, verify_data)
    out = Path(out_dir)
    source, target = src.resolve(), out.resolve()
    if target == source or target in source.parents or source in target.parents:
        # replacing `out` would delete the checkpoint (the whole run, for `--out RUN`) or write into it
        raise FileExistsError(f"export target {out} {'contains' if target in source.parents or target == source else 'is inside'} "
                         f"the checkpoint being exported ({src}); choose a directory outside it")
    if out.exists() and not out.is_dir():
        raise FileExistsError(f"export target {out} exists and is not a directory.")
    if out.is_dir() and any(out.iterdir()) and not overwrite:
        raise FileExistsError(f"export target {out} is not empty; pass overwrite=True (--overwrite) "
                              f"to replace it, or choose another directory.")
    student_dir = src / ckpt.STUDENT_DIR
    if not (student_dir / "config.json").is_file():
        raise FileNotFoundError(f"{student_dir}/config.json is missing: the checkpoint was saved "
                                f"without save_student_files().")
    if isinstance(dtype, str):
        dtype = getattr(torch, dtype)

    model = _build_model(student_dir, consolidated_state_dict(src), dtype)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.parent / f".{out.name}.tmp-{uuid.uuid4().hex[:8]}"
    try:
        model.save_pretrained(tmp, safe_serialization=True)
        for f in student_dir.iterdir():  # tokenizer files, generation_config.json
            if f.is_file() and f.name != "config.json" and not (tmp / f.name).exists():
                shutil.copy2(f, tmp / f.name)
        if (student_dir / "generation_config.json").is_file():  # the run's, not one derived anew
            shutil.copy2(student_dir / "generation_config.json", tmp / "generation_config.json")
        state = ckpt.load_trainer_state(src) if (src / ckpt.TRAINER_STATE).is_file() else {}
        (tmp / "README.md").write_text(model_card.render(state, model_name=out.name))
        if out.exists():
            old = out.parent / f".{out.name}.old-{uuid.uuid4().hex[:8]}"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return out


# ---- Hub ---------------------------------------------------------------------------------------


def _folder_files(folder: Path) -> list[tuple[str, int]]:
    return [(p.relative_to(folder).as_posix(), p.stat().st_size)
            for p in sorted(folder.rglob("*")) if p.is_file() and ".git" not in p.relative_to(folder).parts]


def push_to_hub(folder: str | os.PathLike, repo_id: str, private: bool = False, token: Optional[str] = None,
                dry_run: bool = False, endpoint: Optional[str] = None) -> list[str]:
    """Upload an exported folder to the Hub repo `repo_id` (created if missing); return the paths.

    `token` defaults to `huggingface_hub.get_token()` (HF_TOKEN, else the saved `hf auth login`).
    `endpoint` defaults to HF_ENDPOINT or huggingface.co. `dry_run` prints what would be uploaded
    and contacts nothing (no token needed).
    """
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} is not an exported model folder (no config.json).")
    files = _folder_files(folder)
    if dry_run:
        print(f"[dry run] would upload {len(files)} files to {repo_id} "
              f"({'private' if private else 'public'}), contacting nothing:")
        for rel, size in files:
            print(f"  {rel}  {size:,} bytes")
        return [rel for rel, _ in files]

    import huggingface_hub

    token = token or _require_token()
    api = huggingface_hub.HfApi(endpoint=endpoint, token=token)
    api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model")
    api.upload_folder(repo_id=repo_id, folder_path=str(folder), repo_type="model",
                      commit_message="Upload distilled student")
    return [rel for rel, _ in files]


def _require_token() -> str:
    import huggingface_hub

    token = huggingface_hub.get_token()
    if not token:
        raise PermissionError("no Hugging Face token: run `hf auth login` or set HF_TOKEN "
                              "(or pass token=...). Use --dry-run to see what would be uploaded.")
    return token


def export_main(checkpoint: str, out: str, overwrite: bool = False, push_to_hub: Optional[str] = None,
                private: bool = False, dry_run: bool = False) -> Path:
    """`minillm export`: export `checkpoint` to `out`, then optionally push it to the repo id
    `push_to_hub`. With `dry_run` and no push, only reports what would be exported."""
    src = resolve_checkpoint(checkpoint)
    if push_to_hub:  # before the export: a bad name or a missing login found after it wastes the export
        from huggingface_hub.utils import HFValidationError, validate_repo_id
        try:
            validate_repo_id(push_to_hub)
        except HFValidationError as e:
            raise ConfigError(f"--push-to-hub {push_to_hub!r} is not a Hub repo id (ORG/NAME): {e}") from None
        if not dry_run:
            _require_token()
    if dry_run and not push_to_hub:
        print(f"[dry run] would export {src} to {out}")
        return Path(out)
    path = export_checkpoint(src, out, overwrite=overwrite)
    print(f"exported {src} -> {path}")
    if push_to_hub:
        files = _push(path, push_to_hub, private=private, dry_run=dry_run)
        if not dry_run:
            print(f"pushed {len(files)} files to {push_to_hub}")
    return path


_push = push_to_hub  # export_main's argument shadows the function's name
