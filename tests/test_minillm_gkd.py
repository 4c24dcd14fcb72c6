"""GKD on-policy mixer: frequencies, exact endpoints, resumable sequence."""

import math

import pytest

from minillm import OnPolicyMixer


@pytest.mark.parametrize("lam", [0.1, 0.5, 0.9])
def test_frequency_matches_lambda(lam):
    n = 20000
    mixer = OnPolicyMixer(lam, seed=7)
    k = sum(mixer.next_source() == "student" for _ in range(n))
    # binomial: |k - n lam| <= 4 sd
    assert abs(k - n * lam) <= 4 * math.sqrt(n * lam * (1 - lam))


def test_endpoints_and_seq_kd():
    assert {OnPolicyMixer(1.0).next_source() for _ in range(200)} == {"student"}
    m0 = OnPolicyMixer(0.0)
    assert {m0.next_source() for _ in range(200)} == {"dataset"}
    mt = OnPolicyMixer(0.0, seq_kd=True)
    assert {mt.next_source() for _ in range(200)} == {"teacher"}
    with pytest.raises(ValueError, match="lam must be in"):
        OnPolicyMixer(1.5)


def test_deterministic_and_resumable():
    a, b = OnPolicyMixer(0.5, seed=3), OnPolicyMixer(0.5, seed=3)
    first = [a.next_source() for _ in range(50)]
    assert first == [b.next_source() for _ in range(50)]
    state = a.state_dict()
    tail = [a.next_source() for _ in range(100)]
    resumed = OnPolicyMixer(0.5, seed=999)  # seed is restored from the state
    resumed.load_state_dict(state)
    assert [resumed.next_source() for _ in range(100)] == tail
    assert resumed.calls == 150
    assert first != [OnPolicyMixer(0.5, seed=4).next_source() for _ in range(50)]
