"""Hugging Face `generate` backend: CPU (tests, laptops) and a GPU fallback."""
from __future__ import annotations

from typing import Optional

import torch

from rollout.forward import response_logits
from rollout.mixed_sampling import lockstep_mixed_sample
from rollout.types import RolloutBatch, SamplingSettings, pad_id_of
from rollout.weight_sync import TensorMeta, load_bucket


def _truncate_at_stop(tokens: list[int], stop_ids: set[int]) -> list[int]:
    """Cut a generated row after its first stop token (kept), dropping HF's trailing padding."""
    out = []
    for t in tokens:
        out.append(t)
        if t in stop_ids:
            return out
    # No stop token: HF pads only after a stop, so a pad here is a real sampled token; keep all.
    return out


class HFRolloutBackend:
    """Samples with `model.generate`, then recomputes the sampled tokens' log-probs with one forward.

    The recomputation returns raw log q(y_t) (temperature 1, no top-p/top-k), the same quantity the
    learner computes, so old and new log-probs of PPO's ratio come from identical arithmetic.
    """

    def __init__(self, model_path: str, dtype: str = "float32", device: str = "cpu",
                 teacher_path: Optional[str] = None, teacher_dtype: Optional[str] = None,
                 vocab_size: Optional[int] = None):
        """teacher_path: a teacher checkpoint for teacher-mixed sampling (`SamplingSettings.mix_alpha` > 0),
        loaded on the same device in `teacher_dtype` (defaults to `dtype`). None: student only.
        vocab_size: sample only ids below it (a teacher sampling for a student with fewer embedding rows)."""
        self.device = torch.device(device)
        self.model = self._load(model_path, getattr(torch, dtype))
        self.pad_token_id = pad_id_of(self.model.config)
        own = self.model.get_output_embeddings().weight.shape[0]
        self.suppressed = list(range(vocab_size, own)) if vocab_size is not None and vocab_size < own else None
        self.teacher = None
        if teacher_path is not None:
            self.teacher = self._load(teacher_path, getattr(torch, teacher_dtype or dtype))

    def _load(self, path: str, dtype: torch.dtype):
        from transformers import AutoModelForCausalLM, GenerationConfig

        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype).to(self.device).eval()
        # `generate` fills every setting we leave unset from the folder's generation_config.json (Qwen2.5-Instruct's
        # has repetition_penalty=1.1, top_k=20, top_p=0.8): samples would then not follow q, whose raw log-probs the
        # policy gradient uses. Sampling is fully described by SamplingSettings.
        model.generation_config = GenerationConfig()
        return model

    @torch.no_grad()
    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> RolloutBatch:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("rollout: empty prompt (0 tokens); every prompt needs at least one token")
        max_ctx = getattr(self.model.config, "max_position_embeddings", None)
        longest = max(len(p) for p in prompts)
        if max_ctx is not None and longest + settings.max_new_tokens > max_ctx:
            raise ValueError(f"rollout: prompt of {longest} tokens + max_new_tokens={settings.max_new_tokens} "
                             f"exceeds the student's context of {max_ctx}; shorten prompts or lower max_new_tokens")
        if settings.seed is not None:
            torch.manual_seed(settings.seed)
        expanded = [p for p in prompts for _ in range(settings.n)]
        width = max(len(p) for p in expanded)
        ids = torch.full((len(expanded), width), self.pad_token_id, dtype=torch.long)
        attn = torch.zeros_like(ids)
        for i, p in enumerate(expanded):  # left padding for generation
            ids[i, width - len(p):] = torch.tensor(p)
            attn[i, width - len(p):] = 1
        stop = set(settings.stop_token_ids)
        if settings.eos_token_id is not None:
            stop.add(settings.eos_token_id)
        if settings.mix_alpha > 0:
            return self._generate_mixed(expanded, settings, stop)
        # A fresh GenerationConfig: the model folder's defaults (HF's top_k=50, ...) must not change the
        # policy, and no min_new_tokens: forbidding EOS would sample from something other than q, and
        # the policy gradient would then reward the forced tokens (their raw log q is very low).
        from transformers import GenerationConfig
        gen_cfg = GenerationConfig(do_sample=True, temperature=settings.temperature, top_p=settings.top_p,
                                   top_k=settings.top_k, max_new_tokens=settings.max_new_tokens,
                                   eos_token_id=sorted(stop) or None, pad_token_id=self.pad_token_id,
                                   suppress_tokens=self.suppressed)
        out = self.model.generate(input_ids=ids.to(self.device), attention_mask=attn.to(self.device),
                                  generation_config=gen_cfg)
        gen = out[:, width:].tolist()
        responses = [_truncate_at_stop(row, stop) for row in gen]
        batch = RolloutBatch.from_lists(expanded, responses, self.pad_token_id)
        batch.student_logprobs = self.logprobs(batch)
        return batch

    def _generate_mixed(self, expanded: list[list[int]], settings: SamplingSettings, stop: set[int]) -> RolloutBatch:
        """Teacher-mixed sampling (lockstep, `rollout.mixed_sampling`); log-probs are still raw log q."""
        if self.teacher is None:
            raise ValueError(f"rollout: mix_alpha={settings.mix_alpha} needs a teacher; "
                             "build the backend with teacher_path=...")
        responses = lockstep_mixed_sample(self.model, self.teacher, expanded, settings, settings.mix_alpha,
                                          sorted(stop), self.pad_token_id)
        batch = RolloutBatch.from_lists(expanded, responses, self.pad_token_id, source="mixed",
                                        mix_alpha=settings.mix_alpha)
        batch.student_logprobs = self.logprobs(batch)
        return batch

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """(N, T) float32 log q(y_t) of the batch's response tokens under the current weights."""
        logits = response_logits(self.model, batch).float()
        lp = torch.log_softmax(logits, dim=-1).gather(-1, batch.response_tokens().to(logits.device)[..., None])[..., 0]
        return lp.masked_fill(~batch.response_mask().to(lp.device), 0.0).cpu()

    def gpu_uuid(self) -> Optional[str]:
        """The GPU the model is on; None on CPU."""
        return str(torch.cuda.get_device_properties(self.device).uuid) if self.device.type == "cuda" else None

    def load_bucket(self, flat: torch.Tensor, metas: list[TensorMeta]) -> int:
        return load_bucket(self.model, flat, metas)

    def init_weight_update_group(self, backend: str, host: str, port: int, rank_offset: int, world_size: int) -> None:
        """Join the learner's broadcast group (`rollout.collective`) as rank `rank_offset`."""
        from rollout.collective import BroadcastGroup

        self._broadcast = BroadcastGroup(backend, host, port, rank_offset, world_size, device=self.device)

    def load_bucket_broadcast(self, metas: list[TensorMeta]) -> int:
        """Receive one bucket broadcast by learner rank 0 (buckets arrive in the learner's plan order)."""
        flat = torch.empty(sum(m["numel"] for m in metas), dtype=getattr(torch, metas[0]["dtype"]), device=self.device)
        self._broadcast.broadcast(flat, src=0)
        return load_bucket(self.model, flat, metas)
