"""The student as the learner builds it: loaded (or freshly initialised) without dropout, and its parameters in
the weight-decay groups HF Trainer uses."""
from __future__ import annotations

import torch

# HF Trainer's no-decay rule (`Trainer.get_decay_parameter_names`, transformers 5): biases and norm weights.
NO_DECAY_PATTERNS = [r"bias", r"layernorm", r"rmsnorm", r"(?:^|\.)norm(?:$|\.)", r"_norm(?:$|\.)"]


def without_dropout(config):
    """`config` with every dropout probability at 0 (attention_dropout, hidden_dropout, resid_pdrop, ...), and the
    other noise a model adds only in training mode: layer drop (OPT, XGLM) and MoE router jitter (Mixtral, PhiMoE).

    Set on the config, before the model is built: Llama-style attention reads `config.attention_dropout` in its
    forward, which no `nn.Dropout` module holds. The text config is the one a multimodal config nests.
    """
    for cfg in {id(c): c for c in (config, config.get_text_config())}.values():
        for key, value in cfg.to_dict().items():
            noisy = "dropout" in key or "pdrop" in key or key == "layerdrop" or key.endswith("jitter_noise")
            if noisy and isinstance(value, float) and hasattr(cfg, key):
                setattr(cfg, key, 0.0)
    return config


def load_student(path: str, student_init: str, dtype: torch.dtype, disable_dropout: bool = True) -> torch.nn.Module:
    """The student from a model folder: its weights (`pretrained`) or a fresh init from its config (`from_config`).

    disable_dropout: the rollout samples without dropout (vLLM has none, HF generate runs in eval mode), so a
    learner with dropout would compute other log-probs than the samples' for the same weights, and the PPO ratio
    would not start at 1. TRL's GKD trainer disables it too (`disable_dropout=True`).
    """
    import transformers

    config = transformers.AutoConfig.from_pretrained(path)
    if disable_dropout:
        config = without_dropout(config)
    if student_init == "from_config":
        model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(path, config=config, dtype=dtype)
    if disable_dropout:
        for m in model.modules():  # dropout a model builds with a fixed rate, outside its config
            if isinstance(m, torch.nn.Dropout):
                m.p = 0.0
    return model


def optimizer_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """Two AdamW groups, as HF Trainer makes them: decay on weight matrices and embeddings, none on biases and norm
    weights. Each group says whether it decays (`decays`), so a resumed run can apply a new trainer.weight_decay."""
    from transformers.trainer_pt_utils import get_parameter_names

    decay_names = set(get_parameter_names(model, [torch.nn.LayerNorm], NO_DECAY_PATTERNS))
    params = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
    groups = [{"params": [p for n, p in params if n in decay_names], "weight_decay": weight_decay, "decays": True},
              {"params": [p for n, p in params if n not in decay_names], "weight_decay": 0.0, "decays": False}]
    return [g for g in groups if g["params"]]
