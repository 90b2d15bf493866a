"""The per-layer runtime of a T-LoRA: prefix factors on the compute device and the slot that adds the active ranks
to a layer's output. Torch only; what the active rank is comes from an `ActiveRank` the caller owns.

The active rank of the model call in progress is per thread (`ActiveRank` is a `threading.local`): one model run
from two threads, or two clones sharing one application, never sees another call's rank.
"""

from __future__ import annotations

import threading
from typing import Any

import torch
import torch.nn.functional as F

from .adapter import ORTHO, Factors, ModuleAdapter


class ActiveRank(threading.local):
    """The rank of the model call in progress on this thread: `rank` None = all ranks (outside a call, what LyCORIS
    does unmasked); `sample_ranks` per batch item when the items' sigmas differ."""

    rank: int | None = None
    sample_ranks: list[int] | None = None


class FactorCache:
    """An adapter's prefix factors per (dtype, device), built on first use, shared by every slot that runs it.

    Owned by one application: its `release` (on eject) frees only its own device copies."""

    def __init__(self, adapter: ModuleAdapter):
        self.adapter = adapter
        self._by: dict[tuple[torch.dtype, torch.device], Factors] = {}
        self._lock = threading.Lock()

    def get(self, dtype: torch.dtype, device: torch.device) -> Factors:
        f = self._by.get((dtype, device))
        if f is None:
            with self._lock:
                f = self._by.get((dtype, device))
                if f is None:
                    f = self._by[(dtype, device)] = self.adapter.prefix_factors(dtype, device)
        return f

    def nbytes(self, dtype: torch.dtype) -> int:
        """Bytes of one copy of the factors in `dtype` (what a device copy costs)."""
        k = 2 if self.adapter.kind == ORTHO else 1
        return k * self.adapter.rank * (self.adapter.in_features + self.adapter.out_features) * \
            torch.empty((), dtype=dtype).element_size()

    def release(self) -> None:
        with self._lock:
            self._by.clear()


class LayerSlot:
    """Adds the active ranks of one adapter, times `strength`, to one layer's output (optionally a slice of it)."""

    def __init__(self, factors: FactorCache, active: ActiveRank, strength: float,
                 out_slice: tuple[int, int] | None, conv: dict[str, Any] | None):
        self.factors, self.active, self.strength = factors, active, strength
        self.out_slice = out_slice  # (start, size) in the output features of a fused layer
        self.conv = conv  # stride/padding/dilation of a 1x1 conv layer, None for linear
        self.rank = factors.adapter.rank

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        act = self.active
        r = self.rank if act.rank is None else min(act.rank, self.rank)
        if r <= 0 or self.strength == 0:
            return y
        down, up_t, k = self.factors.get(x.dtype, x.device)
        n = k * r
        ranks = act.sample_ranks
        if self.conv is not None:
            h = F.conv2d(x, down[:n, :, None, None], None, **self.conv)
            if ranks is not None:
                h = h * sample_mask(ranks, self.rank, h, n, k, 1)
            return y + self.strength * F.conv2d(h, up_t[:n].T[:, :, None, None])
        h = F.linear(x, down[:n])
        if ranks is not None:
            h = h * sample_mask(ranks, self.rank, h, n, k, -1)
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
