"""Any standard LoRA on a timestep schedule: the per-call patcher of a T-LoRA, every rank on, its strength taken at
each model call from that call's sigma (per batch item), through the percent-to-sigma scale of the sampling that
call runs with (a ModelSampling node placed after this one included).

The LoRA is added in activation space by the same slots (no weight is patched, so fp8, GGUF, QuantizedTensor and
Dynamic VRAM bases take it as they take a T-LoRA); the file is read by the same layouts (kohya, PEFT / diffusers,
LyCORIS LoRA, ComfyUI's `diffusion_model.` names). T-LoRA files are refused with a pointer to Load T-LoRA.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable
from typing import Any

import comfy.patcher_extension

from ..tlora_core import TLoRA, TLoRAError, recorded
from ..tlora_core.strength import StrengthCurve, StrengthRule
from . import apply as _apply
from .files import read_file
from .patcher import WRAPPER_PREFIX

log = logging.getLogger("tlora.scheduled")


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


def _announcer(on_sampling: Callable[[Any], None]):
    """An OUTER_SAMPLE wrapper handing `on_sampling` the sampling of each sampling run before it starts.

    Why there: the node runs before whatever comes after it patches the sampling (ModelSamplingSD3, ...), and
    ComfyUI replays a cached node's UI output at every run, so what the node saw is only a first guess. An
    OUTER_SAMPLE wrapper runs once per run of any sampler (every guider samples through it, on 0.3.75 and later),
    with the guider's model patcher, whose model_sampling (object patches included) is the very object every
    APPLY_MODEL call of that run gets."""
    def outer_sample(executor, *args, **kwargs):
        try:
            on_sampling(executor.class_obj.model_patcher.get_model_object("model_sampling"))
        except Exception as e:  # a report for the UI: it never stops a sampling
            log.warning("scheduled LoRA: could not report the sampling's sigmas: %s", e)
        return executor(*args, **kwargs)
    return outer_sample


def apply_scheduled_lora(patcher, tl: TLoRA, strength: float, curve: StrengthCurve, progress=None,
                         on_sampling: Callable[[Any], None] | None = None):
    """A clone of `patcher` running the LoRA with `strength` times the curve at each call, on that call's sampling;
    `on_sampling(model_sampling)` is called at the start of every sampling run with the clone (or a model made
    from it). The input patcher is never modified."""
    rank = tl.rank
    clone, app = _apply.apply_tlora(patcher, tl, _apply.Settings(strength, rank, rank, 1.0), progress,
                                    strength_rule=StrengthRule(curve))
    if on_sampling is not None:
        clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, app.key,
                                   _announcer(on_sampling))
    log.info("scheduled LoRA %s: %d modules, strength %g x %s", os.path.basename(tl.path), len(app.bindings),
             strength, curve)
    return clone, app


def scheduled_loras(patcher) -> list[tuple[str, float, StrengthRule]]:
    """The scheduled LoRAs on a model, in the order they were applied: (file name, strength_model, rule)."""
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
