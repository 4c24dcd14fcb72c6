"""A broadcast group between learner rank 0 and the rollout engines, beside every default process group.

Both ends build it from the same (backend, host, port, world_size) and their own rank (the learner is 0,
engine workers 1..). DeepSpeed owns the learner's default group and vLLM its engines', so this one is
made from a store directly and never touches `torch.distributed.init_process_group`:
  "nccl"  GPU: vLLM's `StatelessProcessGroup` + `PyNcclCommunicator` (the layout of vLLM's RLHF example)
  "gloo"  CPU: a torch `TCPStore` + `ProcessGroupGloo`; the same protocol, so CI runs the sync path
"""
from __future__ import annotations

import datetime
from typing import Literal, Optional

import torch

Backend = Literal["nccl", "gloo"]
TIMEOUT = datetime.timedelta(minutes=10)


class BroadcastGroup:
    def __init__(self, backend: Backend, host: str, port: int, rank: int, world_size: int,
                 device: Optional[torch.device] = None):
        if world_size < 2:
            raise ValueError(f"a weight broadcast group needs the learner and at least one engine, got world_size={world_size}")
        self.backend, self.rank = backend, rank
        if backend == "nccl":
            from vllm.distributed.device_communicators.pynccl import PyNcclCommunicator
            from vllm.distributed.utils import StatelessProcessGroup

            pg = StatelessProcessGroup.create(host=host, port=port, rank=rank, world_size=world_size)
            self._comm = PyNcclCommunicator(pg, device=device if device is not None else torch.cuda.current_device())
            if self._comm.disabled:  # its broadcast() would then return without sending: stale or garbage weights
                raise RuntimeError("weight broadcast: vLLM's PyNcclCommunicator is disabled here (NCCL library "
                                   "not loadable, or VLLM_DISABLE_PYNCCL=1); set VLLM_NCCL_SO_PATH or use "
                                   "rollout.weight_sync=object_store")
        elif backend == "gloo":
            import torch.distributed as dist

            store = dist.TCPStore(host, port, world_size, is_master=rank == 0, timeout=TIMEOUT)
            self._pg = dist.ProcessGroupGloo(store, rank, world_size, TIMEOUT)
        else:
            raise ValueError(f"broadcast backend must be 'nccl' or 'gloo', got {backend!r}")

    def broadcast(self, tensor: torch.Tensor, src: int = 0) -> None:
        """In place: `tensor` on `src` is copied into every other rank's `tensor` (same size and dtype)."""
        if self.backend == "nccl":
            self._comm.broadcast(tensor, src=src, stream=torch.cuda.current_stream(tensor.device))
            return
        import torch.distributed as dist

        opts = dist.BroadcastOptions()
        opts.rootRank, opts.rootTensor = src, 0
        self._pg.broadcast([tensor], opts).wait()
