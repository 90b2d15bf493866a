"""Per-call T-LoRA on a ComfyUI ModelPatcher clone.

One `PatcherInjection` adds a slot to each target layer's forward (the layer's weights are never
touched), and one APPLY_MODEL wrapper turns each model call's sigma into the trainer's timestep,
the timestep into the active rank, and publishes it to the slots for the duration of the call.
State lives on a `RankState` owned by this application (never a process global), so two models
in one graph, or two T-LoRAs stacked on one model, each follow their own schedule; the rank of the call
in progress is per thread (`tlora_core.slot.ActiveRank`).
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid
import weakref
from collections.abc import Callable
from typing import Any

import comfy.patcher_extension
import comfy.utils
import torch

from ..tlora_core import schedule
from ..tlora_core.slot import ActiveRank, LayerSlot, rank_mask
from . import timesteps

log = logging.getLogger("tlora.patcher")

WRAPPER_PREFIX = "tlora"
TRACE_ENV = "TLORA_TRACE"  # path of a JSON-lines file: one line per model call (diagnostics, tests)
_trace_lock = threading.Lock()


def require_api(patcher) -> None:
    """The ComfyUI APIs this pack relies on (present in 0.3.75 and current releases)."""
    missing = [name for name, ok in (
        ("ModelPatcher.set_injections", hasattr(patcher, "set_injections")),
        ("ModelPatcher.add_wrapper_with_key", hasattr(patcher, "add_wrapper_with_key")),
        ("ModelPatcher.set_additional_models", hasattr(patcher, "set_additional_models")),
        ("patcher_extension.PatcherInjection", hasattr(comfy.patcher_extension, "PatcherInjection")),
        ("WrappersMP.APPLY_MODEL", hasattr(getattr(comfy.patcher_extension, "WrappersMP", None), "APPLY_MODEL")),
    ) if not ok]
    if missing:
        raise RuntimeError(f"T-LoRA needs ComfyUI 0.3.75 or newer (missing: {', '.join(missing)}): update ComfyUI")


class _Rule:
    """A timestep rule for one sampling object, with its memo of sigma tuples -> (timesteps, ranks)."""

    def __init__(self, fn: timesteps.Rule):
        self.fn = fn
        self.memo: dict[tuple[float, ...], tuple[list[float], list[int]]] = {}


class RankState:
    """The schedule of one T-LoRA application, and the rank of the model call in progress on each thread."""

    def __init__(self, name: str, max_rank: int, min_rank: int, alpha: float, mode: str, integer_t: bool = True,
                 curve: str = schedule.POWER, strength_rule: Callable[[float, Any], float] | None = None):
        schedule.validate(max_rank, min_rank, alpha)
        if curve not in schedule.CURVES:
            raise ValueError(f"curve must be one of {', '.join(schedule.CURVES)}, got {curve!r}")
        self.name, self.max_rank, self.min_rank, self.alpha, self.mode = name, max_rank, min_rank, alpha, mode
        self.integer_t, self.curve = integer_t, curve
        # (sigma, model_sampling) -> strength multiplier (a scheduled LoRA), None = 1
        self.strength_rule = strength_rule
        self.width = max_rank  # ranks the call's mask spans: the largest adapter rank (may exceed a max_rank override)
        self.active = ActiveRank()
        self._masks: dict[tuple, torch.Tensor] = {}
        # per sampling object (held weakly: a freed object's id can never hand its rule to a new one)
        self._rules: weakref.WeakKeyDictionary[Any, _Rule] = weakref.WeakKeyDictionary()
        self._scales: weakref.WeakKeyDictionary[Any, dict[tuple[float, ...], list[float]]] = \
            weakref.WeakKeyDictionary()
        self._lock = threading.Lock()
        self.trace_path = os.environ.get(TRACE_ENV) or None

    def _rule(self, model_sampling) -> _Rule:
        rule = self._rules.get(model_sampling)
        if rule is None:
            with self._lock:
                rule = self._rules.get(model_sampling)
                if rule is None:
                    rule = self._rules[model_sampling] = _Rule(timesteps.rule(self.mode, model_sampling,
                                                                             self.integer_t))
        return rule

    def ranks_for(self, sigma: torch.Tensor, model_sampling) -> tuple[list[float], list[int]]:
        if self.min_rank >= self.max_rank:  # every rank at every step: no timestep needed (t reported as -1)
            n = sigma.reshape(-1).shape[0]
            return [-1.0] * n, [self.max_rank] * n
        rule = self._rule(model_sampling)
        key = tuple(sigma.detach().float().reshape(-1).tolist())
        hit = rule.memo.get(key)
        if hit is None:
            ts = rule.fn(sigma)
            hit = ts, [schedule.active_rank(t, self.max_rank, self.min_rank, self.alpha, curve=self.curve)
                       for t in ts]
            if len(rule.memo) > 4096:
                rule.memo.clear()
            rule.memo[key] = hit
        return hit

    def scales_for(self, sigma: torch.Tensor, model_sampling) -> list[float] | None:
        """Each item's strength multiplier (a scheduled LoRA) on the call's sampling, memoised per sampling object
        and sigmas; None without a strength rule."""
        if self.strength_rule is None:
            return None
        memo = self._scales.get(model_sampling)
        if memo is None:
            with self._lock:
                memo = self._scales.setdefault(model_sampling, {})
        key = tuple(sigma.detach().float().reshape(-1).tolist())
        hit = memo.get(key)
        if hit is None:
            if len(memo) > 4096:
                memo.clear()
            hit = memo[key] = [self.strength_rule(s, model_sampling) for s in key]
        return hit

    def mask(self, ranks: list[int], device: torch.device, scales: list[float] | None = None) -> torch.Tensor:
        """The call's rank mask (times its strengths) for compiled models, made once per (ranks, strengths, device):
        no copy to the device per call."""
        key = (tuple(ranks), None if scales is None else tuple(scales), device)
        hit = self._masks.get(key)
        if hit is None:
            if len(self._masks) > 256:
                self._masks.clear()
            hit = self._masks[key] = rank_mask(ranks, self.width, device, scales)
        return hit

    def write_trace(self, sigma: torch.Tensor, ts: list[float], ranks: list[int],
                    scales: list[float] | None = None) -> None:
        line = json.dumps({"lora": self.name, "sigma": sigma.detach().float().reshape(-1).tolist(),
                           "t": ts, "rank": ranks, "max_rank": self.max_rank, "min_rank": self.min_rank,
                           "alpha": self.alpha, "curve": self.curve, "strength": scales})
        assert self.trace_path is not None
        with _trace_lock, open(self.trace_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


def _dispatch_forward(module: torch.nn.Module) -> dict[str, LayerSlot]:
    """Replace module.forward once with one that runs the original and then every slot."""
    slots = module.__dict__.get("_tlora_slots")
    if slots is not None:
        return slots
    slots = {}
    had_own = "forward" in module.__dict__
    orig = module.forward

    def forward(*args, **kwargs):
        y = orig(*args, **kwargs)
        x = args[0] if args else kwargs["input"]
        for slot in slots.values():  # slots change only at inject/eject, never during a forward
            y = slot(x, y)
        return y

    module._tlora_slots = slots
    module._tlora_forward = forward
    module._tlora_restore = orig if had_own else None
    module.forward = forward
    return slots


def _undispatch(module: torch.nn.Module) -> None:
    """Put the layer's forward back once it has no slots, unless another pack has wrapped it since: then our
    (empty) dispatcher stays in its chain as a pass-through rather than dropping the other pack's wrapper."""
    d = module.__dict__
    if d.get("_tlora_slots") is None or d["_tlora_slots"] or d.get("forward") is not d.get("_tlora_forward"):
        return
    restore = d.pop("_tlora_restore", None)
    del d["_tlora_slots"], d["_tlora_forward"]
    if restore is None:
        d.pop("forward", None)
    else:
        module.forward = restore


def store_patcher(store: torch.nn.Module):
    """A ModelPatcher for a factor store: ComfyUI's own patcher class (Dynamic VRAM where it is on), so the store
    is loaded, offloaded and counted like any model."""
    import comfy.model_management as mm
    import comfy.model_patcher

    cls = getattr(comfy.model_patcher, "CoreModelPatcher", comfy.model_patcher.ModelPatcher)
    return cls(store, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


class TLoRAApplication:
    """Everything one Load T-LoRA node adds to a model clone: slots in the target layers, the factors they use (a
    store, registered as an additional model of the clone so ComfyUI's memory planner counts it and loads it with
    the model) and the APPLY_MODEL wrapper that sets each call's rank."""

    def __init__(self, state: RankState, bindings: list[tuple[str, LayerSlot]], store: torch.nn.Module):
        self.state = state
        self.bindings = bindings  # (module path in BaseModel, slot)
        self.store = store
        self.key = f"{WRAPPER_PREFIX}:{state.name}:{uuid.uuid4().hex[:8]}"

    def inject(self, patcher) -> None:
        # one slot key per binding: a fused layer (Flux qkv) carries several slices of one T-LoRA
        for i, (path, slot) in enumerate(self.bindings):
            module = comfy.utils.get_attr(patcher.model, path)
            _dispatch_forward(module)[f"{self.key}#{i}"] = slot

    def eject(self, patcher) -> None:
        for i, (path, _) in enumerate(self.bindings):
            module = comfy.utils.get_attr(patcher.model, path)
            slots = module.__dict__.get("_tlora_slots")
            if slots is not None:
                slots.pop(f"{self.key}#{i}", None)
                _undispatch(module)

    def apply_model_wrapper(self, executor, x, t, *args, **kwargs):
        st = self.state
        ms = executor.class_obj.model_sampling  # the sampling of this call: object patches applied
        ts, ranks = st.ranks_for(t, ms)
        scales = st.scales_for(t, ms)
        if st.trace_path:  # before the rank is set: a trace that cannot be written leaves nothing set
            st.write_trace(t, ts, ranks, scales)
        prev = st.active.set(ranks, st.mask(ranks, x.device, scales), scales)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            st.active.restore(prev)

    def attach(self, patcher) -> None:
        """Register on a (cloned) ModelPatcher."""
        require_api(patcher)
        patcher.set_injections(self.key, [comfy.patcher_extension.PatcherInjection(self.inject, self.eject)])
        patcher.set_additional_models(self.key, [store_patcher(self.store)])
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, self.key,
                                     self.apply_model_wrapper)
