"""Noise curriculum: the probability that a simulated search call returns noisy documents.

ZeroSearch (arXiv 2505.04588, eq. 2; docs/method.md §4) raises the share of noisy simulator
documents during RL so the policy first learns the search format on easy (useful) documents and
then learns to cope with poor ones:

    p(i) = p_s + (b^(i/m) - 1) / (b - 1) * (p_e - p_s)

with i the current RL step (upstream counts from 1), m the total number of steps and b = 4
(hard-coded upstream). One probability serves every search call of a step; a call is noisy iff
a uniform draw is <= p (useful iff uniform() > p).

Schedules are host-side functions of Python numbers, chosen by name from `SCHEDULES`; every one
has the signature `(step, total_steps, start, end) -> float`. `linear` and `constant` exist for
ablations (the paper's "random" ablation is a constant p = 0.5).
"""

from __future__ import annotations

import math
from typing import Protocol

from zerosearch_jax.settings import lookup


class NoiseSchedule(Protocol):
    def __call__(self, step: float, total_steps: int, start: float, end: float) -> float: ...


def _validate(step: float, total_steps: int, start: float, end: float) -> None:
    if not math.isfinite(step):
        raise ValueError(f"step must be a finite number, got {step!r}")
    if total_steps < 1:
        raise ValueError(f"total_steps must be >= 1, got {total_steps!r}")
    for name, p in (("start", start), ("end", end)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} must be a probability in [0, 1], got {p!r}")


def _progress(step: float, total_steps: int) -> float:
    """i / m clamped to [0, 1]: steps before the first give `start`, after the last give `end`."""
    return min(max(step / total_steps, 0.0), 1.0)


def noise_probability(
    step: float, total_steps: int, start: float, end: float, base: float = 4.0
) -> float:
    """Exponential curriculum p_s + (b^(i/m) - 1) / (b - 1) * (p_e - p_s), clamped to [start, end].

    Args:
      step: current RL step i (upstream's first step is 1); <= 0 gives `start`, >= m gives `end`.
      total_steps: total number of RL steps m, >= 1.
      start: p_s in [0, 1].
      end: p_e in [0, 1] (may be below `start` for a decreasing schedule).
      base: b > 0, b != 1; b > 1 rises slowly first, b < 1 rises fast first.
    """
    _validate(step, total_steps, start, end)
    if not (base > 0 and base != 1 and math.isfinite(base)):
        raise ValueError(f"base must be a finite number > 0 and != 1, got {base!r}")
    fraction = (base ** _progress(step, total_steps) - 1.0) / (base - 1.0)
    return start + fraction * (end - start)


def linear_schedule(step: float, total_steps: int, start: float, end: float) -> float:
    """p_s + (i/m) (p_e - p_s), clamped; the b -> 1 limit of `noise_probability`."""
    _validate(step, total_steps, start, end)
    return start + _progress(step, total_steps) * (end - start)


def constant_schedule(step: float, total_steps: int, start: float, end: float) -> float:
    """`end` at every step: the final noise level from the first step on ("random" ablation)."""
    _validate(step, total_steps, start, end)
    return end


SCHEDULES: dict[str, NoiseSchedule] = {
    "exponential": noise_probability,
    "linear": linear_schedule,
    "constant": constant_schedule,
}


def get_schedule(name: str) -> NoiseSchedule:
    """The schedule registered under `name` (one of `SCHEDULES`)."""
    return lookup(SCHEDULES, name, "noise schedule")
