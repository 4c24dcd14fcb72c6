"""Glue between a batch and the objectives of `minillm/`: one forward, one loss per micro-batch."""
from __future__ import annotations

from typing import Optional

import torch

from launch.config import ObjectiveConfig
from minillm.divergences import token_divergence
from minillm.policy_gradient import minillm_loss, pt_loss_with_kd
from minillm.reduce import masked_mean
from rollout.forward import response_logits
from rollout.types import RolloutBatch
from teacher.types import TeacherScores

# objective.name -> (minillm.divergences name, {param: ObjectiveConfig field})
DIVERGENCES = {
    "gkd": ("jsd", {"beta": "beta"}),
    "forward_kl": ("forward_kl", {}),
    "reverse_kl": ("reverse_kl", {}),
    "tvd": ("tvd", {}),
    "skew_kl": ("skew_kl", {"alpha": "skew_alpha"}),
    "skew_rkl": ("skew_rkl", {"alpha": "skew_alpha"}),
    "akl": ("akl", {"mu": "akl_mu"}),
}


def select_scores(scores: Optional[TeacherScores], index: list[int], T: int) -> Optional[TeacherScores]:
    """Rows `index` of the teacher's scores, trimmed to T response positions."""
    if scores is None:
        return None
    idx = torch.as_tensor(index, dtype=torch.long)
    if T == scores.max_response_len and torch.equal(idx, torch.arange(scores.num_rows)):
        return scores  # every row in order (one learner rank, one micro-batch): no copy

    def pick(x):
        return None if x is None else x[idx, :T]

    return TeacherScores(token_logprobs=pick(scores.token_logprobs), topk_ids=pick(scores.topk_ids),
                         topk_logprobs=pick(scores.topk_logprobs), full_logprobs=pick(scores.full_logprobs))


def teacher_kwargs(scores: TeacherScores, device) -> dict:
    """The teacher distribution in the form the objectives take: full log-probs, else top-k."""
    if scores.full_logprobs is not None:
        return {"teacher_logits": scores.full_logprobs.to(device)}
    if scores.topk_ids is not None:
        return {"teacher_topk_ids": scores.topk_ids.to(device).long(), "teacher_topk_logprobs": scores.topk_logprobs.to(device)}
    return {}


def objective_loss(model, batch: RolloutBatch, scores: TeacherScores, cfg: ObjectiveConfig,
                   global_tokens: int) -> tuple[torch.Tensor, dict[str, float]]:
    """Loss on one micro-batch, as this micro-batch's share of the mean over `global_tokens`."""
    logits = response_logits(model, batch)  # (N, T, V)
    device = logits.device
    mask = batch.response_mask().to(device)
    tokens = batch.response_tokens().to(device)
    teacher = teacher_kwargs(scores, device)
    if cfg.name == "minillm":
        if batch.student_logprobs is None:
            raise ValueError("objective minillm needs the rollout's student log-probs (on-policy samples)")
        loss, metrics = minillm_loss(
            logits, tokens, mask, batch.student_logprobs.to(device), scores.token_logprobs.to(device), **teacher,
            alpha=batch.mix_alpha, clip_eps=cfg.clip_eps, length_norm=cfg.length_norm, gamma=cfg.gamma,
            include_current=cfg.include_current, whiten=cfg.whiten, importance=cfg.importance,
            single_step=cfg.single_step, num_tokens=global_tokens)
        # the loss terms are this micro-batch's share of the global mean; report them (like the other
        # metrics) as this micro-batch's mean, which the learner weights by its token count
        share_to_mean = global_tokens / max(int(mask.sum()), 1)
        return loss, {k: float(v) * (share_to_mean if k in ("loss", "pg_loss", "single_step_loss") else 1.0)
                      for k, v in metrics.items()}
    if not teacher:
        raise ValueError(f"objective {cfg.name} needs the teacher's distribution: set teacher.return_full=true "
                         f"or teacher.topk>0")
    name, params = DIVERGENCES[cfg.name]
    per_token = token_divergence(name, logits, mask, temperature=cfg.temperature,
                                 **teacher, **{k: getattr(cfg, v) for k, v in params.items()})
    loss = masked_mean(per_token, mask, num_tokens=global_tokens)
    return loss, {"loss": float(masked_mean(per_token.detach(), mask)), "divergence": float(masked_mean(per_token.detach(), mask))}


def lm_batch_loss(model, batch: RolloutBatch, global_tokens: int, scores: Optional[TeacherScores] = None,
                  kd_ratio: float = 0.0) -> tuple[torch.Tensor, dict[str, float]]:
    """MiniLLM's L_PT: next-token NLL on pretraining text (its "response" part), share of the global mean;
    with `kd_ratio` > 0 mixed with the forward KL from the teacher's `scores` on the same tokens (the code's
    `--kd-ratio`). Metrics are the same shares (the driver adds them over micro-batches and ranks): pt_loss, and
    with KD its two parts, pt_lm_loss and pt_kd_loss."""
    logits = response_logits(model, batch)
    mask = batch.response_mask().to(logits.device)
    teacher = teacher_kwargs(scores, logits.device) if kd_ratio > 0 else {}
    loss, metrics = pt_loss_with_kd(logits, batch.response_tokens().to(logits.device), mask, kd_ratio=kd_ratio,
                                    num_tokens=max(global_tokens, 1), **teacher)
    if kd_ratio == 0:
        return loss, {"pt_loss": float(metrics["pt_loss"])}  # without KD the LM part is the whole
    return loss, {"pt_loss": float(metrics["pt_loss"]), "pt_lm_loss": float(metrics["lm_loss"]),
                  "pt_kd_loss": float(metrics["kd_loss"])}
