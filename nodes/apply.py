"""Build a T-LoRA application for a ModelPatcher: read, map, check, get the SVD base, attach.

Everything that can fail runs before the model is cloned, so a bad file or model leaves the model alone.
The expensive part, the SVD base of a LyCORIS file, is rebuilt one layer at a time (bounded memory), cached on
disk by the content of each weight, and kept in process for the same file on the same loaded weights, so a
re-execution with other sliders or strength does no hashing and no SVD.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict
from dataclasses import dataclass

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from ..tlora_core import TLoRA, TLoRAError, load_tlora, schedule
from ..tlora_core.recorded import sidecars
from ..tlora_core.svd import SVDCache
from . import bases, timesteps
from .patcher import LayerSlot, RankState, TLoRAApplication, require_api
from .plan import plan

log = logging.getLogger("tlora.apply")

CACHE_ENV = "TLORA_CACHE_DIR"
_FILE_CACHE_SIZE = 4
_file_cache: OrderedDict[tuple, TLoRA] = OrderedDict()
_file_lock = threading.Lock()


def svd_cache() -> SVDCache:
    directory = os.environ.get(CACHE_ENV) or os.path.join(folder_paths.get_user_directory(), "tlora", "svd_cache")
    return SVDCache(directory)


def file_key(path: str, assume_vanilla: bool = False) -> tuple:
    """Identity of a T-LoRA file and of the sidecars that can change what it records (path, size, mtime)."""
    parts = []
    for p in (path, *sidecars(path)):
        st = os.stat(p)
        parts.append((os.path.realpath(p), st.st_size, st.st_mtime_ns))
    return (*parts, assume_vanilla)


def read_file(path: str, assume_vanilla: bool) -> TLoRA:
    """load_tlora with a small in-memory LRU keyed by `file_key` (a changed file or sidecar is read again)."""
    key = file_key(path, assume_vanilla)
    with _file_lock:
        hit = _file_cache.get(key)
        if hit is not None:
            _file_cache.move_to_end(key)
            return hit
    tl = load_tlora(path, assume_vanilla=assume_vanilla)
    with _file_lock:
        for k in [k for k in _file_cache if k[0][0] == key[0][0]]:
            del _file_cache[k]  # a changed file on disk replaces its stale entry
        _file_cache[key] = tl
        while len(_file_cache) > _FILE_CACHE_SIZE:
            _file_cache.popitem(last=False)
    return tl


def _conv_args(module) -> dict | None:
    if isinstance(module, torch.nn.Conv2d):
        return {"stride": module.stride, "padding": module.padding, "dilation": module.dilation,
                "groups": module.groups}
    return None


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
        return timesteps.resolve(s.mode, patcher.get_model_object("model_sampling"))[1]
    except (ValueError, RuntimeError) as e:
        raise TLoRAError(tl.path, str(e)) from None


def apply_tlora(patcher, tl: TLoRA, settings: Settings, progress=None):
    """A clone of `patcher` with the T-LoRA attached, and the application; the input patcher is never modified."""
    name = os.path.basename(tl.path)
    how = _check_settings(patcher, tl, settings)
    p = plan(patcher, tl)
    device = comfy.model_management.get_torch_device()
    prepared = bases.prepare(patcher, tl, p.targets, file_key(tl.path), svd_cache(), device, progress)
    state = RankState(name, settings.max_rank, settings.min_rank, settings.alpha, settings.mode, tl.integer_timestep)
    bindings = []
    for t in p.targets:
        module = comfy.utils.get_attr(patcher.model, t.path)
        slot = LayerSlot(prepared.factors[t.adapter.name], state, settings.strength, t.out_slice, _conv_args(module))
        bindings.append((t.path, slot))
    app = TLoRAApplication(state, bindings)
    clone = patcher.clone()
    app.attach(clone)
    log.info("T-LoRA %s: %s; matched %d, unmatched %d, skipped %d; schedule max_rank=%d min_rank=%d alpha=%g; "
             "timesteps: %s", name, tl.format, len(p.targets), len(p.unmatched), len(tl.skipped) + len(p.skipped),
             settings.max_rank, settings.min_rank, settings.alpha, how)
    if p.unmatched:
        log.warning("T-LoRA %s: %d modules not found in the model, e.g. %s", name, len(p.unmatched),
                    ", ".join(p.unmatched[:3]))
    return clone, app
