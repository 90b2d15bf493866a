"""Exact top-r singular triplets of a base weight, with a persistent per-layer cache.

LyCORIS `tlora` files do not store the SVD base they were trained against (P0, Q0, lambda0 =
top-r singular triplets of the base weight). We rebuild it exactly: eigen-decomposition of the
smaller Gram matrix in float64 (much faster than a full SVD, accurate to < 1e-6 relative on the
rank-one terms that matter), never a randomized approximation.
"""

from __future__ import annotations

import hashlib
import logging
import os
import threading
from collections.abc import Callable

import torch
from safetensors.torch import load_file, save_file

log = logging.getLogger("tlora.svd")

# Bump when the computation changes, so old cache entries are never served.
CACHE_VERSION = 1

SVDStats = dict  # {"computed": int, "cached": int}

_NULL_TOL = torch.finfo(torch.float64).eps ** 0.5


def top_singular(weight: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u (out, r), s (r,), v (in, r)) of a 2-D weight, float32, on the weight's device.

    Singular values are sorted descending like `torch.linalg.svd`. Where rank exceeds
    min(out, in), the missing triplets are zero vectors with s = 1e-6 (LyCORIS' padding).
    """
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64)
    out_dim, in_dim = w.shape
    k = min(rank, out_dim, in_dim)
    # Singular values below the Gram matrix's round-off (~sqrt(eps) * s_max) are numerically zero:
    # their terms get zero vectors, never w @ v / s (which overflows float32 on rank-deficient weights).
    if in_dim <= out_dim:
        evals, evecs = torch.linalg.eigh(w.T @ w)
        v = evecs[:, -k:].flip(1)
        s = evals[-k:].flip(0).clamp_min(0).sqrt()
        null = s <= s[:1] * _NULL_TOL
        u = torch.where(null, 0.0, (w @ v) / torch.where(null, 1.0, s))
    else:
        evals, evecs = torch.linalg.eigh(w @ w.T)
        u = evecs[:, -k:].flip(1)
        s = evals[-k:].flip(0).clamp_min(0).sqrt()
        null = s <= s[:1] * _NULL_TOL
        v = torch.where(null, 0.0, (w.T @ u) / torch.where(null, 1.0, s))
    if k < rank:
        pad = rank - k
        u = torch.nn.functional.pad(u, (0, pad))
        v = torch.nn.functional.pad(v, (0, pad))
        s = torch.nn.functional.pad(s, (0, pad), value=1e-6)
    return u.float(), s.float(), v.float()


def weight_digest(weight: torch.Tensor) -> str:
    """Content hash of a weight (dtype, shape and bytes)."""
    t = weight.detach().contiguous().cpu()
    h = hashlib.blake2b(digest_size=20)
    h.update(f"{t.dtype}|{tuple(t.shape)}|v{CACHE_VERSION}".encode())
    h.update(t.view(torch.uint8).reshape(-1).numpy().data)
    return h.hexdigest()


class SVDCache:
    """Directory of `<digest>-r<rank>.safetensors` files holding (u, s, v); `None` dir = no cache."""

    def __init__(self, directory: str | os.PathLike | None):
        self.directory = None if directory is None else os.fspath(directory)
        self._lock = threading.Lock()

    def _path(self, digest: str, rank: int) -> str:
        return os.path.join(self.directory, f"{digest}-r{rank}.safetensors")

    def get(self, digest: str, rank: int):
        if self.directory is None:
            return None
        path = self._path(digest, rank)
        if not os.path.exists(path):
            return None
        try:
            d = load_file(path)
            return d["u"], d["s"], d["v"]
        except Exception as e:  # a torn or foreign file: recompute and overwrite
            log.warning("ignoring unreadable SVD cache entry %s: %s", path, e)
            return None

    def put(self, digest: str, rank: int, usv) -> None:
        if self.directory is None:
            return
        os.makedirs(self.directory, exist_ok=True)
        path = self._path(digest, rank)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        u, s, v = usv
        save_file({"u": u.contiguous().cpu(), "s": s.contiguous().cpu(), "v": v.contiguous().cpu()}, tmp)
        os.replace(tmp, path)


def _fits(usv, weight: torch.Tensor, rank: int) -> bool:
    u, s, v = usv
    shapes_ok = (tuple(u.shape) == (weight.shape[0], rank) and tuple(s.shape) == (rank,)
                 and tuple(v.shape) == (weight[0].numel(), rank))
    return shapes_ok and all(t.is_floating_point() and bool(torch.isfinite(t).all()) for t in usv)


def base_triplets(
    weights: dict[str, torch.Tensor],
    ranks: dict[str, int],
    cache: SVDCache | None = None,
    progress: Callable[[int, int], None] | None = None,
    stats: SVDStats | None = None,
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Top-r triplets for each named base weight, from the cache where the content matches."""
    out = {}
    total = len(weights)
    if stats is not None:
        stats.setdefault("computed", 0)
        stats.setdefault("cached", 0)
    for i, (name, w) in enumerate(weights.items()):
        rank = ranks[name]
        digest = weight_digest(w) if cache is not None else None
        usv = cache.get(digest, rank) if cache is not None else None
        if usv is not None and not _fits(usv, w, rank):
            log.warning("ignoring SVD cache entry for %s: wrong shapes or non-finite values", name)
            usv = None
        if usv is None:
            usv = top_singular(w, rank)
            if cache is not None:
                cache.put(digest, rank, usv)
            if stats is not None:
                stats["computed"] = stats.get("computed", 0) + 1
        elif stats is not None:
            stats["cached"] = stats.get("cached", 0) + 1
        out[name] = usv
        if progress is not None:
            progress(i + 1, total)
    return out
