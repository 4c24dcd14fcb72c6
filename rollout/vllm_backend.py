"""vLLM backend (GPU, vLLM 0.26): same methods as `HFRolloutBackend`, plus the GPU weight-sync paths.

Token ids in (`TokensPrompt`, `skip_tokenizer_init=True`), token ids + raw log q out. The engine is built with
`logprobs_mode="raw_logprobs"` (log-softmax of the model's logits before temperature/top-k/top-p) and each
request asks `logprobs=0`: vLLM then returns, per generated token, a `dict[int, Logprob]` holding only the
sampled token (`CompletionOutput.logprobs`, a plain list because `flat_logprobs` stays False), so every
sampled token comes with its own raw log-prob: the quantity the learner recomputes (in bf16 the two differ
by kernel rounding; benchmarks/bench_rollout.py measures it).

`logprobs(batch)` scores given tokens with `prompt_logprobs=0` on prompt + response (entry j of
`RequestOutput.prompt_logprobs` is {token j: Logprob} given tokens < j, entry 0 is None; raw and processed
are identical for prompt tokens; such requests skip prefix-cache reads) under the engine's current weights:
no second copy of the model. It needs one free position after each row (max_tokens >= 1), so rows must be
shorter than the engine's max_model_len.

Weight sync (one RPC per flat bucket, into `rollout.vllm_extension.WeightSyncExtension`; prefix cache reset
after each bucket so no stale KV is reused):
  load_bucket(flat, metas)            CPU-staged: the bucket's bytes travel through the RPC
  load_bucket_ipc(handle, metas)      same GPU: `ipc_handle(flat_cuda)` from the learner, zero-copy
  init_weight_update_group(...) +
  load_bucket_broadcast(metas)        separate GPUs: NCCL broadcast from learner rank 0, whose end is
                                      `rollout.collective.BroadcastGroup` (same StatelessProcessGroup + PyNccl)
`sleep(level)` / `wake_up()` free and restore GPU memory for the single-GPU mode (needs sleep_mode=True,
which makes vLLM use its cumem allocator). Weights must not be loaded while asleep: wake up first
(after a level-2 sleep, `wake_up(["weights"])`, load, then `wake_up(["kv_cache"])` keeps the peak low).

Teacher-mixed sampling (`SamplingSettings.mix_alpha` > 0) runs a second `LLM` for the teacher (vLLM 0.26 V1:
each `LLM` has its own engine-core process, so two fit in one process; give each its own
gpu_memory_utilization share) and the alternating scheduler of `rollout.mixed_sampling`.
"""
from __future__ import annotations

import importlib.util
import os
import pickle
import random
from typing import Optional, Sequence

import torch

from rollout.mixed_sampling import alternating_mixed_sample
from rollout.types import RolloutBatch, SamplingSettings, pad_id_of
from rollout.weight_sync import TensorMeta

EXTENSION = "rollout.vllm_extension.WeightSyncExtension"

# vLLM 0.26's V2 model runner (the default for dense decoder-only models) caps logit_bias at 1024 ids per request.
_MAX_MASKED_IDS = 1024


def _sampling_params(settings: SamplingSettings, max_tokens: int, stop_ids: Sequence[int], seed: Optional[int],
                     n: int = 1, logprobs: Optional[int] = 0, logit_bias: Optional[dict[int, float]] = None):
    from vllm import SamplingParams

    # ignore_eos: stop exactly at our stop set (the HF backend's rule), not also at the generation config's EOS
    # ids, which vLLM would otherwise add to stop_token_ids (`SamplingParams.update_from_generation_config`).
    # A stop token is kept in `token_ids` (detokenize=False: there is no text to strip it from).
    return SamplingParams(n=n, temperature=settings.temperature, top_p=settings.top_p, top_k=settings.top_k,
                          max_tokens=max_tokens, stop_token_ids=list(stop_ids), ignore_eos=True, seed=seed,
                          logprobs=logprobs, detokenize=False, logit_bias=logit_bias)


def _stop_ids(settings: SamplingSettings) -> list[int]:
    stop = set(settings.stop_token_ids)
    if settings.eos_token_id is not None:
        stop.add(settings.eos_token_id)
    return sorted(stop)


def _tokens_prompt(ids: list[int]):
    from vllm.inputs import TokensPrompt

    return TokensPrompt(prompt_token_ids=[int(t) for t in ids])


def _vocab_mask(own: int, common: int) -> Optional[dict[int, float]]:
    """logit_bias that forbids ids >= `common` (the other model has no such token), or None."""
    if own <= common:
        return None
    if own - common > _MAX_MASKED_IDS:
        raise ValueError(f"rollout: student and teacher vocabularies differ by {own - common} ids (> {_MAX_MASKED_IDS}, "
                         "what vLLM's logit_bias can forbid); sampling from one for the other needs (nearly) the "
                         "same vocabulary")
    return {i: float("-inf") for i in range(common, own)}


class VllmTokenEngine:
    """`rollout.mixed_sampling.TokenEngine` over a `vllm.LLM`; per-request seeds come from `rng`.

    logit_bias: ids this engine must not sample (the other engine's vocabulary is smaller), as in the HF
    lockstep sampler, which samples the common first V ids only.
    """

    def __init__(self, llm, settings: SamplingSettings, rng: random.Random,
                 logit_bias: Optional[dict[int, float]] = None):
        self.llm, self.settings, self.rng, self.logit_bias = llm, settings, rng, logit_bias

    def generate(self, prompt_ids_list: list[list[int]], max_tokens_list: list[int],
                 stop_ids: Sequence[int]) -> list[list[int]]:
        # no logprobs here: the student's are recomputed on the finished rows (`VllmRolloutBackend.logprobs`)
        params = [_sampling_params(self.settings, k, stop_ids, self.rng.randrange(2**31), logprobs=None,
                                   logit_bias=self.logit_bias) for k in max_tokens_list]
        outs = self.llm.generate([_tokens_prompt(p) for p in prompt_ids_list], params, use_tqdm=False)
        return [list(o.outputs[0].token_ids) for o in outs]


class VllmRolloutBackend:
    def __init__(self, model_path: str, dtype: str = "bfloat16", tensor_parallel_size: int = 1,
                 gpu_memory_utilization: float = 0.3, enforce_eager: bool = False, sleep_mode: bool = False,
                 seed: int = 0, teacher_path: Optional[str] = None, teacher_gpu_memory_utilization: float = 0.35,
                 teacher_dtype: Optional[str] = None, max_model_len: Optional[int] = None,
                 vocab_size: Optional[int] = None):
        """vocab_size: sample only ids below it (a teacher sampling for a student with fewer embedding rows)."""
        if importlib.util.find_spec("flashinfer") is None:
            # vLLM's sampler imports flashinfer unless told not to; its engine processes inherit this environment
            os.environ.setdefault("VLLM_USE_FLASHINFER_SAMPLER", "0")
        import vllm.envs as envs
        from vllm import LLM

        if teacher_path is not None and not envs.VLLM_ENABLE_V1_MULTIPROCESSING:
            # in-process engines would share vLLM's process-global state (distributed groups, compile config)
            raise ValueError("rollout: a teacher engine beside the student needs VLLM_ENABLE_V1_MULTIPROCESSING=1 "
                             "(vLLM's default: one engine-core process per LLM)")
        common = dict(tensor_parallel_size=tensor_parallel_size, enforce_eager=enforce_eager, seed=seed,
                      skip_tokenizer_init=True,  # token ids in and out; test models ship no tokenizer
                      logprobs_mode="raw_logprobs", max_model_len=max_model_len,
                      # TP > 1 inside a Ray actor: left to itself vLLM picks its Ray executor (the actor is in a
                      # placement group, `ParallelConfig.__post_init__`), which wants one-GPU bundles and rejects
                      # ours ({GPU: TP}, already held by this actor); the TP workers run as local processes instead
                      distributed_executor_backend="mp" if tensor_parallel_size > 1 else None)
        self.llm = LLM(model=model_path, dtype=dtype, gpu_memory_utilization=gpu_memory_utilization,
                       enable_sleep_mode=sleep_mode, enable_prefix_caching=True,
                       worker_extension_cls=EXTENSION, **common)
        self.max_model_len = int(self.llm.model_config.max_model_len)
        self.teacher = None
        self._student_mask = self._teacher_mask = None
        self._own_mask = _vocab_mask(self.llm.model_config.get_vocab_size(), vocab_size) if vocab_size else None
        # mixed sampling: both engines see every prefix, and the student rescores the rows (one free slot)
        self._mixed_max_len = self.max_model_len - 1
        if teacher_path is not None:
            self.teacher = LLM(model=teacher_path, dtype=teacher_dtype or dtype, enable_sleep_mode=sleep_mode,
                               gpu_memory_utilization=teacher_gpu_memory_utilization, **common)
            self._mixed_max_len = min(self._mixed_max_len, int(self.teacher.model_config.max_model_len))
            v_student = self.llm.model_config.get_vocab_size()
            v_teacher = self.teacher.model_config.get_vocab_size()
            v_common = min(v_student, v_teacher)
            self._student_mask = _vocab_mask(v_student, v_common)
            self._teacher_mask = _vocab_mask(v_teacher, v_common)
        self.pad_token_id = pad_id_of(self.llm.model_config.hf_config)
        self._asleep: set[str] = set()  # vLLM memory tags released by sleep() and not yet woken

    # ---- sampling -----------------------------------------------------------------------------

    def generate(self, prompts: list[list[int]], settings: SamplingSettings) -> RolloutBatch:
        if any(len(p) == 0 for p in prompts):
            raise ValueError("rollout: empty prompt (0 tokens); every prompt needs at least one token")
        self._check_awake(everything=True)
        longest = max(len(p) for p in prompts)
        # vLLM would silently stop a row at max_model_len (the HF backend raises too)
        limit = self._mixed_max_len if settings.mix_alpha > 0 else self.max_model_len
        if longest + settings.max_new_tokens > limit:
            raise ValueError(f"rollout: prompt of {longest} tokens + max_new_tokens={settings.max_new_tokens} "
                             f"exceeds {limit} tokens, the engine's max_model_len"
                             f"{' less one (mixed sampling rescores the rows)' if settings.mix_alpha > 0 else ''}; "
                             "shorten prompts or lower max_new_tokens")
        stop = _stop_ids(settings)
        rng = random.Random(settings.seed)
        if settings.mix_alpha > 0:
            return self._generate_mixed(prompts, settings, stop, rng)
        # One request per prompt with n samples; distinct seeds per prompt (vLLM gives child j seed + j,
        # `vllm.v1.engine.parallel_sampling.ParentRequest`).
        params = [_sampling_params(settings, settings.max_new_tokens, stop,
                                   None if settings.seed is None else rng.randrange(2**31), n=settings.n,
                                   logit_bias=self._own_mask)
                  for _ in prompts]
        outs = self.llm.generate([_tokens_prompt(p) for p in prompts], params, use_tqdm=False)
        expanded, responses, logprobs = [], [], []
        for p, out in zip(prompts, outs):
            for c in out.outputs:  # ordered by child index (FINAL_ONLY aggregation)
                expanded.append(list(p))
                responses.append(list(c.token_ids))
                # logprobs=0: one {sampled id: Logprob} per step
                logprobs.append([step[tok].logprob for tok, step in zip(c.token_ids, c.logprobs)])
        return RolloutBatch.from_lists(expanded, responses, self.pad_token_id, logprobs)

    def _generate_mixed(self, prompts, settings, stop, rng) -> RolloutBatch:
        if self.teacher is None:
            raise ValueError(f"rollout: mix_alpha={settings.mix_alpha} needs a teacher; "
                             "build the backend with teacher_path=...")
        expanded = [list(p) for p in prompts for _ in range(settings.n)]
        if settings.seed is not None:
            torch.manual_seed(settings.seed)  # the z draws
        responses = alternating_mixed_sample(VllmTokenEngine(self.llm, settings, rng, self._student_mask),
                                             VllmTokenEngine(self.teacher, settings, rng, self._teacher_mask),
                                             expanded, settings.max_new_tokens, settings.mix_alpha, stop)
        batch = RolloutBatch.from_lists(expanded, responses, self.pad_token_id, source="mixed",
                                        mix_alpha=settings.mix_alpha)
        batch.student_logprobs = self.logprobs(batch)  # raw log q; the teacher tokens have no engine log q
        return batch

    def logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """(N, T) float32 raw log q(y_t) of the batch's response tokens (vLLM prompt_logprobs)."""
        from vllm import SamplingParams

        self._check_awake(everything=True)
        rows = [batch.sequences[i, :int(batch.prompt_lens[i] + batch.response_lens[i])].tolist()
                for i in range(len(batch))]
        too_long = [i for i, r in enumerate(rows) if len(r) >= self.max_model_len]
        if too_long:
            raise ValueError(f"rollout: rows {too_long[:5]} have >= max_model_len={self.max_model_len} tokens; "
                             "prompt_logprobs needs one free position after the row")
        # greedy: the one generated token is discarded, so spend no sampling randomness on it
        params = SamplingParams(max_tokens=1, temperature=0.0, prompt_logprobs=0, detokenize=False)
        outs = self.llm.generate([_tokens_prompt(r) for r in rows], params, use_tqdm=False)
        lp = torch.zeros(len(batch), batch.max_response_len)
        for i, (row, out) in enumerate(zip(rows, outs)):
            P = int(batch.prompt_lens[i])
            if len(row) > P:
                # prompt_logprobs[j] scores token j given tokens < j (entry 0 is None)
                lp[i, :len(row) - P] = torch.tensor([out.prompt_logprobs[j][row[j]].logprob for j in range(P, len(row))])
        return lp

    # ---- weight sync --------------------------------------------------------------------------

    def load_bucket(self, flat: torch.Tensor, metas: list[TensorMeta]) -> int:
        self._check_awake()
        n = self.llm.collective_rpc("load_bucket_flat", args=(flat_to_bytes(flat), metas))[0]
        self._reset_prefix_cache()
        return n

    def load_bucket_ipc(self, handle: bytes, metas: list[TensorMeta]) -> int:
        self._check_awake()
        n = self.llm.collective_rpc("load_bucket_ipc", args=(handle, metas))[0]
        self._reset_prefix_cache()
        return n

    def init_weight_update_group(self, backend: str, host: str, port: int, rank_offset: int, world_size: int) -> None:
        """Join learner rank 0's broadcast group (`rollout.collective.BroadcastGroup`, "nccl"): engine worker r
        takes rank rank_offset + r. Blocks until every member has joined."""
        if backend != "nccl":
            raise ValueError(f"the vllm backend receives broadcasts over NCCL only, got backend={backend!r}")
        self.llm.collective_rpc("init_weight_update_group", args=(host, port, rank_offset, world_size))

    def load_bucket_broadcast(self, metas: list[TensorMeta]) -> int:
        """Receive one bucket broadcast by learner rank 0 (buckets arrive in the learner's plan order)."""
        self._check_awake()
        n = self.llm.collective_rpc("load_bucket_nccl", args=(metas,))[0]
        self._reset_prefix_cache()
        return n

    def gpu_uuid(self) -> str:
        """The GPU of engine rank 0, asked of the engine process: the rollout actor opens no CUDA context (~0.5 GB)."""
        return self.llm.collective_rpc("gpu_uuid")[0]

    def weights_checksum(self) -> float:
        return self.llm.collective_rpc("weights_checksum")[0]

    # ---- single-GPU mode ----------------------------------------------------------------------

    def sleep(self, level: int = 1) -> None:
        """Level 1 offloads weights to CPU and drops the KV cache; level 2 drops the weights too; level 0 only
        pauses scheduling (wake with ["scheduling"]). vLLM also clears the prefix cache (`EngineCore.sleep`).
        The mixed-sampling teacher engine sleeps with it, at level 1 at most: no sync rewrites its weights."""
        self.llm.sleep(level=level)
        if self.teacher is not None:
            self.teacher.sleep(level=min(level, 1))
        self._asleep = {"scheduling"} if level == 0 else {"weights", "kv_cache"}

    def wake_up(self, tags: Optional[list[str]] = None) -> None:
        """tags: None wakes everything; ["weights"] then ["kv_cache"] lets new weights load before the KV cache returns."""
        was_asleep = bool(self._asleep)
        self.llm.wake_up(tags=tags)
        self._asleep = set() if tags is None else self._asleep - set(tags)
        # it slept with the student; no sync touches it, so it wakes whole once the student is whole again
        # (last: the sync runs with the most free memory)
        if self.teacher is not None and was_asleep and not self._asleep:
            self.teacher.wake_up()

    def _reset_prefix_cache(self) -> None:
        """Cached KV was computed by the old weights. (With the KV cache asleep, sleep() already dropped it.)"""
        if "kv_cache" not in self._asleep:
            self.llm.reset_prefix_cache()

    def _check_awake(self, everything: bool = False) -> None:
        """Sampling needs everything resident; loading weights needs the weights (vLLM would write to unmapped memory)."""
        if "weights" in self._asleep or (everything and self._asleep):
            raise RuntimeError(f"rollout: the vLLM engine is asleep ({sorted(self._asleep)} released); call wake_up() first")


# ---- learner side -------------------------------------------------------------------------------


def flat_to_bytes(flat: torch.Tensor) -> bytes:
    """A flat bucket's raw bytes (any dtype, bf16 included): plain data for vLLM's RPC encoder."""
    return flat.detach().contiguous().cpu().view(torch.uint8).numpy().tobytes()


def ipc_handle(flat: torch.Tensor) -> bytes:
    """Pickled (GPU UUID, rebuild fn, args) of a CUDA flat bucket, for `load_bucket_ipc` on the same GPU.

    The learner must keep `flat` alive (and unmodified) until the call returns.
    """
    from torch.multiprocessing.reductions import reduce_tensor

    if not flat.is_cuda:
        raise ValueError(f"ipc_handle needs a CUDA tensor, got one on {flat.device}")
    uuid = str(torch.cuda.get_device_properties(flat.device).uuid)
    rebuild, args = reduce_tensor(flat)
    return pickle.dumps((uuid, rebuild, args))
