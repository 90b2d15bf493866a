"""The per-layer runtime of a T-LoRA: prefix factors on the compute device and the slot that adds the active ranks
to a layer's output. Torch only; what the active rank is comes from an `ActiveRank` the caller owns.

The active rank of the model call in progress is per thread (`ActiveRank` is a `threading.local`): one model run
from two threads, or two clones sharing one application, never sees another call's rank.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from .adapter import Factors, ModuleAdapter

Saved = tuple[int | None, list[int] | None, torch.Tensor | None, float, list[float] | None]


class ActiveRank(threading.local):
    """The rank of the model call in progress on this thread: `rank` None = all ranks (outside a call, what LyCORIS
    does unmasked); `sample_ranks` per batch item when the items' sigmas differ; `mask` the same as a (items, R)
    0/1 tensor on the call's device, for compiled models (a tensor input: a new rank never recompiles a graph)."""

    rank: int | None = None
    sample_ranks: list[int] | None = None
    mask: torch.Tensor | None = None
    # a scheduled LoRA's strength multiplier: `scale` for the whole call, `sample_scales` per item when the items'
    # differ; both folded into `mask` for compiled models
    scale: float = 1.0
    sample_scales: list[float] | None = None

    def set(self, ranks: list[int], mask: torch.Tensor, scales: list[float] | None = None) -> Saved:
        """Publish one call's per-item ranks (and the same as a mask, see `rank_mask`) and strength multipliers
        (None: 1); returns what to `restore`. Done once per call, so the layers' slots only read."""
        prev = self.rank, self.sample_ranks, self.mask, self.scale, self.sample_scales
        self.rank = max(ranks)
        self.sample_ranks = None if len(set(ranks)) == 1 else ranks
        self.mask = mask
        uniform = scales is None or len(set(scales)) == 1
        self.scale = 1.0 if scales is None else scales[0] if uniform else 1.0
        self.sample_scales = None if uniform else scales
        return prev

    def restore(self, prev: Saved) -> None:
        self.rank, self.sample_ranks, self.mask, self.scale, self.sample_scales = prev


def rank_mask(ranks: list[int], width: int, device: torch.device | str | None = None,
              scales: list[float] | None = None) -> torch.Tensor:
    """(items, width): the first `ranks[i]` ranks of item i, times its strength multiplier (1 without `scales`)."""
    mask = (torch.arange(width)[None, :] < torch.tensor(ranks)[:, None]).float()
    if scales is not None:
        mask = mask * torch.tensor(scales, dtype=torch.float32)[:, None]
    return mask.to(device)


class FactorStore(torch.nn.Module):
    """The prefix factors of one application's adapters, as frozen parameters of one small module, so that the host
    can count them in its memory planning and move them with the model (load, offload, partial load).

    `get` returns the stored factors where they already sit on the compute device in the compute dtype; otherwise
    (the store left on the offload device by a partial load, or a layer computing in another dtype) a copy for
    that call, cached only when it is a dtype change on the store's own device."""

    def __init__(self, adapters: dict[str, ModuleAdapter], dtype: torch.dtype, device: torch.device | str = "cpu"):
        super().__init__()
        self.index: dict[str, tuple[int, int]] = {}  # adapter name -> (parameter index, k)
        for i, (name, a) in enumerate(adapters.items()):
            down, up_t, k = a.prefix_factors(dtype, device)
            self.register_parameter(f"down_{i}", torch.nn.Parameter(down, requires_grad=False))
            self.register_parameter(f"up_{i}", torch.nn.Parameter(up_t, requires_grad=False))
            self.index[name] = (i, k)
        self._converted: dict[tuple[str, torch.dtype, torch.device], Factors] = {}
        self._lock = threading.Lock()

    def nbytes(self) -> int:
        return sum(p.numel() * p.element_size() for p in self.parameters())

    def get(self, name: str, dtype: torch.dtype, device: torch.device) -> Factors:
        i, k = self.index[name]
        down, up_t = self._parameters[f"down_{i}"], self._parameters[f"up_{i}"]
        assert down is not None and up_t is not None
        if down.dtype == dtype and down.device == device:
            return down, up_t, k
        if down.device != device:  # not resident on the compute device: a transient copy, as a lowvram layer does
            return down.to(device=device, dtype=dtype), up_t.to(device=device, dtype=dtype), k
        key = (name, dtype, device)
        hit = self._converted.get(key)
        if hit is None:
            with self._lock:
                hit = self._converted[key] = (down.to(dtype), up_t.to(dtype), k)
        return hit

    def _apply(self, fn: Callable[[torch.Tensor], torch.Tensor], recurse: bool = True) -> FactorStore:
        self._converted.clear()  # moved by the host: copies in other dtypes are stale
        return super()._apply(fn, recurse)  # type: ignore[no-untyped-call, no-any-return]


class FactorRef:
    """One adapter's factors in a store (what a slot holds)."""

    def __init__(self, store: FactorStore, adapter: ModuleAdapter):
        self.store, self.adapter, self.rank = store, adapter, adapter.rank

    def get(self, dtype: torch.dtype, device: torch.device) -> Factors:
        return self.store.get(self.adapter.name, dtype, device)


class LayerSlot:
    """Adds the active ranks of one adapter, times `strength`, to one layer's output (optionally a slice of it)."""

    def __init__(self, factors: FactorRef, active: ActiveRank, strength: float,
                 out_slice: tuple[int, int] | None, conv: dict[str, Any] | None):
        self.factors, self.active, self.strength = factors, active, strength
        self.out_slice = out_slice  # (start, size) in the output features of a fused layer
        self.conv = conv  # the factors' conv arguments on a conv layer (see engine.apply), None for linear
        self.kernel = factors.adapter.kernel  # a LoCon's k x k down kernel, None for 1x1 factors
        self.rank = factors.rank

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        act = self.active
        if torch.compiler.is_compiling():
            return self._static(x, y, act.mask)
        r = self.rank if act.rank is None else min(act.rank, self.rank)
        strength = self.strength * act.scale
        scales = act.sample_scales
        if r <= 0 or strength == 0:
            return y
        down, up_t, k = self.factors.get(x.dtype, x.device)
        n = k * r
        ranks = act.sample_ranks
        if self.conv is not None:
            h = _fit(F.conv2d(x, self._conv_down(down, n), None, **self.conv), y)
            if ranks is not None:
                h = h * sample_mask(ranks, self.rank, h, n, k, 1)
            if scales is not None:
                h = h * sample_scale(scales, h)
            return y + strength * F.conv2d(h, up_t[:n].T[:, :, None, None])
        h = F.linear(x, down[:n])
        if ranks is not None:
            h = h * sample_mask(ranks, self.rank, h, n, k, -1)
        if scales is not None:
            h = h * sample_scale(scales, h)
        if not y.is_contiguous() or y.dtype != h.dtype:
            d = ((h @ up_t[:n]) * strength).to(y.dtype)
            if self.out_slice is None:
                return y + d
            y = y.clone()
            y.narrow(-1, *self.out_slice).add_(d)
            return y
        # y is the layer's own fresh output: accumulate into it with one fused GEMM (no temporaries)
        y2 = y.view(-1, y.shape[-1])
        if self.out_slice is not None:
            y2 = y2.narrow(1, *self.out_slice)
        y2.addmm_(h.reshape(-1, n), up_t[:n], alpha=strength)
        return y


    def _conv_down(self, down: torch.Tensor, n: int) -> torch.Tensor:
        """The first `n` factor rows as a conv kernel: 1x1, or a LoCon's k x k."""
        if self.kernel is None:
            return down[:n, :, None, None]
        return down[:n].view(n, -1, *self.kernel)

    def _static(self, x: torch.Tensor, y: torch.Tensor, mask: torch.Tensor | None) -> torch.Tensor:
        """Every rank's rows times the call's 0/1 mask: shapes never depend on the rank, so a compiled graph serves
        every step (the prefix slices of the eager path would specialise it on each rank)."""
        if self.strength == 0:
            return y
        down, up_t, k = self.factors.get(x.dtype, x.device)
        conv = self.conv is not None
        if self.conv is not None:
            h = _fit(F.conv2d(x, self._conv_down(down, down.shape[0]), None, **self.conv), y)
        else:
            h = F.linear(x, down)
        if mask is not None:
            m = mask[:, : self.rank].to(h.dtype).repeat_interleave(k, dim=1)  # (items, k * R), rows interleaved
            m = m.repeat_interleave(h.shape[0] // m.shape[0], dim=0)
            shape = [h.shape[0]] + [1] * (h.ndim - 1)
            shape[1 if conv else -1] = m.shape[1]
            h = h * m.reshape(shape)
        if conv:
            return y + self.strength * F.conv2d(h, up_t.T[:, :, None, None])
        d = ((h @ up_t) * self.strength).to(y.dtype)
        if self.out_slice is None:
            return y + d
        y = y.clone()
        y.narrow(-1, *self.out_slice).add_(d)
        return y


def _fit(h: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """The factors' output on a k x k conv layer's output grid (a 1x1 conv on the stride can reach one row further)."""
    if h.shape[2:] == y.shape[2:]:
        return h
    return h[..., : y.shape[-2], : y.shape[-1]]


def sample_scale(scales: list[float], h: torch.Tensor) -> torch.Tensor:
    """Each batch item's strength multiplier, shaped to broadcast over `h` (items of one sigma are consecutive)."""
    b = h.shape[0]
    if b % len(scales):
        raise RuntimeError(f"scheduled LoRA: batch of {b} does not divide into {len(scales)} sigmas")
    per = torch.tensor(scales, device=h.device, dtype=h.dtype).repeat_interleave(b // len(scales))
    return per.reshape([b] + [1] * (h.ndim - 1))


def sample_mask(ranks: list[int], max_rank: int, h: torch.Tensor, n: int, k: int, dim: int) -> torch.Tensor:
    """0/1 mask over the first `n` factor rows for each batch item of `h` (items of one sigma are consecutive)."""
    b = h.shape[0]
    if b % len(ranks):
        raise RuntimeError(f"T-LoRA: batch of {b} does not divide into {len(ranks)} sigmas")
    per = torch.tensor([min(r, max_rank) for r in ranks], device=h.device).repeat_interleave(b // len(ranks))
    mask = (torch.arange(n, device=h.device)[None, :] < (k * per)[:, None]).to(h.dtype)
    shape = [b] + [1] * (h.ndim - 1)
    shape[dim] = n
    return mask.reshape(shape)
