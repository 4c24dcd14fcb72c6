"""Typed, validated configuration: one dataclass per concern, YAML files plus dotted overrides.

Everything a run reads comes from `RunConfig`. `load_config(path, overrides)` merges a YAML file
with `section.key=value` overrides and validates the result *before* any model is loaded:
an unknown key, a wrong type or an impossible value raises `ConfigError` naming the key and
the valid choices.

Paths may start with `builtin:` to point into the assets shipped with the package
(`builtin:tiny-teacher`, `builtin:tokenizer`, `builtin:corpus/train.jsonl`, ...).
"""
from __future__ import annotations

import dataclasses
import datetime
import difflib
import importlib.util
import math
import os
import re
import types
import typing
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, Optional

import yaml

CONFIG_DIR = Path(__file__).parent / "configs"
ASSETS_DIR = Path(__file__).parent / "assets"
DEFAULT_CONFIG = "cpu_tiny"


class ConfigError(ValueError):
    """A configuration problem the user can fix; the message names the key."""


# "owner/name" as the Hub spells a model id (one slash; no scheme, no leading ./ or /)
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*/[\w.\-]+$")


def resolve_path(path: Optional[str]) -> Optional[str]:
    """Expand `builtin:` (shipped assets) and `~`; a Hub model id that is no local path becomes its folder in the
    local Hugging Face cache (`hf download`, HF_HOME), when it is there: nothing is downloaded. Other strings pass
    through unchanged."""
    if path is None:
        return None
    if path.startswith("builtin:"):
        return str(ASSETS_DIR / path[len("builtin:"):])
    path = os.path.expanduser(path)
    if looks_like_hub_id(path):
        return cached_hub_snapshot(path) or path
    return path


def looks_like_hub_id(value: str) -> bool:
    """An `owner/name` string that names no local path."""
    return bool(_HUB_ID.match(value)) and not os.path.exists(os.path.expanduser(value))


def cached_hub_snapshot(repo_id: str) -> Optional[str]:
    """The local cache's snapshot folder of a Hub model (main revision), or None if it is not cached."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import LocalEntryNotFoundError

    try:
        return snapshot_download(repo_id, local_files_only=True)
    except (LocalEntryNotFoundError, ValueError, OSError):
        return None


@dataclass
class ModelConfig:
    """Student and teacher models.

    student (str): a Hugging Face model folder (or `builtin:`) with the student's initial weights,
        or, with `student_init: from_config`, a folder holding only a `config.json`; its weights
        are then initialised at random with `trainer.seed`.
    student_init (str, *optional*, defaults to "pretrained"): "pretrained" | "from_config".
    teacher (str): the teacher's model folder.
    tokenizer (str, *optional*): tokenizer folder; defaults to the student folder. The teacher's
        tokenizer (if its folder has one) must agree with it on the tokens used.
    dtype (str, *optional*, defaults to "float32"): parameter dtype for student and teacher
        ("float32" on CPU, "bfloat16" on GPU).
    """

    student: str = "builtin:tiny-student"
    student_init: Literal["pretrained", "from_config"] = "pretrained"
    teacher: str = "builtin:tiny-teacher"
    tokenizer: Optional[str] = None
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"


@dataclass
class DataConfig:
    """Prompt data.

    prompts (str): a local `.jsonl`/`.parquet`/`.json` file (a `.json` file holds an array of objects
        or JSON lines), a `datasets` `save_to_disk` folder (of a DatasetDict, its "train" split), or
        `hf:NAME[:SPLIT]` for a Hugging Face `datasets` dataset already in the local cache (nothing is
        downloaded when HF_HUB_OFFLINE=1) or a `save_to_disk` folder's split.
    prompt_key (str, *optional*, defaults to "prompt"): the field with the prompt text or a list of
        chat messages (the tokenizer's chat template is then applied). Left at "prompt", rows without
        it are read from a `messages` column (TRL's conversational form).
    response_key (str, *optional*, defaults to "response"): the field with the dataset's own
        response (GKD's off-policy data; needed when `objective.lam < 1`). Left at "response", rows
        without it are read from a `completion` column (TRL's prompt/completion form). With the chat
        template applied, a response's ids are those the template writes for the assistant turn (its
        end-of-turn token included), else the text's ids closed by EOS.
    chat_template (bool, *optional*, defaults to False): apply the tokenizer's chat template to plain
        string prompts too (chat-message prompts always get it).
    eval_prompts (str, *optional*): held-out prompts for the before/after reverse-KL report.
    num_eval_prompts (int, *optional*, defaults to 32).
    pretrain (str, *optional*): text data for MiniLLM's L_PT loss: rows with a `text` field, from a
        `.jsonl`, `.parquet` or `hf:NAME[:SPLIT]` source.
    pretrain_max_len (int, *optional*, defaults to 512): pretraining documents are cut into windows
        of at most this many tokens (BOS as the tokenizer adds it, EOS closing each document).
    max_prompt_len (int, *optional*, defaults to 256): the longest prompt in tokens.
    long_prompts (str, *optional*, defaults to "error"): what a prompt longer than the limit does:
        "error" (the run does not start), "skip" (the row is dropped, with one warning counting them)
        or "truncate_left" (its last tokens are kept, as TRL's collator does). The limit is
        `max_prompt_len`, and with "skip"/"truncate_left" also the student's (and the Ray teacher's)
        context minus `rollout.max_new_tokens`. Eval prompts follow the same policy.
    """

    prompts: str = "builtin:corpus/prompts_train.jsonl"
    prompt_key: str = "prompt"
    response_key: str = "response"
    chat_template: bool = False
    eval_prompts: Optional[str] = "builtin:corpus/prompts_eval.jsonl"
    num_eval_prompts: int = 32
    pretrain: Optional[str] = None
    pretrain_max_len: int = 512
    max_prompt_len: int = 256
    long_prompts: Literal["error", "skip", "truncate_left"] = "error"

    def validate(self) -> None:
        _positive("data.num_eval_prompts", self.num_eval_prompts)
        _positive("data.max_prompt_len", self.max_prompt_len)
        choices = typing.get_args(typing.get_type_hints(DataConfig)["long_prompts"])
        if self.long_prompts not in choices:
            raise ConfigError(f"data.long_prompts must be one of {', '.join(map(repr, choices))}, "
                              f"got {self.long_prompts!r}")
        if self.pretrain_max_len < 2:
            raise ConfigError(f"data.pretrain_max_len must be >= 2 (one context token and one target), got {self.pretrain_max_len}")


@dataclass
class RolloutConfig:
    """Sampling from the student.

    backend (str, *optional*, defaults to "hf"): "hf" (transformers `generate`, CPU or GPU) or
        "vllm" (GPU, needs the `vllm` extra).
    num_workers (int, *optional*, defaults to 1): data-parallel rollout workers (Ray actors).
    tensor_parallel_size (int, *optional*, defaults to 1): vLLM tensor parallelism per worker.
    prompts_per_step (int, *optional*, defaults to 16): prompts drawn per training step.
    n_samples (int, *optional*, defaults to 1): samples per prompt.
    max_new_tokens (int, *optional*, defaults to 32).
    temperature, top_p, top_k: sampling settings (defaults 1.0, 1.0, 0 = off). MiniLLM requires the
        defaults (its policy gradient is over y ~ q_θ); for the divergence objectives they only choose
        the prefixes on which the divergence is taken.
    mix_alpha (float, *optional*, defaults to 0.0): MiniLLM teacher-mixed sampling, each token
        drawn from α·p + (1−α)·q_θ (arXiv 2306.08543 §2.2); 0 is plain student sampling.
    seed (int, *optional*, defaults to 0).
    gpu_memory_utilization (float, *optional*, defaults to 0.3): vLLM's share of the GPU.
    teacher_gpu_memory_utilization (float, *optional*, defaults to 0.35): with vllm and mix_alpha > 0,
        the share of the same GPU for the teacher engine that draws the teacher's tokens; the two
        shares must fit in one GPU.
    sleep_mode (bool, *optional*, defaults to False): vLLM sleeps (weights and KV cache offloaded)
        while the learner trains; for the single-GPU mode. The teacher engine of mixed sampling sleeps
        too (its weights wait in CPU memory).
    enforce_eager (bool, *optional*, defaults to False): vLLM without CUDA graphs (faster start).
    sync_bucket_mb (int, *optional*, defaults to 256): weight-sync flat bucket size.
    weight_sync (str, *optional*, defaults to "auto"): how new weights reach the rollout workers:
        "object_store" (CPU-staged buckets through Ray's object store), "broadcast" (learner rank 0
        broadcasts each bucket: NCCL on GPU, gloo on CPU), "cuda_ipc" (vLLM on the learner's own GPU:
        zero-copy handles). "auto": object_store on CPU or with the hf backend; with vllm, cuda_ipc when
        every worker sits on the GPU of the only learner rank (the single-GPU mode), else broadcast, or
        object_store where a GPU would hold two NCCL ranks (decided from the GPUs Ray assigns).
    num_cpus (float, *optional*, defaults to 1): CPUs per rollout worker actor.
    num_gpus (float, *optional*, defaults to 1): GPUs per rollout worker with tensor_parallel_size=1
        (a fraction shares a GPU with other roles: the single-GPU mode); with tensor parallelism each
        worker takes tensor_parallel_size whole GPUs.
    """

    backend: Literal["hf", "vllm"] = "hf"
    num_workers: int = 1
    tensor_parallel_size: int = 1
    prompts_per_step: int = 16
    n_samples: int = 1
    max_new_tokens: int = 32
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    mix_alpha: float = 0.0
    seed: int = 0
    gpu_memory_utilization: float = 0.3
    teacher_gpu_memory_utilization: float = 0.35
    sleep_mode: bool = False
    enforce_eager: bool = False
    sync_bucket_mb: int = 256
    weight_sync: Literal["auto", "object_store", "broadcast", "cuda_ipc"] = "auto"
    num_cpus: float = 1.0
    num_gpus: float = 1.0

    def gpus_per_worker(self, device: str) -> float:
        if device == "cpu":
            return 0.0
        return self.num_gpus if self.tensor_parallel_size == 1 else float(self.tensor_parallel_size)

    def validate(self) -> None:
        _in_range("rollout.num_gpus", self.num_gpus, 0.0, None)
        _in_range("rollout.num_cpus", self.num_cpus, 0.0, None)
        for key in ("num_workers", "tensor_parallel_size", "prompts_per_step", "n_samples",
                    "max_new_tokens", "sync_bucket_mb"):
            _positive(f"rollout.{key}", getattr(self, key))
        _in_range("rollout.temperature", self.temperature, 0.0, None, low_open=True)
        _in_range("rollout.top_p", self.top_p, 0.0, 1.0, low_open=True)
        _in_range("rollout.top_k", self.top_k, 0, None)
        _in_range("rollout.mix_alpha", self.mix_alpha, 0.0, 1.0)
        _in_range("rollout.gpu_memory_utilization", self.gpu_memory_utilization, 0.0, 1.0, low_open=True)
        _in_range("rollout.teacher_gpu_memory_utilization", self.teacher_gpu_memory_utilization, 0.0, 1.0, low_open=True)
        engines = self.gpu_memory_utilization + (self.teacher_gpu_memory_utilization if self.mix_alpha > 0 else 0.0)
        if self.backend == "vllm" and self.mix_alpha > 0 and engines > 1.0:
            # vLLM would fail at start-up, when the second engine finds too little free memory
            raise ConfigError(f"rollout.gpu_memory_utilization ({self.gpu_memory_utilization}) + "
                              f"rollout.teacher_gpu_memory_utilization ({self.teacher_gpu_memory_utilization}) > 1: "
                              "with mix_alpha > 0 the student and teacher engines share each rollout GPU; lower them")
        if self.backend == "vllm" and self.num_gpus < 1 and engines > 0.7:
            warnings.warn(f"rollout: the vLLM engines take {engines:.0%} of a GPU they share with other roles "
                          f"(rollout.num_gpus={self.num_gpus}); the learner and teacher get the rest", stacklevel=2)


@dataclass
class TeacherConfig:
    """Teacher scoring.

    backend (str, *optional*, defaults to "ray"): "ray" (a pool of teacher actors),
        "http" (a `minillm serve-teacher` service at `url`), "vllm_server" (an external vLLM
        OpenAI-compatible server at `url`, via prompt_logprobs).
    num_replicas (int, *optional*, defaults to 1): data-parallel teacher actors ("ray").
    topk (int, *optional*, defaults to 0): top-k teacher log-probs per position (0 = sampled
        token only). Used by the top-k forms of the objectives when `return_full` is off.
    return_full (bool, *optional*, defaults to True): return the full teacher distribution
        (exact single-step / divergence terms; fine for small vocabularies or colocated teachers).
        Backend "ray" only.
    url (str, *optional*): service address for "http"/"vllm_server".
    served_model_name (str, *optional*): model name on the vLLM server (default: `model.teacher`).
    token_budget (int, *optional*, defaults to 16384): tokens per teacher micro-batch.
    num_gpus (float, *optional*, defaults to 0): GPUs per teacher replica.
    num_cpus (float, *optional*, defaults to 1): CPUs per teacher replica.
    overlap (bool, *optional*, defaults to True): with several rollout workers, score each worker's
        samples as soon as that worker finishes, while the others still generate (not in sleep mode,
        where the engines share the GPU with the teacher).
    """

    backend: Literal["ray", "http", "vllm_server"] = "ray"
    num_replicas: int = 1
    topk: int = 0
    return_full: bool = True
    url: Optional[str] = None
    served_model_name: Optional[str] = None
    token_budget: int = 16384
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    overlap: bool = True

    def validate(self) -> None:
        _positive("teacher.num_replicas", self.num_replicas)
        _in_range("teacher.num_gpus", self.num_gpus, 0.0, None)
        _in_range("teacher.num_cpus", self.num_cpus, 0.0, None)
        if self.url and not self.url.startswith(("http://", "https://")):
            raise ConfigError(f"teacher.url must start with http:// or https://, got {self.url!r}")
        _positive("teacher.token_budget", self.token_budget)
        _in_range("teacher.topk", self.topk, 0, None)
        if self.backend in ("http", "vllm_server") and not self.url:
            raise ConfigError(f"teacher.url is required when teacher.backend is {self.backend!r}")


OBJECTIVES = ("minillm", "gkd", "forward_kl", "reverse_kl", "tvd", "skew_kl", "skew_rkl", "akl")


@dataclass
class ObjectiveConfig:
    """The distillation objective.

    name (str, *optional*, defaults to "minillm"): "minillm" (reverse-KL policy gradient,
        arXiv 2306.08543), "gkd" (generalised JSD(β) with on-policy fraction λ, arXiv 2306.13649),
        or a token-level divergence on student samples: "forward_kl", "reverse_kl", "tvd",
        "skew_kl", "skew_rkl" (DistiLLM, arXiv 2402.03898), "akl" (arXiv 2404.02657).
    lam (float, *optional*, defaults to 1.0): GKD on-policy fraction λ: each batch is the
        student's own samples with probability λ, else the dataset's responses (or the teacher's
        samples with `seq_kd`). Used by every objective except "minillm" (always on-policy).
    seq_kd (bool, *optional*, defaults to False): off-policy batches are teacher samples.
    beta (float, *optional*, defaults to 0.5): JSD(β) interpolation.
    skew_alpha (float, *optional*, defaults to 0.1): DistiLLM skew α.
    akl_mu (float, *optional*, defaults to 0.5): AKL head/tail cumulative-probability split μ.
    temperature (float, *optional*, defaults to 1.0): divergence temperature τ: both distributions at τ
        (not for minillm). Full teacher log-probs are re-tempered in the loss; top-k ones are scored at τ.
    clip_eps (float, *optional*, defaults to 0.2): PPO ratio clipping ε (MiniLLM); null = no clipping (the
        exact importance-weighted estimator, see `minillm.policy_gradient.minillm_loss`).
    ppo_epochs (int, *optional*, defaults to 1): inner epochs over one rollout.
    length_norm (bool, *optional*, defaults to True): MiniLLM length normalisation.
    gamma (float, *optional*, defaults to 1.0): discount (the official code uses 0.95).
    include_current (bool, *optional*, defaults to False): official code's r_t in the return.
    whiten (bool, *optional*, defaults to False): official code's advantage whitening (masked). Like the
        code, which whitens each PPO mini-batch on each GPU, statistics are per learner micro-batch
        (`trainer.micro_batch_tokens`), so they depend on that budget.
    importance (str, *optional*, defaults to "token"): teacher-mixed importance weights,
        "token" (paper's single-token ratio) or "sequence" (exact products).
    single_step (bool, *optional*, defaults to True): MiniLLM single-step decomposition.
    pt_weight (float, *optional*, defaults to 0.0): weight of the L_PT language-modelling loss
        (needs `data.pretrain`).
    pt_kd_ratio (float, *optional*, defaults to 0.0): the official MiniLLM code's `--kd-ratio`: the
        pretraining term becomes `(1 - r) L_PT + r KD`, KD the token-level forward KL from the teacher on the
        same pretraining windows (the code's teacher-student cross-entropy, same gradient). Needs
        `pt_weight > 0` and the teacher's distribution (`teacher.return_full` or `teacher.topk > 0`).
    """

    name: Literal["minillm", "gkd", "forward_kl", "reverse_kl", "tvd", "skew_kl", "skew_rkl", "akl"] = "minillm"
    lam: float = 1.0
    seq_kd: bool = False
    beta: float = 0.5
    skew_alpha: float = 0.1
    akl_mu: float = 0.5
    temperature: float = 1.0
    clip_eps: Optional[float] = 0.2
    ppo_epochs: int = 1
    length_norm: bool = True
    gamma: float = 1.0
    include_current: bool = False
    whiten: bool = False
    importance: Literal["token", "sequence"] = "token"
    single_step: bool = True
    pt_weight: float = 0.0
    pt_kd_ratio: float = 0.0

    def validate(self) -> None:
        _in_range("objective.lam", self.lam, 0.0, 1.0)
        _in_range("objective.beta", self.beta, 0.0, 1.0)
        _in_range("objective.skew_alpha", self.skew_alpha, 0.0, 1.0)
        _in_range("objective.akl_mu", self.akl_mu, 0.0, 1.0)
        _in_range("objective.temperature", self.temperature, 0.0, None, low_open=True)
        if self.clip_eps is not None:
            _in_range("objective.clip_eps", self.clip_eps, 0.0, None, low_open=True)
        _in_range("objective.gamma", self.gamma, 0.0, 1.0)
        _in_range("objective.pt_weight", self.pt_weight, 0.0, None)
        _in_range("objective.pt_kd_ratio", self.pt_kd_ratio, 0.0, 1.0)
        if self.pt_kd_ratio > 0 and self.pt_weight == 0:
            raise ConfigError(f"objective.pt_kd_ratio={self.pt_kd_ratio} mixes KD into the pretraining term, which is "
                              f"off: set objective.pt_weight > 0 (and data.pretrain), or pt_kd_ratio=0")
        _positive("objective.ppo_epochs", self.ppo_epochs)

    def needs_teacher_distribution(self) -> bool:
        """Whether the loss reads the teacher's distribution (top-k or full), not only its sampled-token log-probs."""
        return self.name != "minillm" or self.single_step or self.pt_kd_ratio > 0


@dataclass
class TrainerConfig:
    """The DeepSpeed learner.

    steps (int, *optional*, defaults to 100): training steps (one rollout each).
    lr (float, *optional*, defaults to 1e-5), weight_decay (float, defaults to 0.0): AdamW; as in HF Trainer,
        biases and norm weights do not decay.
    lr_schedule (str, *optional*, defaults to "constant"): "constant" | "linear" | "cosine",
        after `warmup_steps` of linear warm-up.
    warmup_steps (int, *optional*, defaults to 0): warm-up length in optimizer updates (steps × ppo_epochs
        updates in a run).
    warmup_ratio (float, *optional*, defaults to 0.0): warm-up as a fraction of the run's updates, rounded up
        (HF Trainer's `warmup_ratio`); give it or `warmup_steps`, not both.
    grad_clip (float, *optional*, defaults to 1.0): max gradient norm (0 = off).
    zero_stage (int, *optional*, defaults to 0): DeepSpeed ZeRO stage 0-3.
    num_ranks (int, *optional*, defaults to 1): learner data-parallel ranks (Ray actors).
    micro_batch_tokens (int, *optional*, defaults to 8192): token budget per micro-batch.
    bf16 (bool, *optional*, defaults to False): bf16 training (GPU).
    gradient_checkpointing (bool, *optional*, defaults to False).
    disable_dropout (bool, *optional*, defaults to True): the learner's student without dropout, as the rollout
        samples (TRL's `disable_dropout`): with it on, the learner's log-probs are not the samples'.
    cpu_offload (bool, *optional*, defaults to False): ZeRO optimizer offload to CPU.
    device (str, *optional*, defaults to "cpu"): "cpu" or "cuda".
    num_gpus (float, *optional*, defaults to 0): GPUs per learner rank.
    num_cpus (float, *optional*, defaults to 1): CPUs per learner rank.
    seed (int, *optional*, defaults to 0).
    eval_every (int, *optional*, defaults to 0): held-out reverse KL every N steps (0 = only
        before and after training); for objectives other than minillm also the objective's own loss
        on the same held-out samples (`eval/loss`).
    """

    steps: int = 100
    lr: float = 1e-5
    weight_decay: float = 0.0
    lr_schedule: Literal["constant", "linear", "cosine"] = "constant"
    warmup_steps: int = 0
    warmup_ratio: float = 0.0
    grad_clip: float = 1.0
    zero_stage: int = 0
    num_ranks: int = 1
    micro_batch_tokens: int = 8192
    bf16: bool = False
    gradient_checkpointing: bool = False
    disable_dropout: bool = True
    cpu_offload: bool = False
    device: Literal["cpu", "cuda"] = "cpu"
    num_gpus: float = 0.0
    num_cpus: float = 1.0
    seed: int = 0
    eval_every: int = 0

    def warmup_updates(self, ppo_epochs: int) -> int:
        """The warm-up in optimizer updates: `warmup_steps`, or `warmup_ratio` of the run's updates (rounded up)."""
        return self.warmup_steps or math.ceil(self.warmup_ratio * self.steps * ppo_epochs)

    def validate(self) -> None:
        _positive("trainer.steps", self.steps)
        _in_range("trainer.lr", self.lr, 0.0, None, low_open=True)
        _in_range("trainer.weight_decay", self.weight_decay, 0.0, None)
        _in_range("trainer.warmup_steps", self.warmup_steps, 0, None)
        _in_range("trainer.warmup_ratio", self.warmup_ratio, 0.0, 1.0)
        if self.warmup_steps and self.warmup_ratio:
            raise ConfigError(f"trainer.warmup_steps={self.warmup_steps} and trainer.warmup_ratio={self.warmup_ratio} "
                              f"both set the warm-up; give one of them")
        _in_range("trainer.grad_clip", self.grad_clip, 0.0, None)
        if self.zero_stage not in (0, 1, 2, 3):
            raise ConfigError(f"trainer.zero_stage must be one of 0, 1, 2, 3, got {self.zero_stage}")
        _positive("trainer.num_ranks", self.num_ranks)
        _in_range("trainer.num_gpus", self.num_gpus, 0.0, None)
        _in_range("trainer.num_cpus", self.num_cpus, 0.0, None)
        _positive("trainer.micro_batch_tokens", self.micro_batch_tokens)
        _in_range("trainer.eval_every", self.eval_every, 0, None)
        if self.bf16 and self.device == "cpu":
            raise ConfigError("trainer.bf16 is for GPU runs; set trainer.device=cuda or trainer.bf16=false")


@dataclass
class CheckpointConfig:
    """Checkpoints.

    every (int, *optional*, defaults to 0): checkpoint every N steps (0 = only at the end).
    keep_last (int, *optional*, defaults to 2): complete checkpoints kept.
    resume (str, *optional*, defaults to "never"): "never", "auto" (latest complete checkpoint
        in the run's checkpoint folder, if any) or a path: a checkpoint, a checkpoints folder, or a run
        folder (its newest complete checkpoint).
    """

    every: int = 0
    keep_last: int = 2
    resume: str = "never"

    def validate(self) -> None:
        _in_range("checkpoint.every", self.every, 0, None)
        _positive("checkpoint.keep_last", self.keep_last)


@dataclass
class ClusterConfig:
    """Where the Ray roles run.

    address (str, *optional*): Ray cluster address ("auto" inside `ray job submit`); None starts
        a local cluster.
    num_cpus (int, *optional*): CPUs of the local cluster (None = all).
    spread_roles (bool, *optional*, defaults to False): place rollout, teacher and learner in
        separate placement groups spread across nodes (multi-node); False packs them.
    """

    address: Optional[str] = None
    num_cpus: Optional[int] = None
    spread_roles: bool = False

    def validate(self) -> None:
        if self.num_cpus is not None:
            _positive("cluster.num_cpus", self.num_cpus)


@dataclass
class LoggingConfig:
    """Where metrics go besides `metrics.jsonl` and TensorBoard (always written to `output_dir`).

    wandb_project (str, *optional*): Weights & Biases project; None (default) = W&B off. Needs
        `pip install -e ".[wandb]"` and `wandb login` (or WANDB_API_KEY) unless `wandb_mode` is offline.
    wandb_entity (str, *optional*): W&B team or user (None = the login's default).
    wandb_run_name (str, *optional*): display name (None = the name of `output_dir`).
    wandb_mode (str, *optional*, defaults to "online"): "online" or "offline" (written under
        `output_dir/wandb`, uploaded later with `wandb sync`).
    """

    wandb_project: Optional[str] = None
    wandb_entity: Optional[str] = None
    wandb_run_name: Optional[str] = None
    wandb_mode: Literal["online", "offline"] = "online"

    def validate(self) -> None:
        if self.wandb_project is not None and importlib.util.find_spec("wandb") is None:
            raise ConfigError("logging.wandb_project is set but wandb is not installed: pip install -e \".[wandb]\" "
                              "(or unset logging.wandb_project)")


@dataclass
class RunConfig:
    """A whole run. `output_dir` receives logs, checkpoints and the exported model (`final/`)."""

    output_dir: str = "runs/minillm"
    model: ModelConfig = field(default_factory=ModelConfig)
    data: DataConfig = field(default_factory=DataConfig)
    rollout: RolloutConfig = field(default_factory=RolloutConfig)
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    objective: ObjectiveConfig = field(default_factory=ObjectiveConfig)
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)

    def validate(self) -> None:
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if hasattr(section, "validate"):
                section.validate()
        r = self.rollout
        if self.objective.name == "minillm" and (r.temperature != 1.0 or r.top_p < 1.0 or r.top_k > 0):
            # the policy gradient's expectation is over y ~ q_θ itself; a tempered or truncated sampler is
            # another policy, and the rollout's log q (raw) would not be the sampler's probabilities
            raise ConfigError(f"objective.name=minillm samples from the student itself: rollout.temperature must "
                              f"be 1.0, top_p 1.0 and top_k 0 (got {r.temperature}, {r.top_p}, {r.top_k})")
        if self.objective.name == "minillm" and self.objective.temperature != 1.0:
            raise ConfigError("objective.temperature is the divergence objectives' temperature; MiniLLM's policy gradient "
                              "is over the untempered student: leave objective.temperature=1.0 for objective.name=minillm")
        if self.rollout.mix_alpha > 0 and self.objective.name != "minillm":
            raise ConfigError("rollout.mix_alpha (teacher-mixed sampling) is for objective.name=minillm")
        if self.objective.pt_weight > 0 and not self.data.pretrain:
            raise ConfigError("objective.pt_weight > 0 needs data.pretrain (rows with a 'text' field: .jsonl, "
                              ".parquet or hf:NAME[:SPLIT])")
        if self.rollout.backend == "vllm" and self.trainer.device != "cuda":
            raise ConfigError("rollout.backend=vllm needs a GPU: set trainer.device=cuda (or rollout.backend=hf)")
        if r.sleep_mode and r.backend != "vllm":
            raise ConfigError("rollout.sleep_mode is a vLLM feature: set rollout.backend=vllm or sleep_mode=false")
        if r.weight_sync == "cuda_ipc" and (r.backend != "vllm" or r.tensor_parallel_size != 1 or self.trainer.num_ranks != 1):
            raise ConfigError("rollout.weight_sync=cuda_ipc is for vLLM workers without tensor parallelism on the GPU "
                              "of a single learner rank; use weight_sync=broadcast (or auto)")
        if (self.teacher.backend == "vllm_server" and self.objective.name != "minillm" and self.objective.temperature != 1.0):
            raise ConfigError("objective.temperature != 1 needs the teacher's top-k log-probs at that temperature; "
                              "vLLM's prompt_logprobs come from raw logits: use teacher.backend=ray or http, or "
                              "objective.temperature=1.0")
        if self.objective.needs_teacher_distribution() and not (self.teacher.return_full or self.teacher.topk > 0):
            what = (f"objective.name={self.objective.name}" if self.objective.name != "minillm" else
                    "objective.single_step=true" if self.objective.single_step else "objective.pt_kd_ratio > 0")
            raise ConfigError(f"{what} needs the teacher's distribution: set teacher.return_full=true (backend ray) "
                              f"or teacher.topk > 0")
        if self.teacher.backend != "ray" and self.teacher.return_full:
            raise ConfigError(f"teacher.return_full is only served by teacher.backend=ray; "
                              f"set teacher.return_full=false and teacher.topk>0 for {self.teacher.backend!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


# ---------------------------------------------------------------------------------------------
# Loading: YAML + dotted overrides -> dataclasses, strictly.


def _positive(key: str, value) -> None:
    if value <= 0:
        raise ConfigError(f"{key} must be > 0, got {value}")


def _in_range(key: str, value, low, high, low_open: bool = False) -> None:
    bad_low = low is not None and (value <= low if low_open else value < low)
    bad_high = high is not None and value > high
    if bad_low or bad_high:
        lo = "(" if low_open else "["
        raise ConfigError(f"{key} must be in {lo}{low}, {high if high is not None else 'inf'}], got {value}")


def _check_type(key: str, value: Any, annotation: Any) -> Any:
    """Return `value` converted to `annotation` (int -> float allowed) or raise ConfigError."""
    origin = typing.get_origin(annotation)
    if origin is typing.Union or origin is types.UnionType:
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, args[0])
    if origin is Literal:
        choices = typing.get_args(annotation)
        if value not in choices:
            raise ConfigError(f"{key} must be one of {', '.join(map(repr, choices))}, got {value!r}")
        return value
    if annotation is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"{key} must be true or false, got {value!r}")
        return value
    if annotation is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{key} must be an integer, got {value!r}")
        return value
    if annotation is float:
        if isinstance(value, str):  # YAML 1.1 reads 1e-5 (no dot) as a string
            try:
                value = float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"{key} must be a number, got {value!r}")
        if not math.isfinite(value):
            raise ConfigError(f"{key} must be a finite number, got {value!r}")
        return float(value)
    if annotation is str:
        if isinstance(value, (int, float, datetime.date)) and not isinstance(value, bool):
            return str(value)  # YAML read `run_name=2024-01-01` or `prompt_key=1` as a date or a number
        if not isinstance(value, str):
            raise ConfigError(f"{key} must be a string, got {value!r}")
        return value
    raise TypeError(f"unsupported config annotation {annotation} for {key}")


# TRL / transformers TrainingArguments names (GKDConfig, DistillationConfig) a migrating user types, and ours.
TRL_NAMES = {
    "lmbda": "objective.lam", "beta": "objective.beta", "seq_kd": "objective.seq_kd",
    "temperature": "rollout.temperature (sampling; objective.temperature is the loss's)",
    "max_new_tokens": "rollout.max_new_tokens", "top_p": "rollout.top_p", "top_k": "rollout.top_k",
    "max_prompt_length": "data.max_prompt_len", "max_length": "data.max_prompt_len + rollout.max_new_tokens",
    "model_name_or_path": "model.student", "teacher_model_name_or_path": "model.teacher",
    "learning_rate": "trainer.lr", "max_grad_norm": "trainer.grad_clip", "lr_scheduler_type": "trainer.lr_schedule",
    "warmup_steps": "trainer.warmup_steps", "warmup_ratio": "trainer.warmup_ratio",
    "weight_decay": "trainer.weight_decay", "max_steps": "trainer.steps",
    "seed": "trainer.seed", "bf16": "trainer.bf16", "gradient_checkpointing": "trainer.gradient_checkpointing",
    "disable_dropout": "trainer.disable_dropout", "eval_steps": "trainer.eval_every",
    "save_steps": "checkpoint.every", "save_total_limit": "checkpoint.keep_last",
    "per_device_train_batch_size": "rollout.prompts_per_step (the global batch: per-device batch x accumulation x GPUs)",
    "gradient_accumulation_steps": "rollout.prompts_per_step (the global batch) and trainer.micro_batch_tokens",
    "dataset_name": "data.prompts (hf:NAME[:SPLIT])", "report_to": "logging.wandb_project (TensorBoard is always on)",
    "use_vllm": "rollout.backend=vllm", "vllm_gpu_memory_utilization": "rollout.gpu_memory_utilization",
}


def _unknown_keys(cls, data: dict, prefix: str) -> list[tuple[str, list[str], str]]:
    """Every unknown key in the tree (not only the first): (its section, that section's keys, the key with the
    likeliest meant one)."""
    if not isinstance(data, dict):
        return []
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    out = []
    for k, v in data.items():
        key = f"{prefix}.{k}" if prefix else str(k)
        if k in names:
            if dataclasses.is_dataclass(hints[k]):
                out += _unknown_keys(hints[k], v or {}, key)
            continue
        if k in TRL_NAMES:
            hint = f" (TRL's {k} is {TRL_NAMES[k]} here)"
        elif str(k).split(".")[0] in names:  # `trainer.lr: 1e-5` in a YAML file: sections nest there
            hint = f" (in a YAML file sections nest: {str(k).split('.')[0]}: then the key indented under it)"
        elif (other := section_with(k)) and other != prefix:
            hint = f" (did you mean {other}.{k}?)"
        else:
            close = difflib.get_close_matches(str(k), names, n=1)
            hint = f" (did you mean {prefix + '.' if prefix else ''}{close[0]}?)" if close else ""
        out.append((prefix, names, key + hint))
    return out


def section_with(name: str) -> Optional[str]:
    """The section of RunConfig that has a key `name`, if exactly one does."""
    sections = {k: t for k, t in typing.get_type_hints(RunConfig).items() if dataclasses.is_dataclass(t)}
    hits = [k for k, t in sections.items() if name in {f.name for f in dataclasses.fields(t)}]
    return hits[0] if len(hits) == 1 else None


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"{prefix or 'config'} must be a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = [f.name for f in dataclasses.fields(cls)]
    unknown = _unknown_keys(cls, data, prefix)
    if len(unknown) == 1:
        section, valid, text = unknown[0]
        raise ConfigError(f"unknown config key {text}; valid keys{' in ' + section if section else ''}: "
                          f"{', '.join(valid)}")
    if unknown:
        raise ConfigError(f"{len(unknown)} unknown config keys: {'; '.join(t for _, _, t in unknown)}. The keys: "
                          f"`minillm config` prints them all, README 'Configuration reference' describes them")
    kwargs = {}
    for name in names:
        if name not in data:
            continue
        key = f"{prefix}.{name}" if prefix else name
        hint = hints[name]
        if dataclasses.is_dataclass(hint):
            kwargs[name] = _build(hint, data[name] or {}, key)
        else:
            kwargs[name] = _check_type(key, data[name], hint)
    return cls(**kwargs)


def _apply_override(tree: dict, override: str) -> None:
    if "=" not in override:
        raise ConfigError(f"override {override!r} must look like section.key=value (e.g. trainer.lr=1e-5)")
    dotted, raw = override.split("=", 1)
    keys = dotted.strip().split(".")
    node = tree
    for k in keys[:-1]:
        node = node.setdefault(k, {})
        if not isinstance(node, dict):
            raise ConfigError(f"override {override!r}: {k!r} is not a section")
    try:
        node[keys[-1]] = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {override!r}: the value is not valid YAML ({str(e).splitlines()[0]}); "
                          f"quote it if it is text") from None


def config_path(name_or_path: str) -> Path:
    """A YAML path, or the name of a shipped config in launch/configs/."""
    p = Path(name_or_path)
    if p.suffix in (".yaml", ".yml") and p.is_file():
        return p
    shipped = CONFIG_DIR / f"{name_or_path}.yaml"
    if shipped.exists():
        return shipped
    if p.exists():
        raise ConfigError(f"config {name_or_path!r} is not a YAML file (.yaml or .yml)")
    names = sorted(x.stem for x in CONFIG_DIR.glob("*.yaml"))
    raise ConfigError(f"config {name_or_path!r} not found: give a YAML file or one of {', '.join(names)}")


def load_config(path: Optional[str] = None, overrides: Optional[list[str]] = None) -> RunConfig:
    """Load and validate a run config; `path=None` is the embedded CPU default."""
    source = config_path(path or DEFAULT_CONFIG)
    try:
        with open(source) as f:
            tree = yaml.safe_load(f) or {}
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from None
    for ov in overrides or []:
        _apply_override(tree, ov)
    cfg = _build(RunConfig, tree, "")
    cfg.validate()
    return cfg


def config_from_dict(tree: dict) -> RunConfig:
    cfg = _build(RunConfig, tree, "")
    cfg.validate()
    return cfg
