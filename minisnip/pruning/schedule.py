"""How much to prune when: the cubic sparsity schedule of gradual pruning.

Zhu & Gupta, "To prune, or not to prune: exploring the efficacy of pruning for model compression" (ICLR
workshop 2018, arXiv 1710.01878), eq. (1): starting at step t0 with sparsity s_i, prune n times, every Δt
steps, to the final sparsity s_f:

    s_t = s_f + (s_i - s_f) (1 - (t - t0) / (n Δt))^3        for t in {t0, t0 + Δt, ..., t0 + n Δt}

It prunes fast while many redundant weights are left and slowly near the end. Sanh, Wolf & Rush (Movement
Pruning, NeurIPS 2020) frame it with a warm-up (s_i for the first steps, while scores or weights settle) and
a cool-down (s_f for the last steps, so the model recovers at its final sparsity). `cubic_sparsity` is that
curve as a function of the 1-based fine-tuning step: t0 = warmup_steps, n Δt = total - warmup - cooldown;
how often a method acts on it (Δt) is the method's business (`update_every` of magnitude pruning; movement
pruning follows it every step).
"""

from __future__ import annotations

import math


def _check_share(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be a number in [0, 1], got {name}={value!r}")
    return float(value)


def _check_steps(name: str, value: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ValueError(f"{name} must be an integer >= 0, got {name}={value!r}")
    return value


def cubic_sparsity(step: int, total_steps: int, final: float, initial: float = 0.0,
                   warmup_steps: int = 0, cooldown_steps: int = 0) -> float:
    """Zhu & Gupta's eq. (1) with Sanh et al.'s warm-up and cool-down: the sparsity to hold after `step`.

        step <= warmup_steps:                     s_i
        step >= total_steps - cooldown_steps:     s_f
        otherwise:  s_f + (s_i - s_f) (1 - (step - t0) / (n Δt))^3,  t0 = warmup_steps,
                                                                   n Δt = total_steps - warmup - cooldown

    `step` counts optimiser steps from 1 (step 0 = before training: s_i). The curve is non-decreasing and
    hits both ends exactly. 0 <= initial <= final <= 1; warmup_steps + cooldown_steps <= total_steps.
    """
    final, initial = _check_share("final", final), _check_share("initial", initial)
    if initial > final:
        raise ValueError(f"initial sparsity must not exceed the final one, got initial={initial}, final={final}")
    if isinstance(total_steps, bool) or not isinstance(total_steps, int) or total_steps < 1:
        raise ValueError(f"total_steps must be an integer >= 1, got total_steps={total_steps!r}")
    warmup_steps = _check_steps("warmup_steps", warmup_steps)
    cooldown_steps = _check_steps("cooldown_steps", cooldown_steps)
    if warmup_steps + cooldown_steps > total_steps:
        raise ValueError(f"warmup_steps + cooldown_steps must not exceed total_steps, got {warmup_steps} + "
                         f"{cooldown_steps} > {total_steps}")
    step = _check_steps("step", step)
    span = total_steps - warmup_steps - cooldown_steps  # n Δt
    if step <= warmup_steps:
        return initial
    if step >= warmup_steps + span:
        return final
    return final + (initial - final) * (1.0 - (step - warmup_steps) / span) ** 3


def schedule_steps(total_steps: int, warmup: float, cooldown: float) -> tuple[int, int]:
    """Warm-up and cool-down as shares of the fine-tuning steps -> (warmup_steps, cooldown_steps), rounded,
    never together more than total_steps."""
    warmup, cooldown = _check_share("warmup", warmup), _check_share("cooldown", cooldown)
    if warmup + cooldown > 1.0:
        raise ValueError(f"warmup + cooldown must not exceed 1 (shares of the steps), got {warmup} + {cooldown}")
    w, c = round(warmup * total_steps), round(cooldown * total_steps)
    return w, min(c, total_steps - w)


__all__ = ["cubic_sparsity", "schedule_steps"]
