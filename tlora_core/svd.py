"""Exact top-r singular triplets of base weights, one layer at a time, with a persistent per-layer cache.

LyCORIS `tlora` files do not store the SVD base they were trained against (P0, Q0, lambda0 = top-r singular
triplets of the base weight). It is rebuilt exactly: eigen-decomposition of the smaller Gram matrix in float64
(accurate to < 1e-6 relative on the rank-one terms that matter), never a randomized approximation.

`compute_base_triplets` takes one `BaseJob` per layer and touches one weight at a time: look its content key up in the
cache, and only on a miss fetch the weight, decompose it, keep the small factors and drop the weight, so peak
memory is one layer's working set whatever the number of layers.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import torch
from safetensors.torch import load_file, save_file

from . import lapack

log = logging.getLogger("tlora.svd")

Triplets = tuple[torch.Tensor, torch.Tensor, torch.Tensor]
Progress = Callable[[int, int], None]
DEFAULT_MAX_BYTES = int(os.environ.get("TLORA_CACHE_MAX_MB", "4096")) << 20  # SVD cache size limit

_NULL_TOL = torch.finfo(torch.float64).eps ** 0.5


def _top_eigh(w: torch.Tensor, tall: bool, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Top-k eigenpairs (ascending) of W^T W (tall) or W W^T (wide), float64, and W @ evecs (tall) or W^T @ evecs
    (wide): LAPACK's subset solver and this thread's BLAS on the CPU (see lapack.py), torch's full eigh elsewhere
    (GPU) or without SciPy."""
    if w.device.type == "cpu" and lapack.available():
        evals, evecs = lapack.top_gram_eigh(w.numpy(), tall, k)
        proj = lapack.project(w.numpy(), evecs, tall)
        return torch.from_numpy(evals), torch.from_numpy(evecs), torch.from_numpy(proj)
    evals, evecs = torch.linalg.eigh(w.T @ w if tall else w @ w.T)
    evecs = evecs[:, -k:]
    return evals[-k:], evecs, (w @ evecs) if tall else (w.T @ evecs)


def top_singular(weight: torch.Tensor, rank: int) -> Triplets:
    """(u (out, r), s (r,), v (in, r)) of a 2-D weight, float32, on the weight's device.

    Singular values are sorted descending like `torch.linalg.svd`. Where rank exceeds
    min(out, in), the missing triplets are zero vectors with s = 1e-6 (LyCORIS' padding).
    """
    w = weight.detach().reshape(weight.shape[0], -1).to(torch.float64).contiguous()
    k = min(rank, *w.shape)
    tall = w.shape[1] <= w.shape[0]
    # eigenvectors of the smaller Gram matrix are v (tall weight) or u (wide weight)
    evals, evecs, proj = _top_eigh(w, tall, k)
    vecs, proj = evecs.flip(1), proj.flip(1)
    s = evals.flip(0).clamp_min(0).sqrt()
    # Singular values below the Gram matrix's round-off (~sqrt(eps) * s_max) are numerically zero:
    # their terms get zero vectors, never w @ v / s (which overflows float32 on rank-deficient weights).
    null = s <= s[:1] * _NULL_TOL
    other = torch.where(null, 0.0, proj / torch.where(null, 1.0, s))
    u, v = (other, vecs) if tall else (vecs, other)
    if k < rank:
        pad = rank - k
        u = torch.nn.functional.pad(u, (0, pad))
        v = torch.nn.functional.pad(v, (0, pad))
        s = torch.nn.functional.pad(s, (0, pad), value=1e-6)
    return u.float(), s.float(), v.float()


class SVDCache:
    """Directory of `<digest>-r<rank>.safetensors` files holding (u, s, v); `None` dir = no cache.

    Bounded: after each write the least recently used entries (a hit refreshes an entry's time) are removed until
    the folder holds at most `max_bytes`."""

    def __init__(self, directory: str | os.PathLike[str] | None, max_bytes: int = DEFAULT_MAX_BYTES):
        self.directory = None if directory is None else os.fspath(directory)
        self.max_bytes = max_bytes
        self._written = 0

    def _path(self, digest: str, rank: int) -> str:
        assert self.directory is not None
        return os.path.join(self.directory, f"{digest}-r{rank}.safetensors")

    def get(self, digest: str, rank: int) -> Triplets | None:
        if self.directory is None:
            return None
        path = self._path(digest, rank)
        if not os.path.exists(path):
            return None
        try:
            d = load_file(path)
            usv = d["u"], d["s"], d["v"]
        except Exception as e:  # a torn or foreign file: recompute and overwrite
            log.warning("ignoring unreadable SVD cache entry %s: %s", path, e)
            return None
        try:
            os.utime(path)  # recently used: kept longest by `prune`
        except OSError:
            pass
        return usv

    def put(self, digest: str, rank: int, usv: Triplets) -> None:
        if self.directory is None:
            return
        os.makedirs(self.directory, exist_ok=True)
        path = self._path(digest, rank)
        tmp = f"{path}.{os.getpid()}.{threading.get_ident()}.tmp"
        u, s, v = usv
        try:
            save_file({"u": u.contiguous().cpu(), "s": s.contiguous().cpu(), "v": v.contiguous().cpu()}, tmp)
            os.replace(tmp, path)
        except BaseException:
            _unlink(tmp)
            raise
        self._written += os.path.getsize(path)

    def prune(self) -> int:
        """Remove the least recently used entries beyond `max_bytes`; returns how many were removed."""
        if self.directory is None or not os.path.isdir(self.directory):
            return 0
        entries = []
        for e in os.scandir(self.directory):
            if e.name.endswith(".safetensors"):
                try:
                    st = e.stat()
                except OSError:
                    continue
                entries.append((st.st_mtime, st.st_size, e.path))
            elif e.name.endswith(".tmp") and time.time() - e.stat().st_mtime > 3600:
                _unlink(e.path)  # left by a process killed mid-write
        total, removed = sum(size for _, size, _ in entries), 0
        for _, size, path in sorted(entries):
            if total <= self.max_bytes:
                break
            _unlink(path)
            total, removed = total - size, removed + 1
        if removed:
            log.info("SVD cache %s: removed %d least recently used entries (limit %d MB)", self.directory, removed,
                     self.max_bytes >> 20)
        return removed


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except OSError:
        pass


@dataclass(frozen=True)
class BaseJob:
    """One layer whose SVD base is needed: its rank, its weight's shape, a content key of the weight as stored
    (cheap, no dequantization) and the dequantized weight on the device to decompose on (fetched only on a
    cache miss)."""

    name: str
    rank: int
    shape: tuple[int, int]
    digest: Callable[[], str]
    weight: Callable[[], torch.Tensor]


def _fits(usv: Triplets, job: BaseJob) -> bool:
    """A cache entry of the right shapes whose singular values are finite and >= 0 (entries are written whole by
    `SVDCache.put`, so a wrong one is a foreign or edited file: its shapes or values show it)."""
    u, s, v = usv
    shapes_ok = (tuple(u.shape) == (job.shape[0], job.rank) and tuple(s.shape) == (job.rank,)
                 and tuple(v.shape) == (job.shape[1], job.rank))
    return shapes_ok and all(t.is_floating_point() for t in usv) and bool(torch.isfinite(s).all() and (s >= 0).all())


def default_workers(device: torch.device | str) -> int:
    """Layers decomposed at once: one on a GPU; on the CPU one per core (up to 4: each holds a layer's fp64
    working set), each on a single BLAS thread, where LAPACK can run without the GIL."""
    if torch.device(device).type != "cpu" or not lapack.available():
        return 1
    return max(1, min(4, os.cpu_count() or 1))


def compute_base_triplets(jobs: Iterable[BaseJob], cache: SVDCache | None = None, progress: Progress | None = None,
                  stats: dict[str, int] | None = None, workers: int = 1) -> dict[str, Triplets]:
    """Top-r triplets (float32, CPU) for each layer, from the cache where the content matches; `workers` layers at
    a time (peak memory: that many layers' working sets)."""
    jobs = list(jobs)
    stats = {} if stats is None else stats
    for k in ("computed", "cached"):
        stats.setdefault(k, 0)
    lock = threading.Lock()
    done = [0]

    def run(job: BaseJob) -> Triplets:
        if workers > 1:
            lapack.single_threaded_blas()
        digest = job.digest() if cache is not None else ""
        usv = _from_cache(job, digest, cache)
        with lock:
            stats["cached" if usv is not None else "computed"] += 1
        if usv is None:
            u, s, v = top_singular(job.weight(), job.rank)
            usv = (u.cpu(), s.cpu(), v.cpu())
            if cache is not None:
                cache.put(digest, job.rank, usv)
        with lock:
            done[0] += 1
            if progress is not None:
                progress(done[0], len(jobs))
        return usv

    try:
        if workers <= 1 or len(jobs) <= 1:
            return {job.name: run(job) for job in jobs}
        # each worker's LAPACK/BLAS calls run on one thread of its own (lapack.single_threaded_blas), so no
        # process-wide thread setting is touched
        with ThreadPoolExecutor(workers) as ex:
            return dict(zip([j.name for j in jobs], ex.map(run, jobs), strict=True))
    finally:
        if cache is not None and cache._written:
            cache.prune()
            cache._written = 0


def _from_cache(job: BaseJob, digest: str, cache: SVDCache | None) -> Triplets | None:
    if cache is None:
        return None
    usv = cache.get(digest, job.rank)
    if usv is not None and not _fits(usv, job):
        log.warning("ignoring SVD cache entry for %s: wrong shapes or non-finite values", job.name)
        return None
    return usv
