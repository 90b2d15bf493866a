"""The names a stock LoRA loader reads for each trained module, for the rank-2R standard LoRA export
(`tlora_core.export`).

A whole layer gets kohya's name, `lora_unet_<ComfyUI module path with '_'>`: ComfyUI's key map has it for every weight
of the diffusion model, and it is what sd-scripts writes for the UNets and for Flux. A row slice of a fused weight
(Flux and SD3 q/k/v, Flux's proj_mlp) or a layer with reordered rows (`swap_scale_shift`) has no kohya name: it gets
the name ComfyUI's own key map (`comfy.lora.model_lora_keys_unet`) gives that very slice or reorder, diffusers'
`transformer.<module path>` first. A module ComfyUI's own map does not reach (a slice only this pack's key maps know)
has no name a stock loader reads: a run with the export is refused before any work. Training trains no text-encoder
module, so none is exported.
"""

from __future__ import annotations

import comfy.lora

from ...tlora_core import TLoRAError
from .. import keymaps
from ..train_targets import TrainTarget

KOHYA_PREFIX = "lora_unet_"


def _identity(key: str, rows: tuple[int, int, int] | None, reorder) -> tuple:
    """What a key-map entry patches: the weight, its rows (dim, start, size), and the row order (function identity:
    the pack's key map hands on ComfyUI's own functions)."""
    return key, None if rows is None else tuple(rows), None if reorder is None else id(reorder)


def _preference(stem: str):
    """Sort key of a stock name for one module: diffusers' `transformer.<path>` of the module's own LyCORIS name
    first, other `transformer.` names next, then the rest, each group alphabetically."""
    def rank(name: str) -> tuple[int, str]:
        if name.startswith("transformer.") and name[len("transformer."):].replace(".", "_") == stem:
            return 0, name
        return (1 if name.startswith("transformer.") else 2), name
    return rank


def standard_names(model, targets: list[TrainTarget], out: str) -> dict[str, str]:
    """{module name: the name stock LoraLoader reads for its layer}; refuses a run (writing `out`) where a module
    has no such name."""
    names, missing = find_names(model, targets)
    if missing:
        raise TLoRAError(out, f"export_standard: {len(missing)} of {len(targets)} trained layers have no name that "
                              f"ComfyUI's LoraLoader reads on this {type(model).__name__} model (e.g. {missing[0]}): "
                              "a standard LoRA cannot hold them; switch export_standard off")
    return names


def find_names(model, targets: list[TrainTarget]) -> tuple[dict[str, str], list[str]]:
    """({module name: the name stock LoraLoader reads for its layer}, [modules with no such name, described])."""
    stock = comfy.lora.model_lora_keys_unet(model, {})
    ours = keymaps.model_key_map(model)  # what Load T-LoRA reads the export with: the same layer for every name
    by_identity: dict[tuple, list[str]] = {}
    for name, hit in stock.items():
        ident = _identity(*keymaps.split_hit(hit))
        if name in ours and _identity(*keymaps.split_hit(ours[name])) == ident:
            by_identity.setdefault(ident, []).append(name)
    names: dict[str, str] = {}
    missing: list[str] = []
    for t in targets:
        if t.out_slice is None and t.reorder is None:
            kohya = KOHYA_PREFIX + t.path.removeprefix("diffusion_model.").replace(".", "_")
            if stock.get(kohya) == t.key and ours.get(kohya) == t.key:
                names[t.name] = kohya
                continue
        rows = None if t.out_slice is None else (0, *t.out_slice)
        found = by_identity.get(_identity(t.key, rows, t.reorder))
        if found:
            names[t.name] = sorted(found, key=_preference(t.name.removeprefix("lycoris_")))[0]
        else:
            where = f"rows {t.out_slice[0]}..{sum(t.out_slice) - 1} of " if t.out_slice else ""
            missing.append(f"{t.name} ({where}{t.key})")
    return names, missing
