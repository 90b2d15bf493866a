"""Build a T-LoRA application for a ModelPatcher: read, map, check, get the SVD base, attach.

Everything that can fail runs before the model is cloned, so a bad file or model leaves the model alone.
The expensive part, the SVD base of a LyCORIS file, is rebuilt one layer at a time (bounded memory), cached on
disk by the content of each weight, and remembered on the loaded model (`bases.prepare`), so a re-execution with
other sliders or strength does no hashing and no SVD. Text-encoder modules take the same storage-aware path and
are applied statically (a text encoder runs once, with no timestep).
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass

import comfy.lora
import comfy.model_management
import comfy.utils
import torch

from ..tlora_core import TLoRA, TLoRAError, recorded, schedule
from ..tlora_core.slot import FactorRef, FactorStore, LayerSlot
from . import bases, keymaps, timesteps
from .conv import conv_args
from .files import file_key, svd_cache
from .patcher import RankState, TLoRAApplication, require_api
from .plan import map_modules, plan

log = logging.getLogger("tlora.apply")


def compute_dtype(patcher) -> torch.dtype:
    """The dtype the model's layers compute in (its manual-cast dtype for fp8 / quantized storage)."""
    model = patcher.model
    dtype = getattr(model, "manual_cast_dtype", None) or model.get_dtype()
    return dtype if dtype in (torch.float32, torch.float16, torch.bfloat16, torch.float64) else torch.float32


@dataclass(frozen=True)
class Settings:
    strength: float
    max_rank: int
    min_rank: int
    alpha: float
    mode: str = timesteps.AUTO


def _check_settings(patcher, tl: TLoRA, s: Settings) -> str:
    """Validate the schedule and the timestep mode on this model before any work; returns the mode's description."""
    try:
        schedule.validate(s.max_rank, s.min_rank, s.alpha)
    except ValueError as e:
        raise TLoRAError(tl.path, f"bad schedule: {e}") from None
    try:
        require_api(patcher)
        if s.min_rank == s.max_rank:  # every rank at every step: no timestep rule is needed
            return "every rank at every step"
        return timesteps.resolve(s.mode, patcher.get_model_object("model_sampling"), patcher.model)[1]
    except (ValueError, RuntimeError) as e:
        raise TLoRAError(tl.path, str(e)) from None


def apply_tlora(patcher, tl: TLoRA, settings: Settings, progress=None, strength_rule=None):
    """A clone of `patcher` with the T-LoRA attached, and the application; the input patcher is never modified.
    `strength_rule` (sigma -> multiplier): a scheduled LoRA's strength at each call (engine.scheduled)."""
    name = os.path.basename(tl.path)
    how = _check_settings(patcher, tl, settings)
    p = plan(patcher, tl)
    device = comfy.model_management.get_torch_device()
    # one file read two ways (vanilla or not, ranks or pairs, by Load T-LoRA or the scheduled LoRA) is two sets of
    # adapters: the memo key carries the reading and the node
    reader = "tlora" if strength_rule is None else "scheduled"
    prepared = bases.prepare(patcher, tl, p.targets, (*file_key(tl.path, *tl.reading), reader), svd_cache(), device,
                             progress)
    state = RankState(name, settings.max_rank, settings.min_rank, settings.alpha, settings.mode, tl.integer_timestep,
                      tl.curve, strength_rule)
    state.width = max(settings.max_rank, tl.rank)
    # this application's own factors, in the model's compute dtype, on the offload device until ComfyUI loads them
    # with the model (they are counted by its memory planner as an additional model of the clone)
    store = FactorStore(prepared.adapters, compute_dtype(patcher), comfy.model_management.unet_offload_device())
    bindings = []
    for t in p.targets:
        module = comfy.utils.get_attr(patcher.model, t.path)
        ref = FactorRef(store, prepared.adapters[t.adapter.name])
        slot = LayerSlot(ref, state.active, settings.strength, t.out_slice, conv_args(module, t.adapter.kernel))
        bindings.append((t.path, slot))
    app = TLoRAApplication(state, bindings, store)
    clone = patcher.clone()
    app.attach(clone)
    log.info("T-LoRA %s: %s written by %s; matched %d, unmatched %d, skipped %d; schedule max_rank=%d min_rank=%d "
             "alpha=%g curve=%s; timesteps: %s", name, tl.format, tl.writer.title, len(p.targets), len(p.unmatched),
             len(tl.skipped) + len(p.skipped), settings.max_rank, settings.min_rank, settings.alpha, tl.curve, how)
    if p.unmatched:
        log.warning("T-LoRA %s: %d modules not found in the model, e.g. %s", name, len(p.unmatched),
                    ", ".join(p.unmatched[:3]))
    return clone, app


def apply_text_encoder(clip, tl: TLoRA, strength: float, progress=None):
    """A clone of `clip` with the file's text-encoder modules applied statically at full rank (as trained: a text
    encoder has no timestep). Their base weights are read like the diffusion model's (through the layer: stock
    LoRA patches undone, fp8 / scaled fp8 / QuantizedTensor / GGUF dequantized), the SVD base is cached the same
    way, and everything that can fail runs before the clone."""
    if clip is None or not tl.text_encoder_modules or strength == 0:
        return clip
    patcher = clip.patcher
    model = clip.cond_stage_model
    p = map_modules(tl, tl.text_encoder_modules, comfy.lora.model_lora_keys_clip(model, {}), model)
    if not p.targets:
        family = keymaps.guess_family(tl.text_encoder_modules)
        raise TLoRAError(tl.path, f"matched 0 of {len(tl.text_encoder_modules)} text-encoder modules to this text "
                                  f"encoder ({type(model).__name__}){f'; they look like {family}' if family else ''}")
    prepared = bases.prepare(patcher, tl, p.targets, (*file_key(tl.path, *tl.reading), "text_encoder"), svd_cache(),
                             comfy.model_management.text_encoder_offload_device(), progress)
    patches = {}
    for t in p.targets:
        delta = prepared.adapters[t.adapter.name].delta_weight(t.adapter.rank)
        if t.out_slice is not None:  # a row slice of a fused weight: a full-size diff, zero elsewhere
            full = torch.zeros(comfy.utils.get_attr(model, t.key).shape, dtype=torch.float32)
            full.narrow(0, *t.out_slice).copy_(delta.reshape(t.out_slice[1], *full.shape[1:]))
            delta = full
        patches[t.key] = ("diff", (delta.to(torch.float32),))
    out = clip.clone()
    out.add_patches(patches, strength)
    log.info("T-LoRA %s: %d of %d text-encoder modules applied statically%s", os.path.basename(tl.path),
             len(p.targets), len(tl.text_encoder_modules),
             f"; not found in this text encoder: {', '.join(p.unmatched[:3])}" if p.unmatched else "")
    return out


def resolve_schedule(tl: TLoRA, source: str, max_rank: int, min_rank: int, alpha: float):
    """`tlora_core.recorded.resolve_schedule` for a file, with its errors naming the file."""
    try:
        return recorded.resolve_schedule(tl.schedule_defaults(), source, max_rank, min_rank, alpha)
    except ValueError as e:
        raise TLoRAError(tl.path, str(e)) from None
