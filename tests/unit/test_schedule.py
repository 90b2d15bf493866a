"""Rank schedule and timestep conventions, checked against LyCORIS' own `compute_timestep_mask`."""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from lycoris.modules.tlora import compute_timestep_mask

from tlora_core import active_rank, discrete_timestep, flow_timestep
from tlora_core.schedule import schedule_table


@st.composite
def schedules(draw):
    max_rank = draw(st.integers(1, 128))
    min_rank = draw(st.integers(1, max_rank))
    alpha = draw(st.floats(0.1, 5.0, allow_nan=False, allow_infinity=False))
    return max_rank, min_rank, alpha


@settings(max_examples=120, deadline=None)
@given(schedules())
def test_active_rank_matches_lycoris_mask_for_every_timestep(params):
    max_rank, min_rank, alpha = params
    for t in range(0, 1001):
        expected = int(compute_timestep_mask(t, 1000, max_rank, min_rank, alpha).sum().item())
        assert active_rank(t, max_rank, min_rank, alpha) == expected, (t, max_rank, min_rank, alpha)


@pytest.mark.parametrize(("alpha", "expected"), [
    (1.0, [64, 48, 32, 16, 1]),
    (2.0, [64, 36, 16, 4, 1]),
    (0.5, [64, 55, 45, 32, 2]),
])
def test_documented_table(alpha, expected):
    timesteps = [0, 250, 500, 750, 999]
    assert [active_rank(t, 64, 1, alpha) for t in timesteps] == expected
    assert [int(compute_timestep_mask(t, 1000, 64, 1, alpha).sum()) for t in timesteps] == expected


def test_schedule_table_covers_every_timestep_and_is_monotone():
    table = schedule_table(64, 32, 1.0)
    assert [t for t, _ in table] == list(range(1000))
    ranks = [r for _, r in table]
    assert ranks[0] == 64 and ranks[-1] == 32
    assert all(a >= b for a, b in zip(ranks[:-1], ranks[1:], strict=True))
    assert active_rank(1000, 64, 32, 1.0) == 32


@pytest.mark.parametrize(("max_rank", "min_rank", "alpha", "needle"), [
    (0, 1, 1.0, "max_rank"),
    (-3, 1, 1.0, "max_rank"),
    (2.5, 1, 1.0, "max_rank"),
    (True, 1, 1.0, "max_rank"),
    (8, 0, 1.0, "min_rank"),
    (8, 9, 1.0, "min_rank"),
    (8, -1, 1.0, "min_rank"),
    (8, 1, 0.0, "alpha"),
    (8, 1, -1.0, "alpha"),
    (8, 1, math.nan, "alpha"),
    (8, 1, math.inf, "alpha"),
])
def test_bad_schedule_parameters_raise_clear_value_errors(max_rank, min_rank, alpha, needle):
    with pytest.raises(ValueError, match=needle):
        active_rank(0, max_rank, min_rank, alpha)


@pytest.mark.parametrize("t", [-1, -0.5, 1000.5, 1001, math.nan, math.inf, -math.inf])
def test_timestep_outside_range_raises(t):
    with pytest.raises(ValueError, match="timestep"):
        active_rank(t, 8, 1, 1.0)


@pytest.mark.parametrize(("sigma", "expected"), [
    (1.0, 1000), (0.2501, 250), (0.0, 0), (0.5, 500), (0.9999, 999), (0.001, 1),
    (1.5, 1000), (-0.1, 0),  # clamped to the trainer's range
])
def test_flow_timestep_is_int_sigma_times_1000(sigma, expected):
    assert flow_timestep(sigma) == expected
    assert flow_timestep(torch.tensor(sigma, dtype=torch.float64)) == expected


@pytest.mark.parametrize(("model_t", "expected"), [(999.0, 999), (999.9, 999), (0.4, 0), (500, 500), (1200, 1000)])
def test_discrete_timestep_truncates_the_models_timestep(model_t, expected):
    # the model's own timestep for a sigma is what the trainer used, truncated and clamped
    assert discrete_timestep(model_t) == expected


def test_timestep_errors():
    with pytest.raises(ValueError, match="finite"):
        flow_timestep(math.nan)
    with pytest.raises(ValueError, match="finite"):
        discrete_timestep(math.inf)
    assert flow_timestep(0.5004, integer=False) == pytest.approx(500.4)


def test_flow_timestep_feeds_the_schedule_like_the_trainer():
    # Flux-style sigmas in [0, 1]: the trainer's t is int(sigma * 1000), never sigma itself.
    sigmas = [1.0, 0.75, 0.5, 0.25, 0.0]
    ranks = [active_rank(flow_timestep(s), 64) for s in sigmas]
    assert ranks == [1, 16, 32, 48, 64]


def test_numpy_scalars_are_accepted_like_python_numbers():
    import numpy as np

    assert active_rank(500, np.int64(8), np.int32(2), np.float32(1.0)) == active_rank(500, 8, 2, 1.0) == \
        int(compute_timestep_mask(500, 1000, 8, 2, 1.0).sum())
    assert active_rank(500, 8.0, 2, np.float64(0.5)) == int(compute_timestep_mask(500, 1000, 8, 2, 0.5).sum())
