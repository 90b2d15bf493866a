"""Who wrote a T-LoRA file, from its tensor names and metadata, and what that trainer did that the file may not say.

Trainers differ in three things a loader must reproduce: the layout (one rank per index, or a rank-2R export whose
rank i and rank R + i switch together), the curve of the active rank over t (`schedule.CURVES`), and their
defaults for what the file does not record (min_rank, the curve's exponent). `identify` names the writer and says
what was assumed; the README's writers table lists them.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from .schedule import COSINE, LINEAR, POWER, POWER_CEIL

Recorded = dict[str, tuple[float, str]]

RANKS = "ranks"  # rank i of the file is rank i of the schedule
PAIRS = "pairs"  # a rank-2R export: up = [P diag(l), -P0 diag(l0)], down = [Q; Q0]; rank i goes with rank R + i
STANDARD_LAYOUTS = ("auto", RANKS, PAIRS)
# the metadata record of this pack's own rank-2R export (tlora_core.export), and its creator
PACK_EXPORT = "tlora_export"
PACK_EXPORT_CREATOR = "ComfyUI-TLoRA Train T-LoRA"


@dataclass(frozen=True)
class Writer:
    id: str
    title: str
    curve: str = POWER
    integer_timestep: bool = True  # False: the trainer fed its mask sigma * 1000 (or sigma) unrounded
    defaults: Recorded = field(default_factory=dict)  # the trainer's own values where the file records none
    assumed: str = ""  # what the pack assumes that the file does not say, and how to change it
    found: Recorded = field(default_factory=dict)  # schedule values read from writer-specific metadata


def _json(metadata: dict[str, str], key: str) -> dict[str, Any]:
    try:
        cfg = json.loads(metadata.get(key) or "{}")
    except (ValueError, RecursionError):
        return {}
    return cfg if isinstance(cfg, dict) else {}


def _num(value: Any) -> float | None:
    try:
        num = float(value)
    except (TypeError, ValueError):
        return None
    return num if math.isfinite(num) else None


def _dim(metadata: dict[str, str]) -> float | None:
    """The rank the trainer was asked for (kohya `ss_network_dim`, SimpleTuner `linear_dim`)."""
    return _num(metadata.get("ss_network_dim")) or _num(_json(metadata, "lycoris_config").get("linear_dim"))


def standard_layout(metadata: dict[str, str], rank: int, choice: str = "auto") -> tuple[str, str]:
    """(RANKS or PAIRS, why) for a T-LoRA in a standard LoRA layout (lora_down / lora_up) of tensor rank `rank`.

    LyCORIS' tlora export (the fork of LyCORIS pull request 280, and its `tools/convert_tlora.py`) writes rank 2R with
    alpha 2a: its `lycoris_config` or `ss_network_args` says `algo: tlora`, and the rank it records is half the
    tensors'. AnimaLoraStudio's LoCon path also says `algo: tlora`, at the recorded rank. convert_tlora.py records
    nothing at all: such a file is loaded with `standard_layout` = pairs. This pack's own export says so in its
    `tlora_export` record."""
    if choice not in STANDARD_LAYOUTS:
        raise ValueError(f"standard_layout must be one of {', '.join(STANDARD_LAYOUTS)}, got {choice!r}")
    if choice != "auto":
        return choice, f"standard_layout '{choice}' (set on the node)"
    own = _json(metadata, PACK_EXPORT)
    if own.get("creator") == PACK_EXPORT_CREATOR and rank % 2 == 0 and _num(own.get("rank")) == rank // 2:
        return PAIRS, f"{PACK_EXPORT_CREATOR}'s rank-2R export of a rank-{rank // 2} T-LoRA ('{PACK_EXPORT}' record)"
    dim = _dim(metadata)
    args = _json(metadata, "ss_network_args")
    if metadata.get("ss_network_module") == ORANGEMAGIC_ANIMA and not any(k.startswith("ss_tlora_") for k in metadata):
        return PAIRS, "the `_comfy` rank-2R export of networks.lora_tlora_anima (no ss_tlora_* settings)"
    says = any(str(cfg.get("algo", "")).lower() == "tlora"
               for cfg in (_json(metadata, "lycoris_config"), args))
    if says and dim is not None and rank % 2 == 0 and int(dim) * 2 == rank:
        return PAIRS, f"LyCORIS tlora export: tensor rank {rank} is twice the recorded rank {int(dim)}"
    if says and dim is None and rank % 2 == 0 and "model_family" not in args and "source_algo" not in args:
        return PAIRS, ("LyCORIS tlora export ('algo: tlora' in a standard layout); if ranks are not paired, set "
                       "standard_layout to 'ranks'")
    return RANKS, "one rank per index"


ORANGEMAGIC_ANIMA = "networks.lora_tlora_anima"  # orangemagic123/sd-scripts
TRAINED = "train_tlora"  # written by this pack's Train T-LoRA
TRAINED_METADATA = "tlora_training"  # its run record (tlora_core.training.METADATA)
PACK_WRITERS = ("self_contained", TRAINED)  # files this pack wrote: their `tlora_base` record names the checkpoint
_EVERY_RANK_PREVIEWS = ("its trainer samples with every rank (schedule_source 'all_ranks' to match its previews); "
                        "the schedule runs it as it was trained")


def _lora_scripts_next(metadata: dict[str, str], state: dict[str, float], rank: int) -> Writer:
    """wochenlong/lora-scripts-next `networks.tlora_anima`: t = sigma (post-shift, unrounded), a cosine or linear
    curve, floor; settings in `ss_tlora_*` (newer), `*_state` tensors (mid-2026), `ss_network_args`."""
    args = _json(metadata, "ss_network_args")
    found: Recorded = {}
    if "min_rank" in state:
        found["min_rank"] = (int(state["min_rank"]), "tlora_min_rank_state tensors")
    sched = None
    for sc in (metadata.get("ss_tlora_rank_schedule"), state.get("schedule"), args.get("tlora_rank_schedule")):
        if sched is None and sc is not None:
            sched = {0: "linear", 1: "cosine"}.get(int(sc)) if isinstance(sc, float) else str(sc).lower()
    masked = any(k.startswith("ss_tlora_") for k in metadata) or bool(state) or \
        metadata.get("ss_adapter_algorithm") == "timestep_lora"
    title = "lora-scripts-next (networks.tlora_anima)"
    if not masked:  # its first releases never passed the timestep to the network: trained with every rank
        return Writer("lora_scripts_next_unmasked", title, defaults={"min_rank": (rank, "trained without a mask "
                      "(no ss_tlora_* metadata)")},
                      assumed="no ss_tlora_* metadata: written by a release that trained with every rank active; "
                              "run as trained (every rank), or set schedule_source to 'sliders' to try a schedule")
    curve = LINEAR if sched == "linear" else COSINE
    assumed = "" if sched else "its rank schedule is not recorded: cosine assumed (the trainer's default)"
    return Writer("lora_scripts_next", title, curve=curve, integer_timestep=False, found=found,
                  defaults={"min_rank": (1, "default")}, assumed=assumed)


def identify(fmt: str, names: set[str], metadata: dict[str, str], rank: int, stored_base: bool,
             has_record: bool, layout: str = RANKS, state: dict[str, float] | None = None) -> Writer:
    """The writer of a file of format `fmt` (tlora_core.layouts) with these module names and metadata."""
    args = _json(metadata, "ss_network_args")
    module = metadata.get("ss_network_module", "")
    if module == ORANGEMAGIC_ANIMA:  # t = sigma (first sample), int(), T = 1
        return Writer("orangemagic_tlora_anima", "orangemagic123/sd-scripts (networks.lora_tlora_anima)",
                      integer_timestep=False, assumed=_EVERY_RANK_PREVIEWS)
    if fmt in ("official_ortho", "official_vanilla"):
        return Writer("official", "ControlGenAI/T-LoRA (the paper's repository)")
    if fmt == "lycoris_tlora":
        if TRAINED_METADATA in metadata:  # Train T-LoRA's run record (with or without a stored base)
            return Writer(TRAINED, "ComfyUI-TLoRA (Train T-LoRA)")
        if has_record:
            return Writer("self_contained", "ComfyUI-TLoRA (Save T-LoRA with base)")
        if any(n.startswith("tlora_") for n in names) or metadata.get("ss_adapter_module") == "library.adapters.tlora":
            return Writer("enferlain", "Enferlain/sd-scripts (library.adapters.tlora)",
                          assumed="min_rank and mask_alpha are not recorded: the trainer's defaults (1 and 1.0) "
                                  "are assumed; files from before its 2026-05-04 release were trained without a mask "
                                  "(schedule_source 'all_ranks')")
        if stored_base and module == "lycoris.kohya":
            r = int(_dim(metadata) or rank)
            return Writer("sd_scripts_67372a", "sd-scripts + LyCORIS fork (67372a)",
                          defaults={"min_rank": (math.ceil(r / 2), "the trainer's default ceil(rank / 2)")})
        if stored_base:
            return Writer("lycoris_stored_base", "a LyCORIS-layout trainer that stores its base",
                          assumed="no known trainer's marker: LyCORIS' schedule defaults (min_rank 1, alpha 1)")
        return Writer("simpletuner", "SimpleTuner / LyCORIS (algo tlora)")
    if layout == PAIRS and _json(metadata, PACK_EXPORT).get("creator") == PACK_EXPORT_CREATOR:
        return Writer("tlora_train_export", f"{PACK_EXPORT_CREATOR} (rank-2R export)")
    if layout == PAIRS:
        return Writer("lycoris_export", "LyCORIS tlora export (rank 2R, pull request 280 / convert_tlora.py)")
    if module == "networks.tlora_anima" or metadata.get("ss_adapter_algorithm") == "timestep_lora" or state:
        return _lora_scripts_next(metadata, state or {}, rank)
    if module == "lycoris.kohya" and (args.get("source_algo") == "tlora_ortho" or args.get("model_family")
                                      or str(args.get("algo", "")).lower() == "tlora"):
        return Writer("anima_lora_studio", "AnimaLoraStudio (lora_type tlora)", curve=POWER_CEIL,
                      integer_timestep=False,
                      assumed="min_rank and the exponent are not recorded: the trainer's defaults (1 and 1.0) are "
                              "assumed (AnimaLoraStudio's own previews run every rank: schedule_source "
                              "'all_ranks' for those)")
    if module == "networks.lora_anima":  # sorryhyun/anima_lora: ranks i < the float rank, t = sigma (batch mean)
        return Writer("anima_lora", "sorryhyun/anima_lora (use_timestep_mask)", curve=POWER_CEIL,
                      integer_timestep=False, assumed=("min_rank and alpha_rank_scale are recorded only when given as "
                                                       "network_args (else its defaults 1 and 1.0); " +
                                                       _EVERY_RANK_PREVIEWS))
    return Writer("vanilla", "a vanilla T-LoRA in a standard LoRA layout",
                  assumed="the trainer is not recorded: LyCORIS' schedule (int(((T - t) / T) ** alpha * (R - Rmin)) "
                          "+ Rmin) with the sliders' min_rank and alpha")
