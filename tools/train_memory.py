"""Autograd's memory in one Train T-LoRA step on a ComfyUI model: the bytes of the tensors autograd saves for the
backward pass (unique storages; the model's weights and the trainable factors left out, they are held anyway), held
at the end of the forward and at their peak through the backward (checkpoint recomputations included), and which of
the model's layers gradient checkpointing runs again in the backward pass.

Used by `tests/comfy/test_checkpointing.py` and `benchmarks/bench_checkpointing.py`."""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch


class SavedBytes:
    """A `saved_tensors_hooks` pair that counts what autograd keeps: each saved tensor is held by a small object
    whose lifetime is the saved slot's, so `now` follows the bytes alive and `peak` their maximum. With `copies` (the
    training loop's `copy_on_save`) it saves what `saved_copies` keeps for models that update activations in place;
    it refuses, as autograd does, a saved tensor changed in place before the backward pass used it."""

    def __init__(self, exclude: set[int], copies: Callable[[torch.Tensor], torch.Tensor] | None):
        self.exclude, self.copies = exclude, copies
        self.live: dict[int, list[int]] = {}  # storage address -> [saved slots holding it, bytes]
        self.now = self.peak = 0

    def pack(self, t: torch.Tensor) -> Any:
        return _Held(self, t if self.copies is None else self.copies(t))

    @staticmethod
    def unpack(held: Any) -> torch.Tensor:
        # hooks switch off autograd's own check that a saved tensor was not changed since: do it here (copies are
        # only changed where they are the tensor itself: the weights, which nothing updates)
        if held.t._version != held.version:
            raise RuntimeError("a tensor saved for the backward pass was modified by an inplace operation")
        return held.t

    def hooks(self):
        return torch.autograd.graph.saved_tensors_hooks(self.pack, self.unpack)


class _Held:
    def __init__(self, meter: SavedBytes, t: torch.Tensor):
        self.meter, self.t, self.key, self.version = meter, t, None, t._version
        storage = t.untyped_storage()
        key = storage._cdata  # the storage itself (the meta device has no addresses)
        if not storage.nbytes() or key in meter.exclude:
            return
        self.key = key
        slot = meter.live.setdefault(key, [0, storage.nbytes()])
        slot[0] += 1
        if slot[0] == 1:
            meter.now += slot[1]
            meter.peak = max(meter.peak, meter.now)

    def __del__(self):
        if self.key is None:
            return
        slot = self.meter.live[self.key]
        slot[0] -= 1
        if slot[0] == 0:
            self.meter.now -= slot[1]
            del self.meter.live[self.key]


@dataclass
class Step:
    forward_bytes: int  # saved by the forward, held until the backward pass
    peak_bytes: int  # the most held at once, forward and backward (recomputed blocks included)
    layers: int  # leaf modules of the diffusion model the forward ran
    rerun: int  # of those, how many ran again in the backward pass (gradient checkpointing)
    copies: bool  # the model needed saved copies (it updates activations in place)
    seconds: float
    ranks: list[int] = field(default_factory=list)
    grads: dict[str, torch.Tensor] = field(default_factory=dict)


def modules_for(pack, patcher, targets, rank: int, linear_alpha: float, seed: int | None = None) -> dict:
    """Trainable modules from the exact SVD of each target's weight (the trainer's init); with a seed, moved off
    the init by seeded noise so that every factor's gradient is exercised."""
    eng = pack.engine
    out = {}
    for t in targets:
        lt = eng.plan.LayerTarget(t.path, t.key, None, t.out_slice, t.reorder)
        w = eng.bases.with_rows(lt, eng.weights.layer_weight(patcher, t.key).dequantized())
        u, s, v = pack.tlora_core.svd.top_singular(w.reshape(w.shape[0], -1), rank)
        m = pack.tlora_core.training.TrainableTLoRA(t.name, u, s, v, linear_alpha / rank, t.conv)
        if seed is not None:
            g = torch.Generator().manual_seed(seed + sum(map(ord, t.name)))
            with torch.no_grad():
                for p in (m.q, m.p, m.lam):
                    p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
        out[t.name] = m
    return out


def _held_anyway(dm: torch.nn.Module, modules: dict) -> set[int]:
    tensors = [*dm.parameters(), *dm.buffers(), *(p for m in modules.values() for p in m.parameters()),
               *(b for m in modules.values() for b in m.buffers())]
    return {t.untyped_storage()._cdata for t in tensors}


@contextlib.contextmanager
def reruns(diffusion_model: torch.nn.Module) -> Iterator[dict[str, list[int]]]:
    """{leaf module path: [runs in the forward, runs in the backward pass]} while in the block. A module runs in the
    backward pass when gradient checkpointing recomputes it (autograd is executing a node then)."""
    counts: dict[str, list[int]] = {}

    def counter(name: str):
        def pre(_module, _args):
            counts.setdefault(name, [0, 0])[torch._C._current_autograd_node() is not None] += 1
        return pre

    handles = [m.register_forward_pre_hook(counter(n)) for n, m in diffusion_model.named_modules()
               if next(m.children(), None) is None]
    try:
        yield counts
    finally:
        for h in handles:
            h.remove()


def one_step(pack, patcher, targets, modules: dict, settings, x: torch.Tensor, sigma: torch.Tensor,
             conds: dict[str, Any], G: torch.Tensor | None = None, options: dict | None = None,
             forward: Callable | None = None) -> Step:
    """One training forward and backward through ComfyUI's `apply_model` with Train T-LoRA's patch (its slots, rank
    rule and, per `settings.gradient_checkpointing`, checkpointing), the loss <G, denoised>; `options`: more
    `transformer_options`; `forward(patch)`: another forward (the meta device's, which has no sigma to read).
    Models that update activations in place are run again with saved copies, as the training loop's probe does."""
    import comfy.patcher_extension

    tr = pack.engine.training
    for copies in (False, True):
        for m in modules.values():
            for p in m.parameters():
                p.grad = None
        patch = tr.TrainingPatch(patcher, targets, modules, settings)
        try:
            with torch.inference_mode(False):
                patch.load()
                dm = patch.clone.model.diffusion_model
                meter = SavedBytes(_held_anyway(dm, modules), tr.checkpointing.copy_on_save if copies else None)
                t0 = time.perf_counter()
                try:
                    with reruns(dm) as counts, torch.enable_grad(), meter.hooks():
                        out = forward(patch) if forward is not None else patch.clone.model.apply_model(
                            x, sigma, transformer_options={**(options or {}), "wrappers":
                                                           comfy.patcher_extension.copy_nested_dicts(
                                                               patch.clone.wrappers)}, **conds)
                        forward_bytes = meter.now
                        if G is None:
                            G = torch.randn(out.shape, generator=torch.Generator().manual_seed(9)).to(out.device)
                        (out.float() * G).sum().backward()
                        del out
                except RuntimeError as e:
                    if copies or tr.checkpointing.INPLACE_ERROR not in str(e):
                        raise
                    continue
                seconds = time.perf_counter() - t0
        finally:
            patch.close()
        grads = {f"{n}.{k}": getattr(m, k).grad.detach().clone() for n, m in modules.items()
                 for k in ("q", "p", "lam") if getattr(m, k).grad is not None}
        return Step(forward_bytes, meter.peak, sum(1 for c in counts.values() if c[0]),
                    sum(1 for c in counts.values() if c[0] and c[1]), copies, seconds,
                    patch.state.calls[-1]["rank"] if patch.state.calls else [], grads)
    raise AssertionError("unreachable")
