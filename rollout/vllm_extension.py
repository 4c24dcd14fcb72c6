"""Engine-side weight sync: mixed into every vLLM worker via `worker_extension_cls` (no vLLM patching).

Passed as `LLM(..., worker_extension_cls="rollout.vllm_extension.WeightSyncExtension")` and called with
`llm.collective_rpc("<method>", args=(...))`, one RPC per flat bucket (`rollout.weight_sync`). Arguments
are plain data (metas with dtype names); `self.model_runner`, `self.device` come from vLLM's worker.

Three ways a bucket arrives:
  load_bucket_flat   the bucket's bytes through the RPC (the CPU-staged fallback)
  load_bucket_ipc    same GPU as the learner: a CUDA IPC handle of the learner's flat buffer, no copy
                     through the host (`torch.multiprocessing.reductions.reduce_tensor`)
  load_bucket_nccl   separate GPUs: broadcast from learner rank 0 over a NCCL group made by
                     `init_weight_update_group` (vLLM's `StatelessProcessGroup` + `PyNcclCommunicator`)
This module imports nothing from vLLM at load time; vLLM imports sit inside the methods.
"""
from __future__ import annotations

import pickle

import torch

from rollout.weight_sync import TensorMeta, unpack

# Argument of `torch.multiprocessing.reductions.rebuild_cuda_tensor` that holds the CUDA device index:
# (tensor_cls, size, stride, offset, storage_cls, dtype, storage_device, handle, ...). The learner and the
# engine may see the same GPU under different indices (CUDA_VISIBLE_DEVICES), so it is replaced.
_REBUILD_DEVICE_ARG = 6


class WeightSyncExtension:
    def _load(self, flat: torch.Tensor, metas: list[TensorMeta]) -> int:
        loaded = self.model_runner.model.load_weights(weights=list(unpack(flat, metas)))
        return len(loaded) if loaded is not None else len(metas)

    def load_bucket_flat(self, raw: bytes, metas: list[TensorMeta]) -> int:
        """Load one bucket whose bytes came through the RPC itself (`flat_to_bytes`); returns tensors loaded."""
        flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(getattr(torch, metas[0]["dtype"]))
        return self._load(flat.to(self.device), metas)

    def load_bucket_ipc(self, handle: bytes, metas: list[TensorMeta]) -> int:
        """Load one bucket from a pickled CUDA IPC handle (`reduce_tensor(flat)`) made on this GPU.

        Pickled by the sender: vLLM's RPC encoder takes plain data, not the rebuild function and classes.
        """
        rebuild, args = pickle.loads(handle)
        args = list(args)
        args[_REBUILD_DEVICE_ARG] = self.device.index
        flat = rebuild(*args)
        n = self._load(flat, metas)
        torch.cuda.synchronize(self.device)  # the learner may overwrite its buffer once this returns
        del flat
        return n

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """Join a NCCL group with the learner (rank 0); engine workers take ranks rank_offset + their world rank."""
        from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
        from vllm.distributed.parallel_state import get_world_group
        from vllm.distributed.utils import StatelessProcessGroup

        rank = get_world_group().rank + rank_offset
        pg = StatelessProcessGroup.create(host=master_address, port=master_port, rank=rank, world_size=world_size)
        self._sync_comm = PyNcclCommunicator(pg, device=self.device)

    def load_bucket_nccl(self, metas: list[TensorMeta]) -> int:
        """Receive one bucket broadcast by learner rank 0 (it must call broadcast with the same size and dtype)."""
        numel = sum(m["numel"] for m in metas)
        flat = torch.empty(numel, dtype=getattr(torch, metas[0]["dtype"]), device=self.device)
        self._sync_comm.broadcast(flat, src=0, stream=torch.cuda.current_stream())
        n = self._load(flat, metas)
        del flat
        return n

    def weights_checksum(self) -> float:
        """Sum of all parameters in float64 (tests: did a sync change the weights?)."""
        return float(sum(p.double().sum().item() for p in self.model_runner.model.parameters()))
