"""Build a T-LoRA application for a ModelPatcher: read, map, validate, rebuild the SVD base, attach.

Everything that can fail runs before the model is cloned, so a bad file leaves the model alone.
"""

from __future__ import annotations

import logging
import os
import threading
from collections import OrderedDict

import comfy.model_management
import comfy.utils
import folder_paths
import torch

from tlora_core import TLoRA, TLoRAError, diagnostics, load_tlora, schedule
from tlora_core.svd import SVDCache, base_triplets

from . import keymap
from .patcher import LayerSlot, RankState, TLoRAApplication

log = logging.getLogger("tlora.apply")

CACHE_ENV = "TLORA_CACHE_DIR"
_FILE_CACHE_SIZE = 4
_file_cache: OrderedDict = OrderedDict()
_file_lock = threading.Lock()


def svd_cache() -> SVDCache:
    directory = os.environ.get(CACHE_ENV) or os.path.join(folder_paths.get_user_directory(), "tlora", "svd_cache")
    return SVDCache(directory)


def read_file(path: str, assume_vanilla: bool) -> TLoRA:
    """load_tlora with a small in-memory LRU keyed by the file's identity (path, size, mtime)."""
    st = os.stat(path)
    key = (os.path.realpath(path), st.st_size, st.st_mtime_ns, assume_vanilla)
    with _file_lock:
        hit = _file_cache.get(key)
        if hit is not None:
            _file_cache.move_to_end(key)
            return hit
    tl = load_tlora(path, assume_vanilla=assume_vanilla)
    with _file_lock:
        for k in [k for k in _file_cache if k[0] == key[0]]:
            del _file_cache[k]  # a changed file on disk replaces its stale entry
        _file_cache[key] = tl
        while len(_file_cache) > _FILE_CACHE_SIZE:
            _file_cache.popitem(last=False)
    return tl


def _original_weight(patcher, key: str) -> torch.Tensor:
    """The model's weight without any patches currently applied to it."""
    bk = patcher.backup.get(key)
    if bk is not None:
        return bk.weight
    return comfy.utils.get_attr(patcher.model, key)


def _conv_args(module) -> dict | None:
    if isinstance(module, torch.nn.Conv2d):
        return {"stride": module.stride, "padding": module.padding, "dilation": module.dilation,
                "groups": module.groups}
    return None


def plan(patcher, tl: TLoRA):
    """[(module path, weight key, adapter, out_slice, reorder)], unmatched names, {name: why skipped}.

    `reorder` is the row transform of ComfyUI key-map entries `(key, None, fn)` (e.g. swap_scale_shift,
    diffusers' (scale, shift) vs ComfyUI's (shift, scale)): it maps the model's rows to the file's order.

    Raises when nothing matches or a module's shape says the file is for another architecture."""
    key_map = keymap.model_key_map(patcher.model)
    model_keys = set(patcher.model.state_dict().keys())
    matched, unmatched, skipped = [], [], {}
    for name, adapter in tl.modules.items():
        hit = keymap.resolve(name, tl.naming, key_map)
        if hit is None:
            unmatched.append(name)
            continue
        key, out_slice = (hit, None) if isinstance(hit, str) else (hit[0], hit[1])
        reorder = hit[2] if isinstance(hit, tuple) and len(hit) > 2 else None
        if not key.endswith(".weight") or key not in model_keys:
            unmatched.append(name)
            continue
        weight = _original_weight(patcher, key)
        if out_slice is not None:
            dim, start, size = out_slice
            if dim != 0:
                raise TLoRAError(tl.path, f"module '{name}' maps to a slice along dim {dim} of '{key}', "
                                          "which is not supported")
            weight = weight.narrow(0, start, size)
            out_slice = (start, size)
        shape = tuple(weight.shape)
        if len(shape) > 2 and any(k != 1 for k in shape[2:]):
            skipped[name] = adapter.fit_error(shape)
            continue
        if shape[:2] != (adapter.out_features, adapter.in_features):
            raise TLoRAError(tl.path, f"module '{name}' has shape {adapter.out_features}x{adapter.in_features} but "
                                      f"the model's '{key}' is {'x'.join(map(str, shape))}: this T-LoRA was trained "
                                      "for a different model architecture")
        matched.append((key[: -len(".weight")], key, adapter, out_slice, reorder))
    if not matched:
        family = keymap.guess_family(tl.modules)
        looks = f" Its module names look like {family}." if family else ""
        model_name = type(patcher.model).__name__
        raise TLoRAError(tl.path, f"matched 0 of {len(tl.modules)} modules to this {model_name} model.{looks} "
                                  "Load it on the model family it was trained for.")
    return matched, unmatched, skipped


def apply_tlora(patcher, tl: TLoRA, strength: float, max_rank: int, min_rank: int, alpha: float,
                mode: str = "auto", progress=None):
    """A clone of `patcher` with the T-LoRA attached; the input patcher is never modified."""
    name = os.path.basename(tl.path)
    try:
        schedule.validate(max_rank, min_rank, alpha)
    except ValueError as e:
        raise TLoRAError(tl.path, f"bad schedule: {e}") from None
    if mode not in ("auto", *schedule.TIMESTEP_MODES):
        raise TLoRAError(tl.path, f"timestep_mode must be auto, discrete or flow, got {mode!r}")
    matched, unmatched, skipped = plan(patcher, tl)

    # keyed by module name: several modules may patch slices of one fused weight (Flux qkv, linear1)
    needs = {a.name: a for _, _, a, _, _ in matched if a.needs_svd_base and not a.has_base}
    bases = {}
    if needs:
        device = comfy.model_management.get_torch_device()
        weights = {}
        for _, key, a, out_slice, reorder in matched:
            if a.name in needs:
                w = _original_weight(patcher, key)
                if out_slice is not None:
                    w = w.narrow(0, *out_slice)
                if reorder is not None:
                    w = reorder(w)  # the trainer's SVD saw the weight in its own row order
                weights[a.name] = w.to(device)
        stats: dict = {}
        bases = base_triplets(weights, {n: a.rank for n, a in needs.items()}, svd_cache(), progress, stats)
        aligned = diagnostics.alignment(needs, bases)
        log.info("T-LoRA %s: SVD base for %d layers (%d computed, %d from cache); alignment with the trained "
                 "factors %.3f", name, len(needs), stats.get("computed", 0), stats.get("cached", 0), aligned.figure)
        warning = diagnostics.mismatch_message(name, aligned)
        if warning:
            log.warning(warning)

    state = RankState(name, max_rank, min_rank, alpha, mode, tl.integer_timestep)
    bindings = []
    for path, _key, adapter, out_slice, reorder in matched:
        if adapter.name in bases:
            adapter = adapter.with_svd_base(*(t.cpu() for t in bases[adapter.name]))
        if reorder is not None:
            adapter = adapter.with_rows(reorder)
        module = comfy.utils.get_attr(patcher.model, path)
        bindings.append((path, LayerSlot(adapter, state, strength, out_slice, _conv_args(module))))
    app = TLoRAApplication(state, bindings)
    clone = patcher.clone()
    app.attach(clone)
    log.info("T-LoRA %s: %s; matched %d, unmatched %d, skipped %d; schedule max_rank=%d min_rank=%d alpha=%g, "
             "timestep mode %s", name, tl.format, len(matched), len(unmatched), len(tl.skipped) + len(skipped),
             max_rank, min_rank, alpha, mode)
    if unmatched:
        log.warning("T-LoRA %s: %d modules not found in the model, e.g. %s", name, len(unmatched),
                    ", ".join(unmatched[:3]))
    return clone, app
