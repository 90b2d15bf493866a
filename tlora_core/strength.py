"""A LoRA's strength over the sampling: the curve of Load LoRA (timestep schedule), as a function of progress.

Progress is ComfyUI's percent of the sampling (0 = first step, pure noise; 1 = the end), the scale its hook
keyframes and `start_percent` inputs use. The curve is zero outside [start, end]; inside it goes from
`strength_start` to `strength_end` with the chosen shape. Keyframes (`percent:strength` pairs) replace it with a
piecewise-linear curve through them, held flat before the first and after the last.
js/tlora_strength.js ports `strength_at` and `parse_keyframes`; the frontend tier runs both on one table.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

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
