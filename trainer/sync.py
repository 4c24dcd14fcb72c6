"""Weight sync: the learner's new weights reach every rollout worker after each update.

Weights travel as flat buckets (`rollout.weight_sync`), one transfer per bucket, over one of three
paths (`rollout.weight_sync` in the config):
  object_store  rank 0 packs CPU buckets into Ray's object store; workers fetch them (any setup)
  broadcast     rank 0 broadcasts each bucket from its device over a group with the engines
                (`rollout.collective`: NCCL on GPU, gloo on CPU); nothing passes through the host on GPU
  cuda_ipc      vLLM on rank 0's own GPU: the engine reads rank 0's bucket through a CUDA IPC handle,
                one bucket alive at a time
Under ZeRO-3 every learner rank takes part (each bucket is gathered), whatever the path.
"""
from __future__ import annotations

import ray

from launch.config import RunConfig


def resolve_sync_path(cfg: RunConfig) -> str:
    """The configured path, with "auto" decided from the config (`fit_to_gpus` then checks the placement)."""
    r = cfg.rollout
    if r.weight_sync != "auto":
        return r.weight_sync
    if r.backend != "vllm" or cfg.trainer.device != "cuda":
        return "object_store"
    # fractional GPUs: the workers may sit on the learner's GPU (the single-GPU mode)
    may_share = cfg.trainer.num_ranks == 1 and r.tensor_parallel_size == 1 and r.num_gpus < 1 and cfg.trainer.num_gpus < 1
    return "cuda_ipc" if may_share else "broadcast"


def fit_to_gpus(path: str, auto: bool, learner_gpu: str, worker_gpus: list[str]) -> str:
    """The path that works with the GPUs Ray gave (UUIDs of learner rank 0 and of each worker).

    cuda_ipc needs every worker on the learner's GPU; an NCCL broadcast needs every member on its own
    GPU (NCCL refuses two ranks on one device). "auto" falls back (cuda_ipc → broadcast → object_store);
    an explicit choice that cannot work raises."""
    on_learner = [g == learner_gpu for g in worker_gpus]
    if path == "cuda_ipc":
        if all(on_learner):
            return path
        if not auto:
            raise RuntimeError(f"rollout.weight_sync=cuda_ipc needs every rollout worker on learner rank 0's GPU "
                               f"(learner {learner_gpu}, workers {worker_gpus}); use rollout.weight_sync=broadcast")
        path = "broadcast"
    if path == "broadcast" and (any(on_learner) or len(set(worker_gpus)) < len(worker_gpus)):
        if not auto:
            raise RuntimeError(f"rollout.weight_sync=broadcast needs learner rank 0 and every rollout worker on GPUs "
                               f"of their own (NCCL allows one rank per GPU), but some share one (learner {learner_gpu}, "
                               f"workers {worker_gpus}); use rollout.weight_sync=object_store or auto")
        return "object_store"
    return path


def get_all(refs: list) -> list:
    """ray.get(refs), but raising at the first failure: the peers of a failed collective member would
    otherwise wait for it forever (NCCL) and so would a plain ray.get on them."""
    pending = list(refs)
    while pending:
        ready, pending = ray.wait(pending, num_returns=1)
        ray.get(ready)
    return ray.get(refs)


def sync_weights(learners: list, workers: list, bucket_mb: int) -> int:
    """Object-store path: rank 0's CPU buckets → every worker. Returns the tensors each worker loaded."""
    buckets = ray.get([lr.export_weights.remote(bucket_mb) for lr in learners])[0]
    return sum(ray.get([w.update_weights.remote(buckets) for w in workers]))


class WeightSync:
    """Set up once (joins groups, checks devices), then called after every update."""

    def __init__(self, cfg: RunConfig, learners: list, workers: list, path: str | None = None):
        self.learners, self.workers = learners, workers
        self.bucket_mb = cfg.rollout.sync_bucket_mb
        self.path = path or resolve_sync_path(cfg)
        if self.path not in ("object_store", "broadcast", "cuda_ipc"):
            raise ValueError(f"unknown weight-sync path {self.path!r}")
        if cfg.trainer.device == "cuda" and self.path != "object_store":
            learner_gpu = ray.get(self.learners[0].gpu_uuid.remote())
            worker_gpus = ray.get([w.gpu_uuid.remote() for w in self.workers])
            self.path = fit_to_gpus(self.path, path is None and cfg.rollout.weight_sync == "auto", learner_gpu, worker_gpus)
        if self.path == "broadcast":
            self._join_broadcast_group(cfg)

    def _join_broadcast_group(self, cfg: RunConfig) -> None:
        backend = "nccl" if cfg.trainer.device == "cuda" else "gloo"
        engine_ranks = cfg.rollout.tensor_parallel_size if cfg.rollout.backend == "vllm" else 1
        world_size = 1 + engine_ranks * len(self.workers)
        host, port = ray.get(self.learners[0].address.remote())
        # every member blocks in the rendezvous until all have joined: start them together
        refs = [w.init_weight_update_group.remote(backend, host, port, 1 + i * engine_ranks, world_size)
                for i, w in enumerate(self.workers)]
        refs += [lr.init_weight_broadcast.remote(backend, host, port, world_size) for lr in self.learners]
        get_all(refs)
        self.plan = ray.get(self.learners[0].weight_plan.remote(self.bucket_mb))

    def __call__(self) -> int:
        """Send the current weights; returns the tensors each worker loaded, summed over workers."""
        if self.path == "object_store":
            return sync_weights(self.learners, self.workers, self.bucket_mb)
        if self.path == "broadcast":
            sent = [lr.broadcast_weights.remote(self.bucket_mb) for lr in self.learners]
            received = [w.update_weights_broadcast.remote(self.plan) for w in self.workers]
            return sum(get_all(sent + received)[len(sent):])
        count = ray.get([lr.begin_ipc_export.remote(self.bucket_mb) for lr in self.learners])[0]
        n = 0
        for i in range(count):
            bucket = ray.get([lr.next_ipc_bucket.remote() for lr in self.learners])[0]
            n += sum(ray.get([w.update_weights_ipc.remote([bucket], complete=i == count - 1) for w in self.workers]))
        ray.get([lr.end_ipc_export.remote() for lr in self.learners])
        return n
