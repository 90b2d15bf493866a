"""Any standard LoRA on a timestep schedule: the per-call patcher of a T-LoRA, every rank on, its strength taken at
each model call from that call's sigma (per batch item), through the model's own percent-to-sigma scale.

The LoRA is added in activation space by the same slots (no weight is patched, so fp8, GGUF, QuantizedTensor and
Dynamic VRAM bases take it as they take a T-LoRA); the file is read by the same layouts (kohya, PEFT / diffusers,
LyCORIS LoRA, ComfyUI's `diffusion_model.` names). T-LoRA files are refused with a pointer to Load T-LoRA.
"""

from __future__ import annotations

import logging
import os

import torch

from ..tlora_core import TLoRA, TLoRAError, recorded
from ..tlora_core.strength import StrengthCurve, strength_at
from . import apply as _apply
from .files import read_file
from .patcher import WRAPPER_PREFIX

log = logging.getLogger("tlora.scheduled")

_BISECT = 40  # halvings of [0, 1]: far below any sampler's step


def percent_of(model_sampling, sigma: float) -> float:
    """The sampling percent whose sigma is `sigma` (the inverse of the model's own `percent_to_sigma`)."""
    lo, hi = 0.0, 1.0
    for _ in range(_BISECT):
        mid = 0.5 * (lo + hi)
        if float(model_sampling.percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return 0.5 * (lo + hi)


def _f32(x) -> float:
    return float(torch.tensor(float(x), dtype=torch.float32))


def sigma_ticks(model_sampling, percents=(0.0, 0.25, 0.5, 0.75, 1.0)) -> list[tuple[float, float]]:
    """(percent, sigma) of the model's sampling at a few percents, for a sigma axis under a progress axis: the ends
    are the model's own sigma_max and sigma_min (ComfyUI's percent_to_sigma answers 'past every sigma' there)."""
    out = []
    for p in percents:
        if p <= 0.0:
            s = model_sampling.sigma_max
        elif p >= 1.0:
            s = model_sampling.sigma_min
        else:
            s = model_sampling.percent_to_sigma(p)
        out.append((float(p), float(s)))
    return out


class StrengthRule:
    """sigma -> the curve's strength: inside [start, end) in the model's sigma (as ComfyUI's hook keyframes decide
    it: a call belongs to the percent whose sigma it has reached), interpolated at the call's percent."""

    def __init__(self, curve: StrengthCurve, model_sampling):
        self.curve, self.ms = curve, model_sampling
        # in float32, as the sampler's sigmas are: a call at exactly a boundary's sigma is past it
        self.start_sigma = _f32(model_sampling.percent_to_sigma(curve.start))
        self.end_sigma = _f32(model_sampling.percent_to_sigma(curve.end)) if curve.end < 1.0 else -1.0

    def __call__(self, sigma: float) -> float:
        c = self.curve
        p = percent_of(self.ms, sigma)
        if c.keyframes:
            return strength_at(c, p)
        if sigma > self.start_sigma or sigma <= self.end_sigma:
            return 0.0
        return strength_at(c, min(max(p, c.start), c.end))


def read_lora(path: str) -> TLoRA:
    """A standard LoRA file (refusing T-LoRAs, which have their own node, and tensors it cannot run)."""
    tl = read_file(path, assume_vanilla=True)
    if tl.format not in ("kohya", "peft") or recorded.says_tlora(tl.metadata):
        raise TLoRAError(path, f"is a T-LoRA ({tl.writer.title}): load it with Load T-LoRA, which runs its rank "
                               "schedule; this node schedules the strength of a standard LoRA")
    if tl.ignored:
        raise TLoRAError(path, f"holds tensors this node cannot run ({', '.join(tl.ignored[:3])}; DoRA, LoHa, LoKr "
                               "or Tucker LoRAs): load it with ComfyUI's LoraLoader")
    return tl


def apply_scheduled_lora(patcher, tl: TLoRA, strength: float, curve: StrengthCurve, progress=None):
    """A clone of `patcher` running the LoRA with `strength` times the curve at each call; the input patcher is
    never modified."""
    rank = tl.rank
    rule = StrengthRule(curve, patcher.get_model_object("model_sampling"))
    clone, app = _apply.apply_tlora(patcher, tl, _apply.Settings(strength, rank, rank, 1.0), progress,
                                    strength_rule=rule)
    log.info("scheduled LoRA %s: %d modules, strength %g x %s", os.path.basename(tl.path), len(app.bindings),
             strength, curve)
    return clone, app


def scheduled_loras(patcher) -> list[tuple[str, float, StrengthRule]]:
    """The scheduled LoRAs on a model, in the order they were applied: (file name, strength_model, rule)."""
    import comfy.patcher_extension

    out = []
    for key, fns in patcher.wrappers.get(comfy.patcher_extension.WrappersMP.APPLY_MODEL, {}).items():
        if not key.startswith(f"{WRAPPER_PREFIX}:"):
            continue
        for fn in fns:
            app = getattr(fn, "__self__", None)
            rule = getattr(getattr(app, "state", None), "strength_rule", None)
            if isinstance(rule, StrengthRule) and app.bindings:
                out.append((app.state.name, app.bindings[0][1].strength, rule))
    return out
