"""Held-out reverse KL of the student to the teacher: the number that must fall."""
from __future__ import annotations


from rollout.types import RolloutBatch
from teacher.types import TeacherScores


def reverse_kl_estimate(batch: RolloutBatch, scores: TeacherScores) -> dict[str, float]:
    """Monte-Carlo sequence-level KL(q‖p) from student samples y ~ q.

    KL(q‖p) = E_{y~q}[Σ_t log q(y_t|y<t,x) − log p(y_t|y<t,x)]; `batch.student_logprobs` holds
    log q and `scores.token_logprobs` log p of the same tokens. Returns the per-sequence mean
    (`reverse_kl`), its standard error, and the per-token mean (`reverse_kl_per_token`).
    """
    mask = batch.response_mask()
    diff = (batch.student_logprobs - scores.token_logprobs) * mask
    per_seq = diff.sum(1)
    n = per_seq.numel()
    return {
        "reverse_kl": per_seq.mean().item(),
        "reverse_kl_stderr": (per_seq.std() / n ** 0.5).item() if n > 1 else float("nan"),
        "reverse_kl_per_token": (diff.sum() / mask.sum().clamp(min=1)).item(),
        "response_len": batch.response_lens.float().mean().item(),
    }
