"""A T-LoRA file as one object: its modules as adapters, its format, and what it records about itself.

`load_tlora` reads any supported layout (see `layouts`); the file reading and pickle safety live in `fileio`,
the recorded schedule in `recorded`.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from typing import Any

from . import digest, layouts
from . import recorded as rec
from .adapter import ModuleAdapter
from .errors import TLoRAError
from .fileio import guess_other, is_pickle, read_state_dict
from .layouts import KOHYA, LYCORIS, OFFICIAL_ORTHO, OFFICIAL_VANILLA, PEFT, STANDARD_LAYOUTS

log = logging.getLogger("tlora.formats")

__all__ = ["KOHYA", "LYCORIS", "OFFICIAL_ORTHO", "OFFICIAL_VANILLA", "PEFT", "STANDARD_LAYOUTS", "TLoRA", "load_tlora"]

BASE_METADATA = "tlora_base"  # JSON: where a self-contained file's stored SVD base came from


@dataclass(frozen=True)
class TLoRA:
    path: str
    format: str
    modules: dict[str, ModuleAdapter]  # diffusion-model modules, keyed by name
    text_encoder_modules: dict[str, ModuleAdapter] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it is not used
    recorded: rec.Recorded = field(default_factory=dict)  # schedule values the file records
    metadata: dict[str, str] = field(default_factory=dict)
    # False where the trainer fed its mask a float timestep (official Flux pipeline: t = sigma * 1000)
    integer_timestep: bool = True

    @property
    def naming(self) -> str:
        return layouts.NAMING[self.format]

    @property
    def rank(self) -> int:
        ranks = [m.rank for m in self.modules.values()] or [m.rank for m in self.text_encoder_modules.values()]
        return max(ranks) if ranks else 0

    @property
    def needs_svd_base(self) -> bool:
        return any(m.needs_svd_base for m in self.modules.values())

    @property
    def stored_base(self) -> dict[str, Any] | None:
        """Where the SVD base of a self-contained LyCORIS file came from (None for other files)."""
        if self.format != LYCORIS or self.needs_svd_base:
            return None
        try:
            info = json.loads(self.metadata.get(BASE_METADATA, "{}"))
        except ValueError:
            info = {}
        return info if isinstance(info, dict) else {}

    def schedule_defaults(self) -> rec.Recorded:
        """max_rank, min_rank, alpha with their sources ('tensor shapes', metadata, sidecar, default)."""
        out: rec.Recorded = {"max_rank": (self.rank, "tensor shapes"), "min_rank": (1, "default"),
                                  "alpha": (1.0, "default")}
        out.update(self.recorded)
        return out


def load_tlora(path: str | os.PathLike[str], assume_vanilla: bool = False, sidecar: bool = True) -> TLoRA:
    """Read a T-LoRA file of any supported layout.

    assume_vanilla: accept a standard LoRA layout (kohya / PEFT) as a vanilla T-LoRA.
    sidecar: read schedule values from lycoris_config.json / hparams.yml beside the file.
    """
    path = os.fspath(path)
    sd, metadata = read_state_dict(path, lambda k: layouts.split_key(k) is not None)
    if not sd:
        raise TLoRAError(path, "the file holds no tensors")
    groups, families, unknown = layouts.group_tensors(sd)
    fmt = check_format(path, families, set(groups), list(sd), metadata, assume_vanilla)
    if unknown:
        log.warning("%s: %d tensors of unknown role ignored (e.g. %s)", os.path.basename(path), len(unknown),
                    unknown[0])
    modules: dict[str, ModuleAdapter] = {}
    te_modules: dict[str, ModuleAdapter] = {}
    skipped: dict[str, str] = {}
    for name in sorted(groups):
        g = groups[name]
        if not any(r in g for r in ("q", "p", "down", "up", "lam")):
            continue  # a stray alpha
        adapter = layouts.build(path, fmt, name, g, skipped)
        if adapter is not None:
            (te_modules if layouts.is_text_encoder(name) else modules)[adapter.name] = adapter
    if not modules and not te_modules:
        raise TLoRAError(path, f"no usable modules ({len(skipped)} skipped: {next(iter(skipped.values()), '')})")
    _check_stored_base(path, fmt, modules, sd, metadata)
    ranks = {m.rank for m in modules.values()}
    if len(ranks) > 1:
        log.info("%s: modules have different ranks %s; the schedule uses the largest", os.path.basename(path),
                 sorted(ranks))
    return TLoRA(path=path, format=fmt, modules=modules, text_encoder_modules=te_modules, skipped=skipped,
                 recorded=rec.recorded_schedule(path, metadata, sidecar), metadata=metadata,
                 integer_timestep=not (fmt == OFFICIAL_VANILLA and is_pickle(path)))


def check_format(path: str, families: set[str], module_names: set[str], keys: list[str], metadata: dict[str, str],
                 assume_vanilla: bool) -> str:
    """The file's format from its layout families and names; refuses mixed layouts and unmarked standard LoRAs."""
    if not families:
        raise TLoRAError(path, guess_other(keys))
    if len(families) > 1:
        raise TLoRAError(path, f"mixes several layouts ({', '.join(sorted(families))}); one file must use one")
    fmt = layouts.format_of(next(iter(families)), module_names)
    if fmt in STANDARD_LAYOUTS and not (assume_vanilla or rec.says_tlora(metadata)):
        raise TLoRAError(path, f"this is a standard LoRA ({fmt} layout) with no T-LoRA marker in its metadata. If it "
                               "was trained as a vanilla T-LoRA, switch on 'vanilla_tlora' (assume_vanilla); "
                               "otherwise load it with ComfyUI's LoraLoader")
    return fmt


def _check_stored_base(path: str, fmt: str, modules: dict[str, ModuleAdapter], sd: dict[str, Any],
                       metadata: dict[str, str]) -> None:
    """A self-contained LyCORIS file stores the base of every module, unchanged since it was written."""
    if fmt != LYCORIS:
        return
    stored = sum(1 for m in modules.values() if m.base_down is not None)
    if stored == 0:
        return
    again = "write it again with 'Save T-LoRA with base'"
    if stored < len(modules):
        raise TLoRAError(path, f"stores the SVD base of {stored} of {len(modules)} modules: a self-contained file "
                               f"stores all of them (truncated or edited?); {again}")
    try:
        record = json.loads(metadata.get(BASE_METADATA, "{}"))
        want, version = record.get("digest"), int(record.get("version", 1))
    except (ValueError, AttributeError, TypeError):
        want, version = None, 0
    if not want:
        raise TLoRAError(path, f"stores an SVD base without the '{BASE_METADATA}' record of it (not written by "
                               f"'Save T-LoRA with base'); {again}")
    if version not in digest.FORMAT_SALTS:
        raise TLoRAError(path, f"its stored SVD base is in format version {version}, which this version of the pack "
                               "does not know (written by a newer ComfyUI-TLoRA?): update ComfyUI-TLoRA")
    if digest.stored_base_digest(sd, version) != want:
        raise TLoRAError(path, f"its stored SVD base was changed after it was written (digest mismatch): the file "
                               f"is damaged or edited; {again}")
