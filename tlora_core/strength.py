"""A LoRA's strength over the sampling: the curve of Load LoRA (timestep schedule), as a function of progress.

Progress is ComfyUI's percent of the sampling (0 = first step, pure noise; 1 = the end), the scale its hook
keyframes and `start_percent` inputs use. The curve is zero outside [start, end]; inside it goes from
`strength_start` to `strength_end` with the chosen shape. Keyframes (`percent:strength` pairs) replace it with a
piecewise-linear curve through them, held flat before the first and after the last.

`StrengthRule` is what each model call gets: the curve on the sampling of that call, in its sigma, with the end
point excluded (the call that reaches end_percent's sigma is already past it, as with ComfyUI's hook keyframes).
A sampling is any object with ComfyUI's model_sampling interface (`percent_to_sigma`, `sigma_max`, `sigma_min`).
js/tlora_strength.js ports the rule's percent form and `parse_keyframes`; the frontend tier runs both on one table.
"""

from __future__ import annotations

import math
import re
import weakref
from dataclasses import dataclass
from typing import Any, Protocol

import torch

SHAPES = ("constant", "linear", "cosine", "smoothstep")
_PAIR = re.compile(r"^\s*([-+]?(?:\d+\.?\d*|\.\d+))\s*:\s*([-+]?(?:\d+\.?\d*|\.\d+)(?:[eE][-+]?\d+)?)\s*$")


@dataclass(frozen=True)
class StrengthCurve:
    start: float = 0.0
    end: float = 1.0
    strength_start: float = 1.0
    strength_end: float = 1.0
    shape: str = "constant"
    keyframes: tuple[tuple[float, float], ...] = ()

    def __post_init__(self) -> None:
        for name in ("start", "end"):
            v = getattr(self, name)
            if not isinstance(v, (int, float)) or not math.isfinite(v) or not 0.0 <= v <= 1.0:
                raise ValueError(f"{name}_percent must be in 0..1, got {v!r}")
        if self.end < self.start:
            raise ValueError(f"end_percent {self.end:g} is before start_percent {self.start:g}")
        for name in ("strength_start", "strength_end"):
            if not math.isfinite(getattr(self, name)):
                raise ValueError(f"{name} must be a finite number")
        if self.shape not in SHAPES:
            raise ValueError(f"curve must be one of {', '.join(SHAPES)}, got {self.shape!r}")

    def at(self, percent: float) -> float:
        return strength_at(self, percent)


def parse_keyframes(text: str) -> tuple[tuple[float, float], ...]:
    """`percent:strength` pairs separated by commas, semicolons or new lines, e.g. "0:0, 0.5:1, 1:0.8"; percents
    in 0..1 and strictly increasing. Empty text: no keyframes."""
    pairs: list[tuple[float, float]] = []
    for i, item in enumerate(p for p in re.split(r"[,;\n]", text or "") if p.strip()):
        m = _PAIR.match(item)
        if m is None:
            raise ValueError(f"keyframe {i + 1} '{item.strip()}' is not percent:strength (e.g. 0.5:1.0)")
        pct, s = float(m.group(1)), float(m.group(2))
        if not 0.0 <= pct <= 1.0:
            raise ValueError(f"keyframe {i + 1} '{item.strip()}': percent {pct:g} is outside 0..1")
        if pairs and pct <= pairs[-1][0]:
            raise ValueError(f"keyframe {i + 1} '{item.strip()}': percents must increase (after {pairs[-1][0]:g})")
        pairs.append((pct, s))
    return tuple(pairs)


def _shape(u: float, shape: str) -> float:
    if shape == "constant":
        return 0.0
    if shape == "linear":
        return u
    if shape == "cosine":
        return 0.5 - 0.5 * math.cos(math.pi * u)
    return u * u * (3.0 - 2.0 * u)  # smoothstep


def strength_at(c: StrengthCurve, percent: float) -> float:
    """The curve's strength multiplier at `percent` of the sampling."""
    p = min(max(float(percent), 0.0), 1.0)
    if c.keyframes:
        ks = c.keyframes
        if p <= ks[0][0]:
            return ks[0][1]
        for (p0, s0), (p1, s1) in zip(ks, ks[1:], strict=False):
            if p <= p1:
                return s0 + (s1 - s0) * (p - p0) / (p1 - p0)
        return ks[-1][1]
    if p < c.start or p > c.end:
        return 0.0
    u = 0.0 if c.end == c.start else (p - c.start) / (c.end - c.start)
    return c.strength_start + (c.strength_end - c.strength_start) * _shape(u, c.shape)


_BISECT = 40  # halvings of [0, 1]: far below any sampler's step


class Sampling(Protocol):
    """What the rule uses of a ComfyUI model_sampling object (its values may be floats or 0-d tensors)."""

    sigma_max: Any
    sigma_min: Any

    def percent_to_sigma(self, percent: float) -> Any: ...


def percent_of(sampling: Sampling, sigma: float) -> float:
    """The sampling percent whose sigma is `sigma` (the inverse of the sampling's own `percent_to_sigma`)."""
    lo, hi = 0.0, 1.0
    for _ in range(_BISECT):
        mid = 0.5 * (lo + hi)
        if float(sampling.percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def sigma_ticks(sampling: Sampling, percents: tuple[float, ...] = (0.0, 0.25, 0.5, 0.75, 1.0)
                ) -> list[tuple[float, float]]:
    """(percent, sigma) of a sampling at a few percents, for a sigma axis under a progress axis: the ends are its
    own sigma_max and sigma_min (ComfyUI's percent_to_sigma answers 'past every sigma' there)."""
    out = []
    for p in percents:
        if p <= 0.0:
            s = sampling.sigma_max
        elif p >= 1.0:
            s = sampling.sigma_min
        else:
            s = sampling.percent_to_sigma(p)
        out.append((float(p), float(s)))
    return out


def _f32(x: Any) -> float:
    return float(torch.tensor(float(x), dtype=torch.float32))


class StrengthRule:
    """(sigma, sampling) -> the curve's strength at a model call: zero outside [start, end) in the sampling's sigma
    (as ComfyUI's hook keyframes decide it: a call belongs to the percent whose sigma it has reached; end = 1 keeps
    the last call), interpolated at the call's percent. The sampling is the call's own, so one placed after the
    LoRA (a shift, a v-prediction switch) is the one followed; its boundary sigmas are kept per sampling object,
    held weakly (a freed object's id can never hand its sigmas to a new one)."""

    def __init__(self, curve: StrengthCurve):
        self.curve = curve
        self._bounds: weakref.WeakKeyDictionary[Any, tuple[float, float]] = weakref.WeakKeyDictionary()

    def bounds(self, sampling: Sampling) -> tuple[float, float]:
        """(start, end) sigma on `sampling`, in float32 as the sampler's sigmas are (a call at exactly a boundary's
        sigma has reached it); end is -1 for end_percent 1."""
        hit = self._bounds.get(sampling)
        if hit is None:
            c = self.curve
            hit = (_f32(sampling.percent_to_sigma(c.start)),
                   _f32(sampling.percent_to_sigma(c.end)) if c.end < 1.0 else -1.0)
            self._bounds[sampling] = hit
        return hit

    def __call__(self, sigma: float, sampling: Sampling) -> float:
        c = self.curve
        if c.keyframes:
            return strength_at(c, percent_of(sampling, sigma))
        start, end = self.bounds(sampling)
        if sigma > start or sigma <= end:
            return 0.0
        return strength_at(c, min(max(percent_of(sampling, sigma), c.start), c.end))
