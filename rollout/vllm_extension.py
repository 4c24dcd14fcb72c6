"""Engine-side weight sync: mixed into every vLLM worker via `worker_extension_cls` (no vLLM patching).

Passed as `LLM(..., worker_extension_cls="rollout.vllm_extension.WeightSyncExtension")` and called with
`llm.collective_rpc("<method>", args=(...))`, one RPC per flat bucket (`rollout.weight_sync`). vLLM 0.26 adds
the class to the worker's bases (`WorkerWrapperBase.init_worker`), so `self.model_runner` and `self.device`
are the GPU worker's; no method name here may exist on the worker (vLLM asserts it at start-up).

Arguments must be plain data: the RPC goes to the engine-core process through vLLM's msgpack encoder
(`vllm.v1.serial_utils.MsgpackEncoder`), where `bytes`, str, int, float, lists and dicts round-trip but a
torch tensor arrives as a bare `[dtype, shape, buffer index]` list. Hence metas with dtype names, bucket
bytes and pickled IPC handles.

Three ways a bucket arrives:
  load_bucket_flat   the bucket's bytes through the RPC (the CPU-staged fallback)
  load_bucket_ipc    same GPU as the learner: a CUDA IPC handle of the learner's flat buffer, no copy
                     through the host (`torch.multiprocessing.reductions.reduce_tensor`, as vLLM's own
                     `vllm.distributed.weight_transfer.ipc_engine` does)
  load_bucket_nccl   separate GPUs: broadcast from learner rank 0 over a NCCL group made by
                     `init_weight_update_group` (vLLM's `StatelessProcessGroup` + `PyNcclCommunicator`)

Loading is `model.load_weights(...)` with checkpoint (Hugging Face) names: vLLM's loaders copy in place
(`param.data.copy_` / narrowed copies into fused qkv_proj and gate_up_proj), so CUDA graphs and the compiled
model keep seeing the same storage, and bf16/fp16/fp32 (unquantized) layers need no
`process_weights_after_loading` on CUDA (`UnquantizedLinearMethod` only repacks on CPU). Quantized models
would need vLLM's layerwise reload (`initialize_layerwise_reload` / `finalize_layerwise_reload`): not
supported here. This module imports nothing from vLLM at load time; vLLM imports sit inside the methods.
"""
from __future__ import annotations

import pickle
import warnings

import torch

from rollout.weight_sync import TensorMeta, unpack

# Argument of `torch.multiprocessing.reductions.rebuild_cuda_tensor` that holds the CUDA device index:
# (tensor_cls, size, stride, offset, storage_cls, dtype, storage_device, handle, ...). The learner and the
# engine may see the same GPU under different indices (CUDA_VISIBLE_DEVICES), so it is replaced (vLLM's
# ipc_engine does the same).
_REBUILD_DEVICE_ARG = 6


class WeightSyncExtension:
    def _sync_model(self) -> torch.nn.Module:
        """The bare model: `get_model()` unwraps vLLM's CUDA-graph wrappers (V1 and V2 model runners)."""
        return self.model_runner.get_model()

    @torch.no_grad()
    def _load(self, flat: torch.Tensor, metas: list[TensorMeta]) -> int:
        """Returns the tensors received. (vLLM's `load_weights` returns the names of its own parameters,
        where q/k/v and gate/up are one fused tensor, so its count is not comparable across backends.)
        A name the model does not have raises in vLLM's `AutoWeightsLoader`."""
        self._sync_model().load_weights(weights=list(unpack(flat, metas)))
        return len(metas)

    def load_bucket_flat(self, raw: bytes, metas: list[TensorMeta]) -> int:
        """Load one bucket whose bytes came through the RPC itself (`flat_to_bytes`); returns tensors loaded."""
        with warnings.catch_warnings():  # read-only buffer: it is only copied to the GPU, never written
            warnings.simplefilter("ignore", UserWarning)
            host = torch.frombuffer(raw, dtype=torch.uint8)
        flat = host.to(self.device).view(getattr(torch, metas[0]["dtype"]))
        return self._load(flat, metas)

    def load_bucket_ipc(self, handle: bytes, metas: list[TensorMeta]) -> int:
        """Load one bucket from a pickled (GPU UUID, rebuild fn, args) of `reduce_tensor(flat)` made on this GPU.

        Pickled by the sender: vLLM's RPC encoder takes plain data, not the rebuild function and classes.
        """
        uuid, rebuild, args = pickle.loads(handle)
        here = str(torch.cuda.get_device_properties(self.device).uuid)
        if uuid != here:
            raise ValueError(f"load_bucket_ipc: the bucket lives on GPU {uuid}, this engine worker is on {here}; "
                             "CUDA IPC needs the same GPU (use the object-store or NCCL path)")
        args = list(args)
        args[_REBUILD_DEVICE_ARG] = self.device.index
        flat = rebuild(*args)
        n = self._load(flat, metas)
        torch.cuda.synchronize(self.device)  # the learner may overwrite its buffer once this returns
        del flat
        return n

    def init_weight_update_group(self, master_address: str, master_port: int, rank_offset: int, world_size: int) -> None:
        """Join the NCCL broadcast group with the learner (rank 0; `rollout.collective.BroadcastGroup`, vLLM's
        `StatelessProcessGroup` + `PyNcclCommunicator`); engine workers take ranks rank_offset + their world rank.

        Blocks until every rank has joined (the learner builds its end concurrently).
        """
        from vllm.distributed.parallel_state import get_world_group

        from rollout.collective import BroadcastGroup

        rank = get_world_group().rank + rank_offset
        self._sync_group = BroadcastGroup("nccl", master_address, master_port, rank, world_size, device=self.device)

    def load_bucket_nccl(self, metas: list[TensorMeta]) -> int:
        """Receive one bucket broadcast by learner rank 0 (it must call broadcast with the same size and dtype)."""
        numel = sum(m["numel"] for m in metas)
        flat = torch.empty(numel, dtype=getattr(torch, metas[0]["dtype"]), device=self.device)
        self._sync_group.broadcast(flat, src=0)
        n = self._load(flat, metas)
        del flat
        return n

    def gpu_uuid(self) -> str:
        """This engine worker's GPU (the same string as the learner's `torch.cuda.get_device_properties(..).uuid`)."""
        return str(torch.cuda.get_device_properties(self.device).uuid)

    def weights_checksum(self) -> float:
        """Sum of all parameters in float64 (tests: did a sync change the weights?)."""
        return float(sum(p.double().sum().item() for p in self._sync_model().parameters()))
