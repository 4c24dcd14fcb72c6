"""Bucketed weight transfer: parameters travel as a few flat buffers, not one message per tensor.

The learner packs (name, tensor) pairs into flat 1-D buffers of at most `bucket_bytes` (one dtype
per bucket) described by `TensorMeta` records; a rollout worker unpacks each buffer into views and
copies them into its model. One transfer (Ray object, or a broadcast on GPU) per bucket.
"""
from __future__ import annotations

from typing import Iterable, Iterator, TypedDict

import torch


class TensorMeta(TypedDict):
    name: str
    shape: list[int]
    dtype: str  # torch dtype name, e.g. "float32" (plain data across processes)
    offset: int  # in elements, within the bucket
    numel: int


def bucket_plan(named_shapes: Iterable[tuple[str, torch.Size, torch.dtype]], bucket_bytes: int) -> list[list[TensorMeta]]:
    """Group tensors into buckets of one dtype and at most `bucket_bytes` (a larger tensor is alone)."""
    buckets: list[list[TensorMeta]] = []
    current: list[TensorMeta] = []
    used, current_dtype = 0, None
    for name, shape, dtype in named_shapes:
        numel = 1
        for s in shape:
            numel *= int(s)
        nbytes = numel * torch.empty((), dtype=dtype).element_size()
        if current and (dtype != current_dtype or used + nbytes > bucket_bytes):
            buckets.append(current)
            current, used = [], 0
        offset = sum(m["numel"] for m in current)
        current.append(TensorMeta(name=name, shape=list(shape), dtype=str(dtype).removeprefix("torch."),
                                  offset=offset, numel=numel))
        used += nbytes
        current_dtype = dtype
    if current:
        buckets.append(current)
    return buckets


def pack(tensors: Iterable[torch.Tensor], metas: list[TensorMeta], device=None) -> torch.Tensor:
    """One flat buffer holding `tensors` in the order of `metas`."""
    total = sum(m["numel"] for m in metas)
    flat = torch.empty(total, dtype=getattr(torch, metas[0]["dtype"]), device=device)
    for t, m in zip(tensors, metas):
        flat[m["offset"]:m["offset"] + m["numel"]].copy_(t.detach().reshape(-1))
    return flat


def unpack(flat: torch.Tensor, metas: list[TensorMeta]) -> Iterator[tuple[str, torch.Tensor]]:
    """Views into `flat`, one per tensor."""
    for m in metas:
        yield m["name"], flat[m["offset"]:m["offset"] + m["numel"]].view(m["shape"])


@torch.no_grad()
def load_bucket(model: torch.nn.Module, flat: torch.Tensor, metas: list[TensorMeta]) -> int:
    """Copy one bucket into `model`'s parameters/buffers by name; returns the tensors loaded."""
    params = dict(model.named_parameters())
    params.update(dict(model.named_buffers()))
    n = 0
    for name, view in unpack(flat, metas):
        if name not in params:
            raise KeyError(f"weight sync: the rollout model has no tensor named {name!r}")
        target = params[name]
        if tuple(target.shape) != tuple(view.shape):
            raise ValueError(f"weight sync: {name} has shape {tuple(target.shape)} here, {tuple(view.shape)} from the learner")
        target.copy_(view.to(target.device, target.dtype))
        n += 1
    return n
