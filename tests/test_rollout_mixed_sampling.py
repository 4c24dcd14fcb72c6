"""Teacher-mixed sampling draws each token from α·p + (1−α)·q (MiniLLM arXiv 2306.08543 §2.2).

Statistical checks: empirical token frequencies against the mixture computed from a direct forward of
both models (deliberately independent of `rollout.mixed_sampling`), with Pearson's chi-square
(p > 0.001 to accept) and a power check that the same counts reject a wrong α (p < 1e-6).
Seeds are fixed, so every test is deterministic.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy.stats import chisquare
from transformers import AutoModelForCausalLM, LlamaConfig, LlamaForCausalLM

from rollout.hf_backend import HFRolloutBackend
from rollout.mixed_sampling import HFTokenEngine, alternating_mixed_sample, draw_teacher_positions
from rollout.types import SamplingSettings

TEACHER = "launch/assets/tiny-teacher"  # trained 4-layer Llama: peaked p
EOS = 2
PROMPT = [1, 5, 6, 39]
ALPHA = 0.4
ACCEPT_P, REJECT_P = 1e-3, 1e-6


def random_student(path, seed: int, std: float = 0.3) -> str:
    """A random 2-layer Llama over the teacher's vocabulary; a large init std makes q far from uniform."""
    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=75, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=128,
                      pad_token_id=0, bos_token_id=1, eos_token_id=EOS, initializer_range=std)
    LlamaForCausalLM(cfg).save_pretrained(path)
    return str(path)


@pytest.fixture(scope="module")
def student_path(tmp_path_factory):
    return random_student(tmp_path_factory.mktemp("student"), seed=0)


@pytest.fixture(scope="module")
def backend(student_path):
    torch.set_num_threads(2)
    return HFRolloutBackend(student_path, teacher_path=TEACHER)


@torch.no_grad()
def next_token_probs(path: str, prefix: list[int]) -> np.ndarray:
    """(V,) float64 softmax of a plain full forward (reference, independent of the sampler)."""
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float64).eval()
    return torch.softmax(model(input_ids=torch.tensor([prefix])).logits[0, -1], -1).numpy()


def chi2_pvalue(tokens: np.ndarray, probs: np.ndarray) -> float:
    """Pearson chi-square of observed tokens vs expected probs; bins with expected < 5 pooled into one."""
    n = len(tokens)
    observed = np.bincount(tokens, minlength=len(probs)).astype(float)
    expected = n * probs / probs.sum()
    big = expected >= 5
    obs = np.append(observed[big], observed[~big].sum())
    exp = np.append(expected[big], expected[~big].sum())
    if exp[-1] == 0:
        obs, exp = obs[:-1], exp[:-1]
    assert obs.sum() == n, "a token outside the support was sampled"
    return float(chisquare(obs, exp).pvalue)


def check_mixture(tokens: np.ndarray, p: np.ndarray, q: np.ndarray, alpha: float) -> None:
    pv = chi2_pvalue(tokens, alpha * p + (1 - alpha) * q)
    assert pv > ACCEPT_P, f"frequencies differ from α·p + (1−α)·q at α={alpha}: p-value {pv:.2e}"
    for wrong in (alpha - 0.2, alpha + 0.2):  # power: the same counts must reject a wrong α
        pv_wrong = chi2_pvalue(tokens, wrong * p + (1 - wrong) * q)
        assert pv_wrong < REJECT_P, f"test has no power: α={wrong} not rejected (p-value {pv_wrong:.2e})"


def first_and_second(batch) -> tuple[np.ndarray, np.ndarray]:
    r = batch.response_tokens().numpy()
    return r[:, 0], r


@pytest.fixture(scope="module")
def p_q(student_path):
    """Reference next-token distributions after PROMPT, and after PROMPT + the likeliest mixed first token."""
    p1, q1 = next_token_probs(TEACHER, PROMPT), next_token_probs(student_path, PROMPT)
    mix = ALPHA * p1 + (1 - ALPHA) * q1
    mix[EOS] = 0
    y1 = int(mix.argmax())
    return p1, q1, y1, next_token_probs(TEACHER, PROMPT + [y1]), next_token_probs(student_path, PROMPT + [y1])


def test_distributions_differ_enough(p_q):
    p1, q1, *_ = p_q
    assert 0.5 * np.abs(p1 - q1).sum() > 0.4  # total variation; otherwise α would be hard to identify


def test_lockstep_first_token_matches_mixture(backend, p_q):
    p1, q1, *_ = p_q
    batch = backend.generate([PROMPT], SamplingSettings(max_new_tokens=1, n=4000, seed=1, eos_token_id=EOS,
                                                        mix_alpha=ALPHA))
    assert batch.source == "mixed" and batch.mix_alpha == ALPHA
    check_mixture(first_and_second(batch)[0], p1, q1, ALPHA)


def test_lockstep_second_token_given_first_matches_mixture(backend, p_q):
    _, _, y1, p2, q2 = p_q
    batch = backend.generate([PROMPT], SamplingSettings(max_new_tokens=2, n=6000, seed=2, eos_token_id=EOS,
                                                        mix_alpha=ALPHA))
    first, resp = first_and_second(batch)
    rows = first == y1
    assert rows.sum() > 600, rows.sum()
    check_mixture(resp[rows, 1], p2, q2, ALPHA)  # exercises both KV caches one step on


def test_alternating_scheduler_with_hf_engines_matches_mixture(backend, p_q):
    p1, q1, y1, p2, q2 = p_q
    settings = SamplingSettings()
    student = HFTokenEngine(backend.model, settings, backend.pad_token_id)
    teacher = HFTokenEngine(backend.teacher, settings, backend.pad_token_id)
    torch.manual_seed(3)
    resp = alternating_mixed_sample(student, teacher, [PROMPT] * 6000, max_new_tokens=2, alpha=ALPHA, stop_ids=[EOS])
    first = np.array([r[0] for r in resp])
    check_mixture(first, p1, q1, ALPHA)
    second = np.array([r[1] for r in resp if r[0] == y1])
    assert len(second) > 600
    check_mixture(second, p2, q2, ALPHA)


def test_alpha_zero_is_the_plain_student_path(backend, p_q):
    _, q1, *_ = p_q
    plain = SamplingSettings(max_new_tokens=1, n=4000, seed=4, eos_token_id=EOS)
    zero = SamplingSettings(max_new_tokens=1, n=4000, seed=4, eos_token_id=EOS, mix_alpha=0.0)
    a, b = backend.generate([PROMPT], plain), backend.generate([PROMPT], zero)
    assert b.source == "student" and b.mix_alpha == 0.0
    assert torch.equal(a.sequences, b.sequences)
    # exactly q, EOS included (no min_new_tokens: forbidding EOS would sample from something else)
    assert chi2_pvalue(first_and_second(b)[0], q1) > ACCEPT_P


def test_alpha_one_samples_only_from_teacher(backend, p_q):
    p1, *_ = p_q
    batch = backend.generate([PROMPT], SamplingSettings(max_new_tokens=1, n=3000, seed=5, eos_token_id=EOS,
                                                        mix_alpha=1.0))
    assert chi2_pvalue(first_and_second(batch)[0], p1) > ACCEPT_P


def test_mixed_batch_logprobs_are_raw_student_logprobs(backend, student_path):
    batch = backend.generate([PROMPT, [1, 7]], SamplingSettings(max_new_tokens=6, n=3, seed=6, eos_token_id=EOS,
                                                                mix_alpha=0.5))
    model = AutoModelForCausalLM.from_pretrained(student_path, dtype=torch.float64).eval()
    for i in range(len(batch)):
        P, R = int(batch.prompt_lens[i]), int(batch.response_lens[i])
        seq = batch.sequences[i, :P + R]
        with torch.no_grad():
            lp = torch.log_softmax(model(input_ids=seq[None]).logits[0], -1)
        ref = lp[P - 1:P + R - 1].gather(-1, seq[P:, None])[:, 0].float()
        torch.testing.assert_close(batch.student_logprobs[i, :R], ref, atol=5e-5, rtol=0)  # float32 rollout vs float64 reference
        assert (batch.student_logprobs[i, R:] == 0).all()


def test_mixed_sampling_without_teacher_raises(student_path):
    plain = HFRolloutBackend(student_path)
    with pytest.raises(ValueError, match="needs a teacher"):
        plain.generate([PROMPT], SamplingSettings(mix_alpha=0.2))


def test_mix_alpha_out_of_range_raises():
    with pytest.raises(ValueError, match="mix_alpha must be in"):
        SamplingSettings(mix_alpha=1.5)


# ---- the alternating scheduler's bookkeeping, with deterministic fake engines -------------------


class ConstantEngine:
    """Always samples `token`, except it emits `stop_at` as the response's k-th overall token (once)."""

    def __init__(self, token: int, log: list, stop_after_total: int | None = None):
        self.token, self.log, self.stop_after_total = token, log, stop_after_total

    def generate(self, prompt_ids_list, max_tokens_list, stop_ids):
        outs = []
        for prompt, k in zip(prompt_ids_list, max_tokens_list):
            self.log.append((len(prompt), k))
            out = []
            for _ in range(k):
                total = len(prompt) - 1 + len(out)  # prompts here are one token long
                if self.stop_after_total is not None and total == self.stop_after_total:
                    out.append(EOS)
                    break
                out.append(self.token)
            outs.append(out)
        return outs


def test_alternating_scheduler_puts_teacher_tokens_exactly_where_z_says():
    z = torch.tensor([[0, 0, 1, 0, 1, 1, 0, 0],
                      [1, 0, 0, 0, 0, 0, 0, 1],
                      [0, 0, 0, 0, 0, 0, 0, 0],
                      [1, 1, 1, 1, 1, 1, 1, 1]], dtype=torch.bool)
    log_s, log_t = [], []
    resp = alternating_mixed_sample(ConstantEngine(10, log_s), ConstantEngine(20, log_t), [[1]] * 4,
                                    max_new_tokens=8, alpha=0.5, stop_ids=[EOS], z=z)
    for row, zr in zip(resp, z.tolist()):
        assert row == [20 if zi else 10 for zi in zr]
    # One student request per run, (prefix length, run length). Round 1: row 0 runs t=0..1, row 2 all 8;
    # round 2: row 0 t=3, row 1 t=1..6; round 4: row 0 t=6..7. Row 3 never asks the student.
    assert log_s == [(1, 2), (1, 8), (4, 1), (2, 6), (7, 2)]
    assert sum(k for _, k in log_t) == int(z.sum())


def test_alternating_scheduler_stops_at_eos_inside_a_student_run():
    z = torch.tensor([[0, 0, 0, 1, 0, 0]], dtype=torch.bool)
    resp = alternating_mixed_sample(ConstantEngine(10, [], stop_after_total=1), ConstantEngine(20, []),
                                    [[1]], max_new_tokens=6, alpha=0.5, stop_ids=[EOS], z=z)
    assert resp == [[10, EOS]]  # the teacher is never asked: the run ended at EOS


def test_draw_teacher_positions_rate():
    torch.manual_seed(0)
    z = draw_teacher_positions(2000, 50, 0.2)
    assert abs(z.float().mean().item() - 0.2) < 0.005  # 100k Bernoulli(0.2): sd 0.0013
