"""What a T-LoRA file is, from its header alone: format, rank, modules, recorded schedule, stored base.

Reads tensor names, shapes and metadata (safetensors) without loading a tensor, and keeps nothing, so the node's
frontend can ask about a 700 MB file for free. `.pt` pickles have no header: they are loaded (tensors only, as
`load_tlora` does) and dropped.
"""

from __future__ import annotations

import json
import os
from typing import Any

from safetensors import safe_open

from . import layouts
from . import recorded as rec
from .errors import TLoRAError
from .fileio import guess_other, is_pickle, read_pickle
from .formats import BASE_METADATA, STATE_SUFFIXES, classify, schedule_defaults

_RANK_ROLES = ("q", "down")  # (rank, in) tensors: the rank is their first dimension


def _header(path: str) -> tuple[dict[str, tuple[int, ...]], dict[str, str], dict[str, float]]:
    """(tensor shapes, metadata, lora-scripts-next's schedule scalars) without loading the other tensors."""
    if not os.path.isfile(path):
        raise TLoRAError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise TLoRAError(path, "the file is empty (0 bytes)")
    if is_pickle(path):
        return {k: tuple(v.shape) for k, v in read_pickle(path).items()}, {}, {}
    try:
        with safe_open(path, framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
            state = {}
            for suffix, name in STATE_SUFFIXES:
                hit = next((k for k in shapes if k.endswith(suffix) and not any(shapes[k])), None)
                if hit is not None:
                    state[name] = float(f.get_tensor(hit).float().item())
            return shapes, dict(f.metadata() or {}), state
    except Exception as e:
        raise TLoRAError(path, f"not a readable safetensors file (truncated or corrupt?): {e}") from None


def describe(path: str | os.PathLike[str], assume_vanilla: bool = False, sidecar: bool = True,
             standard_layout: str = "auto") -> dict[str, Any]:
    """A JSON-ready description; raises TLoRAError for what `load_tlora` would refuse by name and layout."""
    path = os.fspath(path)
    shapes, metadata, state = _header(path)
    if not shapes:
        raise TLoRAError(path, "the file holds no tensors")
    groups: dict[str, dict[str, tuple[int, ...]]] = {}
    families: set[str] = set()
    for key, shape in shapes.items():
        split = layouts.split_key(key)
        if split is None:
            continue
        family, role = layouts.SUFFIXES[split[1]]
        groups.setdefault(split[0], {})[role] = shape
        families.update({family} if family else set())
    if not groups:
        raise TLoRAError(path, guess_other(list(shapes)))
    fmt, writer, layout_why = classify(path, families, groups, list(shapes), metadata, assume_vanilla,
                                       standard_layout, state)
    modules = {n: g for n, g in groups.items() if any(r in g for r in ("q", "p", "down", "up", "lam"))}
    te = [n for n in modules if layouts.is_text_encoder(n)]
    ranks = [g[r][0] for g in modules.values() for r in _RANK_ROLES if r in g and g[r]]
    rank = (max(ranks) if ranks else 0) // (2 if fmt in layouts.EXPORTS else 1)
    stored = fmt == layouts.LYCORIS and bool(modules) and all("q0" in g for g in modules.values())
    base_record = None
    if stored:
        try:
            base_record = json.loads(metadata.get(BASE_METADATA, "{}"))
        except ValueError:
            base_record = {}
    defaults = schedule_defaults(rank, writer, rec.recorded_schedule(path, metadata, sidecar))
    return {"format": fmt, "rank": rank, "modules": len(modules) - len(te), "text_encoder_modules": len(te),
            "stored_base": stored, "stored_base_record": base_record,
            "writer": {"id": writer.id, "title": writer.title, "assumed": writer.assumed, "layout": layout_why},
            "curve": writer.curve,
            "integer_timestep": writer.integer_timestep and not (fmt == layouts.OFFICIAL_VANILLA and is_pickle(path)),
            "recorded": {k: {"value": v, "source": src} for k, (v, src) in defaults.items()}}
