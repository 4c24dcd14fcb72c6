"""Data that crosses actor boundaries: token ids in, token ids out, so every role sees the same tokens."""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Optional

import torch


@dataclass
class SamplingSettings:
    """How the student samples. Defaults are plain ancestral sampling (on-policy).

    temperature (float): logits are divided by it before sampling.
    top_p (float): nucleus sampling (1.0 = off). top_k (int): 0 = off.
    max_new_tokens (int): response length cap. n (int): samples per prompt.
    eos_token_id (int | None): generation stops at it (it is kept as the last response token).
    stop_token_ids (list[int]): further tokens that end a response.
    seed (int | None): makes a call reproducible.
    mix_alpha (float): MiniLLM teacher-mixed sampling, each token drawn from α·p + (1−α)·q
        (`rollout.mixed_sampling`; needs a backend built with a teacher). 0.0 = plain student sampling.
    """

    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    max_new_tokens: int = 32
    n: int = 1
    eos_token_id: Optional[int] = None
    stop_token_ids: list[int] = field(default_factory=list)
    seed: Optional[int] = None
    mix_alpha: float = 0.0

    def __post_init__(self):
        if not 0.0 <= self.mix_alpha <= 1.0:
            raise ValueError(f"mix_alpha must be in [0.0, 1.0], got {self.mix_alpha}.")


@dataclass
class RolloutBatch:
    """A batch of prompt + response token sequences (right-padded).

    sequences: (N, L) long. Row i is prompt_i, then response_i, then `pad_token_id`.
    prompt_lens: (N,) long. response_lens: (N,) long.
    student_logprobs: (N, T) float32, T = max(response_lens): log q(y_t | y_<t, x) under the
        weights that sampled (temperature 1, no truncation; the behaviour policy of PPO), 0 past
        each response. None for data the student did not sample (dataset / teacher responses).
    source: "student" | "dataset" | "teacher" | "mixed" (teacher-mixed sampling, `mix_alpha`).
    mix_alpha: α of the teacher-mixed proposal p̃ = α·p + (1−α)·q that sampled the batch.
    """

    sequences: torch.Tensor
    prompt_lens: torch.Tensor
    response_lens: torch.Tensor
    pad_token_id: int
    student_logprobs: Optional[torch.Tensor] = None
    source: str = "student"
    mix_alpha: float = 0.0

    def __len__(self) -> int:
        return self.sequences.shape[0]

    @property
    def max_response_len(self) -> int:
        return int(self.response_lens.max().item()) if len(self) else 0

    def response_mask(self) -> torch.Tensor:
        """(N, T) bool, True on real response tokens."""
        t = torch.arange(self.max_response_len)
        return t[None, :] < self.response_lens[:, None]

    def response_positions(self) -> torch.Tensor:
        """(N, T) long: index in `sequences` of response token t (clamped inside the row past its end)."""
        t = torch.arange(self.max_response_len)
        pos = self.prompt_lens[:, None] + t[None, :]
        return pos.clamp(max=self.sequences.shape[1] - 1)

    def response_tokens(self) -> torch.Tensor:
        """(N, T) long; pad past each response."""
        tok = self.sequences.gather(1, self.response_positions())
        return tok.masked_fill(~self.response_mask(), self.pad_token_id)

    def attention_mask(self) -> torch.Tensor:
        """(N, L) long, 1 on prompt and response tokens."""
        pos = torch.arange(self.sequences.shape[1])
        return (pos[None, :] < (self.prompt_lens + self.response_lens)[:, None]).long()

    def select(self, index) -> "RolloutBatch":
        """Rows `index` (a list or tensor), trimmed to their own longest sequence."""
        index = torch.as_tensor(index, dtype=torch.long)
        prompt_lens, response_lens = self.prompt_lens[index], self.response_lens[index]
        L = int((prompt_lens + response_lens).max().item()) if len(index) else 0
        T = int(response_lens.max().item()) if len(index) else 0
        lp = None if self.student_logprobs is None else self.student_logprobs[index, :T]
        return replace(self, sequences=self.sequences[index, :L], prompt_lens=prompt_lens,
                       response_lens=response_lens, student_logprobs=lp)

    @staticmethod
    def from_lists(prompts: list[list[int]], responses: list[list[int]], pad_token_id: int,
                   student_logprobs: Optional[list[list[float]]] = None, source: str = "student",
                   mix_alpha: float = 0.0) -> "RolloutBatch":
        n = len(prompts)
        L = max((len(p) + len(r) for p, r in zip(prompts, responses)), default=0)
        T = max((len(r) for r in responses), default=0)
        seq = torch.full((n, L), pad_token_id, dtype=torch.long)
        for i, (p, r) in enumerate(zip(prompts, responses)):
            seq[i, :len(p) + len(r)] = torch.tensor(list(p) + list(r), dtype=torch.long)
        lp = None
        if student_logprobs is not None:
            lp = torch.zeros(n, T)
            for i, row in enumerate(student_logprobs):
                lp[i, :len(row)] = torch.tensor(row, dtype=torch.float32)
        return RolloutBatch(seq, torch.tensor([len(p) for p in prompts], dtype=torch.long),
                            torch.tensor([len(r) for r in responses], dtype=torch.long), pad_token_id,
                            lp, source, mix_alpha)

    @staticmethod
    def concat(batches: list["RolloutBatch"]) -> "RolloutBatch":
        """Stack batches along N (same pad id and source)."""
        prompts, responses, logprobs = [], [], []
        has_lp = all(b.student_logprobs is not None for b in batches)
        for b in batches:
            for i in range(len(b)):
                p, r = int(b.prompt_lens[i]), int(b.response_lens[i])
                prompts.append(b.sequences[i, :p].tolist())
                responses.append(b.sequences[i, p:p + r].tolist())
                if has_lp:
                    logprobs.append(b.student_logprobs[i, :r].tolist())
        first = batches[0]
        return RolloutBatch.from_lists(prompts, responses, first.pad_token_id, logprobs if has_lp else None,
                                       first.source, first.mix_alpha)


def pad_id_of(config) -> int:
    """The id a model's rows are padded with (always masked): its pad id, else its (first) EOS id (Llama 3 configs
    list several and have no pad id), else 0."""
    pad = config.pad_token_id if getattr(config, "pad_token_id", None) is not None else getattr(config, "eos_token_id", None)
    if isinstance(pad, (list, tuple)):
        pad = pad[0] if pad else None
    return pad if pad is not None else 0
