"""Load a teacher checkpoint from a local folder and describe its vocabulary.

Shared by the Ray actors and the HTTP service so both report the same ``vocab_info``.
"""

from __future__ import annotations

import os

import torch

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str) -> torch.dtype:
    """'float32' | 'bfloat16' | 'float16' (also 'fp32', 'bf16', 'fp16') -> torch.dtype."""
    alias = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16"}
    key = alias.get(name, name)
    if key not in DTYPES:
        raise ValueError(f"dtype must be one of {sorted(DTYPES) + sorted(alias)}, got {name!r}.")
    return DTYPES[key]


def load_teacher(model_path: str, device: str = "cpu", dtype: str = "float32"):
    """``AutoModelForCausalLM`` from a local folder, on ``device``, eval mode, no grads."""
    from transformers import AutoModelForCausalLM

    if not os.path.isdir(model_path):
        raise FileNotFoundError(f"teacher model folder {model_path!r} not found; pass a local path saved with save_pretrained.")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"device={device!r} but CUDA is not available here; use device='cpu' or give the replica a GPU.")
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=parse_dtype(dtype))
    model.to(device).eval().requires_grad_(False)
    return model


def load_tokenizer_if_present(model_path: str):
    """The tokenizer saved next to the weights, or None if the folder has none."""
    names = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")
    if not any(os.path.exists(os.path.join(model_path, n)) for n in names):
        return None
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(model_path)
    except (OSError, ValueError):
        return None


def describe_teacher(model, model_path: str, tokenizer=None) -> dict:
    """Vocabulary facts the trainer checks against the student.

    Returns: {model_name, vocab_size (embedding rows, from config), tokenizer_len (or None),
    max_context, special_token_ids: {bos, eos, pad, unk}}.
    """
    cfg = model.config.get_text_config() if hasattr(model.config, "get_text_config") else model.config
    special = {}
    for name in ("bos", "eos", "pad", "unk"):
        tid = getattr(tokenizer, f"{name}_token_id", None) if tokenizer is not None else None
        if tid is None:
            tid = getattr(cfg, f"{name}_token_id", None)
        special[name] = tid
    return {
        "model_name": os.path.basename(os.path.normpath(model_path)),
        "vocab_size": int(cfg.vocab_size),
        "tokenizer_len": len(tokenizer) if tokenizer is not None else None,
        "max_context": getattr(cfg, "max_position_embeddings", None),
        "special_token_ids": special,
    }
