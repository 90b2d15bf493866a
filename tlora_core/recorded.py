"""What a T-LoRA file records about itself: its schedule (min_rank, alpha) and whether it says it is a T-LoRA.

First found wins: the file's metadata (a `lycoris_config` JSON or top-level `tlora_*` keys), then a SimpleTuner
`lycoris_config.json` (or `<name>.json`) beside the file, then the official repo's `hparams.yml` beside it or up.
`sidecars(path)` lists the files that can change the answer, so caches can key on them.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
from typing import Any

log = logging.getLogger("tlora.recorded")

Recorded = dict[str, tuple[float, str]]  # field -> (value, where it was found)

META_KEYS = {
    "max_rank": ("linear_dim", "tlora_max_rank", "max_rank", "rank"),
    "min_rank": ("tlora_min_rank", "ss_tlora_min_rank", "min_rank"),
    "alpha": ("tlora_alpha", "tlora_mask_alpha", "ss_tlora_alpha_rank_scale", "alpha_rank_scale"),
}
_JSON_CONFIGS = ("lycoris_config", "tlora_config", "training_config", "ss_network_args")
# descriptive metadata fields that may name the method; free text elsewhere (captions, tags, paths) never counts
_NAMING_FIELDS = ("algo", "lora_type", "network_type", "trainer", "ss_network_module", "ss_adapter_module",
                  "ss_adapter_algorithm", "modelspec.title",
                  "modelspec.architecture", "modelspec.description")
_TLORA_WORD = re.compile(r"(?<![a-z0-9])t-?lora(?![a-z0-9])", re.I)


def _json_configs(metadata: dict[str, str]) -> list[tuple[str, dict[str, Any]]]:
    out = []
    for k in _JSON_CONFIGS:
        raw = metadata.get(k)
        if not raw:
            continue
        try:
            cfg = json.loads(raw)
        except (ValueError, RecursionError):
            log.warning("metadata '%s' is not JSON; ignored", k)
            continue
        if isinstance(cfg, dict):
            out.append((k, cfg))
    return out


def says_tlora(metadata: dict[str, str]) -> bool:
    """Whether the metadata marks the file as a T-LoRA: a `tlora_*` / `ss_tlora_*` setting, `algo: tlora` (or
    AnimaLoraStudio's `source_algo: tlora_ortho`) in a training config, lora-scripts-next's `timestep_lora`, or the
    word T-LoRA in a field that names the method (not in captions, tags or file names)."""
    configs = [cfg for _, cfg in _json_configs(metadata)]
    keys = list(metadata) + [k for cfg in configs for k in cfg]
    if any(str(k).lower().startswith(("tlora_", "ss_tlora_")) for k in keys):
        return True
    if any(str(cfg.get("algo", "")).lower() in ("tlora", "t-lora") or
           str(cfg.get("source_algo", "")).lower().startswith("tlora") for cfg in configs):
        return True
    if metadata.get("ss_adapter_algorithm") == "timestep_lora":  # lora-scripts-next
        return True
    if any(str(cfg.get("use_timestep_mask", "")).lower() in ("true", "1") for cfg in configs):  # anima_lora
        return True
    return any(_TLORA_WORD.search(str(metadata.get(f, ""))) for f in _NAMING_FIELDS)


def _pick(source: dict[str, Any], where: str, out: Recorded) -> None:
    for field_name, keys in META_KEYS.items():
        if field_name in out:
            continue
        for k in keys:
            try:
                num = float(source[k])
            except (KeyError, TypeError, ValueError):
                continue
            if math.isfinite(num):
                out[field_name] = (int(num) if field_name != "alpha" else num, where)
                break


def sidecars(path: str) -> list[str]:
    """The sidecar files that exist for a T-LoRA file, in the order they are read."""
    folder = os.path.dirname(os.path.abspath(path))
    stem = os.path.splitext(os.path.basename(path))[0]
    found = []
    for cand in (f"{stem}.lycoris_config.json", f"{stem}.json", "lycoris_config.json"):
        if os.path.isfile(os.path.join(folder, cand)):
            found.append(os.path.join(folder, cand))
            break
    for cand in ("hparams.yml", os.path.join("..", "hparams.yml"), os.path.join("..", "logs", "hparams.yml")):
        if os.path.isfile(os.path.join(folder, cand)):
            found.append(os.path.normpath(os.path.join(folder, cand)))
            break
    return found


def recorded_schedule(path: str, metadata: dict[str, str], sidecar: bool = True) -> Recorded:
    """Schedule values the file records: field -> (value, source)."""
    found: Recorded = {}
    for k, cfg in _json_configs(metadata):
        _pick(cfg, f"metadata '{k}'", found)
    _pick({k: v for k, v in metadata.items() if any(k in keys for keys in META_KEYS.values())}, "metadata", found)
    for sc in sidecars(path) if sidecar else []:
        name = os.path.relpath(sc, os.path.dirname(os.path.abspath(path)))
        _pick(_read_sidecar(sc), f"sidecar {name}", found)
    return found


def _read_sidecar(path: str) -> dict[str, Any]:
    if path.endswith(".yml"):
        return _simple_yaml(path)
    try:
        with open(path, encoding="utf-8") as f:
            cfg = json.load(f)
    except (OSError, ValueError, RecursionError) as e:
        log.warning("ignoring unreadable sidecar %s: %s", path, e)
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _simple_yaml(path: str) -> dict[str, Any]:
    """Top-level `key: value` scalars of a small YAML file (no YAML dependency in the core)."""
    out: dict[str, Any] = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"^([A-Za-z_][\w]*)\s*:\s*([^#\s][^#]*?)\s*(?:#.*)?$", line)  # no indent: top level
                if m:
                    out.setdefault(m.group(1), m.group(2).strip("'\""))
    except (OSError, ValueError):  # unreadable, or not UTF-8 text
        pass
    return out


# Where the schedule of a Load T-LoRA node comes from (js/tlora_schedule.js `resolveSchedule` ports this; the
# frontend tier runs both on one table of cases).
SCHEDULE_SOURCES = ("file", "sliders", "all_ranks")


def resolve_schedule(defaults: Recorded, source: str, max_rank: int, min_rank: int,
                     alpha: float) -> tuple[int, int, float, str]:
    """(max_rank, min_rank, alpha, explanation) from a file's `schedule_defaults()` and the node's widgets.

    max_rank: the widget when > 0 (at most the file's rank), else the file's rank. file: min_rank and alpha as the
    file records them, each falling back to its slider where the file records nothing. sliders: the sliders.
    all_ranks: every rank at every step (min_rank = max_rank)."""
    file_rank = int(defaults["max_rank"][0])
    if max_rank and max_rank > file_rank:
        raise ValueError(f"max_rank override {max_rank} exceeds the file's rank {file_rank}")
    r = max_rank or file_rank
    if source == "file":
        mr = defaults["min_rank"] if defaults["min_rank"][1] != "default" else (min_rank, "slider")
        al = defaults["alpha"] if defaults["alpha"][1] != "default" else (alpha, "slider")
    elif source == "sliders":
        mr, al = (min_rank, "slider"), (alpha, "slider")
    elif source == "all_ranks":
        mr, al = (r, "all_ranks"), (1.0, "all_ranks")
    else:
        raise ValueError(f"schedule_source must be one of {', '.join(SCHEDULE_SOURCES)}, got {source!r}")
    why = (f"max_rank {r} ({'override' if max_rank else 'file rank'}), min_rank {mr[0]:g} ({mr[1]}), "
           f"alpha {al[0]:g} ({al[1]})")
    return int(r), int(mr[0]), float(al[0]), why
