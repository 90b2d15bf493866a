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

import comfy.model_sampling
import comfy.patcher_extension
import comfy.utils
import torch
import torch.nn.functional as F

from tlora_core import schedule
from tlora_core.adapter import ModuleAdapter

log = logging.getLogger("tlora.patcher")

WRAPPER_PREFIX = "tlora"
TRACE_ENV = "TLORA_TRACE"  # path of a JSON-lines file: one line per model call (diagnostics, tests)
_trace_lock = threading.Lock()


def is_flow_model(model_sampling) -> bool:
    """Rectified-flow models (SD3, Flux, Flux 2, Wan, ...) predict a constant velocity."""
    return isinstance(model_sampling, (comfy.model_sampling.CONST, comfy.model_sampling.ModelSamplingDiscreteFlow,
                                       comfy.model_sampling.ModelSamplingFlux))


def resolve_mode(mode: str, model_sampling) -> str:
    if mode == "auto":
        return schedule.FLOW if is_flow_model(model_sampling) else schedule.DISCRETE
    if mode not in schedule.TIMESTEP_MODES:
        raise ValueError(f"timestep_mode must be auto, discrete or flow, got {mode!r}")
    return mode


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
        self._memo: dict[tuple[float, ...], tuple[list[int], list[int]]] = {}
        self.trace_path = os.environ.get(TRACE_ENV) or None

    def timesteps(self, sigma: torch.Tensor, model_sampling) -> list[float]:
        mode = resolve_mode(self.mode, model_sampling)
        sig = sigma.detach().float().reshape(-1)
        if mode == schedule.DISCRETE:
            disc = model_sampling.timestep(sigma.detach()).float().reshape(-1).tolist()
            return [schedule.timestep_from_sigma(s, mode, d) for s, d in zip(sig.tolist(), disc, strict=False)]
        return [schedule.timestep_from_sigma(s, mode, integer=self.integer_t) for s in sig.tolist()]

    def ranks_for(self, sigma: torch.Tensor, model_sampling) -> tuple[list[float], list[int]]:
        key = tuple(sigma.detach().float().reshape(-1).tolist())
        hit = self._memo.get(key)
        if hit is None:
            ts = self.timesteps(sigma, model_sampling)
            hit = ts, [schedule.active_rank(t, self.max_rank, self.min_rank, self.alpha) for t in ts]
            if len(self._memo) > 4096:
                self._memo.clear()
            self._memo[key] = hit
        return hit

    def write_trace(self, sigma: torch.Tensor, ts: list[int], ranks: list[int]) -> None:
        line = json.dumps({"lora": self.name, "sigma": sigma.detach().float().reshape(-1).tolist(),
                           "t": ts, "rank": ranks, "max_rank": self.max_rank, "min_rank": self.min_rank,
                           "alpha": self.alpha})
        with _trace_lock, open(self.trace_path, "a", encoding="utf-8") as f:
            f.write(line + "\n")


class LayerSlot:
    """Adds the active ranks of one adapter to one layer's output (optionally a slice of it)."""

    def __init__(self, adapter: ModuleAdapter, state: RankState, strength: float,
                 out_slice: tuple[int, int] | None, conv: dict | None):
        self.adapter, self.state, self.strength = adapter, state, strength
        self.out_slice = out_slice  # (start, size) in the output features of a fused layer
        self.conv = conv  # stride/padding/dilation of a 1x1 conv layer, None for linear
        self.rank = adapter.rank
        self._factors: dict = {}

    def factors(self, dtype, device):
        key = (dtype, device)
        f = self._factors.get(key)
        if f is None:
            f = self._factors[key] = self.adapter.prefix_factors(dtype, device, self.strength)
        return f

    def release(self) -> None:
        self._factors.clear()

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        st = self.state
        r = self.rank if st.rank is None else min(st.rank, self.rank)
        if r <= 0:
            return y
        down, up_t, k = self.factors(x.dtype, x.device)
        n = k * r
        if self.conv is None:
            h = F.linear(x, down[:n])
            if st.sample_ranks is not None:
                h = h * self._sample_mask(h, n, k, -1)
            out = y.shape[-1]
            if not y.is_contiguous() or y.dtype != h.dtype:
                d = (h @ up_t[:n]).to(y.dtype)
                if self.out_slice is None:
                    return y + d
                y = y.clone()
                y.narrow(-1, *self.out_slice).add_(d)
                return y
            # y is the layer's own fresh output: accumulate into it with one fused GEMM (no temporaries)
            y2 = y.view(-1, out)
            if self.out_slice is not None:
                y2 = y2.narrow(1, *self.out_slice)
            y2.addmm_(h.reshape(-1, n), up_t[:n])
            return y
        h = F.conv2d(x, down[:n, :, None, None], None, **self.conv)
        if st.sample_ranks is not None:
            h = h * self._sample_mask(h, n, k, 1)
        return y + F.conv2d(h, up_t[:n].T[:, :, None, None])

    def _sample_mask(self, h: torch.Tensor, n: int, k: int, dim: int) -> torch.Tensor:
        ranks = self.state.sample_ranks
        b = h.shape[0]
        if b % len(ranks):
            raise RuntimeError(f"T-LoRA: batch of {b} does not divide into {len(ranks)} sigmas")
        per = torch.tensor([min(r, self.rank) for r in ranks], device=h.device).repeat_interleave(b // len(ranks))
        mask = (torch.arange(n, device=h.device)[None, :] < (k * per)[:, None]).to(h.dtype)
        shape = [b] + [1] * (h.ndim - 1)
        shape[dim] = n
        return mask.reshape(shape)


def _dispatch_forward(module: torch.nn.Module):
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
    module._tlora_restore = orig if had_own else None
    module.forward = forward
    return slots


def _undispatch(module: torch.nn.Module) -> None:
    slots = module.__dict__.get("_tlora_slots")
    if slots is None or slots:
        return
    restore = module.__dict__.pop("_tlora_restore", None)
    del module.__dict__["_tlora_slots"]
    if restore is None:
        module.__dict__.pop("forward", None)
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
            slot.release()

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
