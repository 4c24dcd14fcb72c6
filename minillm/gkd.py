"""On-policy data mixing of GKD (Agarwal et al., ICLR 2024, arXiv 2306.13649, Algorithm 1).

With probability ``lam`` a batch's outputs are sampled from the student (on-policy); otherwise they
come from the fixed dataset, or from the teacher when ``seq_kd`` (sequence-level KD, TRL's
``GKDConfig.seq_kd``). The divergence itself is :func:`minillm.divergences.generalized_jsd`.
"""

from __future__ import annotations

import random
from typing import Any


class OnPolicyMixer:
    """Seeded source chooser: ``next_source()`` returns ``"student"``, ``"dataset"`` or ``"teacher"``.

    One uniform draw ``u`` per call from a private ``random.Random(seed)``; ``"student"`` iff ``u < lam``,
    so ``lam = 0`` and ``lam = 1`` are exact and the sequence is a pure function of ``(seed, calls)``.
    ``state_dict()`` / ``load_state_dict()`` capture the generator state, so a resumed run continues the
    exact same sequence.

    Args:
        lam (float): student fraction in [0, 1] (GKD's lambda; TRL ``GKDConfig.lmbda``, defaults to 0.5 there).
        seq_kd (bool, *optional*, defaults to False): off-policy batches come from the teacher, not the dataset.
        seed (int, *optional*, defaults to 0).
    """

    def __init__(self, lam: float, seq_kd: bool = False, seed: int = 0):
        if not 0.0 <= lam <= 1.0:
            raise ValueError(f"lam must be in [0.0, 1.0], got {lam}.")
        self.lam = float(lam)
        self.seq_kd = bool(seq_kd)
        self.seed = int(seed)
        self.calls = 0
        self._rng = random.Random(self.seed)

    def next_source(self) -> str:
        self.calls += 1
        if self._rng.random() < self.lam:
            return "student"
        return "teacher" if self.seq_kd else "dataset"

    def state_dict(self) -> dict[str, Any]:
        return {"lam": self.lam, "seq_kd": self.seq_kd, "seed": self.seed, "calls": self.calls, "rng_state": self._rng.getstate()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if (state["lam"], state["seq_kd"]) != (self.lam, self.seq_kd):
            raise ValueError(
                f"state is for lam={state['lam']}, seq_kd={state['seq_kd']}, mixer has lam={self.lam}, seq_kd={self.seq_kd}."
            )
        self.seed, self.calls = int(state["seed"]), int(state["calls"])
        rng_state = state["rng_state"]
        # getstate() is (version, tuple_of_ints, gauss); tolerate a list after a JSON/YAML round trip.
        self._rng.setstate((rng_state[0], tuple(rng_state[1]), rng_state[2]))
