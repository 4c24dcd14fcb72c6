"""The rollout worker: one Ray actor interface over the `hf` and `vllm` backends."""
from __future__ import annotations

from typing import Optional

import ray
import torch

from rollout.types import RolloutBatch, SamplingSettings
from rollout.weight_sync import TensorMeta


class RolloutWorker:
    """Samples from the current student and takes new weights from the learner.

    Protocol (the actor's public methods):
      generate(prompts, settings) -> RolloutBatch     token ids in, token ids + log q out
      logprobs(batch) -> (N, T) tensor                 log q of given tokens under current weights
      update_weights(buckets) -> int                   [(flat ref, metas)], one per bucket (object store)
      update_weights_ipc(buckets) -> int               [(CUDA IPC handle, metas)] (vllm, same GPU)
      init_weight_update_group(...) +
      update_weights_broadcast(plan) -> int            buckets broadcast by learner rank 0
      sleep() / wake_up()                              free / restore the engine's GPU memory (vllm)
      weights_version() -> int                         how many syncs this worker has taken
    """

    def __init__(self, model_path: str, backend: str = "hf", dtype: str = "float32", device: str = "cpu",
                 teacher_path: Optional[str] = None, **backend_kwargs):
        """teacher_path: teacher checkpoint for teacher-mixed sampling (`SamplingSettings.mix_alpha` > 0)."""
        torch.set_num_threads(max(1, int(backend_kwargs.pop("num_threads", 1))))
        if backend == "hf":
            from rollout.hf_backend import HFRolloutBackend
            self.backend = HFRolloutBackend(model_path, dtype=dtype, device=device, teacher_path=teacher_path,
                                            teacher_dtype=backend_kwargs.pop("teacher_dtype", None),
                                            vocab_size=backend_kwargs.pop("vocab_size", None))
        elif backend == "vllm":
            from rollout.vllm_backend import VllmRolloutBackend
            self.backend = VllmRolloutBackend(model_path, dtype=dtype, teacher_path=teacher_path, **backend_kwargs)
        else:
            raise ValueError(f"rollout backend must be 'hf' or 'vllm', got {backend!r}")
        self.version = 0

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> RolloutBatch:
        return self.backend.generate(prompts, settings)

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        return self.backend.logprobs(batch)

    def update_weights(self, buckets: list[tuple]) -> int:
        """Load every bucket; `buckets` holds (flat tensor or ObjectRef, metas) pairs."""
        n = 0
        for flat, metas in buckets:
            if isinstance(flat, ray.ObjectRef):
                flat = ray.get(flat)
            n += self.backend.load_bucket(flat, metas)
        self.version += 1
        return n

    def weights_version(self) -> int:
        return self.version

    # ---- GPU-only extras (vllm backend) ------------------------------------------------------

    def update_weights_ipc(self, buckets: list[tuple[bytes, list[TensorMeta]]], complete: bool = True) -> int:
        """Same GPU as the learner: (pickled CUDA IPC handle from `rollout.vllm_backend.ipc_handle`, metas).
        complete=False: more buckets of this update follow in later calls (the version moves on the last)."""
        n = sum(self.backend.load_bucket_ipc(handle, metas) for handle, metas in buckets)
        self.version += int(complete)
        return n

    def gpu_uuid(self) -> Optional[str]:
        """The GPU this worker samples on (the same-GPU path checks it is the learner's); None on CPU."""
        return self.backend.gpu_uuid()

    def init_weight_update_group(self, backend: str, host: str, port: int, rank_offset: int, world_size: int) -> None:
        """Join the broadcast group whose rank 0 is the learner (`rollout.collective`; "nccl" on GPU,
        "gloo" on CPU); this worker's engine ranks are rank_offset.. ."""
        self.backend.init_weight_update_group(backend, host, port, rank_offset, world_size)

    def update_weights_broadcast(self, plan: list[list[TensorMeta]]) -> int:
        """Receive each bucket of `plan` by broadcast; the learner sends them in the same order."""
        n = sum(self.backend.load_bucket_broadcast(metas) for metas in plan)
        self.version += 1
        return n

    def sleep(self, level: int = 1) -> None:
        """Single-GPU mode: free the engine's GPU memory while the learner trains (vllm backend).
        Level 1 keeps a CPU copy of the weights; level 2 drops them (a full weight sync follows)."""
        self.backend.sleep(level)

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """tags: None restores everything; ["weights"] first, then ["kv_cache"] after a sync."""
        self.backend.wake_up(tags)

    def ready(self) -> bool:
        return True


RolloutWorkerActor = ray.remote(RolloutWorker)
