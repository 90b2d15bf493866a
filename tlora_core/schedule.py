"""Rank schedule of T-LoRA and the timestep conventions that feed it.

`active_rank` is the rank LyCORIS `compute_timestep_mask` activates (the same formula as the
official T-LoRA repo): r = int(((T - t) / T) ** alpha * (R - Rmin)) + Rmin, clamped to R. Some trainers round or
shape the curve their own way (`CURVES`; which writer uses which is in `writers`).
js/tlora_schedule.js ports `active_rank`; tests run both on one table of values.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence

import torch

MAX_TIMESTEP = 1000

# How a trainer turns a sampler's sigma into the t its mask was computed from.
DISCRETE = "discrete"  # DDPM-style models (SD1.5, SDXL): the model's own integer timestep
FLOW = "flow"  # rectified-flow models (SD3, Flux, Flux 2, ...): int(sigma * 1000)
TIMESTEP_MODES = (DISCRETE, FLOW)

# How the active rank follows p = (T - t) / T (p = 0 at pure noise):
POWER = "power"  # int(p ** alpha * (R - Rmin)) + Rmin: LyCORIS, SimpleTuner, the official repo, sd-scripts forks
# the trainers that feed their mask sigma itself compute in float32 with p = 1 - sigma, as done here
POWER_CEIL = "power_ceil"  # ranks i < p ** alpha * (R - Rmin) + Rmin, i.e. its ceiling: AnimaLoraStudio
LINEAR = "linear"  # Rmin + floor(p * (R - Rmin)): lora-scripts-next's linear schedule
COSINE = "cosine"  # Rmin + floor((0.5 - 0.5 cos(pi p)) * (R - Rmin)): lora-scripts-next's default schedule
CURVES = (POWER, POWER_CEIL, LINEAR, COSINE)


def validate(max_rank: int, min_rank: int = 1, alpha: float = 1.0) -> None:
    """Raise ValueError when the schedule parameters make no sense."""
    if isinstance(max_rank, bool) or int(max_rank) != max_rank or max_rank < 1:
        raise ValueError(f"max_rank must be an integer >= 1, got {max_rank!r}")
    if isinstance(min_rank, bool) or int(min_rank) != min_rank or not 1 <= min_rank <= max_rank:
        raise ValueError(f"min_rank must be an integer in [1, max_rank={max_rank}], got {min_rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, numbers.Real) or not math.isfinite(alpha) or alpha <= 0:
        raise ValueError(f"alpha (the schedule exponent) must be a finite number > 0, got {alpha!r}")


def active_rank(
    t: float,
    max_rank: int,
    min_rank: int = 1,
    alpha: float = 1.0,
    max_timestep: int = MAX_TIMESTEP,
    curve: str = POWER,
) -> int:
    """Number of leading ranks active at trainer timestep t (0 = clean, max_timestep = noise)."""
    validate(max_rank, min_rank, alpha)
    if not math.isfinite(t) or not 0 <= t <= max_timestep:
        raise ValueError(f"timestep must be in [0, {max_timestep}], got {t!r}")
    if curve == POWER:
        r = int(((max_timestep - t) / max_timestep) ** alpha * (max_rank - min_rank)) + min_rank
    elif curve in (POWER_CEIL, LINEAR, COSINE):
        r = _sigma_curve(t / max_timestep, max_rank, min_rank, alpha, curve)
    else:
        raise ValueError(f"curve must be one of {', '.join(CURVES)}, got {curve!r}")
    return min(max(r, min_rank), max_rank)


def _sigma_curve(sigma: float, max_rank: int, min_rank: int, alpha: float, curve: str) -> int:
    """The sigma trainers' rules, in their float32 arithmetic (a float64 p = 0.79999999 would floor to the rank
    below their 0.8)."""
    p = 1.0 - torch.tensor(sigma, dtype=torch.float32)
    span = max_rank - min_rank
    if curve == POWER_CEIL:
        return int(torch.ceil(p.pow(alpha) * span + min_rank))
    if curve == COSINE:
        p = 0.5 - 0.5 * torch.cos(math.pi * p)
    return min_rank + int(torch.floor(span * p))


def _trainer_t(t: float, what: str, integer: bool) -> float:
    if not math.isfinite(t):
        raise ValueError(f"{what} gives no finite timestep")
    t = min(max(t, 0.0), float(MAX_TIMESTEP))
    return int(t) if integer else t


def flow_timestep(sigma: float, integer: bool = True) -> float:
    """The t a flow-model trainer fed its mask: int(sigma * 1000), sigma in [0, 1] after shift. `integer=False` keeps
    sigma * 1000 as a float, which is what the official T-LoRA Flux pipeline feeds its mask."""
    return _trainer_t(float(sigma) * MAX_TIMESTEP, f"sigma {sigma!r}", integer)


def discrete_timestep(model_t: float, integer: bool = True) -> float:
    """The t a DDPM trainer fed its mask for the model's own timestep of a sigma (ComfyUI
    `model_sampling.timestep(sigma)`), truncated like `int(t)` in the trainers' loops."""
    return _trainer_t(float(model_t), f"model timestep {model_t!r}", integer)


def schedule_table(max_rank: int, min_rank: int = 1, alpha: float = 1.0,
                   timesteps: Sequence[int] | None = None, curve: str = POWER) -> list[tuple[int, int]]:
    """(t, rank) pairs, every integer t in [0, 999] unless `timesteps` is given."""
    ts = range(MAX_TIMESTEP) if timesteps is None else timesteps
    return [(int(t), active_rank(t, max_rank, min_rank, alpha, curve=curve)) for t in ts]
