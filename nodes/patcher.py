"""Per-call T-LoRA on a ComfyUI ModelPatcher clone.

One `PatcherInjection` adds a slot to each target layer's forward (the layer's weights are never
touched), and one APPLY_MODEL wrapper turns each model call's sigma into the trainer's timestep,
the timestep into the active rank, and publishes it to the slots for the duration of the call.
State lives on a `RankState` owned by this application (never a process global), so two models
in one graph, or two T-LoRAs stacked on one model, each follow their own schedule.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import uuid

import comfy.patcher_extension
import comfy.utils
import torch
import torch.nn.functional as F

from ..tlora_core import schedule
from ..tlora_core.adapter import Factors, ModuleAdapter
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
        ("patcher_extension.PatcherInjection", hasattr(comfy.patcher_extension, "PatcherInjection")),
        ("WrappersMP.APPLY_MODEL", hasattr(getattr(comfy.patcher_extension, "WrappersMP", None), "APPLY_MODEL")),
    ) if not ok]
    if missing:
        raise RuntimeError(f"T-LoRA needs ComfyUI 0.3.75 or newer (missing: {', '.join(missing)}): update ComfyUI")


class RankState:
    """The schedule of one T-LoRA application and the rank of the model call in progress."""

    def __init__(self, name: str, max_rank: int, min_rank: int, alpha: float, mode: str, integer_t: bool = True):
        schedule.validate(max_rank, min_rank, alpha)
        self.name, self.max_rank, self.min_rank, self.alpha, self.mode = name, max_rank, min_rank, alpha, mode
        self.integer_t = integer_t
        self.rank: int | None = None  # None outside a model call: all ranks (what LyCORIS does unmasked)
        self.sample_ranks: list[int] | None = None  # per batch item when sigmas differ within a call
        self._rules: dict[int, timesteps.Rule] = {}
        self._memo: dict[tuple[float, ...], tuple[list[float], list[int]]] = {}
        self.trace_path = os.environ.get(TRACE_ENV) or None

    def timesteps(self, sigma: torch.Tensor, model_sampling) -> list[float]:
        rule = self._rules.get(id(model_sampling))
        if rule is None:
            rule = self._rules[id(model_sampling)] = timesteps.rule(self.mode, model_sampling, self.integer_t)
        return rule(sigma)

    def ranks_for(self, sigma: torch.Tensor, model_sampling) -> tuple[list[float], list[int]]:
        key = (id(model_sampling), *sigma.detach().float().reshape(-1).tolist())
        hit = self._memo.get(key)
        if hit is None:
            ts = self.timesteps(sigma, model_sampling)
            hit = ts, [schedule.active_rank(t, self.max_rank, self.min_rank, self.alpha) for t in ts]
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def write_trace(self, sigma: torch.Tensor, ts: list[float], ranks: list[int]) -> None:
        line = json.dumps({"lora": self.name, "sigma": sigma.detach().float().reshape(-1).tolist(),
                           "t": ts, "rank": ranks, "max_rank": self.max_rank, "min_rank": self.min_rank,
                           "alpha": self.alpha})
        assert self.trace_path is not None
        with _trace_lock, open(self.trace_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class FactorCache:
    """An adapter's prefix factors per (dtype, device), built on first use, shared by every slot that runs it."""

    def __init__(self, adapter: ModuleAdapter):
        self.adapter = adapter
        self._by: dict[tuple[torch.dtype, torch.device], Factors] = {}

    def get(self, dtype: torch.dtype, device: torch.device) -> Factors:
        f = self._by.get((dtype, device))
        if f is None:
            f = self._by[(dtype, device)] = self.adapter.prefix_factors(dtype, device)
        return f

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for down, up_t, _ in self._by.values() for t in (down, up_t))

    def release(self) -> None:
        self._by.clear()


class LayerSlot:
    """Adds the active ranks of one adapter, times `strength`, to one layer's output (optionally a slice of it)."""

    def __init__(self, factors: FactorCache, state: RankState, strength: float,
                 out_slice: tuple[int, int] | None, conv: dict | None):
        self.factors, self.state, self.strength = factors, state, strength
        self.out_slice = out_slice  # (start, size) in the output features of a fused layer
        self.conv = conv  # stride/padding/dilation of a 1x1 conv layer, None for linear
        self.rank = factors.adapter.rank

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        st = self.state
        r = self.rank if st.rank is None else min(st.rank, self.rank)
        if r <= 0 or self.strength == 0:
            return y
        down, up_t, k = self.factors.get(x.dtype, x.device)
        n = k * r
        if self.conv is not None:
            h = F.conv2d(x, down[:n, :, None, None], None, **self.conv)
            if st.sample_ranks is not None:
                h = h * self._sample_mask(h, n, k, 1)
            return y + self.strength * F.conv2d(h, up_t[:n].T[:, :, None, None])
        h = F.linear(x, down[:n])
        if st.sample_ranks is not None:
            h = h * self._sample_mask(h, n, k, -1)
        if not y.is_contiguous() or y.dtype != h.dtype:
            d = ((h @ up_t[:n]) * self.strength).to(y.dtype)
            if self.out_slice is None:
                return y + d
            y = y.clone()
            y.narrow(-1, *self.out_slice).add_(d)
            return y
        # y is the layer's own fresh output: accumulate into it with one fused GEMM (no temporaries)
        y2 = y.view(-1, y.shape[-1])
        if self.out_slice is not None:
            y2 = y2.narrow(1, *self.out_slice)
        y2.addmm_(h.reshape(-1, n), up_t[:n], alpha=self.strength)
        return y

    def _sample_mask(self, h: torch.Tensor, n: int, k: int, dim: int) -> torch.Tensor:
        ranks = self.state.sample_ranks
        assert ranks is not None
        b = h.shape[0]
        if b % len(ranks):
            raise RuntimeError(f"T-LoRA: batch of {b} does not divide into {len(ranks)} sigmas")
        per = torch.tensor([min(r, self.rank) for r in ranks], device=h.device).repeat_interleave(b // len(ranks))
        mask = (torch.arange(n, device=h.device)[None, :] < (k * per)[:, None]).to(h.dtype)
        shape = [b] + [1] * (h.ndim - 1)
        shape[dim] = n
        return mask.reshape(shape)


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


class TLoRAApplication:
    """Everything one Load T-LoRA node adds to a model clone."""

    def __init__(self, state: RankState, bindings: list[tuple[str, LayerSlot]]):
        self.state = state
        self.bindings = bindings  # (module path in BaseModel, slot)
        self.key = f"{WRAPPER_PREFIX}:{state.name}:{uuid.uuid4().hex[:8]}"

    def inject(self, patcher) -> None:
        # one slot key per binding: a fused layer (Flux qkv) carries several slices of one T-LoRA
        for i, (path, slot) in enumerate(self.bindings):
            module = comfy.utils.get_attr(patcher.model, path)
            _dispatch_forward(module)[f"{self.key}#{i}"] = slot

    def eject(self, patcher) -> None:
        for i, (path, slot) in enumerate(self.bindings):
            module = comfy.utils.get_attr(patcher.model, path)
            slots = module.__dict__.get("_tlora_slots")
            if slots is not None:
                slots.pop(f"{self.key}#{i}", None)
                _undispatch(module)
            slot.factors.release()

    def apply_model_wrapper(self, executor, x, t, *args, **kwargs):
        st = self.state
        ts, ranks = st.ranks_for(t, executor.class_obj.model_sampling)
        prev = st.rank, st.sample_ranks
        st.rank = max(ranks)
        st.sample_ranks = None if len(set(ranks)) == 1 else ranks
        if st.trace_path:
            st.write_trace(t, ts, ranks)
        try:
            return executor(x, t, *args, **kwargs)
        finally:
            st.rank, st.sample_ranks = prev

    def attach(self, patcher) -> None:
        """Register on a (cloned) ModelPatcher."""
        require_api(patcher)
        patcher.set_injections(self.key, [comfy.patcher_extension.PatcherInjection(self.inject, self.eject)])
        patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, self.key,
                                     self.apply_model_wrapper)
