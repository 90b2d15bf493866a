"""Map a T-LoRA file's module names onto a ComfyUI model's weights.

Built on ComfyUI's own key map (`comfy.lora.model_lora_keys_unet`), which knows the `lycoris_`
and diffusers names of UNets, SD3, Flux, HiDream, Qwen-Image, Lumina2 and more, including row
slices of fused weights (Flux qkv). Every file name is tried in the spellings that map uses.
"""

from __future__ import annotations

import re

import comfy.lora

FAMILY_HINTS = (
    (r"double_blocks|single_blocks|single_transformer_blocks|transformer_blocks\.\d+\.attn\.add_q_proj"
     r"|transformer_blocks_\d+_attn_add_q_proj|context_embedder|x_embedder", "a DiT (Flux / SD3 family)"),
    (r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block", "a UNet (SD1.5 / SDXL family)"),
    (r"blocks\.\d+\.(self_attn|cross_attn)|blocks_\d+_(self_attn|cross_attn)", "a Wan-style video DiT"),
)


def model_key_map(model) -> dict:
    """ComfyUI's LoRA key map for this BaseModel: name -> weight key or (key, (dim, start, size))."""
    return comfy.lora.model_lora_keys_unet(model, {})


def candidates(name: str, naming: str) -> list[str]:
    """Spellings of one module name that ComfyUI's key map may hold."""
    out = [name]
    if naming == "diffusers":
        flat = name.replace(".", "_")
        out += [f"lycoris_{flat}", f"transformer.{name}", f"unet.{name}", f"diffusion_model.{name}",
                f"lora_unet_{flat}", f"lora_transformer_{flat}"]
    elif naming == "lycoris":
        stem = name[len("lycoris_"):] if name.startswith("lycoris_") else name
        out += [f"lora_unet_{stem}", f"lora_transformer_{stem}"]
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


def guess_family(names) -> str | None:
    text = " ".join(list(names)[:500])
    for pattern, family in FAMILY_HINTS:
        if re.search(pattern, text):
            return family
    return None
