"""What Train T-LoRA trains on a ComfyUI model, and under which names: the reverse of the loader's key maps.

`keymaps.model_key_map` maps every `lycoris_<diffusers path>` name a trainer writes onto a ComfyUI weight, a row
slice of a fused weight, or a weight with reordered rows. Read backwards it gives, for each layer (or row slice),
the name LyCORIS gives the same module on the diffusers model: so a file trained here has exactly the names the
loader and LyCORIS read, for every family the loader runs, fused q/k/v and reordered rows included.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

import comfy.utils
import torch

from . import keymaps
from .plan import RowTransform

ATTENTION, ATTENTION_FF, ALL_LINEARS = "attention", "attention+feed_forward", "all_linears"
PRESETS = (ATTENTION, ATTENTION_FF, ALL_LINEARS)
# LyCORIS class presets that select the same modules on the diffusers model (recorded in the file's config)
LYCORIS_CLASSES = {ATTENTION: ["Attention"], ATTENTION_FF: ["Attention", "FeedForward"], ALL_LINEARS: None}

_TE = re.compile(r"^lycoris_te\d?_")
# the projections of an attention module, by the names diffusers' attention classes give them
_ATTN = re.compile(r"(?:^|_)(?:attn\d?|attention|self_attn|cross_attn|audio_attn\d?|[a-z]+_to_[a-z]+_attn)_"
                   r"(?:to_q|to_k|to_v|to_out(?:_0)?|add_q_proj|add_k_proj|add_v_proj|to_add_out|to_qkv\w*|"
                   r"q_proj|k_proj|v_proj|o_proj|to_gate_logits)$")
_FF = re.compile(r"(?:^|_)(?:ff|ff_context|ffn|feed_forward|mlp|img_mlp|txt_mlp|audio_ff)_"
                 r"(?:net_0_proj|net_2|linear_in|linear_out|proj_in|proj_out|fc1|fc2|w1|w2|w3|\d+)$|_proj_mlp$")


@dataclass(frozen=True)
class TrainTarget:
    """One trainable module: its LyCORIS name and the layer (or rows of a fused layer) it patches."""

    name: str  # lycoris_<diffusers module path>
    path: str  # the layer's module path in the BaseModel
    key: str  # its weight key
    out_features: int
    in_features: int
    out_slice: tuple[int, int] | None = None
    reorder: RowTransform | None = None
    conv: bool = False


def _selected(name: str, preset: str) -> bool:
    if preset == ALL_LINEARS:
        return True
    if _ATTN.search(name):
        return True
    return preset == ATTENTION_FF and bool(_FF.search(name))


def trainable_targets(model: torch.nn.Module, preset: str) -> list[TrainTarget]:
    """Every Linear / 1x1-conv module of the diffusion model that the key maps name, selected by `preset`; one name
    per target: where several spellings reach one layer, the first the key map holds (ComfyUI's own map comes first,
    and lists a model's diffusers spelling before aliases it accepts for other models, e.g. Flux's `ff.net.0.proj`
    before Flux 2's `ff.linear_in`)."""
    if preset not in PRESETS:
        raise ValueError(f"targets must be one of {', '.join(PRESETS)}, got {preset!r}")
    key_map = keymaps.model_key_map(model)
    sd = model.state_dict()
    found: dict[tuple, TrainTarget] = {}
    for name in key_map:
        if not name.startswith("lycoris_") or _TE.match(name) or not _selected(name, preset):
            continue
        key, rows, reorder = keymaps.split_hit(key_map[name])
        if not key.endswith(".weight") or key not in sd:
            continue
        w = sd[key]
        if w.ndim not in (2, 4) or (w.ndim == 4 and tuple(w.shape[2:]) != (1, 1)):
            continue
        if rows is not None and rows[0] != 0:
            continue
        out_slice = None if rows is None else (rows[1], rows[2])
        ident = (key, out_slice)
        if ident in found:
            continue
        path = key[: -len(".weight")]
        if not isinstance(comfy.utils.get_attr(model, path), (torch.nn.Linear, torch.nn.Conv2d)):
            continue
        found[ident] = TrainTarget(name, path, key, out_slice[1] if out_slice else int(w.shape[0]), int(w.shape[1]),
                                   out_slice, reorder, w.ndim == 4)
    return sorted(found.values(), key=lambda t: t.name)
