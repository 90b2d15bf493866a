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
# No LyCORIS class preset for any targets value: LyCORIS' "Attention" / "FeedForward" classes select other modules
# than these on some families (none of diffusers' Flux attention, whose class is FluxAttention). The file's config
# names the trained modules instead (`tlora_core.training.module_preset`, recorded by `write_trained`).
LYCORIS_CLASSES: dict[str, list[str] | None] = {ATTENTION: None, ATTENTION_FF: None, ALL_LINEARS: None}

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


# Flux 2's names of a single block's fused layers, which ComfyUI's Flux map (0.33) also gives Flux 1 models, whose
# diffusers blocks split linear1 into to_q / to_k / to_v / proj_mlp (reached by row slices) and call linear2 proj_out
_FLUX2_SINGLE = re.compile(r"^lycoris_single_transformer_blocks_\d+_attn_(?:to_qkv_mlp_proj|to_out)$")
# Flux.1's diffusers names that ComfyUI's map also gives Flux.2 (whose diffusers model fuses the single blocks' q/k/v
# and MLP into `attn.to_qkv_mlp_proj`, and names its feed-forward `linear_in/out`, its embedders `time_guidance_embed`)
_FLUX1_ONLY = re.compile(r"^lycoris_(?:single_transformer_blocks_\d+_(?:attn_to_[qkv]|proj_mlp|proj_out)|"
                         r"time_text_embed_\w+|transformer_blocks_\d+_ff(?:_context)?_net_\w+)$")


def _foreign(model: torch.nn.Module, name: str) -> bool:
    """A name ComfyUI's key map gives this model that diffusers' model of its family does not have: trained under it,
    a layer would get a name LyCORIS and diffusers do not know, or be trained twice (whole and by slices)."""
    classes = {c.__name__ for c in type(model).__mro__}
    if "Flux" in classes and "Flux2" not in classes and _FLUX2_SINGLE.match(name):
        return True
    if "Flux2" in classes and _FLUX1_ONLY.match(name):
        return True
    # the UNet map names label_emb both `class_embedding` (diffusers' unCLIP UNet) and `add_embedding` (SDXL-style)
    return name.startswith("lycoris_add_embedding_" if "SD21UNCLIP" in classes else "lycoris_class_embedding_")


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
    before Flux 2's `ff.linear_in`); never a name the family's diffusers model lacks (`_foreign`)."""
    if preset not in PRESETS:
        raise ValueError(f"targets must be one of {', '.join(PRESETS)}, got {preset!r}")
    key_map = keymaps.model_key_map(model)
    sd = model.state_dict()
    found: dict[tuple, TrainTarget] = {}
    for name in key_map:
        if not name.startswith("lycoris_") or _TE.match(name) or not _selected(name, preset) or _foreign(model, name):
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
