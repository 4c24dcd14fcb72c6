"""Rollout workers: sample from the current student (Hugging Face `generate` or vLLM) as Ray actors."""
from rollout.types import RolloutBatch, SamplingSettings

__all__ = ["RolloutBatch", "SamplingSettings"]
