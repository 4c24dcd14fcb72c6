"""The training loop (driver): prompts → rollout → teacher scores → loss → update → weight sync.

Synchronous and on-policy: every rollout is sampled with the weights the learner is about to
update. Roles are Ray actors placed by `launch.placement`; this file only sequences them.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Callable, Optional

import ray
import torch

from launch.config import ConfigError, RunConfig, resolve_path
from launch.placement import create_placement, release
from minillm.gkd import OnPolicyMixer
from rollout.types import RolloutBatch, SamplingSettings
from teacher.ray_pool import balance_rows
from teacher.types import TeacherScores, concat_scores
from trainer import checkpoint as ckpt
from trainer.data import PretrainData, PromptData, read_records
from trainer.evaluate import reverse_kl_estimate
from trainer.export import export_checkpoint, resolve_checkpoint
from trainer.gpu_monitor import GpuMonitor
from trainer.objective import select_scores
from trainer.roles import (Roles, check_context, check_paths, check_remote_teacher, load_tokenizers, pad_id,
                           prompt_limit, start_learners, start_rollout, start_teacher)
from trainer.sync import WeightSync
from trainer.tracking import MetricsLog, finish_wandb, start_wandb

log = logging.getLogger("minillm")
EVAL_SAMPLES_PER_PROMPT = 4


# ---- one step's phases ------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def generation_eos_ids(model_dir: str) -> tuple[int, ...]:
    """The EOS ids of a model folder's generation_config.json: instruct models list several (Llama 3: end of
    text, end of message, end of turn; Qwen2.5: end of turn, end of text). None when the folder has no such file."""
    from transformers import GenerationConfig
    try:
        eos = GenerationConfig.from_pretrained(model_dir).eos_token_id
    except OSError:
        return ()
    return tuple(eos) if isinstance(eos, list) else (() if eos is None else (eos,))


def stop_ids(cfg: RunConfig, tokenizer) -> list[int]:
    """Tokens that end a response besides the tokenizer's EOS: the student's generation config's other EOS ids,
    as `generate` and vLLM would stop at them by default."""
    return [i for i in generation_eos_ids(resolve_path(cfg.model.student)) if i != tokenizer.eos_token_id]


def sampling(cfg: RunConfig, tokenizer, seed: int, n: Optional[int] = None) -> SamplingSettings:
    r = cfg.rollout
    return SamplingSettings(temperature=r.temperature, top_p=r.top_p, top_k=r.top_k, max_new_tokens=r.max_new_tokens,
                            n=n or r.n_samples, eos_token_id=tokenizer.eos_token_id, stop_token_ids=stop_ids(cfg, tokenizer),
                            seed=seed, mix_alpha=r.mix_alpha)


def submit_generate(workers: list, prompts: list[list[int]], settings: SamplingSettings) -> list:
    """Split prompts over the workers in contiguous shards (data parallel); one ref per non-empty shard, in prompt order."""
    W = len(workers)
    bounds = [len(prompts) * i // W for i in range(W + 1)]
    return [w.generate.remote(prompts[lo:hi], dataclasses.replace(settings, seed=None if settings.seed is None else settings.seed + i))
            for i, (w, lo, hi) in enumerate(zip(workers, bounds[:-1], bounds[1:])) if hi > lo]


def generate(workers: list, prompts: list[list[int]], settings: SamplingSettings) -> RolloutBatch:
    """Rows come back in prompt order."""
    return RolloutBatch.concat(ray.get(submit_generate(workers, prompts, settings)))


def scoring_temperature(cfg: RunConfig) -> float:
    """The temperature the teacher scores training batches at. A divergence at objective.temperature τ compares
    the teacher and student distributions at τ: full teacher log-probs are re-tempered exactly in the loss
    (softmax(log p / τ)), top-k ones cannot be (the tail's partition is unknown), so the teacher computes those
    at τ. MiniLLM's rewards are at τ = 1 (it samples and scores the untempered student)."""
    o = cfg.objective
    return o.temperature if o.name != "minillm" and not cfg.teacher.return_full else 1.0


def score(teacher, batch: RolloutBatch, cfg: RunConfig, temperature: float = 1.0) -> TeacherScores:
    return teacher.score(batch.sequences, batch.prompt_lens, batch.response_lens,
                         topk=cfg.teacher.topk, return_full=cfg.teacher.return_full, temperature=temperature)


def score_for_update(teacher, batch: RolloutBatch, cfg: RunConfig, n_ranks: int) -> tuple[torch.Tensor, object]:
    """(teacher token log-probs, the scores for `train_on`). With one teacher replica and one learner rank the
    scores stay an ObjectRef that the learner fetches itself: the driver never holds or re-sends them."""
    if n_ranks == 1 and getattr(teacher, "num_replicas", 0) == 1:
        return teacher.score_handoff(batch.sequences, batch.prompt_lens, batch.response_lens, topk=cfg.teacher.topk,
                                     return_full=cfg.teacher.return_full, temperature=scoring_temperature(cfg))
    scores = score(teacher, batch, cfg, scoring_temperature(cfg))
    return scores.token_logprobs, scores


def generate_and_score(workers: list, prompts: list[list[int]], settings: SamplingSettings, teacher,
                       cfg: RunConfig) -> tuple[RolloutBatch, TeacherScores, float, float]:
    """Generate, and score each worker's shard as soon as that worker is done, so that scoring overlaps the
    tail of generation (workers finish at different times: response lengths vary). Still on-policy: every
    shard was sampled with the current weights. Returns (batch, scores, seconds until the last shard was
    sampled, seconds more until every score was in). Scores equal one `score` call on the whole batch."""
    t0 = time.perf_counter()
    refs = submit_generate(workers, prompts, settings)
    position = {ref: i for i, ref in enumerate(refs)}
    shards, futures = [None] * len(refs), [None] * len(refs)
    # teacher clients block (Ray pool, HTTP); threads let several shards be scored while we wait on the rest
    pool = ThreadPoolExecutor(max_workers=len(refs), thread_name_prefix="score")
    pending = list(refs)
    try:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            i = position[ready[0]]
            shards[i] = ray.get(ready[0])
            futures[i] = pool.submit(score, teacher, shards[i], cfg, scoring_temperature(cfg))
        generate_s = time.perf_counter() - t0
        batch = RolloutBatch.concat(shards)
        scores = concat_scores([f.result() for f in futures], T=batch.max_response_len)
    except BaseException:
        for ref in pending:  # a failed shard: stop the others rather than wait for them
            ray.cancel(ref)
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    return batch, scores, generate_s, time.perf_counter() - t0 - generate_s


def overlaps_scoring(cfg: RunConfig, workers: list) -> bool:
    """teacher.overlap, where it can help: several workers, and no engine sleeping on a shared GPU."""
    return cfg.teacher.overlap and len(workers) > 1 and not cfg.rollout.sleep_mode


def rows_per_rank(total_lens: torch.Tensor, n_ranks: int) -> list[torch.Tensor]:
    """Row indices per learner rank, balanced by tokens. Every rank takes part in every step (its collectives wait
    for the others), with no rows if there are fewer rows than ranks: balance_rows leaves those groups out."""
    parts = balance_rows(total_lens, n_ranks)
    return parts + [torch.zeros(0, dtype=torch.long)] * (n_ranks - len(parts))


def merged_sums(outs: list[dict], global_tokens: int) -> dict[str, float]:
    """The ranks' token-weighted metric sums as global means (a rank with no rows reports nothing)."""
    keys = sorted(set().union(*(o["sums"] for o in outs)))
    return {k: sum(o["sums"].get(k, 0.0) for o in outs) / max(global_tokens, 1) for k in keys}


def train_on(learners: list, batch: RolloutBatch, scores, pretrain: Optional[RolloutBatch],
             pretrain_scores: Optional[TeacherScores] = None) -> dict:
    """Shard rows over learner ranks (balanced by tokens) and run one update; returns merged metrics.
    scores: TeacherScores, or (one rank) an ObjectRef of them from `score_for_update`; pretrain_scores: the
    teacher's on the pretraining batch (objective.pt_kd_ratio > 0)."""
    n_ranks = len(learners)
    if isinstance(scores, ray.ObjectRef) and n_ranks != 1:
        raise ValueError(f"train_on: scores as an ObjectRef are for one learner rank, got {n_ranks}")
    shards = rows_per_rank(batch.prompt_lens + batch.response_lens, n_ranks)
    global_tokens = int(batch.response_lens.sum())
    pt_shards = rows_per_rank(pretrain.prompt_lens + pretrain.response_lens, n_ranks) if pretrain is not None else [None] * n_ranks
    pt_tokens = int(pretrain.response_lens.sum()) if pretrain is not None else 0
    refs = []
    for rank, (rows, pt_rows) in enumerate(zip(shards, pt_shards)):
        rows = rows.tolist()
        shard = batch.select(rows)
        # one rank takes every row in order: a ref passes as it is (Ray resolves it in the learner)
        shard_scores = scores if isinstance(scores, ray.ObjectRef) else select_scores(scores, rows, shard.max_response_len)
        pt = pretrain.select(pt_rows.tolist()) if pretrain is not None and len(pt_rows) else None
        pt_scores = select_scores(pretrain_scores, pt_rows.tolist(), pt.max_response_len) if pt is not None else None
        refs.append(learners[rank].train_step.remote(shard, shard_scores, global_tokens, pt, pt_tokens, pt_scores))
    outs = ray.get(refs)
    metrics = merged_sums(outs, global_tokens)
    metrics.update(lr=outs[0]["lr"], grad_norm=outs[0]["grad_norm"])
    if any(o["peak_mem_gb"] for o in outs):
        metrics["learner_peak_mem_gb"] = max(o["peak_mem_gb"] for o in outs)
    return metrics


# ---- evaluation and outputs -------------------------------------------------------------------


def evaluate(cfg: RunConfig, roles: Roles, eval_data: PromptData, tokenizer) -> dict[str, float]:
    """Reverse KL of the current student on held-out prompts (fixed sampling seed: same every call)."""
    prompts = eval_data.prompts
    # the student's own distribution, never the teacher-mixed proposal
    settings = dataclasses.replace(sampling(cfg, tokenizer, seed=10_000_019, n=EVAL_SAMPLES_PER_PROMPT), mix_alpha=0.0)
    batch = generate(roles.rollout, prompts, settings)
    scores = score(roles.teacher, batch, cfg)
    out = reverse_kl_estimate(batch, scores)
    if cfg.objective.name != "minillm":  # the token-level objective itself (MiniLLM's is its reverse KL above)
        out["loss"] = eval_objective(roles.learners, batch, scores)["loss"]
    return out


def eval_loss_text(cfg: RunConfig, figures: dict) -> str:
    return f"; {cfg.objective.name} loss {figures['loss']:.4f}" if "loss" in figures else ""


def eval_objective(learners: list, batch: RolloutBatch, scores: TeacherScores) -> dict[str, float]:
    """The objective's token-mean figures on held-out samples, under the learners' current weights (no update)."""
    global_tokens = int(batch.response_lens.sum())
    refs = []
    for rank, rows in enumerate(rows_per_rank(batch.prompt_lens + batch.response_lens, len(learners))):
        shard = batch.select(rows.tolist())
        refs.append(learners[rank].eval_objective.remote(shard, select_scores(scores, rows.tolist(), shard.max_response_len),
                                                         global_tokens))
    return merged_sums(ray.get(refs), global_tokens)


def save_checkpoint(cfg: RunConfig, roles: Roles, out_dir: Path, step: int, state: dict, tokenizer, student_config) -> Path:
    ckpt_dir = out_dir / "checkpoints"
    tmp = ckpt.begin(ckpt_dir, step)
    ray.get([lr.save_checkpoint.remote(str(tmp)) for lr in roles.learners])
    ckpt.save_trainer_state(tmp, state)
    ckpt.save_student_files(tmp, student_config, generation_config(tokenizer, cfg), tokenizer)
    return ckpt.commit(ckpt_dir, tmp, step, cfg.checkpoint.keep_last)


def generation_config(tokenizer, cfg: RunConfig):
    """The exported student's generation defaults: the student folder's own generation_config.json when it has one
    (as `save_pretrained` after TRL or HF training keeps it), else only its special tokens. Never the rollout's
    settings: a `max_new_tokens` of the training rollouts would silently cut every later `generate`; those
    settings are in the model card."""
    from transformers import GenerationConfig
    try:
        return GenerationConfig.from_pretrained(resolve_path(cfg.model.student))
    except OSError:  # no generation_config.json in the folder
        extra = stop_ids(cfg, tokenizer)
        return GenerationConfig(bos_token_id=tokenizer.bos_token_id,
                                eos_token_id=[tokenizer.eos_token_id, *extra] if extra else tokenizer.eos_token_id,
                                pad_token_id=pad_id(tokenizer))


def progress_fields(cfg: RunConfig, metrics: dict, tokens_per_s: float) -> dict:
    """The progress bar's figures, named for the objective: MiniLLM's reward and per-token reverse KL, or the
    divergence a token-level objective minimises (JSD(β) for GKD), never one labelled as another."""
    fields = {"loss": f"{metrics.get('loss', float('nan')):.3f}"}
    if cfg.objective.name == "minillm":
        fields["reward"] = f"{metrics.get('reward', float('nan')):.3f}"
        fields["rkl"] = f"{metrics.get('reverse_kl', float('nan')):.3f}"
    else:
        label = f"jsd{cfg.objective.beta:g}" if cfg.objective.name == "gkd" else cfg.objective.name
        fields[label] = f"{metrics.get('divergence', float('nan')):.3f}"
    fields["tok_s"] = f"{tokens_per_s:.0f}"
    return fields


def find_resume(cfg: RunConfig, out_dir: Path, data: Optional["Datasets"] = None) -> Optional[Path]:
    if cfg.checkpoint.resume == "never":
        return None
    if cfg.checkpoint.resume == "auto":
        path = ckpt.find_latest(out_dir / "checkpoints")
        if path is None:  # a mistyped output_dir would otherwise start over unnoticed
            log.warning("checkpoint.resume=auto: no complete checkpoint in %s; starting a new run", out_dir / "checkpoints")
    else:
        try:  # a checkpoint, a checkpoints folder or a run folder (its newest complete checkpoint), as for export
            path = resolve_checkpoint(resolve_path(cfg.checkpoint.resume))
        except (FileNotFoundError, ValueError) as e:
            raise FileNotFoundError(f"checkpoint.resume={cfg.checkpoint.resume!r}: {e}") from None
    if path is not None:
        check_resumable(cfg, path, data)
    return path


# keys a resumed run may change without comment (where it writes, how long it runs, how it logs)
_FREE_ON_RESUME = ("output_dir", "checkpoint.", "trainer.steps", "trainer.eval_every", "logging.", "cluster.",
                   "data.eval_prompts", "data.num_eval_prompts")


_ARCHITECTURE_KEYS = ("model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                      "num_attention_heads", "num_key_value_heads", "tie_word_embeddings")


def check_resumable(cfg: RunConfig, path: Path, data: Optional["Datasets"] = None) -> None:
    """Refuse, before anything starts and naming the key, a resume that cannot continue the saved run: a learner
    layout the saved state is not laid out for (ZeRO stage, rank count: one RNG file and ZeRO partition per rank,
    precision, optimizer), a step count the checkpoint is already past, or data of another size (the saved
    position would index another order). Warn about every other changed setting: the run goes on with it."""
    state = ckpt.load_trainer_state(path)
    saved_cfg = state.get("config", {})
    saved = saved_cfg.get("trainer", {})
    keys = ["zero_stage", "num_ranks", "bf16", "cpu_offload"]
    diff = [f"trainer.{k}={saved[k]!r} (now {getattr(cfg.trainer, k)!r})"
            for k in keys if k in saved and saved[k] != getattr(cfg.trainer, k)]
    if diff:
        raise ConfigError(f"cannot resume from {path}: it was written with {', '.join(diff)}; resume with the "
                          f"checkpoint's values, or export it (minillm export) and start a new run from that model")
    if saved and "disable_dropout" not in saved:  # the key came with the two AdamW groups (HF Trainer's no-decay rule)
        raise ConfigError(f"cannot resume from {path}: it was written by an earlier minillm whose optimizer held one "
                          f"parameter group (this one has two: no weight decay on biases and norm weights), so its "
                          f"optimizer state does not load; resume it with that version, or export it (minillm "
                          f"export) and start a new run from that model")
    if (path / ckpt.STUDENT_DIR / "config.json").is_file():  # the learner would fail on shapes, after every role started
        from transformers import AutoConfig

        # both through the same loader: the saved copy was written by save_pretrained, which fills in defaults
        a = AutoConfig.from_pretrained(path / ckpt.STUDENT_DIR).to_dict()
        b = AutoConfig.from_pretrained(resolve_path(cfg.model.student)).to_dict()
        shape = [f"{k} {a.get(k)!r} (now {b.get(k)!r})" for k in _ARCHITECTURE_KEYS if a.get(k) != b.get(k)]
        if shape:
            raise ConfigError(f"cannot resume from {path}: its student differs from model.student={cfg.model.student!r} "
                              f"in {', '.join(shape)}; resume with the run's model.student")
    if state.get("step", 0) > cfg.trainer.steps:
        raise ConfigError(f"cannot resume from {path}: it is at step {state['step']}, past trainer.steps="
                          f"{cfg.trainer.steps}; set trainer.steps >= {state['step']}")
    if data is not None:
        for key, what, saved_pos, now in [
                ("data.prompts", "prompts", state.get("data"), data.train.n),
                ("data.pretrain (or data.pretrain_max_len)", "pretraining windows", state.get("pretrain_data"),
                 data.pretrain.n if data.pretrain is not None else None)]:
            if saved_pos and now is not None and saved_pos.get("n", now) != now:
                raise ConfigError(f"cannot resume from {path}: it was written for {saved_pos['n']} {what}, {key} now "
                                  f"gives {now}; resume with the same data (a new data set: start a new run from the "
                                  f"exported model)")
    changed = [f"{k}: {a!r} -> {b!r}" for k, a, b in _config_changes(saved_cfg, cfg.to_dict())
               if not k.startswith(_FREE_ON_RESUME)]
    if changed:
        log.warning("resuming from %s with settings changed since it was written: %s", path, "; ".join(changed))


def _config_changes(old: dict, new: dict, prefix: str = "") -> list[tuple[str, object, object]]:
    out = []
    for k in sorted(set(old) | set(new)):
        a, b = old.get(k), new.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += _config_changes(a, b, f"{prefix}{k}.")
        elif a != b and k in old:  # a key the checkpoint predates is not a change
            out.append((f"{prefix}{k}", a, b))
    return out


# ---- the loop ---------------------------------------------------------------------------------


@dataclasses.dataclass
class Datasets:
    train: PromptData
    eval: Optional[PromptData]
    pretrain: Optional[PretrainData]


@dataclasses.dataclass
class Hooks:
    """progress: show a progress bar. on_start(roles): sees the started roles (placement checks).
    on_batch(step, batch): sees every training batch (tests, logging).
    stop_after: leave after this many steps of this call, as a preemption would (checkpoints kept)."""
    progress: bool = True
    on_start: Optional[Callable[["Roles"], None]] = None
    on_batch: Optional[Callable[[int, RolloutBatch], None]] = None
    stop_after: Optional[int] = None


def load_data(cfg: RunConfig, tokenizer) -> Datasets:
    """Read and tokenise every data source now, so a bad row fails before any actor starts."""
    max_len, reason = prompt_limit(cfg)  # data.long_prompts applies to this limit
    train_data = PromptData(read_records(cfg.data.prompts), tokenizer, cfg.data, "data.prompts", seed=cfg.trainer.seed,
                            max_len=max_len, limit_reason=reason)
    eval_data = None
    if cfg.data.eval_prompts:
        eval_data = PromptData(read_records(cfg.data.eval_prompts), tokenizer, cfg.data, "data.eval_prompts",
                               limit=cfg.data.num_eval_prompts, max_len=max_len, limit_reason=reason)
    pretrain_data = None
    if cfg.objective.pt_weight > 0:
        pretrain_data = PretrainData(read_records(cfg.data.pretrain), tokenizer, cfg.data.pretrain_max_len, "data.pretrain",
                                     seed=cfg.trainer.seed + 1)
    needs_dataset = cfg.objective.name != "minillm" and cfg.objective.lam < 1 and not cfg.objective.seq_kd
    if needs_dataset and any(r is None for r in train_data.responses):
        raise ConfigError(f"objective.lam={cfg.objective.lam} < 1 uses the dataset's responses, but some rows of "
                          f"data.prompts have no {cfg.data.response_key!r} field (data.response_key)"
                          + (", no 'completion' field and no 'messages' ending with an assistant reply"
                             if cfg.data.response_key == "response" else ""))
    return Datasets(train_data, eval_data, pretrain_data)


def train(cfg: RunConfig, hooks: Optional[Hooks] = None) -> dict:
    """Run a whole distillation job; returns the summary (also written to output_dir/summary.json)."""
    from transformers import AutoConfig

    hooks = hooks or Hooks()
    check_paths(cfg)
    tokenizer = load_tokenizers(cfg)
    check_remote_teacher(cfg, tokenizer)
    data = load_data(cfg, tokenizer)
    check_context(cfg, {"data.prompts": data.train.prompts, **({"data.eval_prompts": data.eval.prompts} if data.eval else {})},
                  max(map(len, data.pretrain.windows)) if data.pretrain is not None else 0)

    out_dir = Path(cfg.output_dir)
    if out_dir.exists() and not out_dir.is_dir():
        raise ConfigError(f"output_dir={cfg.output_dir!r} is a file; give a folder")
    resume_from = find_resume(cfg, out_dir, data)
    if cfg.checkpoint.resume == "never" and ckpt.step_dirs(out_dir / "checkpoints"):
        # a new run here would mix its checkpoints, metrics and logs with the earlier run's
        raise ConfigError(f"output_dir={cfg.output_dir!r} holds checkpoints of an earlier run: pass --resume "
                          f"(checkpoint.resume=auto) to continue it, or give another output_dir (or delete that one)")
    student_config = AutoConfig.from_pretrained(resolve_path(cfg.model.student))
    created = not out_dir.exists()
    out_dir.mkdir(parents=True, exist_ok=True)
    wandb_run, failed = None, True
    try:
        wandb_run = start_wandb(cfg, out_dir, resuming=resume_from is not None)
        summary = _start_and_run(cfg, tokenizer, data, out_dir, resume_from, student_config, hooks, wandb_run)
        failed = False
        return summary
    finally:
        finish_wandb(wandb_run, failed)
        if failed and created and not _has_progress(out_dir):
            shutil.rmtree(out_dir, ignore_errors=True)  # a run that failed to start leaves no folder behind


def _has_progress(out_dir: Path) -> bool:
    """Whether a run folder holds anything worth keeping after a failure: a logged step or a checkpoint."""
    metrics = out_dir / "metrics.jsonl"
    return bool(ckpt.step_dirs(out_dir / "checkpoints")) or (metrics.is_file() and metrics.stat().st_size > 0)


def _start_and_run(cfg: RunConfig, tokenizer, data: Datasets, out_dir: Path, resume_from: Optional[Path],
                   student_config, hooks: Hooks, wandb_run) -> dict:
    """Start the roles, run the loop, and always release what was started."""
    if not ray.is_initialized():
        # joining a cluster (address set) takes its resources as they are; a local one gets cluster.num_cpus
        local = cfg.cluster.address is None
        # "local": a new private cluster even where one runs (ray.init() alone would join the latest one started)
        ray.init(address="local" if local else cfg.cluster.address, num_cpus=cfg.cluster.num_cpus if local else None,
                 include_dashboard=False, logging_level=logging.WARNING)
    placement = create_placement(cfg)
    roles = None
    try:
        learners = start_learners(cfg, placement["learner"])
        if resume_from is not None:
            ray.get([lr.load_checkpoint.remote(str(resume_from)) for lr in learners])
        # rollout workers start from the learner's current weights, written once as an HF folder
        init_dir = out_dir / "rollout_init"
        ray.get([lr.save_hf.remote(str(init_dir)) for lr in learners])
        tokenizer.save_pretrained(init_dir)
        teacher_path = resolve_path(cfg.model.teacher) if cfg.rollout.mix_alpha > 0 else None
        roles = Roles(learners=learners, rollout=[], teacher=None, placement=placement)  # filled as roles start
        # vLLM engines last: each takes a fixed share of its GPU and checks at start that the share is free
        roles.teacher = start_teacher(cfg, placement.get("teacher"))
        roles.rollout = start_rollout(cfg, placement["rollout"], str(init_dir), teacher_path)
        if cfg.objective.seq_kd:
            roles.teacher_sampler = start_rollout(cfg, placement["teacher_sampler"], resolve_path(cfg.model.teacher),
                                                  vocab_size=student_config.vocab_size)
        roles.sync = WeightSync(cfg, learners, roles.rollout)
        if hooks.on_start is not None:
            hooks.on_start(roles)
        return _run(cfg, roles, tokenizer, data, out_dir, resume_from, student_config, hooks, wandb_run)
    finally:
        if roles is not None and hasattr(roles.teacher, "shutdown"):
            roles.teacher.shutdown()
        for group in (roles.rollout + roles.learners + (roles.teacher_sampler or [])) if roles else []:
            ray.kill(group)
        release(placement)


def _run(cfg: RunConfig, roles: Roles, tokenizer, data: Datasets, out_dir: Path, resume_from: Optional[Path],
         student_config, hooks: Hooks, wandb_run=None) -> dict:
    from tqdm import tqdm

    train_data, eval_data, pretrain_data = data.train, data.eval, data.pretrain
    mixer = OnPolicyMixer(1.0 if cfg.objective.name == "minillm" else cfg.objective.lam, seq_kd=cfg.objective.seq_kd,
                          seed=cfg.trainer.seed)
    start_step, history, before = 0, [], None
    if resume_from is not None:
        state = ckpt.load_trainer_state(resume_from)
        start_step, history, before = state["step"], state["history"], state.get("eval_before")
        train_data.load_state_dict(state["data"])
        # a changed objective.lam / seq_kd (warned about in check_resumable) applies from here; the draws go on
        mixer.load_state_dict({**state["mixer"], "lam": mixer.lam, "seq_kd": mixer.seq_kd})
        if pretrain_data is not None and state.get("pretrain_data"):  # else L_PT is new here: its order starts fresh
            pretrain_data.load_state_dict(state["pretrain_data"])
        log.warning("resumed from %s at step %d", resume_from, start_step)
    metrics_log = MetricsLog(out_dir, resume_step=start_step, wandb_run=wandb_run)
    (out_dir / "config.json").write_text(json.dumps(cfg.to_dict(), indent=2))  # the roles started with it

    def run_state(step: int, history: list) -> dict:
        """The driver's part of a checkpoint (the learners write theirs)."""
        return {"step": step, "data": train_data.state_dict(), "mixer": mixer.state_dict(), "history": history,
                "eval_before": before, "config": cfg.to_dict(),
                "pretrain_data": pretrain_data.state_dict() if pretrain_data is not None else None}
    if eval_data is not None and before is None:
        before = evaluate(cfg, roles, eval_data, tokenizer)
        print(f"held-out reverse KL before training: {before['reverse_kl']:.4f} ± {before['reverse_kl_stderr']:.4f} "
              f"(per token {before['reverse_kl_per_token']:.4f}){eval_loss_text(cfg, before)}")

    bar = tqdm(range(start_step, cfg.trainer.steps), initial=start_step, total=cfg.trainer.steps, disable=not hooks.progress,
               desc="distilling", dynamic_ncols=True)
    t_run = time.perf_counter()
    gpu = GpuMonitor.for_device(cfg.trainer.device)  # per-phase peak memory / utilisation (GPU only)
    for step in bar:
        timings, gpu_stats = {}, {}
        gpu.lap("between_steps")  # evaluation, checkpoints, logging: not a phase of the step
        t0 = time.perf_counter()
        source = mixer.next_source()
        idx = train_data.next_indices(cfg.rollout.prompts_per_step)
        prompts = [train_data.prompts[i] for i in idx]
        settings = sampling(cfg, tokenizer, seed=cfg.rollout.seed + 7919 * step)
        if source == "teacher":
            workers, settings = roles.teacher_sampler, dataclasses.replace(settings, n=1)
        else:
            workers = roles.rollout
        scores = None
        if source == "dataset":
            batch = RolloutBatch.from_lists(prompts, [train_data.responses[i] for i in idx], pad_id(tokenizer),
                                            source="dataset")
        elif overlaps_scoring(cfg, workers):
            # time/score is then only the scoring left after the last shard was sampled
            batch, scores, timings["time/generate"], timings["time/score"] = generate_and_score(
                workers, prompts, settings, roles.teacher, cfg)
        else:
            batch = generate(workers, prompts, settings)
        if source == "teacher":
            batch.source, batch.student_logprobs = "teacher", None
        timings.setdefault("time/generate", time.perf_counter() - t0)
        gpu_stats.update(gpu.lap("generate" if scores is None else "generate_score"))  # overlapped: one phase
        if cfg.rollout.sleep_mode:  # single-GPU mode: the engines give their GPU memory to scoring and training
            t0 = time.perf_counter()
            # level 2 drops the weights instead of copying them to CPU: the sync below rewrites all of them
            ray.get([w.sleep.remote(2) for w in roles.rollout])
            timings["time/offload"] = time.perf_counter() - t0
            gpu_stats.update(gpu.lap("sleep"))
        if hooks.on_batch is not None:
            hooks.on_batch(step + 1, batch)

        if scores is None:
            t0 = time.perf_counter()
            teacher_logprobs, scores = score_for_update(roles.teacher, batch, cfg, len(roles.learners))
            timings["time/score"] = time.perf_counter() - t0
            gpu_stats.update(gpu.lap("score"))
        else:
            teacher_logprobs = scores.token_logprobs

        pretrain, pretrain_scores = None, None
        if pretrain_data is not None:
            pretrain = pretrain_data.next_batch(cfg.rollout.prompts_per_step, pad_id(tokenizer))
            if cfg.objective.pt_kd_ratio > 0:  # the code's --kd-ratio: the teacher scores the pretraining text too
                t0 = time.perf_counter()
                pretrain_scores = score(roles.teacher, pretrain, cfg)
                timings["time/score"] += time.perf_counter() - t0

        t0 = time.perf_counter()
        metrics = train_on(roles.learners, batch, scores, pretrain, pretrain_scores)
        timings["time/train"] = time.perf_counter() - t0
        gpu_stats.update(gpu.lap("train"))

        if cfg.rollout.sleep_mode:  # weight memory back first; the KV cache only after the new weights are in
            t0 = time.perf_counter()
            ray.get([w.wake_up.remote(["weights"]) for w in roles.rollout])
            timings["time/offload"] += time.perf_counter() - t0
        t0 = time.perf_counter()
        roles.sync()
        timings["time/sync"] = time.perf_counter() - t0
        gpu_stats.update(gpu.lap("sync"))
        if cfg.rollout.sleep_mode:
            t0 = time.perf_counter()
            ray.get([w.wake_up.remote(["kv_cache"]) for w in roles.rollout])
            timings["time/offload"] += time.perf_counter() - t0
            gpu_stats.update(gpu.lap("wake"))

        n_tokens = int(batch.response_lens.sum())
        step_time = sum(timings.values())
        record = {f"loss/{k}" if "loss" in k else f"train/{k}": v for k, v in metrics.items()}
        record.update(timings)
        record.update(gpu_stats)
        if gpu_stats:
            record["gpu/mem_peak_gb"] = max(v for k, v in gpu_stats.items() if k.startswith("gpu/mem_peak_gb/"))
        record.update({"time/step": step_time, "rollout/tokens": n_tokens, "rollout/source": source,
                       "rollout/response_len": float(batch.response_lens.float().mean()),
                       "throughput/tokens_per_s": n_tokens / step_time,
                       "teacher/logprob": float((teacher_logprobs * batch.response_mask()).sum() / max(n_tokens, 1))})
        if cfg.trainer.eval_every and eval_data is not None and (step + 1) % cfg.trainer.eval_every == 0:
            record.update({f"eval/{k}": v for k, v in evaluate(cfg, roles, eval_data, tokenizer).items()})
        metrics_log.write(step + 1, record)
        history.append({"step": step + 1, **metrics})
        bar.set_postfix(progress_fields(cfg, metrics, n_tokens / step_time))

        if cfg.checkpoint.every and (step + 1) % cfg.checkpoint.every == 0 and step + 1 < cfg.trainer.steps:
            save_checkpoint(cfg, roles, out_dir, step + 1, run_state(step + 1, history), tokenizer, student_config)
        if hooks.stop_after is not None and step + 1 - start_step >= hooks.stop_after and step + 1 < cfg.trainer.steps:
            bar.close()
            metrics_log.close()
            gpu.close()
            return {"stopped_at": step + 1}
    bar.close()
    metrics_log.close()
    gpu.close()
    train_seconds = time.perf_counter() - t_run

    summary = {"steps": cfg.trainer.steps, "train_seconds": train_seconds, "eval_before": before}
    if eval_data is not None:
        after = evaluate(cfg, roles, eval_data, tokenizer)
        summary["eval_after"] = after
        print(f"held-out reverse KL after training:  {after['reverse_kl']:.4f} ± {after['reverse_kl_stderr']:.4f} "
              f"(per token {after['reverse_kl_per_token']:.4f}){eval_loss_text(cfg, after)}")
    if start_step < cfg.trainer.steps or resume_from is None:
        final_metrics = {**(history[-1] if history else {}),
                         **{f"eval_before/{k}": v for k, v in (before or {}).items()},
                         **{f"eval_after/{k}": v for k, v in summary.get("eval_after", {}).items()}}
        final_ckpt = save_checkpoint(cfg, roles, out_dir, cfg.trainer.steps,
                                     {**run_state(cfg.trainer.steps, history), "metrics": final_metrics},
                                     tokenizer, student_config)
    else:  # resumed at the end: the last checkpoint is the final one
        final_ckpt = resume_from
    final_dir = out_dir / "final"
    # just written (or verified by the resume): the CRC pass over every shard would only read it all again
    export_checkpoint(final_ckpt, final_dir, overwrite=True, verify_data=False)
    summary["model_dir"] = str(final_dir)
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2))
    metrics_log.write_summary(summary)
    print(f"student written to {final_dir}")
    return summary
