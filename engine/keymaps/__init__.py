"""Map a T-LoRA file's module names onto a ComfyUI model's weights.

Built on ComfyUI's own key map (`comfy.lora.model_lora_keys_unet`), which knows the `lycoris_` and diffusers names
of UNets, SD3, Flux, HiDream, Qwen-Image, Z-Image and more, including row slices of fused weights (Flux qkv).
What it lacks per family (diffusers names of Flux 2, Wan, HunyuanVideo, ...) is added by the family modules
below, keyed by ComfyUI model class. Every file name is tried in the spellings that map uses.

The tests' tiny twins (`tools/families`) keep their own diffusers -> ComfyUI maps, on purpose. Theirs convert whole
checkpoints (biases, norms, modulation tables, embeddings, fused weights assembled) before any ComfyUI model exists;
these resolve LoRA module names against a loaded model and cover Linear weights only, so a shared map would be two
half-maps joined by glue. Kept apart, every family test checks the maps here against a second encoding written from
the diffusers side: a wrong name, slice or row order here shows as a T-LoRA effect that misses LyCORIS' (a wrong
map there shows as ComfyUI's base forward missing diffusers'). A ComfyUI rename is fixed here; the twins follow only
when ComfyUI changes what its checkpoints look like.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable

import comfy.lora

from . import auraflow, chroma, flux2, hunyuan_image, hunyuan_video, longcat, ltx, lumina2, pixart, wan

AddKeys = Callable[[object, dict], None]
_FAMILIES = (flux2, chroma, longcat, auraflow, pixart, lumina2, wan, hunyuan_video, hunyuan_image, ltx)

# ComfyUI model_base class name -> what this pack adds to ComfyUI's key map for it (subclasses included)
EXTRA: dict[str, list[AddKeys]] = {}
for _m in _FAMILIES:
    for _cls, _add in _m.EXTRA.items():
        EXTRA.setdefault(_cls, []).append(_add)
# (pattern over module names, family): most specific first; the generic ones last
FAMILY_HINTS: tuple[tuple[str, str], ...] = (
    *(h for _m in _FAMILIES for h in _m.HINTS),
    (r"double_blocks|single_blocks|single_transformer_blocks|transformer_blocks\.\d+\.attn\.add_q_proj"
     r"|transformer_blocks_\d+_attn_add_q_proj|context_embedder|x_embedder", "a DiT (Flux / SD3 family)"),
    (r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block", "a UNet (SD1.5 / SDXL family)"),
    (r"blocks\.\d+\.(self_attn|cross_attn)|blocks_\d+_(self_attn|cross_attn)", "a Wan-style video DiT"),
)


def model_key_map(model) -> dict:
    """ComfyUI's LoRA key map for this BaseModel plus the family's additions: name -> weight key,
    `(key, (dim, start, size))` or `(key, None, row_fn)`."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    for cls in type(model).__mro__:
        for add in EXTRA.get(cls.__name__, ()):
            add(model, key_map)
    return key_map


def split_hit(hit) -> tuple[str, tuple[int, int, int] | None, Callable | None]:
    """(weight key, row slice (dim, start, size) or None, row transform or None) of one key-map entry."""
    if isinstance(hit, str):
        return hit, None, None
    return hit[0], hit[1], hit[2] if len(hit) > 2 else None


# Enferlain/sd-scripts names modules by component: `tlora_unet_`, `tlora_mmdit_`, `tlora_clip_l_`, ... + the
# component's own module path: ComfyUI's kohya spellings of the same path
_COMPONENTS = (("tlora_unet_", ("lora_unet_",)), ("tlora_mmdit_", ("lora_unet_",)),
               ("tlora_clip_l_", ("lora_te_", "lora_te1_")), ("tlora_clip_g_", ("lora_te2_",)),
               ("tlora_t5xxl_", ("lora_te3_",)))


def candidates(name: str, naming: str) -> list[str]:
    """Spellings of one module name that the key map may hold."""
    for prefix, spellings in _COMPONENTS:
        if name.startswith(prefix):
            return [s + name[len(prefix):] for s in spellings]
    out = [name]
    if naming == "diffusers":
        flat = name.replace(".", "_")
        out += [f"lycoris_{flat}", f"transformer.{name}", f"unet.{name}", f"diffusion_model.{name}",
                f"lora_unet_{flat}", f"lora_transformer_{flat}"]
    elif naming == "lycoris":
        stem = name[len("lycoris_"):] if name.startswith("lycoris_") else name
        out += [f"lora_unet_{stem}", f"lora_transformer_{stem}"]
        if stem.startswith("te"):  # text-encoder modules: ComfyUI's CLIP key map knows kohya's lora_te spelling
            out.append(f"lora_{stem}")
    elif naming == "kohya":
        if name.startswith("lycoris_"):
            out.append("lora_unet_" + name[len("lycoris_"):])
    return out


def resolve(name: str, naming: str, key_map: dict):
    for cand in candidates(name, naming):
        hit = key_map.get(cand)
        if hit is not None:
            return hit
    return None


def guess_family(names: Iterable[str]) -> str | None:
    text = " ".join(list(names)[:500])
    for pattern, family in FAMILY_HINTS:
        if re.search(pattern, text):
            return family
    return None
