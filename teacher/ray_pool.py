"""Data-parallel pool of Ray actors, each holding one teacher replica.

    pool = TeacherPool("/ckpt/teacher", num_replicas=2, device="cuda", dtype="bfloat16", num_gpus_per_replica=1)
    scores = pool.score(sequences, prompt_lens, response_lens, topk=64)      # blocking
    pending = pool.score_async(sequences, prompt_lens, response_lens)        # overlap with generation
    ...; scores = pending.result()

Rows are split across replicas balanced by token count (longest-first greedy), each
slice is ``ray.put`` separately (only the slice travels to its replica), and results
are put back in the caller's order. A replica that dies is restarted by Ray
(``max_restarts``) and the failed slice is retried once on it.
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import ray
import torch
from ray.exceptions import ActorDiedError, ActorUnavailableError, RayActorError

from teacher.types import TeacherScores, scatter_rows

_ACTOR_ERRORS = (RayActorError, ActorDiedError, ActorUnavailableError)


@ray.remote
class TeacherActor:
    """One teacher replica. Public methods are its protocol: ``score``, ``vocab_info``, ``ping``."""

    def __init__(self, model_path: str, device: str, dtype: str, token_budget: int, release_memory: bool = False,
                 vocab_size: int | None = None):
        from teacher.loading import describe_teacher, load_teacher, load_tokenizer_if_present

        self.model = load_teacher(model_path, device, dtype)
        self.info = describe_teacher(self.model, model_path, load_tokenizer_if_present(model_path))
        self.token_budget = token_budget
        self.release_memory = release_memory
        self.vocab_size = vocab_size

    def score(self, sequences, prompt_lens, response_lens, topk: int, return_full: bool, values_dtype: str, temperature: float) -> TeacherScores:
        """Shapes as in ``teacher.scoring.score_sequences``; the result is on CPU."""
        from teacher.loading import parse_dtype
        from teacher.scoring import score_sequences

        scores = score_sequences(
            self.model, sequences, prompt_lens, response_lens, topk=topk, return_full=return_full,
            values_dtype=parse_dtype(values_dtype), token_budget=self.token_budget, temperature=temperature,
            vocab_size=self.vocab_size,
        ).to("cpu")
        if self.release_memory and torch.cuda.is_available():
            torch.cuda.empty_cache()  # a shared GPU: the learner and the waking engine need what the activations held
        return scores

    @ray.method(num_returns=2)
    def score_split(self, *args) -> tuple[torch.Tensor, TeacherScores]:
        """``score``, returned as two objects: the small (N, T) token log-probs for the caller, and the whole
        result, whose ObjectRef the caller hands to another actor without fetching it."""
        scores = self.score(*args)
        return scores.token_logprobs, scores

    def vocab_info(self) -> dict:
        return self.info

    def ping(self) -> bool:
        return True


def _checked_inputs(sequences, prompt_lens, response_lens, limits: dict | None = None
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """CPU tensors, validated here (`limits`: the teacher's max_context and vocab_size): row errors name the
    caller's row ids, before anything is sent (a replica sees only its slice)."""
    from teacher.scoring import validate_lengths

    sequences, prompt_lens, response_lens = sequences.cpu(), prompt_lens.long().cpu(), response_lens.long().cpu()
    validate_lengths(sequences, prompt_lens, response_lens, **(limits or {}))
    return sequences, prompt_lens, response_lens


def balance_rows(total_lens: torch.Tensor, num_parts: int) -> list[torch.Tensor]:
    """Partition row indices into ``num_parts`` groups with near-equal token sums.

    Longest-processing-time greedy: rows longest first, each to the lightest group.
    Empty groups are dropped. Returns a list of sorted (n_j,) int64 index tensors.
    """
    loads = [0] * num_parts
    groups: list[list[int]] = [[] for _ in range(num_parts)]
    lens = total_lens.tolist()
    for i in sorted(range(len(lens)), key=lambda i: -lens[i]):
        j = min(range(num_parts), key=loads.__getitem__)
        groups[j].append(i)
        loads[j] += lens[i]
    return [torch.tensor(sorted(g), dtype=torch.long) for g in groups if g]


@dataclass
class PendingScores:
    """Handle to an in-flight ``score_async`` call.

    ``refs[j]`` scores rows ``row_indices[j]`` on replica ``replica_ids[j]``; ``result()`` blocks,
    retries a slice once if its replica died, and returns the (N, T, ...) scores in order.
    """

    pool: TeacherPool
    refs: list
    row_indices: list[torch.Tensor]
    replica_ids: list[int]
    args: list[tuple]
    num_rows: int
    T: int

    def ready(self) -> bool:
        """True when every slice has finished (without blocking)."""
        done, _ = ray.wait(self.refs, num_returns=len(self.refs), timeout=0)
        return len(done) == len(self.refs)

    def result(self) -> TeacherScores:
        parts = []
        for j, ref in enumerate(self.refs):
            try:
                parts.append(ray.get(ref))
            except _ACTOR_ERRORS as err:
                parts.append(self.pool._retry(self.replica_ids[j], self.args[j], err))
        return scatter_rows(parts, self.row_indices, self.num_rows, self.T)


class TeacherPool:
    """``num_replicas`` TeacherActors; see the module docstring.

    Args:
        model_path (`str`): local folder with a ``save_pretrained`` checkpoint (and optionally its tokenizer).
        num_replicas (`int`, *optional*, defaults to 1): data-parallel replicas.
        device (`str`, *optional*, defaults to "cpu"): "cpu" or "cuda" (the replica's GPU, as Ray assigns it).
        dtype (`str`, *optional*, defaults to "float32"): "float32" | "bfloat16" | "float16" weights.
        num_cpus_per_replica (`float`, *optional*, defaults to 1): Ray CPU resources per actor.
        num_gpus_per_replica (`float`, *optional*, defaults to 0): Ray GPU resources per actor (1 for cuda).
        token_budget (`int`, *optional*, defaults to 16384): padded tokens per forward pass.
        placement (`list[tuple[PlacementGroup, int]]`, *optional*): one (placement_group, bundle_index)
            per replica; None lets Ray place the actors.
        max_restarts (`int`, *optional*, defaults to 3): Ray restarts per replica after it dies.
        values_dtype (`str`, *optional*, defaults to "float32"): dtype of the returned top-k log-probs.
        release_memory (`bool`, *optional*, defaults to False): return cached CUDA memory to the GPU after
            each call (the teacher shares its GPU with other processes: the single-GPU mode).
        vocab_size (`int`, *optional*): the student's vocabulary size, when it differs from the teacher's by
            embedding padding: distributions are over the student's ids (``score_sequences``).
    """

    def __init__(
        self,
        model_path: str,
        num_replicas: int = 1,
        device: str = "cpu",
        dtype: str = "float32",
        num_cpus_per_replica: float = 1,
        num_gpus_per_replica: float = 0,
        token_budget: int = 16384,
        placement: list | None = None,
        max_restarts: int = 3,
        values_dtype: str = "float32",
        release_memory: bool = False,
        vocab_size: int | None = None,
    ):
        from teacher.loading import parse_dtype

        if num_replicas < 1:
            raise ValueError(f"num_replicas must be >= 1, got {num_replicas}.")
        if device.startswith("cuda") and num_gpus_per_replica <= 0:
            raise ValueError(f"device={device!r} needs num_gpus_per_replica > 0 (Ray hides GPUs from actors without), got {num_gpus_per_replica}.")
        if placement is not None and len(placement) != num_replicas:
            raise ValueError(f"placement must give one (placement_group, bundle_index) per replica: {num_replicas} expected, got {len(placement)}.")
        parse_dtype(dtype), parse_dtype(values_dtype)  # fail here, not inside an actor
        if not ray.is_initialized():
            ray.init()
        self.values_dtype = values_dtype
        self.actors = []
        for i in range(num_replicas):
            options = dict(num_cpus=num_cpus_per_replica, num_gpus=num_gpus_per_replica, max_restarts=max_restarts, max_task_retries=0)
            if placement is not None:
                from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

                pg, bundle = placement[i]
                options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(placement_group=pg, placement_group_bundle_index=bundle)
            self.actors.append(TeacherActor.options(**options).remote(model_path, device, dtype, token_budget, release_memory,
                                                                       vocab_size))
        ray.get([a.ping.remote() for a in self.actors])  # surface load errors now
        info = ray.get(self.actors[0].vocab_info.remote())
        self._limits = {"max_context": info.get("max_context"),
                        "vocab_size": min(info["vocab_size"], vocab_size) if vocab_size else info["vocab_size"]}

    @property
    def num_replicas(self) -> int:
        return len(self.actors)

    def score_async(self, sequences, prompt_lens, response_lens, topk: int = 0, return_full: bool = False, temperature: float = 1.0) -> PendingScores:
        """Submit a batch (shapes as ``score_sequences``) and return at once; call ``.result()`` later."""
        sequences, prompt_lens, response_lens = _checked_inputs(sequences, prompt_lens, response_lens, self._limits)
        T = int(response_lens.max())
        row_indices = balance_rows(prompt_lens + response_lens, self.num_replicas)
        refs, args = [], []
        for j, rows in enumerate(row_indices):
            a = self._replica_args(sequences, prompt_lens, response_lens, rows, topk, return_full, temperature)
            args.append(a)
            refs.append(self.actors[j].score.remote(*a))
        return PendingScores(self, refs, row_indices, list(range(len(row_indices))), args, sequences.shape[0], T)

    def score_handoff(self, sequences, prompt_lens, response_lens, topk: int = 0, return_full: bool = False,
                      temperature: float = 1.0) -> tuple[torch.Tensor, ray.ObjectRef]:
        """One replica only: (the (N, T) token log-probs, an ObjectRef of the whole ``TeacherScores``) for a caller
        that passes the scores on to another actor (the learner) as an argument: they go from the teacher's
        object store to that actor without passing through the caller (full distributions are hundreds of MB
        a step). Returns once scoring is done; a dead replica is retried as in ``score``."""
        if self.num_replicas != 1:
            raise ValueError(f"score_handoff needs a single replica (rows of several would need merging), got {self.num_replicas}")
        sequences, prompt_lens, response_lens = _checked_inputs(sequences, prompt_lens, response_lens, self._limits)
        args = self._replica_args(sequences, prompt_lens, response_lens, torch.arange(len(prompt_lens)), topk,
                                  return_full, temperature)
        small, whole = self.actors[0].score_split.remote(*args)
        try:
            return ray.get(small), whole
        except _ACTOR_ERRORS as err:
            scores = self._retry(0, args, err)
            return scores.token_logprobs, ray.put(scores)

    def _replica_args(self, sequences, prompt_lens, response_lens, rows: torch.Tensor, topk: int, return_full: bool,
                      temperature: float) -> tuple:
        """`TeacherActor.score`'s arguments for rows `rows`, sliced (rows and columns) before ray.put: only
        that replica's part is shipped."""
        L = int((prompt_lens[rows] + response_lens[rows]).max())
        return (ray.put(sequences[rows, :L].contiguous()), prompt_lens[rows], response_lens[rows], topk, return_full,
                self.values_dtype, temperature)

    def score(self, sequences, prompt_lens, response_lens, topk: int = 0, return_full: bool = False, temperature: float = 1.0) -> TeacherScores:
        """Blocking ``score_async(...).result()``: (N, T) token log-probs [+ (N, T, K) top-k, (N, T, V) full]."""
        return self.score_async(sequences, prompt_lens, response_lens, topk, return_full, temperature).result()

    def vocab_info(self) -> dict:
        """{model_name, vocab_size, tokenizer_len, max_context, special_token_ids} of the teacher."""
        return self._call_with_retry(0, "vocab_info")

    def shutdown(self) -> None:
        """Kill the replicas (no restart). The pool is unusable afterwards."""
        for a in self.actors:
            ray.kill(a, no_restart=True)
        self.actors = []

    def _retry(self, replica: int, args: tuple, err: Exception, wait_s: float = 120.0) -> TeacherScores:
        """Re-submit a slice once after its replica died; Ray restarts the actor (max_restarts)."""
        self._wait_alive(replica, err, wait_s)
        try:
            return ray.get(self.actors[replica].score.remote(*args))
        except _ACTOR_ERRORS as err2:
            raise RuntimeError(f"teacher replica {replica} failed twice on the same request; last error: {err2}") from err2

    def _call_with_retry(self, replica: int, method: str):
        try:
            return ray.get(getattr(self.actors[replica], method).remote())
        except _ACTOR_ERRORS as err:
            self._wait_alive(replica, err, 120.0)
            return ray.get(getattr(self.actors[replica], method).remote())

    def _wait_alive(self, replica: int, err: Exception, wait_s: float) -> None:
        deadline = time.monotonic() + wait_s
        while True:
            try:
                ray.get(self.actors[replica].ping.remote(), timeout=max(1.0, deadline - time.monotonic()))
                return
            except ActorDiedError as dead:
                raise RuntimeError(
                    f"teacher replica {replica} died and cannot be restarted (max_restarts used up?): {dead}. "
                    f"Original error: {err}"
                ) from err
            except (ActorUnavailableError, RayActorError, ray.exceptions.GetTimeoutError):
                if time.monotonic() > deadline:
                    raise RuntimeError(f"teacher replica {replica} did not come back within {wait_s:.0f}s after: {err}") from err
                time.sleep(0.2)
