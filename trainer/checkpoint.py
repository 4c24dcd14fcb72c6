"""Crash-safe training checkpoints: a temp dir, a manifest written last, an atomic rename.

A run's checkpoints live in `<output_dir>/checkpoints/`:

    checkpoints/
      step_00000003/          complete: renamed from .tmp-step_00000003 only after MANIFEST.json
        deepspeed/            engine.save_checkpoint(<this>/deepspeed, tag=DS_TAG), by every learner rank
        rng/rank_{r}.pt       torch/python/numpy RNG states of learner rank r (save_rng / load_rng)
        trainer_state.json    step, data position, mixer state, driver RNG, metrics, resolved config
        student/              config.json, generation_config.json, tokenizer files (for export)
        MANIFEST.json         written last: relative path, size and CRC-32 of every file
      latest                  text: the dir name of the newest complete checkpoint (os.replace'd; for people
                              and tools: resuming scans the step dirs themselves)

Protocol (the checkpoints dir must be on a filesystem every learner rank sees):

    tmp = begin(ckpts, step)                       # driver, before any rank writes
    ... every rank: engine.save_checkpoint(tmp / "deepspeed", tag=DS_TAG); save_rng(tmp, rank)
    ... driver: save_trainer_state(tmp, state); save_student_files(tmp, config, gen_config, tok)
    commit(ckpts, tmp, step, keep_last)            # driver, after all ranks returned

A crash anywhere before `commit` renames the dir leaves only a `.tmp-*` dir, which `find_latest`
never looks at and the next `begin`/`commit` removes. A crash after the rename but before `latest`
is replaced leaves a complete `step_*` dir that `find_latest` finds: it scans the step dirs newest
first and takes the first whose every file has the manifest's size and CRC-32 (a file damaged in place,
same size, is caught too). Rotation renames a checkpoint to `.tmp-*` before deleting it, so a crash
mid-delete leaves nothing that looks like a checkpoint. Files are fsync'd in `commit` (the writers,
torch.save and DeepSpeed, do not), so the manifest never describes bytes that are still only in the
page cache.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import random
import re
import shutil
import warnings
import zlib
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any, Optional

import torch

logger = logging.getLogger(__name__)

DS_TAG = "state"  # DeepSpeed's tag: <ckpt>/deepspeed/state/...
MANIFEST = "MANIFEST.json"
LATEST = "latest"
TRAINER_STATE = "trainer_state.json"
STUDENT_DIR = "student"
CHUNK = 16 * 2**20  # CRC-32 read size; zlib releases the GIL on large buffers, so files are summed in threads
TMP_PREFIX = ".tmp-"
_STEP_RE = re.compile(r"^step_(\d{8,})$")


def step_name(step: int) -> str:
    return f"step_{step:08d}"


def deepspeed_dir(checkpoint_dir: str | os.PathLike) -> Path:
    """Where every rank's `engine.save_checkpoint(..., tag=DS_TAG)` / `load_checkpoint` points."""
    return Path(checkpoint_dir) / "deepspeed"


# ---- writing ------------------------------------------------------------------------------


def begin(checkpoints_dir: str | os.PathLike, step: int) -> Path:
    """Create and return an empty `.tmp-step_XXXXXXXX` dir, removing a stale one from a crashed run."""
    root = Path(checkpoints_dir)
    root.mkdir(parents=True, exist_ok=True)
    tmp = root / (TMP_PREFIX + step_name(step))
    if tmp.exists():
        logger.warning("removing stale partial checkpoint %s", tmp)
        shutil.rmtree(tmp)
    tmp.mkdir()
    return tmp


def commit(checkpoints_dir: str | os.PathLike, tmp_dir: str | os.PathLike, step: int,
           keep_last: Optional[int] = None) -> Path:
    """Seal `tmp_dir` as `step_XXXXXXXX`, point `latest` at it, and rotate old checkpoints.

    Order: fsync every file → MANIFEST.json (fsync) → rename tmp → final → fsync the dir →
    replace `latest` → delete complete checkpoints beyond the newest `keep_last` (None keeps all)
    and stale `.tmp-*` dirs. Returns the final path.
    """
    if keep_last is not None and keep_last < 1:
        raise ValueError(f"keep_last must be >= 1 or None, got {keep_last}.")
    root, tmp = Path(checkpoints_dir), Path(tmp_dir)
    if not tmp.is_dir():
        raise FileNotFoundError(f"checkpoint temp dir {tmp} does not exist (call begin() first).")
    if tmp.parent.resolve() != root.resolve():
        raise ValueError(f"temp dir {tmp} is not inside {root}: the rename must stay on one filesystem.")
    _write_manifest(tmp, step)
    final = root / step_name(step)
    if final.exists():  # the same step saved again (e.g. after a resume): swap, then drop the old one
        old = root / (TMP_PREFIX + "replaced-" + step_name(step))
        if old.exists():
            shutil.rmtree(old)
        os.replace(final, old)
        os.replace(tmp, final)
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.replace(tmp, final)
    _fsync_dir(root)
    _atomic_write_text(root / LATEST, final.name + "\n")
    _rotate(root, keep_last, keep=final)
    return final


def _write_manifest(ckpt: Path, step: int) -> None:
    paths = [p for p in sorted(ckpt.rglob("*")) if p.is_file() and p.name != MANIFEST]
    with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
        sums = list(pool.map(lambda p: _crc32(p, fsync=True), paths))  # the writers (torch.save, DeepSpeed) don't fsync
    files = [{"path": p.relative_to(ckpt).as_posix(), "size": size, "crc32": crc} for p, (size, crc) in zip(paths, sums)]
    for d in {p.parent for p in paths} | {ckpt}:
        _fsync_dir(d)
    manifest = {"format": 2, "step": step, "files": files}
    _atomic_write_text(ckpt / MANIFEST, json.dumps(manifest, indent=1))


def _crc32(path: Path, fsync: bool = False) -> tuple[int, str]:
    """(size, CRC-32 as 8 hex digits) of a file, read in chunks."""
    crc, size = 0, 0
    with open(path, "rb") as f:
        if fsync:
            os.fsync(f.fileno())
        while chunk := f.read(CHUNK):
            crc = zlib.crc32(chunk, crc)
            size += len(chunk)
    return size, f"{crc:08x}"


def _atomic_write_text(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(path.parent)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def step_dirs(root: Path) -> list[tuple[int, Path]]:
    """`step_*` dirs under root, oldest first."""
    out = []
    for p in root.iterdir() if root.is_dir() else []:
        m = _STEP_RE.match(p.name)
        if m and p.is_dir():
            out.append((int(m.group(1)), p))
    return sorted(out)


def _rotate(root: Path, keep_last: Optional[int], keep: Path) -> None:
    for p in root.iterdir():
        if p.name.startswith(TMP_PREFIX) and p.is_dir():
            shutil.rmtree(p, ignore_errors=True)
        elif p.name.startswith(f".{LATEST}.tmp-") and p.is_file():  # a pointer write cut short
            p.unlink(missing_ok=True)
    if keep_last is None:
        return
    # sizes only here: every commit would otherwise re-read every kept checkpoint
    complete = [p for _, p in step_dirs(root) if p == keep or is_complete(p, verify_data=False)[0]]
    # Corrupt step dirs are left alone (find_latest names them); only complete ones count and go.
    for p in complete[:-keep_last]:
        if p != keep:
            # out of sight first: a crash mid-delete must not leave a half checkpoint under a step_ name
            doomed = root / (TMP_PREFIX + "deleting-" + p.name)
            if doomed.exists():  # left by an earlier delete that could not finish (e.g. busy NFS files)
                shutil.rmtree(doomed, ignore_errors=True)
            try:
                os.replace(p, doomed)
            except OSError as e:
                logger.warning("could not rotate out old checkpoint %s: %s", p, e)
                continue
            shutil.rmtree(doomed, ignore_errors=True)


# ---- reading ------------------------------------------------------------------------------


def is_complete(path: str | os.PathLike, verify_data: bool = True) -> tuple[bool, str]:
    """(True, "ok") if MANIFEST.json exists and every listed file has its size and (verify_data) its CRC-32."""
    ckpt = Path(path)
    mpath = ckpt / MANIFEST
    if not mpath.is_file():
        return False, f"no {MANIFEST} (the save did not finish)"
    try:
        manifest = json.loads(mpath.read_text())
        files = manifest["files"]
    except (OSError, ValueError, KeyError, TypeError) as e:
        return False, f"unreadable {MANIFEST}: {e}"
    for entry in files:
        p = ckpt / entry["path"]
        if not p.is_file():
            return False, f"missing file {entry['path']}"
        size = p.stat().st_size
        if size != entry["size"]:
            return False, f"{entry['path']} has {size} bytes, manifest says {entry['size']}"
    if verify_data:
        sums = {}
        with ThreadPoolExecutor(max_workers=min(8, os.cpu_count() or 1)) as pool:
            for entry, (_, crc) in zip(files, pool.map(lambda e: _crc32(ckpt / e["path"]), files)):
                sums[entry["path"]] = crc
        for entry in files:
            if "crc32" in entry and sums[entry["path"]] != entry["crc32"]:
                return False, f"{entry['path']} is damaged: its CRC-32 differs from the manifest's"
            if "sha256" in entry and hashlib.sha256((ckpt / entry["path"]).read_bytes()).hexdigest() != entry["sha256"]:
                return False, f"{entry['path']} sha256 differs from the manifest"  # format 1 manifests
    return True, "ok"


def find_latest(checkpoints_dir: str | os.PathLike) -> Optional[Path]:
    """The newest complete checkpoint, or None.

    Scans the `step_*` dirs newest first (not the `latest` pointer, which a crash may leave one
    checkpoint behind), warning with the reason for each one skipped. `.tmp-*` dirs are never considered.
    """
    root = Path(checkpoints_dir)
    if not root.is_dir():
        return None
    for _, p in reversed(step_dirs(root)):
        ok, reason = is_complete(p)
        if ok:
            return p
        _warn(f"skipping checkpoint {p}: {reason}")
    return None


def _warn(msg: str) -> None:
    logger.warning(msg)
    warnings.warn(msg, RuntimeWarning, stacklevel=3)


# ---- RNG ----------------------------------------------------------------------------------


def capture_rng() -> dict:
    """Python `random`, numpy (if importable), torch CPU and CUDA (if available) generator states."""
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    try:
        import numpy as np
        state["numpy"] = np.random.get_state()
    except ImportError:
        pass
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def restore_rng(state: dict) -> None:
    random.setstate(state["python"])
    torch.set_rng_state(state["torch"])
    if "numpy" in state:
        import numpy as np
        np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        if len(state["cuda"]) != torch.cuda.device_count():
            _warn(f"checkpoint has CUDA RNG states for {len(state['cuda'])} devices, "
                  f"this process sees {torch.cuda.device_count()}; restoring the overlap")
        for i, s in enumerate(state["cuda"][:torch.cuda.device_count()]):
            torch.cuda.set_rng_state(s, i)


def save_rng(checkpoint_dir: str | os.PathLike, rank: int) -> Path:
    """capture_rng() into `<ckpt>/rng/rank_{rank}.pt` (each learner rank calls this)."""
    path = Path(checkpoint_dir) / "rng" / f"rank_{rank}.pt"
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(capture_rng(), path)
    return path


def load_rng(checkpoint_dir: str | os.PathLike, rank: int) -> None:
    path = Path(checkpoint_dir) / "rng" / f"rank_{rank}.pt"
    if not path.is_file():
        raise FileNotFoundError(f"no RNG state for rank {rank} at {path}: was the run saved with "
                                f"a different number of learner ranks?")
    restore_rng(torch.load(path, weights_only=False))  # python/numpy states are tuples, not tensors


# ---- trainer state and student files -------------------------------------------------------


def save_trainer_state(checkpoint_dir: str | os.PathLike, state: dict) -> Path:
    """JSON only: convert tensors with .item()/.tolist() first (a clear TypeError says where)."""
    def reject(o):
        raise TypeError(f"trainer_state must be plain JSON, got a {type(o).__name__} "
                        f"({o!r:.60}); convert tensors with .item() / .tolist().")
    text = json.dumps(state, indent=1, default=reject, allow_nan=True)
    path = Path(checkpoint_dir) / TRAINER_STATE
    _atomic_write_text(path, text)
    return path


def load_trainer_state(checkpoint_dir: str | os.PathLike) -> dict:
    return json.loads((Path(checkpoint_dir) / TRAINER_STATE).read_text())


def save_student_files(checkpoint_dir: str | os.PathLike, model_config, generation_config=None,
                       tokenizer=None) -> Path:
    """config.json, generation_config.json and tokenizer files under `<ckpt>/student/` for export.

    `generation_config` None derives one from the model config; `tokenizer` is a tokenizer object
    (anything with save_pretrained) or None.
    """
    out = Path(checkpoint_dir) / STUDENT_DIR
    out.mkdir(parents=True, exist_ok=True)
    model_config.save_pretrained(out)
    if generation_config is None:
        from transformers import GenerationConfig
        generation_config = GenerationConfig.from_model_config(model_config)
    generation_config.save_pretrained(out)
    if tokenizer is not None:
        tokenizer.save_pretrained(out)
    return out
