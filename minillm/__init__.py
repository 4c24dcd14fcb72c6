"""Objectives for on-policy LLM distillation (pure torch; no Ray / vLLM / DeepSpeed imports).

* :mod:`minillm.reduce` -- ``masked_mean``, ``masked_whiten``.
* :mod:`minillm.logprobs` -- chunked ``token_logprobs``, ``entropy``.
* :mod:`minillm.divergences` -- per-token divergences (full-vocabulary and top-k) and ``token_divergence``.
* :mod:`minillm.policy_gradient` -- MiniLLM (arXiv 2306.08543) rewards, advantages, weights and loss.
* :mod:`minillm.gkd` -- GKD's on-policy mixer (arXiv 2306.13649).
"""

from .divergences import (
    DIVERGENCE_NAMES,
    adaptive_kl,
    forward_kl,
    generalized_jsd,
    reverse_kl,
    skew_forward_kl,
    skew_reverse_kl,
    token_divergence,
    total_variation,
)
from .gkd import OnPolicyMixer
from .logprobs import entropy, token_logprobs
from .policy_gradient import (
    long_term_advantages,
    lm_loss,
    minillm_loss,
    mixed_importance_weights,
    pt_loss_with_kd,
    single_step_reverse_kl,
    token_rewards,
)
from .reduce import masked_mean, masked_whiten

__all__ = [
    "DIVERGENCE_NAMES",
    "OnPolicyMixer",
    "adaptive_kl",
    "entropy",
    "forward_kl",
    "generalized_jsd",
    "lm_loss",
    "long_term_advantages",
    "masked_mean",
    "masked_whiten",
    "minillm_loss",
    "mixed_importance_weights",
    "pt_loss_with_kd",
    "reverse_kl",
    "single_step_reverse_kl",
    "skew_forward_kl",
    "skew_reverse_kl",
    "token_divergence",
    "token_logprobs",
    "token_rewards",
    "total_variation",
]
