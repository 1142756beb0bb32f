"""Tests for zerosearch_jax.curriculum (docs/method.md §4)."""

import pytest

from zerosearch_jax.curriculum import (
    SCHEDULES,
    constant_schedule,
    get_schedule,
    linear_schedule,
    noise_probability,
)

M = 203  # total RL steps of the paper's runs


@pytest.mark.parametrize(
    "fraction, expected", [(0.0, 0.0), (0.25, 0.069), (0.5, 0.167), (0.75, 0.305), (1.0, 0.5)]
)
def test_worked_values(fraction, expected):
    # Fractional steps give exactly i/m; the formula is continuous in i.
    assert round(noise_probability(fraction * M, M, 0.0, 0.5), 3) == expected


def test_paper_settings_endpoints():
    for start, end in [(0.0, 0.75), (0.0, 0.25), (0.25, 0.5)]:
        assert noise_probability(1, M, start, end) == pytest.approx(start, abs=0.01)
        assert noise_probability(M, M, start, end) == pytest.approx(end)


def test_clamping():
    assert noise_probability(0, M, 0.1, 0.5) == pytest.approx(0.1)
    assert noise_probability(-7, M, 0.1, 0.5) == pytest.approx(0.1)
    assert noise_probability(M + 50, M, 0.1, 0.5) == pytest.approx(0.5)
    assert linear_schedule(-1, M, 0.1, 0.5) == pytest.approx(0.1)
    assert linear_schedule(2 * M, M, 0.1, 0.5) == pytest.approx(0.5)


@pytest.mark.parametrize("name", sorted(SCHEDULES))
def test_monotonic_between_start_and_end(name):
    schedule = get_schedule(name)
    increasing = [schedule(i, M, 0.0, 0.75) for i in range(-2, M + 3)]
    assert all(a <= b + 1e-12 for a, b in zip(increasing[:-1], increasing[1:], strict=True))
    decreasing = [schedule(i, M, 0.6, 0.2) for i in range(-2, M + 3)]
    assert all(a >= b - 1e-12 for a, b in zip(decreasing[:-1], decreasing[1:], strict=True))
    assert all(0.2 - 1e-12 <= p <= 0.6 + 1e-12 for p in decreasing)


def test_exponential_rises_slower_than_linear():
    for i in range(1, M):
        assert noise_probability(i, M, 0.0, 0.5) < linear_schedule(i, M, 0.0, 0.5)
    # base < 1 bends the other way.
    assert noise_probability(M // 2, M, 0.0, 0.5, base=0.25) > linear_schedule(M // 2, M, 0.0, 0.5)


def test_linear_and_constant():
    assert linear_schedule(M / 2, M, 0.0, 0.5) == pytest.approx(0.25)
    assert constant_schedule(1, M, 0.0, 0.5) == constant_schedule(M, M, 0.0, 0.5) == 0.5


@pytest.mark.parametrize(
    "kwargs, bad",
    [
        (dict(total_steps=0), "0"),
        (dict(start=-0.1), "-0.1"),
        (dict(end=1.5), "1.5"),
        (dict(base=1.0), "1.0"),
        (dict(base=0.0), "0.0"),
        (dict(base=-2.0), "-2.0"),
        (dict(step=float("nan")), "nan"),
    ],
)
def test_bad_arguments_raise(kwargs, bad):
    args = dict(step=10, total_steps=M, start=0.0, end=0.5) | kwargs
    with pytest.raises(ValueError, match=bad):
        noise_probability(**args)


@pytest.mark.parametrize("schedule", [linear_schedule, constant_schedule])
def test_ablation_schedules_validate(schedule):
    with pytest.raises(ValueError, match="total_steps"):
        schedule(1, 0, 0.0, 0.5)
    with pytest.raises(ValueError, match="end"):
        schedule(1, M, 0.0, 2.0)


def test_registry():
    assert get_schedule("exponential") is noise_probability
    assert set(SCHEDULES) == {"exponential", "linear", "constant"}
    with pytest.raises(ValueError, match=r"'cosine'.*constant.*exponential.*linear"):
        get_schedule("cosine")
