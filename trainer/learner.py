"""The learner: DeepSpeed ranks as Ray actors that apply the objectives and update the student.

Each rank is a `Learner` actor. The driver hands every rank its shard of a step's data; ranks split
it into micro-batches by a token budget, agree on the micro-batch count (ZeRO-3 forwards are
collective, so every rank must run the same number), accumulate gradients with the loss normalised
by the *global* token count, and take one optimizer step per inner (PPO) epoch.
"""
from __future__ import annotations

import os
import socket
from typing import Iterator, Optional

import torch

from launch.config import ObjectiveConfig, TrainerConfig, resolve_path
from rollout.forward import response_logits
from rollout.types import RolloutBatch
from rollout.weight_sync import TensorMeta, bucket_plan, pack
from teacher.types import TeacherScores
from trainer.objective import lm_batch_loss, objective_loss, select_scores
from trainer.student import load_student, optimizer_groups


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("", 0))
        return s.getsockname()[1]


def node_address() -> tuple[str, int]:
    """This node's IP and a free port, for rank 0's rendezvous."""
    import ray
    return ray.util.get_node_ip_address(), free_port()


def split_by_tokens(lengths: list[int], budget: int) -> list[list[int]]:
    """Consecutive index groups whose padded size (rows × longest row) stays within `budget`.

    A single row longer than the budget forms its own group.
    """
    groups, current, longest = [], [], 0
    for i, n in enumerate(lengths):
        new_longest = max(longest, n)
        if current and new_longest * (len(current) + 1) > budget:
            groups.append(current)
            current, new_longest = [], n
        current.append(i)
        longest = new_longest
    if current:
        groups.append(current)
    return groups


def deepspeed_config(cfg: TrainerConfig) -> dict:
    ds = {
        "train_micro_batch_size_per_gpu": 1,  # micro-batches are sized by tokens, not rows
        "gradient_accumulation_steps": 1,  # accumulation is driven by set_gradient_accumulation_boundary
        "gradient_clipping": cfg.grad_clip,
        "zero_optimization": {"stage": cfg.zero_stage},
        "bf16": {"enabled": cfg.bf16},
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    }
    if cfg.cpu_offload:
        ds["zero_optimization"]["offload_optimizer"] = {"device": "cpu", "pin_memory": cfg.device == "cuda"}
        ds["optimizer"] = {"type": "AdamW", "params": {"lr": cfg.lr, "weight_decay": cfg.weight_decay}}
    if cfg.zero_stage == 3:
        ds["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] = True
    return ds


class Learner:
    """One DeepSpeed rank. Public methods are the actor protocol (all ranks are called together)."""

    def __init__(self, rank: int, world_size: int, master_addr: str, master_port: int,
                 student: str, student_init: str, dtype: str, trainer: dict, objective: dict,
                 release_memory: bool = False):
        """release_memory: return cached CUDA memory to the GPU after each update and sync, for a GPU shared
        with a sleeping vLLM engine (the single-GPU mode), which must find it free when it wakes."""
        self.cfg = TrainerConfig(**trainer)
        self.release_memory = release_memory
        self.obj = ObjectiveConfig(**objective)
        self.rank, self.world_size = rank, world_size
        torch.set_num_threads(max(1, int(self.cfg.num_cpus)))
        os.environ.update(MASTER_ADDR=master_addr, MASTER_PORT=str(master_port), RANK=str(rank),
                          WORLD_SIZE=str(world_size), LOCAL_RANK="0" if self.cfg.device == "cpu" else str(rank % max(1, torch.cuda.device_count())))
        import deepspeed
        import transformers

        backend = "nccl" if self.cfg.device == "cuda" else "gloo"
        deepspeed.init_distributed(dist_backend=backend, auto_mpi_discovery=False, verbose=False)
        torch.manual_seed(self.cfg.seed)
        self.model = load_student(resolve_path(student), student_init, getattr(torch, dtype), self.cfg.disable_dropout)
        if self.cfg.gradient_checkpointing:
            self.model.gradient_checkpointing_enable()
        schedule = {"constant": "constant_with_warmup", "linear": "linear", "cosine": "cosine"}[self.cfg.lr_schedule]

        def make_scheduler(optimizer):  # handed to DeepSpeed: it steps it and saves it in checkpoints
            return transformers.get_scheduler(schedule, optimizer, num_warmup_steps=self.cfg.warmup_updates(self.obj.ppo_epochs),
                                              num_training_steps=self.cfg.steps * self.obj.ppo_epochs)

        optimizer = None
        if not self.cfg.cpu_offload:  # a torch optimizer: no JIT-built DeepSpeed op needed on CPU
            # weight decay off until DeepSpeed has wrapped it: see below
            optimizer = torch.optim.AdamW(optimizer_groups(self.model, 0.0), lr=self.cfg.lr, weight_decay=0.0)
        self.engine, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=self.model, optimizer=optimizer, config=deepspeed_config(self.cfg), lr_scheduler=make_scheduler,
            model_parameters=None if optimizer is not None else optimizer_groups(self.model, self.cfg.weight_decay))
        if optimizer is not None:
            # bf16 at ZeRO 0 wraps the optimizer in FP16_UnfusedOptimizer, whose initialize_optimizer_states runs one
            # step on zero gradients: Adam's step count would start at 1 (a smaller first update than fp32 runs get)
            # and, with decay on, the fp32 master weights would decay once at the full lr. Start from a clean state.
            optimizer.state.clear()
            for group in optimizer.param_groups:
                group["weight_decay"] = self.cfg.weight_decay if group["decays"] else 0.0
        self.device = self.engine.device
        self.global_step = 0

    # ---- training -------------------------------------------------------------------------

    def train_step(self, batch: RolloutBatch, scores: Optional[TeacherScores], global_tokens: int,
                   pretrain: Optional[RolloutBatch] = None, global_pretrain_tokens: int = 0,
                   pretrain_scores: Optional[TeacherScores] = None) -> dict:
        """One rollout's worth of updates (objective.ppo_epochs optimizer steps).

        Returns {"sums": token-weighted metric sums of the first epoch, "tokens", the first epoch's
        "lr" and pre-clipping "grad_norm", and "peak_mem_gb" (this rank's CUDA peak; 0 on CPU)};
        the driver adds the sums over ranks and divides by the global token count.

        `global_tokens` is the response-token count over all ranks: each rank's loss is a sum over
        its tokens divided by it, times world_size because DeepSpeed averages gradients over ranks.
        """
        self.engine.train()
        if self.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(self.device)
        lengths = (batch.prompt_lens + batch.response_lens).tolist()
        groups = split_by_tokens(lengths, self.cfg.micro_batch_tokens)
        pt_groups = []
        if pretrain is not None:
            pt_groups = split_by_tokens((pretrain.prompt_lens + pretrain.response_lens).tolist(), self.cfg.micro_batch_tokens)
        n_micro = self._agree_max(max(len(groups), len(pt_groups), 1))
        sums: dict[str, float] = {}  # first epoch's token-weighted metric sums (on-policy values)
        for epoch in range(self.obj.ppo_epochs):
            for i in range(n_micro):
                loss = torch.zeros((), device=self.device)
                if i < len(groups):
                    mb = batch.select(groups[i])
                    mb_scores = select_scores(scores, groups[i], mb.max_response_len)
                    loss_mb, metrics = objective_loss(self.engine, mb, mb_scores, self.obj, global_tokens)
                    loss = loss + loss_mb
                    if epoch == 0:
                        n_tok = int(mb.response_lens.sum())
                        for k, v in metrics.items():
                            sums[k] = sums.get(k, 0.0) + float(v) * n_tok
                else:  # an empty slot: keeps collectives in step with ranks that have more data
                    loss = loss + self._dummy_loss()
                if self.obj.pt_weight > 0:  # every rank runs an L_PT forward in every slot (ZeRO-3)
                    if i < len(pt_groups):
                        pt_mb = pretrain.select(pt_groups[i])
                        pt_loss, pt_metrics = lm_batch_loss(
                            self.engine, pt_mb, global_pretrain_tokens, kd_ratio=self.obj.pt_kd_ratio,
                            scores=select_scores(pretrain_scores, pt_groups[i], pt_mb.max_response_len))
                        if epoch == 0:  # this rank's share of the global mean: scale like the rest
                            for k, v in pt_metrics.items():
                                sums[k] = sums.get(k, 0.0) + v * global_tokens
                    else:
                        pt_loss = self._dummy_loss()
                    loss = loss + self.obj.pt_weight * pt_loss
                self.engine.set_gradient_accumulation_boundary(i == n_micro - 1)
                self.engine.backward(loss * self.world_size)
            if epoch == 0:  # like the metric sums: the on-policy (first) update's figures
                lr = self.scheduler.get_last_lr()[0]  # the rate this update uses
                grad_norm = self._grad_norm()
            self.engine.step()  # clips, updates, steps the LR scheduler
            self.global_step += 1
            if epoch == 0 and grad_norm is None:  # ZeRO 1-3: DeepSpeed's pre-clipping norm of this step
                grad_norm = float(self.engine.get_global_grad_norm() or 0.0)
        peak = torch.cuda.max_memory_allocated(self.device) / 2**30 if self.device.type == "cuda" else 0.0
        self._release_cached_memory()
        return {"sums": sums, "tokens": int(batch.response_lens.sum()), "lr": lr, "grad_norm": grad_norm,
                "peak_mem_gb": peak}

    def optimizer_steps(self) -> int:
        """Adam's step count (the largest over parameters; 0 before the first update)."""
        inner = getattr(self.optimizer, "optimizer", self.optimizer)
        steps = [int(st["step"]) for st in inner.state.values() if "step" in st]
        return max(steps, default=0)

    def _grad_norm(self) -> Optional[float]:
        """Pre-clipping global gradient norm. DeepSpeed records it for ZeRO 1-3 at step time; at
        stage 0 with a torch optimizer it does not, and the (already averaged) grads are read here."""
        if self.cfg.zero_stage != 0:
            return None
        grads = [p.grad for p in self.engine.module.parameters() if p.grad is not None]
        return float(torch.nn.utils.get_total_norm(grads)) if grads else 0.0

    def _dummy_loss(self) -> torch.Tensor:
        """A zero loss through the same forward path as real micro-batches (same collectives under ZeRO-3)."""
        one = RolloutBatch.from_lists([[0]], [[0]], pad_token_id=0)
        return response_logits(self.engine, one).sum() * 0.0

    def _agree_max(self, n: int) -> int:
        import torch.distributed as dist
        t = torch.tensor([n], device=self.device)
        dist.all_reduce(t, op=dist.ReduceOp.MAX)
        return int(t.item())

    # ---- evaluation helpers ---------------------------------------------------------------

    @torch.no_grad()
    def eval_objective(self, batch: RolloutBatch, scores: TeacherScores, global_tokens: int) -> dict:
        """The objective's figures on held-out samples, no update: {"sums": token-weighted metric sums, "tokens"},
        merged by the driver like `train_step`'s. Every rank runs the same number of forwards (ZeRO-3)."""
        self.engine.eval()
        groups = split_by_tokens((batch.prompt_lens + batch.response_lens).tolist(), self.cfg.micro_batch_tokens)
        sums: dict[str, float] = {}
        for i in range(self._agree_max(max(len(groups), 1))):
            if i >= len(groups):
                self._dummy_loss()
                continue
            mb = batch.select(groups[i])
            _, metrics = objective_loss(self.engine, mb, select_scores(scores, groups[i], mb.max_response_len),
                                        self.obj, global_tokens)
            n_tok = int(mb.response_lens.sum())
            for k, v in metrics.items():
                sums[k] = sums.get(k, 0.0) + float(v) * n_tok
        self._release_cached_memory()
        return {"sums": sums, "tokens": int(batch.response_lens.sum())}

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """(N, T) log q(y_t) under the learner's current weights (all ranks must call under ZeRO-3)."""
        self.engine.eval()
        logits = response_logits(self.engine.module, batch).float()
        lp = torch.log_softmax(logits, -1).gather(-1, batch.response_tokens().to(self.device)[..., None])[..., 0]
        return lp.masked_fill(~batch.response_mask().to(self.device), 0.0).cpu()

    # ---- weights out -----------------------------------------------------------------------

    def _named_params(self):
        return list(self.engine.module.named_parameters())

    def address(self) -> tuple[str, int]:
        """This rank's node IP and a free port there (rank 0 hosts the weight broadcast's rendezvous)."""
        return node_address()

    def gpu_uuid(self) -> Optional[str]:
        return str(torch.cuda.get_device_properties(self.device).uuid) if self.device.type == "cuda" else None

    def weight_plan(self, bucket_mb: int) -> list[list[TensorMeta]]:
        """The flat buckets the weights travel in (same on every rank: full shapes under ZeRO-3)."""
        return bucket_plan([(n, getattr(p, "ds_shape", p.shape), p.dtype) for n, p in self._named_params()],
                           bucket_mb * 2**20)

    def _gathered_buckets(self, plan: list[list[TensorMeta]], device) -> Iterator[tuple[Optional[torch.Tensor], list[TensorMeta]]]:
        """(flat bucket on rank 0 / None elsewhere, metas) per bucket of `plan`. Under ZeRO-3 every rank must
        iterate: parameters are gathered one bucket at a time, so no rank ever holds more than one
        bucket of full parameters beyond its own shard."""
        import deepspeed

        by_name = dict(self._named_params())
        for metas in plan:
            params = [by_name[m["name"]] for m in metas]
            with deepspeed.zero.GatheredParameters(params, enabled=self.cfg.zero_stage == 3):
                yield (pack(params, metas, device=device) if self.rank == 0 else None), metas

    def export_weights(self, bucket_mb: int) -> list[tuple]:
        """Object-store path: rank 0 returns [(ObjectRef of a CPU flat bucket, metas)], others []."""
        import ray

        return [(ray.put(flat), metas) for flat, metas in self._gathered_buckets(self.weight_plan(bucket_mb), "cpu") if flat is not None]

    def init_weight_broadcast(self, backend: str, host: str, port: int, world_size: int) -> None:
        """Rank 0 joins the broadcast group with the rollout engines as its rank 0 (`rollout.collective`);
        the workers must join at the same time (their `init_weight_update_group`)."""
        from rollout.collective import BroadcastGroup

        if self.rank == 0:
            self._broadcast = BroadcastGroup(backend, host, port, 0, world_size, device=self.device)

    def broadcast_weights(self, bucket_mb: int) -> int:
        """Broadcast path: rank 0 sends each bucket from its device, in `weight_plan` order; every rank
        must call (ZeRO-3 gathers). Returns the tensors sent (0 on other ranks)."""
        n = 0
        for flat, metas in self._gathered_buckets(self.weight_plan(bucket_mb), self.device):
            if flat is not None:
                self._broadcast.broadcast(flat, src=0)
                n += len(metas)
        return n

    def begin_ipc_export(self, bucket_mb: int) -> int:
        """Same-GPU path: start handing out buckets one at a time (`next_ipc_bucket`); returns their count."""
        plan = self.weight_plan(bucket_mb)
        self._ipc_iter = self._gathered_buckets(plan, self.device)
        self._ipc_flat = None
        return len(plan)

    def next_ipc_bucket(self) -> Optional[tuple[bytes, list[TensorMeta]]]:
        """Rank 0: (CUDA IPC handle, metas) of the next bucket, which stays alive (and unchanged) until the
        next call; other ranks: None (they only take part in the ZeRO-3 gather). Every rank must call."""
        from rollout.vllm_backend import ipc_handle

        self._ipc_flat = None  # the engine has loaded the previous bucket: release it
        flat, metas = next(self._ipc_iter)
        if flat is None:
            return None
        self._ipc_flat = flat
        return ipc_handle(flat), metas

    def end_ipc_export(self) -> None:
        """After the last bucket: release it and close the last ZeRO-3 gather (every rank must call)."""
        self._ipc_flat = None
        for _ in self._ipc_iter:
            raise RuntimeError("end_ipc_export: buckets were left unsent")
        if self.device.type == "cuda":  # free shared buckets torch still holds for the engine (as vLLM's ipc_engine)
            torch.cuda.ipc_collect()
        self._release_cached_memory()

    def _release_cached_memory(self) -> None:
        if self.release_memory and self.device.type == "cuda":
            torch.cuda.empty_cache()

    def state_dict_cpu(self) -> dict[str, torch.Tensor]:
        """Full weights on rank 0 (others: {}), gathered bucket by bucket under ZeRO-3."""
        import deepspeed

        out = {}
        for name, p in self._named_params():
            with deepspeed.zero.GatheredParameters([p], enabled=self.cfg.zero_stage == 3):
                if self.rank == 0:
                    out[name] = p.detach().to("cpu", copy=True)
        return out

    def save_hf(self, out_dir: str) -> Optional[str]:
        """Write a Hugging Face model folder (safetensors + config + generation config) from rank 0."""
        sd = self.state_dict_cpu()
        if self.rank != 0:
            return None
        self.engine.module.save_pretrained(out_dir, state_dict=sd, safe_serialization=True)
        return out_dir

    # ---- checkpoints ---------------------------------------------------------------------------

    def save_checkpoint(self, ckpt_dir: str) -> None:
        """Every rank writes its DeepSpeed shard (model, optimizer, scheduler) and its RNG states."""
        from trainer import checkpoint as ckpt

        self.engine.save_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag="state",
                                    client_state={"global_step": self.global_step})
        os.makedirs(os.path.join(ckpt_dir, "rng"), exist_ok=True)
        torch.save(ckpt.capture_rng(), os.path.join(ckpt_dir, "rng", f"rank_{self.rank}.pt"))

    def load_checkpoint(self, ckpt_dir: str) -> int:
        from trainer import checkpoint as ckpt

        _, client = self.engine.load_checkpoint(os.path.join(ckpt_dir, "deepspeed"), tag="state")
        if client is None:
            raise RuntimeError(f"DeepSpeed could not load the checkpoint in {ckpt_dir}")
        self.global_step = client["global_step"]
        ckpt.load_rng(ckpt_dir, self.rank)
        self._apply_optimizer_settings()
        return self.global_step

    def _apply_optimizer_settings(self) -> None:
        """After a resume: the checkpoint restored the optimizer's lr and weight decay and the scheduler's base rate
        as they were saved; a run resumed with another trainer.lr or trainer.weight_decay means the new ones (the
        schedule's shape, warm-up and length, already comes from the config: the scheduler saves no functions)."""
        import warnings

        groups = self.scheduler.optimizer.param_groups
        for group in groups:
            group["weight_decay"] = self.cfg.weight_decay if group.get("decays", True) else 0.0
            group["initial_lr"] = self.cfg.lr
        self.scheduler.base_lrs = [self.cfg.lr] * len(groups)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # get_lr() outside step() warns; it is the rate at the current step
            lrs = self.scheduler.get_lr()
        for group, lr in zip(groups, lrs):
            group["lr"] = lr
        self.scheduler._last_lr = list(lrs)

    def ready(self) -> dict:
        import ray
        return {"rank": self.rank, "world_size": self.world_size, "node_id": ray.get_runtime_context().get_node_id(),
                "params": sum(
            int(torch.tensor(getattr(p, "ds_shape", p.shape)).prod()) for _, p in self._named_params())}
