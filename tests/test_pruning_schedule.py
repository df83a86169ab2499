"""The cubic sparsity schedule (Zhu & Gupta 2017, eq. 1) with warm-up and cool-down."""

import pytest

from minisnip.pruning.schedule import cubic_sparsity, schedule_steps


def test_hand_computed_values():
    # s_t = s_f + (s_i - s_f)(1 - (t - t0)/(n Δt))^3
    assert cubic_sparsity(5, 10, 0.9) == pytest.approx(0.9 - 0.9 * 0.5 ** 3)          # 0.7875
    assert cubic_sparsity(5, 10, 0.9, initial=0.5) == pytest.approx(0.9 - 0.4 * 0.5 ** 3)  # 0.85
    # t0 = 2, n Δt = 10 - 2 - 3 = 5
    assert cubic_sparsity(3, 10, 0.9, warmup_steps=2, cooldown_steps=3) == pytest.approx(0.9 - 0.9 * 0.8 ** 3)
    assert cubic_sparsity(4, 10, 0.9, warmup_steps=2, cooldown_steps=3) == pytest.approx(0.9 - 0.9 * 0.6 ** 3)


def test_warmup_cooldown_and_exact_endpoints():
    s = [cubic_sparsity(t, 10, 0.9, initial=0.1, warmup_steps=2, cooldown_steps=3) for t in range(11)]
    assert s[0] == s[1] == s[2] == 0.1            # warm-up holds s_i exactly
    assert s[7] == s[8] == s[9] == s[10] == 0.9   # cool-down holds s_f exactly
    assert cubic_sparsity(10, 10, 0.95) == 0.95 and cubic_sparsity(0, 10, 0.95) == 0.0


def test_monotone():
    s = [cubic_sparsity(t, 97, 0.97, warmup_steps=9, cooldown_steps=20) for t in range(98)]
    assert all(b >= a for a, b in zip(s, s[1:]))
    increments = [b - a for a, b in zip(s[9:78], s[10:78])]
    assert increments[0] > increments[-1] > 0       # fast first, slow at the end


def test_no_pruning_span():
    assert [cubic_sparsity(t, 4, 0.5, warmup_steps=2, cooldown_steps=2) for t in range(5)] == [0, 0, 0, 0.5, 0.5]


@pytest.mark.parametrize("kwargs, word", [
    (dict(final=1.5), "final"), (dict(final=float("nan")), "final"), (dict(final=0.3, initial=0.5), "initial"),
    (dict(final=0.5, warmup_steps=6, cooldown_steps=5), "warmup_steps"),
    (dict(final=0.5, warmup_steps=-1), "warmup_steps"),
])
def test_rejects_bad_arguments(kwargs, word):
    with pytest.raises(ValueError, match=word):
        cubic_sparsity(1, 10, **kwargs)
    with pytest.raises(ValueError, match="total_steps"):
        cubic_sparsity(1, 0, 0.5)


def test_schedule_steps():
    assert schedule_steps(100, 0.1, 0.2) == (10, 20)
    assert schedule_steps(3, 0.5, 0.5) == (2, 1)
    with pytest.raises(ValueError, match="cooldown"):
        schedule_steps(10, 0.1, float("inf"))
