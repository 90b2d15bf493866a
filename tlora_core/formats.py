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

from . import digest, layouts, writers
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
    writer: writers.Writer = field(default_factory=lambda: writers.Writer("unknown", "unknown"))
    layout_why: str = ""  # how a standard layout was read (ranks or pairs), and why
    ignored: tuple[str, ...] = ()  # tensors of no known role (DoRA scales, Tucker mids, ...): not used
    reading: tuple[bool, str] = (False, "auto")  # how it was read: (assume_vanilla, standard_layout)

    @property
    def curve(self) -> str:
        return self.writer.curve

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
        return schedule_defaults(self.rank, self.writer, self.recorded)


def schedule_defaults(rank: int, writer: writers.Writer, recorded: rec.Recorded) -> rec.Recorded:
    """What the file records, over what its writer does by default, over LyCORIS' defaults."""
    out: rec.Recorded = {"max_rank": (rank, "tensor shapes"), "min_rank": (1, "default"), "alpha": (1.0, "default")}
    for src in (writer.defaults, writer.found, recorded):
        out.update(src)
    if out["min_rank"][0] > rank:  # a writer default of "every rank" (or a recorded value above the file's rank)
        out["min_rank"] = (rank, out["min_rank"][1])
    return out


# lora-scripts-next's per-module schedule tensors (mid-2026): suffix -> setting
STATE_SUFFIXES = ((".tlora_min_rank_state", "min_rank"), (".tlora_rank_schedule_state", "schedule"))


def _state(sd: dict[str, Any]) -> dict[str, float]:
    """lora-scripts-next's per-module schedule tensors (the first of each)."""
    out = {}
    for suffix, key in STATE_SUFFIXES:
        hit = next((k for k in sd if k.endswith(suffix)), None)
        if hit is not None and sd[hit].numel() == 1:
            out[key] = float(sd[hit].float().reshape(()).item())
    return out


def classify(path: str, families: set[str], groups: dict[str, dict[str, Any]], keys: list[str],
             metadata: dict[str, str], assume_vanilla: bool, standard_layout: str = "auto",
             state: dict[str, float] | None = None) -> tuple[str, writers.Writer, str]:
    """(format, writer, how a standard layout was read) of a file, from its tensor names, shapes (`groups`: module ->
    role -> tensor or shape) and metadata; refuses what is not a T-LoRA (see `check_format`)."""
    explicit_pairs = standard_layout == writers.PAIRS
    fmt = check_format(path, families, set(groups), keys, metadata, assume_vanilla or explicit_pairs)
    shapes = [tuple(g[r].shape if hasattr(g[r], "shape") else g[r]) for g in groups.values()
              for r in ("q", "down") if r in g]
    rank = max((s[0] for s in shapes if s), default=0)
    why = ""
    if fmt in STANDARD_LAYOUTS:
        try:
            layout, why = writers.standard_layout(metadata, rank, standard_layout)
        except ValueError as e:
            raise TLoRAError(path, str(e)) from None
        if layout == writers.PAIRS:
            fmt, rank = (layouts.EXPORT if fmt == KOHYA else layouts.EXPORT_PEFT), rank // 2
    stored = fmt == LYCORIS and bool(groups) and all("q0" in g for g in groups.values() if "q" in g)
    writer = writers.identify(fmt, set(groups), metadata, rank, stored, BASE_METADATA in metadata,
                              writers.PAIRS if fmt in layouts.EXPORTS else writers.RANKS, state)
    return fmt, writer, why


def load_tlora(path: str | os.PathLike[str], assume_vanilla: bool = False, sidecar: bool = True,
               standard_layout: str = "auto") -> TLoRA:
    """Read a T-LoRA file of any supported layout.

    assume_vanilla: accept a standard LoRA layout (kohya / PEFT) as a vanilla T-LoRA.
    sidecar: read schedule values from lycoris_config.json / hparams.yml beside the file.
    standard_layout: how a standard layout's ranks are gated: auto (what the file says), ranks, or pairs (LyCORIS'
    rank-2R tlora export; implies assume_vanilla).
    """
    path = os.fspath(path)
    sd, metadata = read_state_dict(path, lambda k: layouts.split_key(k) is not None)
    if not sd:
        raise TLoRAError(path, "the file holds no tensors")
    groups, families, unknown = layouts.group_tensors(sd)
    fmt, writer, layout_why = classify(path, families, groups, list(sd), metadata, assume_vanilla, standard_layout,
                                       _state(sd))
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
    if writer.assumed:
        log.info("%s: written by %s; %s", os.path.basename(path), writer.title, writer.assumed)
    return TLoRA(path=path, format=fmt, modules=modules, text_encoder_modules=te_modules, skipped=skipped,
                 recorded=rec.recorded_schedule(path, metadata, sidecar), metadata=metadata,
                 integer_timestep=writer.integer_timestep and not (fmt == OFFICIAL_VANILLA and is_pickle(path)),
                 writer=writer, layout_why=layout_why, ignored=tuple(unknown),
                 reading=(bool(assume_vanilla), standard_layout))


def check_format(path: str, families: set[str], module_names: set[str], keys: list[str], metadata: dict[str, str],
                 assume_vanilla: bool) -> str:
    """The file's format from its layout families and names; refuses mixed layouts and unmarked standard LoRAs."""
    for pattern, what in layouts.NOT_TLORA:
        if any(pattern.search(k) for k in keys):
            raise TLoRAError(path, what)
    if not families:
        raise TLoRAError(path, guess_other(keys))
    if len(families) > 1:
        raise TLoRAError(path, f"mixes several layouts ({', '.join(sorted(families))}); one file must use one")
    fmt = layouts.format_of(next(iter(families)), module_names)
    if fmt in STANDARD_LAYOUTS and not (assume_vanilla or rec.says_tlora(metadata)):
        raise TLoRAError(path, f"this is a standard LoRA ({fmt} layout) with no T-LoRA marker in its metadata. If it "
                               "was trained as a vanilla T-LoRA, switch on 'vanilla_tlora' (assume_vanilla), or "
                               "set standard_layout to 'pairs' for LyCORIS' rank-2R tlora export (convert_tlora.py); "
                               "otherwise load it with ComfyUI's LoraLoader")
    return fmt


def _check_stored_base(path: str, fmt: str, modules: dict[str, ModuleAdapter], sd: dict[str, Any],
                       metadata: dict[str, str]) -> None:
    """A LyCORIS-layout file that stores a base stores it for every module; one written by this pack (with its
    `tlora_base` record) is unchanged since it was written. Trainers that store the base they trained against
    (Enferlain/sd-scripts, 67372a's LyCORIS) write no record: their stored base is used as it is."""
    if fmt != LYCORIS:
        return
    stored = sum(1 for m in modules.values() if m.base_down is not None)
    if stored == 0:
        return
    again = "write it again with 'Save T-LoRA with base'"
    if stored < len(modules):
        raise TLoRAError(path, f"stores the SVD base of {stored} of {len(modules)} modules: a file that stores its "
                               f"base stores all of them (truncated or edited?); {again}")
    if BASE_METADATA not in metadata:
        return
    try:
        record = json.loads(metadata.get(BASE_METADATA, "{}"))
        want, version = record.get("digest"), int(record.get("version", 1))
    except (ValueError, AttributeError, TypeError):
        want, version = None, 0
    if not want:
        raise TLoRAError(path, f"its '{BASE_METADATA}' record has no digest of the stored SVD base (edited "
                               f"metadata?); {again}")
    if version not in digest.FORMAT_SALTS:
        raise TLoRAError(path, f"its stored SVD base is in format version {version}, which this version of the pack "
                               "does not know (written by a newer ComfyUI-TLoRA?): update ComfyUI-TLoRA")
    if digest.stored_base_digest(sd, version) != want:
        raise TLoRAError(path, f"its stored SVD base was changed after it was written (digest mismatch): the file "
                               f"is damaged or edited; {again}")
