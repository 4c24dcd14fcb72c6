"""The roles of a run, started as Ray actors on their placement groups: learner ranks, rollout
workers, the teacher (a Ray pool, or a client of an HTTP / vLLM server), and the weight sync
between learner and rollout. Also the checks that must fail before any actor starts."""
from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Optional

import ray

from launch.config import ConfigError, RunConfig, looks_like_hub_id, resolve_path
from launch.placement import RolePlacement
from rollout.worker import RolloutWorkerActor
from trainer.learner import Learner, node_address
from trainer.sync import WeightSync


@dataclasses.dataclass
class Roles:
    learners: list
    rollout: list
    teacher: object  # TeacherPool | HttpTeacherClient | VllmServerTeacherClient
    teacher_sampler: Optional[object] = None  # a rollout worker on the teacher's weights (seq_kd)
    placement: Optional[dict[str, RolePlacement]] = None
    sync: Optional[WeightSync] = None  # learner → rollout weights, after every update


# ---- setup ------------------------------------------------------------------------------------


def pad_id(tokenizer) -> int:
    """The id padded batch rows are filled with (always masked): the tokenizer's pad token, else its EOS (Llama 3
    has no pad token). The tokenizer itself is left as it is, so the exported student's tokenizer is the original."""
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def load_tokenizers(cfg: RunConfig):
    """The student's tokenizer, checked against the teacher's (if the teacher folder has one)."""
    from transformers import AutoTokenizer, AutoConfig
    from teacher.loading import load_tokenizer_if_present
    from teacher.tokenizer_check import check_tokenizers_compatible

    student_path = resolve_path(cfg.model.tokenizer or cfg.model.student)
    tok = AutoTokenizer.from_pretrained(student_path)
    if cfg.teacher.backend == "ray":
        teacher_path = resolve_path(cfg.model.teacher)
        teacher_tok = load_tokenizer_if_present(teacher_path)
        if teacher_tok is not None:
            check_tokenizers_compatible(
                tok, teacher_tok,
                student_vocab_size=AutoConfig.from_pretrained(resolve_path(cfg.model.student)).vocab_size,
                teacher_vocab_size=AutoConfig.from_pretrained(teacher_path).vocab_size)
    return tok


def check_remote_teacher(cfg: RunConfig, tokenizer) -> None:
    """A teacher served elsewhere must answer, and (our HTTP service) with the student's BOS/EOS ids, before Ray
    starts: otherwise the first step finds out, after every role started."""
    t = cfg.teacher
    if t.backend == "http":
        from teacher.http_client import HttpTeacherClient
        from teacher.tokenizer_check import TokenizerMismatchError

        client = HttpTeacherClient(t.url, timeout=30.0, retries=2)
        try:
            info = client.vocab_info()
        except ValueError as e:  # a 4xx: something answers there, but not our teacher service
            raise ConfigError(f"teacher.url={t.url}: /v1/info was refused ({e}); is it a `minillm serve-teacher`?") from None
        finally:
            client.close()
        special = info.get("special_token_ids") or {}
        for name in ("bos", "eos"):
            theirs, ours = special.get(name), getattr(tokenizer, f"{name}_token_id", None)
            if theirs is not None and ours is not None and theirs != ours:
                raise TokenizerMismatchError(
                    f"the teacher at teacher.url={t.url} ({info.get('model_name')}) has {name} id {theirs}, the "
                    f"student's tokenizer {ours}: the two do not share a vocabulary; serve a teacher of the "
                    f"student's tokenizer family, or set model.tokenizer to the one the teacher uses")
    elif t.backend == "vllm_server":
        import httpx

        from teacher.http_client import request_with_retries

        with httpx.Client(timeout=30.0) as http:
            try:
                served = [m.get("id") for m in request_with_retries(http, "GET", t.url.rstrip("/") + "/v1/models", 2, 0.5)
                          .json().get("data", [])]
            except ValueError as e:  # 4xx (e.g. an API key it wants) or not JSON: not a vLLM server we can use
                raise ConfigError(f"teacher.url={t.url}: /v1/models did not list the served models ({e})") from None
        name = t.served_model_name or cfg.model.teacher
        if name not in served:
            raise ConfigError(f"the vLLM server at teacher.url={t.url} serves {served}, not {name!r}: set "
                              f"teacher.served_model_name to one of them")


TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


def check_paths(cfg: RunConfig) -> None:
    """Fail before Ray starts if a model folder is missing or unreadable, or the student has no tokenizer."""
    import json

    for key, value in (("model.student", cfg.model.student), ("model.teacher", cfg.model.teacher)):
        if key == "model.teacher" and cfg.teacher.backend != "ray":
            continue
        path = Path(resolve_path(value))
        if not (path / "config.json").exists():
            if looks_like_hub_id(value) and str(path) == value:
                raise FileNotFoundError(
                    f"{key}={value!r} is no local folder, and as a Hub model id it is not in the local Hugging Face "
                    f"cache (nothing is downloaded during a run): `hf download {value}` first (with HF_HOME as the "
                    f"run will see it), or `hf download {value} --local-dir DIR` and give DIR")
            raise FileNotFoundError(f"{key}={value!r}: no config.json in {path}; give a Hugging Face model folder")
        try:
            json.loads((path / "config.json").read_text())
        except ValueError as e:
            raise ConfigError(f"{key}={value!r}: {path / 'config.json'} is not valid JSON ({e})") from None
    if cfg.model.tokenizer:
        path = Path(resolve_path(cfg.model.tokenizer))
        if not any((path / f).is_file() for f in TOKENIZER_FILES):
            raise FileNotFoundError(f"model.tokenizer={cfg.model.tokenizer!r}: no tokenizer files in {path} "
                                    f"(one of {', '.join(TOKENIZER_FILES)}); give a folder saved by save_pretrained")
    elif not any((Path(resolve_path(cfg.model.student)) / f).is_file() for f in TOKENIZER_FILES):
        raise FileNotFoundError(f"model.student={cfg.model.student!r} has no tokenizer files ({', '.join(TOKENIZER_FILES)}); "
                                f"set model.tokenizer to the folder of the student's tokenizer")


def max_context(model_dir: str) -> Optional[int]:
    from transformers import AutoConfig
    return getattr(AutoConfig.from_pretrained(model_dir).get_text_config(), "max_position_embeddings", None)


def prompt_limit(cfg: RunConfig) -> tuple[int, str]:
    """The longest prompt a run takes, and its name for messages: data.max_prompt_len, and with
    data.long_prompts=skip/truncate_left also the student's (and the Ray teacher's) context less
    rollout.max_new_tokens, so the prompts the policy keeps fit (with "error", `check_context` reports it)."""
    limit, reason = cfg.data.max_prompt_len, f"data.max_prompt_len={cfg.data.max_prompt_len}"
    if cfg.data.long_prompts == "error":
        return limit, reason
    models = {"student": cfg.model.student}
    if cfg.teacher.backend == "ray":
        models["teacher"] = cfg.model.teacher
    for who, path in models.items():
        ctx = max_context(resolve_path(path))
        if ctx is None or ctx - cfg.rollout.max_new_tokens >= limit:
            continue
        limit = ctx - cfg.rollout.max_new_tokens
        reason = (f"the {who}'s context of {ctx} tokens less rollout.max_new_tokens={cfg.rollout.max_new_tokens} "
                  f"({limit} tokens)")
        if limit < 1:
            raise ConfigError(f"rollout.max_new_tokens={cfg.rollout.max_new_tokens} leaves no room for a prompt in the "
                              f"{who}'s context of {ctx} tokens; lower rollout.max_new_tokens")
    return limit, reason


def check_context(cfg: RunConfig, prompt_sets: dict[str, list[list[int]]], pretrain_len: int = 0) -> None:
    """Fail before Ray starts if the longest prompt plus rollout.max_new_tokens (or the longest pretraining window,
    `pretrain_len`) would not fit the student's or the teacher's context: otherwise the first step finds out,
    after every role started."""
    models = {"student": cfg.model.student}
    if cfg.teacher.backend == "ray":
        models["teacher"] = cfg.model.teacher
    for who, path in models.items():
        limit = max_context(resolve_path(path))
        if limit is None:
            continue
        for source, prompts in prompt_sets.items():
            longest = max((len(p) for p in prompts), default=0)
            if longest + cfg.rollout.max_new_tokens > limit:
                raise ConfigError(f"{source}: a prompt of {longest} tokens + rollout.max_new_tokens={cfg.rollout.max_new_tokens} "
                                  f"exceeds the {who}'s context of {limit} tokens; lower data.max_prompt_len or "
                                  f"rollout.max_new_tokens, or set data.long_prompts=skip or truncate_left")
        # L_PT runs on the student; with objective.pt_kd_ratio the teacher scores the same windows
        if (who == "student" or cfg.objective.pt_kd_ratio > 0) and pretrain_len > limit:
            raise ConfigError(f"data.pretrain: windows of {pretrain_len} tokens exceed the {who}'s context of {limit} "
                              f"tokens; set data.pretrain_max_len <= {limit}")


def start_learners(cfg: RunConfig, placement: RolePlacement) -> list:
    actor = ray.remote(Learner)
    n = cfg.trainer.num_ranks
    opts = lambda i: dict(num_cpus=cfg.trainer.num_cpus, num_gpus=cfg.trainer.num_gpus,  # noqa: E731
                          scheduling_strategy=placement.strategy(i))
    # rank 0's node address is the rendezvous; ask a task placed on rank 0's bundle for it
    addr, port = ray.get(ray.remote(node_address).options(num_cpus=0, scheduling_strategy=placement.strategy(0)).remote())
    common = dict(world_size=n, master_addr=addr, master_port=port, student=cfg.model.student,
                  student_init=cfg.model.student_init, dtype=cfg.model.dtype,
                  trainer=dataclasses.asdict(cfg.trainer), objective=dataclasses.asdict(cfg.objective),
                  release_memory=cfg.rollout.sleep_mode)
    learners = [actor.options(**opts(i)).remote(rank=i, **common) for i in range(n)]
    ray.get([lr.ready.remote() for lr in learners])
    return learners


def start_teacher(cfg: RunConfig, placement: Optional[RolePlacement]):
    """The teacher scorer, its distributions over the student's ids (the two may differ in embedding padding)."""
    from transformers import AutoConfig
    t = cfg.teacher
    student_vocab = AutoConfig.from_pretrained(resolve_path(cfg.model.student)).get_text_config().vocab_size
    if t.backend == "ray":
        from teacher.ray_pool import TeacherPool
        return TeacherPool(resolve_path(cfg.model.teacher), num_replicas=t.num_replicas, device=cfg.trainer.device,
                           dtype=cfg.model.dtype, num_cpus_per_replica=t.num_cpus, num_gpus_per_replica=t.num_gpus,
                           token_budget=t.token_budget, placement=placement.slots(),
                           release_memory=cfg.rollout.sleep_mode,  # single-GPU mode: give the engine its memory back
                           vocab_size=student_vocab)
    if t.backend == "http":
        from teacher.http_client import HttpTeacherClient
        return HttpTeacherClient(t.url, vocab_size=student_vocab)
    from teacher.vllm_client import VllmServerTeacherClient
    return VllmServerTeacherClient(t.url, t.served_model_name or cfg.model.teacher, topk=t.topk, vocab_size=student_vocab)


def start_rollout(cfg: RunConfig, placement: RolePlacement, model_path: str, teacher_path: Optional[str] = None,
                  vocab_size: Optional[int] = None) -> list:
    """Rollout workers for `model_path` (the student, or the teacher for seq_kd); vocab_size: sample only ids below
    it (the teacher for a student with fewer embedding rows: the learner and the scorer know no other ids)."""
    r = cfg.rollout
    kwargs = dict(backend=r.backend, dtype=cfg.model.dtype, device=cfg.trainer.device, num_threads=r.num_cpus)
    if teacher_path is not None:
        kwargs["teacher_path"] = teacher_path
    if vocab_size is not None:
        kwargs["vocab_size"] = vocab_size
    if r.backend == "vllm":
        kwargs.update(tensor_parallel_size=r.tensor_parallel_size, gpu_memory_utilization=r.gpu_memory_utilization,
                      enforce_eager=r.enforce_eager, sleep_mode=r.sleep_mode)
        if teacher_path is not None:
            kwargs["teacher_gpu_memory_utilization"] = r.teacher_gpu_memory_utilization
    # a distinct engine seed per worker: an unseeded request draws from it, and equal seeds repeat samples
    workers = [RolloutWorkerActor.options(num_cpus=r.num_cpus, num_gpus=r.gpus_per_worker(cfg.trainer.device),
                                          scheduling_strategy=placement.strategy(i)).remote(
                   model_path, **kwargs, **({"seed": r.seed + i} if r.backend == "vllm" else {}))
               for i in range(r.num_workers)]
    ray.get([w.ready.remote() for w in workers])
    return workers
