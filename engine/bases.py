"""The base of every module of a T-LoRA on a loaded model: rebuilt (LyCORIS), stored (self-contained files and
the official repo's), or none needed (vanilla), with the diagnostics that say how far to trust it.

`prepare` is memoised on the loaded model itself (a weak reference: the memo goes with the model), keyed by the
file and the identity of the weights it reads (`quick_key`), so running the same file on the same model again
(other sliders, other strength) does no hashing and no SVD. It returns immutable adapters; each application builds
its own device factors from them, so one application's eject never frees another's.
"""

from __future__ import annotations

import hashlib
import logging
import os
import statistics
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from ..tlora_core import TLoRA, TLoRAError, diagnostics
from ..tlora_core.adapter import ModuleAdapter
from ..tlora_core.lru import LockedLRU
from ..tlora_core.random_init import RANDOM_BASE
from ..tlora_core.svd import BaseJob, SVDCache, Triplets, compute_base_triplets, default_workers
from ..tlora_core.writers import PACK_WRITERS
from .plan import LayerTarget
from .weights import EXACT, LOW, LayerWeight, UnreadableWeight, layer_weight

log = logging.getLogger("tlora.bases")

FIT_LAYERS = 16  # layers a stored base is checked on against the loaded weights
ALIGN_LAYERS = 64  # layers the alignment figure (a median) is measured on: spread over the model
PREPARED_PER_MODEL = 2


class _Stats:
    """Counters for tests and diagnostics, updated under a lock (SVD workers update them from threads)."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.values = {"prepared": 0, "reused": 0, "digests": 0, "svd": 0}

    def add(self, name: str, n: int = 1) -> None:
        with self._lock:
            self.values[name] += n

    def __getitem__(self, name: str) -> int:
        return self.values[name]

    def snapshot(self) -> dict[str, int]:
        with self._lock:
            return dict(self.values)


stats = _Stats()


class _ModelMemo:
    """What `prepare` remembers about one loaded model: its prepared files and its weights' content digests."""

    def __init__(self) -> None:
        self.prepared: LockedLRU[tuple, Prepared] = LockedLRU(PREPARED_PER_MODEL)
        self.digests: LockedLRU[tuple, str] = LockedLRU(8192)  # quick_key of a stored weight -> content digest


_memos: weakref.WeakKeyDictionary[torch.nn.Module, _ModelMemo] = weakref.WeakKeyDictionary()
_memos_lock = threading.Lock()


def _memo(model: torch.nn.Module) -> _ModelMemo:
    with _memos_lock:
        memo = _memos.get(model)
        if memo is None:
            memo = _memos[model] = _ModelMemo()
        return memo

# Measured effect of rebuilding the base from low-precision weights of the right checkpoint (README, "What it
# guarantees"; tests/comfy/test_storage.py): relative error of the T-LoRA's effect on one model call, tiny SDXL
# and Flux with random weights (flat spectra: a worst case; trained weights' separated top singular values move less)
EXPECTED_ERROR = {"bfloat16": "about 0.5-1.5%", "float16": "about 0.05-0.2%", "fp8": "about 5-20%",
                  "gguf": "about 5-10% for Q8_0 and 50% or more for 4-bit quants"}


def _expected(kinds: list[str]) -> str:
    """The measured figure for the least precise of these storage kinds."""
    for family, figure in (("gguf", "gguf"), ("fp8", "fp8"), ("quantized", "fp8"), ("scaled_fp8", "fp8"),
                           ("bfloat16", "bfloat16"), ("float16", "float16")):
        if any(k.startswith(family) for k in kinds):
            return EXPECTED_ERROR[figure]
    return "very little"


Note = tuple[int, str]  # (logging level, line)


@dataclass
class Prepared:
    adapters: dict[str, ModuleAdapter]  # module name -> the adapter with its base, rows in the layer's order
    notes: list[Note] = field(default_factory=list)  # lines logged when prepared (repeated on reuse)


def with_rows(t: LayerTarget, w: torch.Tensor) -> torch.Tensor:
    """The part of a layer's weight a module patches, in the row order the trainer saw."""
    if t.out_slice is not None:
        w = w.narrow(0, *t.out_slice)
    return t.reorder(w) if t.reorder is not None else w


def _digest(memo: _ModelMemo, lw: LayerWeight, t: LayerTarget) -> str:
    key = lw.quick_key
    full = memo.digests.get(key)
    if full is None:
        full = lw.digest()
        stats.add("digests")
        memo.digests.put(key, full)
    extra = f"|rows {t.out_slice}|{getattr(t.reorder, '__name__', t.reorder)}"
    return hashlib.blake2b((full + extra).encode(), digest_size=20).hexdigest()


def layer_weights(patcher, tl: TLoRA, targets: list[LayerTarget]) -> dict[str, LayerWeight]:
    try:
        return {t.key: layer_weight(patcher, t.key) for t in targets}
    except UnreadableWeight as e:
        raise TLoRAError(tl.path, str(e)) from None


def jobs(model: torch.nn.Module, targets: list[LayerTarget], weights: dict[str, LayerWeight],
         device) -> list[BaseJob]:
    """One SVD job per target: its weight's digest and dequantized rows, fetched lazily, one layer at a time."""
    memo = _memo(model)
    return [BaseJob(t.adapter.name, t.adapter.rank, (t.adapter.out_features, t.adapter.in_features),
                    lambda lw=weights[t.key], t=t: _digest(memo, lw, t),
                    lambda lw=weights[t.key], t=t: with_rows(t, lw.dequantized(device))) for t in targets]


def _rebuild(model: torch.nn.Module, tl: TLoRA, targets: list[LayerTarget], weights: dict[str, LayerWeight],
             cache: SVDCache, device, progress: Callable[[int, int], None] | None
             ) -> tuple[dict[str, Triplets], list[Note]]:
    counts: dict[str, int] = {}
    triplets = compute_base_triplets(jobs(model, targets, weights, device), cache, progress, counts,
                                     default_workers(device))
    stats.add("svd", counts["computed"])
    name = os.path.basename(tl.path)
    sample = targets[:: max(1, len(targets) // ALIGN_LAYERS)]
    aligned = diagnostics.alignment({t.adapter.name: t.adapter for t in sample},
                                    {t.adapter.name: triplets[t.adapter.name] for t in sample})
    notes = [(logging.INFO, f"T-LoRA {name}: SVD base for {len(targets)} layers ({counts['computed']} computed, "
                            f"{counts['cached']} from cache); alignment with the trained factors {aligned.figure:.3f}")]
    kinds = sorted({weights[t.key].kind for t in targets})
    precisions = {w.precision for w in weights.values()}
    if precisions != {EXACT}:  # a warning for fp8 / GGUF storage, a note for fp16 / bf16
        level = logging.WARNING if LOW in precisions else logging.INFO
        notes.append((level, f"T-LoRA {name}: SVD base rebuilt from {'/'.join(kinds)} weights, not the full-precision "
                             f"ones it was trained on: expect the T-LoRA's effect to be off by {_expected(kinds)}. For "
                             "an exact effect on any storage, make a self-contained file once with 'Save T-LoRA with "
                             "base' (or `python -m tlora_core embed-base`) on the full-precision checkpoint"))
    warning = diagnostics.mismatch_message(name, aligned)
    return triplets, notes + ([(logging.WARNING, warning)] if warning else [])


def _fit_check(tl: TLoRA, targets: list[LayerTarget], weights: dict[str, LayerWeight]) -> list[Note]:
    """A self-contained file's stored base against the loaded checkpoint, on a spread of layers. A random base (the
    paper's init, recorded as `base_init` by Train T-LoRA) is no weight's SVD: nothing to check."""
    if tl.writer.id in PACK_WRITERS and (tl.stored_base or {}).get("base_init") == RANDOM_BASE:
        return [(logging.INFO, f"T-LoRA {os.path.basename(tl.path)}: stored base (random, the paper's init; not "
                               "built from the checkpoint's weights)")]
    step = max(1, len(targets) // FIT_LAYERS)
    figures = [diagnostics.base_fit(t.adapter, with_rows(t, weights[t.key].dequantized("cpu")))
               for t in targets[::step][:FIT_LAYERS]]
    figure = statistics.median(figures)
    name = os.path.basename(tl.path)
    source = (tl.stored_base or {}).get("checkpoint", "an unnamed checkpoint") if tl.writer.id in PACK_WRITERS \
        else f"stored by its trainer, {tl.writer.title}"
    notes = [(logging.INFO, f"T-LoRA {name}: stored SVD base (from {source}); residual on this checkpoint "
                            f"{figure:.3f} over {len(figures)} layers")]
    warning = diagnostics.fit_message(name, figure, len(figures))
    return notes + ([(logging.WARNING, warning)] if warning else [])


def prepare(patcher, tl: TLoRA, targets: list[LayerTarget], file_key: tuple, cache: SVDCache, device,
            progress: Callable[[int, int], None] | None = None) -> Prepared:
    """The adapter of every target with its base (rows in the layer's order), and the notes on how it was
    obtained. Memoised on `patcher.model`."""
    rebuild = [t for t in targets if t.adapter.needs_svd_base]
    stored = [t for t in targets if t.adapter.svd_base and not t.adapter.needs_svd_base and not t.adapter.tap]
    weights = layer_weights(patcher, tl, rebuild + stored)
    layout = tuple((t.adapter.name, t.key, t.out_slice, getattr(t.reorder, "__name__", None)) for t in targets)
    key = (file_key, layout, tuple(sorted((k, w.quick_key) for k, w in weights.items())))
    memo = _memo(patcher.model)
    hit = memo.prepared.get(key)
    if hit is not None:
        stats.add("reused")
        for level, line in hit.notes:
            log.log(level, "%s (as before)", line)
        return hit
    triplets, notes = _rebuild(patcher.model, tl, rebuild, weights, cache, device, progress) if rebuild else ({}, [])
    notes += _fit_check(tl, stored, weights) if stored else []
    for level, line in notes:
        log.log(level, line)
    adapters = {}
    for t in targets:
        a = t.adapter.with_base(*triplets[t.adapter.name]) if t.adapter.name in triplets else t.adapter
        adapters[t.adapter.name] = a.with_rows(t.reorder) if t.reorder is not None else a
    out = Prepared(adapters, notes)
    stats.add("prepared")
    memo.prepared.put(key, out)
    return out
