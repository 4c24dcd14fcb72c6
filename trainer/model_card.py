"""README.md model card for an exported student, built from a checkpoint's trainer_state.json.

`trainer_state["config"]` is the resolved run config (`dataclasses.asdict(RunConfig)`), and
`trainer_state["metrics"]` the metrics history: a list of per-step dicts (the last one is
reported) or a dict of final values. Missing pieces are left out rather than guessed.
"""
from __future__ import annotations

import math
import re
from typing import Any, Optional

# A Hub id is "name" or "owner/name" with no path separators beyond one slash and no scheme.
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.\-]*(/[\w.\-]+)?$")

_OBJECTIVES = {
    "minillm": "MiniLLM: reverse-KL policy gradient on student samples ([arXiv 2306.08543](https://arxiv.org/abs/2306.08543))",
    "gkd": "GKD: generalised JSD(β) with on-policy fraction λ ([arXiv 2306.13649](https://arxiv.org/abs/2306.13649))",
    "forward_kl": "token-level forward KL on student samples",
    "reverse_kl": "token-level reverse KL on student samples",
    "tvd": "token-level total variation distance on student samples",
    "skew_kl": "DistiLLM skew KL ([arXiv 2402.03898](https://arxiv.org/abs/2402.03898))",
    "skew_rkl": "DistiLLM skew reverse KL ([arXiv 2402.03898](https://arxiv.org/abs/2402.03898))",
    "akl": "adaptive KL ([arXiv 2404.02657](https://arxiv.org/abs/2404.02657))",
}

# (section, key) pairs shown as hyper-parameters, when present in the config.
_HPARAMS = [
    ("objective", "name"), ("objective", "lam"), ("objective", "seq_kd"), ("objective", "beta"),
    ("objective", "skew_alpha"), ("objective", "akl_mu"), ("objective", "temperature"),
    ("objective", "clip_eps"), ("objective", "ppo_epochs"), ("objective", "pt_weight"), ("objective", "pt_kd_ratio"),
    ("rollout", "mix_alpha"), ("rollout", "temperature"), ("rollout", "top_p"), ("rollout", "top_k"),
    ("rollout", "max_new_tokens"),
    ("rollout", "prompts_per_step"), ("rollout", "n_samples"), ("trainer", "steps"), ("trainer", "lr"), ("trainer", "lr_schedule"),
    ("trainer", "warmup_steps"), ("trainer", "warmup_ratio"), ("trainer", "weight_decay"), ("trainer", "grad_clip"),
    ("trainer", "zero_stage"), ("trainer", "num_ranks"), ("trainer", "bf16"), ("trainer", "seed"),
]

# Keys that mean something only for some objectives (launch/config.py's ObjectiveConfig): a GKD card listing
# PPO clipping would describe settings the run never used.
_ONLY_FOR = {
    ("objective", "clip_eps"): {"minillm"}, ("rollout", "mix_alpha"): {"minillm"},
    ("objective", "beta"): {"gkd"}, ("objective", "skew_alpha"): {"skew_kl", "skew_rkl"}, ("objective", "akl_mu"): {"akl"},
}
_NOT_FOR = {("objective", "lam"): {"minillm"}, ("objective", "seq_kd"): {"minillm"}, ("objective", "temperature"): {"minillm"}}


def _applies(sec: str, key: str, objective: Optional[str]) -> bool:
    if objective is None:
        return True
    return objective in _ONLY_FOR.get((sec, key), {objective}) and objective not in _NOT_FOR.get((sec, key), ())


def hub_id(name: Optional[str]) -> Optional[str]:
    """`name` if it looks like a Hub model id (not a local path or `builtin:` asset), else None."""
    if not name or name.startswith(("builtin:", "/", ".", "~")) or ":" in name:
        return None
    return name if _HUB_ID.match(name) else None


def final_metrics(metrics: Any) -> dict[str, float]:
    """The last metrics entry, numbers only (history list → last dict; dict → as is)."""
    if isinstance(metrics, list):
        metrics = next((m for m in reversed(metrics) if isinstance(m, dict)), {})
    if not isinstance(metrics, dict):
        return {}
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float)) and not isinstance(v, bool)}


def _fmt(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}" if math.isfinite(v) else str(v)
    return str(v)


def render(trainer_state: dict, model_name: Optional[str] = None) -> str:
    """The model card text (YAML front matter + markdown)."""
    cfg = trainer_state.get("config") or {}
    model = cfg.get("model") or {}
    objective = (cfg.get("objective") or {}).get("name")
    student, teacher = model.get("student"), model.get("teacher")
    base = hub_id(student) if model.get("student_init", "pretrained") == "pretrained" else None

    front = ["---", "library_name: transformers", "tags:", "- distillation", "- minillm"]
    if objective and objective != "minillm":
        front.append(f"- {objective.replace('_', '-')}")
    if base:
        front.append(f"base_model: {base}")
    front.append("---")

    title = model_name or "Distilled student"
    lines = [f"# {title}", ""]
    desc = f"A student model distilled on-policy from the teacher `{teacher}`" if teacher else "A distilled student model"
    lines += [desc + (f", starting from `{student}`." if student else "."), ""]
    if objective:
        lines += [f"**Objective:** {_OBJECTIVES.get(objective, objective)}.", ""]
    if "step" in trainer_state:
        lines += [f"**Training steps completed:** {trainer_state['step']}", ""]

    rows = [(f"{sec}.{key}", (cfg.get(sec) or {})[key]) for sec, key in _HPARAMS
            if key in (cfg.get(sec) or {}) and _applies(sec, key, objective)]
    if rows:
        lines += ["## Hyper-parameters", "", "| name | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in rows] + [""]

    metrics = final_metrics(trainer_state.get("metrics"))
    if metrics:
        lines += ["## Final metrics", "", "| metric | value |", "|---|---|"]
        lines += [f"| `{k}` | {_fmt(v)} |" for k, v in sorted(metrics.items())] + [""]

    lines += ["The rollout settings above are the training samples'; `generation_config.json` holds the student's own "
              "generation defaults.", ""] if rows else []
    lines += ["## Usage", "", "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer",
              "", 'model = AutoModelForCausalLM.from_pretrained("<this folder or repo id>")',
              'tokenizer = AutoTokenizer.from_pretrained("<this folder or repo id>")', "```", ""]
    return "\n".join(front) + "\n\n" + "\n".join(lines)
