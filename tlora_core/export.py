"""A trained T-LoRA as a rank-2R standard LoRA: one file every LoRA loader applies (every rank, no schedule) and
Load T-LoRA reads back with its schedule.

Per module (the layout of LyCORIS' tlora export, pull request 280 / `tools/convert_tlora.py`):

    lora_up = [P diag(lambda), -P0 diag(lambda0)]  (out, 2R)     lora_down = [Q; Q0]  (2R, in)     alpha = 2a

so lora_up @ lora_down = P diag(lambda) Q - P0 diag(lambda0) Q0 and alpha / 2R = a / R: a standard loader adds the
T-LoRA's change at every rank, what merging it does. Rank i of the schedule is column i and column R + i together.
1x1 convolutions are saved 4-D, `(out, 2R, 1, 1)` / `(2R, in, 1, 1)`, as kohya saves them. Tensors are float32: the
two halves are large and nearly cancel, so half precision would bury the trained change in round-off.

The metadata says what the file is: `lycoris_config` with `algo: tlora` and the T-LoRA's rank (half the tensors',
LyCORIS' own mark of the export), the schedule (`linear_dim`, `tlora_min_rank`, `tlora_alpha`) and a `tlora_export`
record naming its creator (`writers.PACK_EXPORT`), by which Load T-LoRA recognises it and reads it as pairs. The
caller names the modules: for each layer, a name that a standard loader reads.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

import torch

from .embed import write_atomically
from .training import METADATA, TrainableTLoRA
from .writers import PACK_EXPORT, PACK_EXPORT_CREATOR, PAIRS

SUFFIX = ".standard.safetensors"


def standard_path(path: str) -> str:
    """Where the export of the T-LoRA at `path` goes: `<stem>.standard.safetensors` beside it."""
    stem = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
    return stem + SUFFIX


def export_factors(m: TrainableTLoRA) -> tuple[torch.Tensor, torch.Tensor, float]:
    """(lora_down (2R, in), lora_up (out, 2R), alpha) of one trained module, float32 on the CPU."""
    q, p, lam = (t.detach().float().cpu() for t in (m.q, m.p, m.lam))
    q0, p0, lam0 = (t.detach().float().cpu() for t in (m.q0, m.p0, m.lam0))
    down = torch.cat([q, q0], dim=0)
    up = torch.cat([p * lam[None, :], -(p0 * lam0[None, :])], dim=1)
    return down, up, 2.0 * m.scale * m.rank


def export_tensors(modules: Mapping[str, TrainableTLoRA], names: Mapping[str, str]) -> dict[str, torch.Tensor]:
    """Standard LoRA tensors (`<name>.lora_down.weight`, `.lora_up.weight`, `.alpha`) of every module, under the name
    `names` gives it."""
    missing = sorted(set(modules) - set(names))
    if missing:
        raise ValueError(f"no standard LoRA name for {len(missing)} modules (e.g. {missing[0]})")
    if len(set(names[n] for n in modules)) != len(modules):
        raise ValueError("two modules share one standard LoRA name")
    out: dict[str, torch.Tensor] = {}
    for name, m in sorted(modules.items()):
        down, up, alpha = export_factors(m)
        tail = (1, 1) if m.conv else ()
        key = names[name]
        out[f"{key}.lora_down.weight"] = down.reshape(*down.shape, *tail).contiguous()
        out[f"{key}.lora_up.weight"] = up.reshape(*up.shape, *tail).contiguous()
        out[f"{key}.alpha"] = torch.tensor(alpha)
    return out


def export_metadata(config: Mapping[str, Any], training: Mapping[str, Any], source: str) -> dict[str, str]:
    """What the export says about itself: LyCORIS' config (its rank is the T-LoRA's, half the tensors'), the
    schedule, the training record and the `tlora_export` record."""
    rank = int(config["linear_dim"])
    record = {"creator": PACK_EXPORT_CREATOR, "layout": PAIRS, "rank": rank, "tensor_rank": 2 * rank,
              "min_rank": config["tlora_min_rank"], "alpha": config["tlora_alpha"], "source": source,
              "about": "rank-2R standard LoRA of a T-LoRA: lora_up = [P diag(lambda), -P0 diag(lambda0)], "
                       "lora_down = [Q; Q0], alpha 2a; rank i and rank R + i switch together"}
    return {"lycoris_config": json.dumps(dict(config), sort_keys=True),
            METADATA: json.dumps(dict(training), sort_keys=True),
            "linear_dim": str(rank), "tlora_min_rank": str(config["tlora_min_rank"]),
            "tlora_alpha": str(config["tlora_alpha"]), PACK_EXPORT: json.dumps(record, sort_keys=True)}


def write_export(path: str, modules: Mapping[str, TrainableTLoRA], names: Mapping[str, str],
                 config: Mapping[str, Any], training: Mapping[str, Any], source: str) -> str:
    """Write the rank-2R standard LoRA of `modules` to `path` atomically; `source`: the T-LoRA file's name."""
    return write_atomically(export_tensors(modules, names), path, export_metadata(config, training, source))

