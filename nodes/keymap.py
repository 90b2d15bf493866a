"""Map a T-LoRA file's module names onto a ComfyUI model's weights.

Built on ComfyUI's own key map (`comfy.lora.model_lora_keys_unet`), which knows the `lycoris_`
and diffusers names of UNets, SD3, Flux, HiDream, Qwen-Image, Lumina2 and more, including row
slices of fused weights (Flux qkv). Every file name is tried in the spellings that map uses.
"""

from __future__ import annotations

import re

import comfy.lora
import comfy.model_base

FAMILY_HINTS = (
    (r"double_blocks|single_blocks|single_transformer_blocks|transformer_blocks\.\d+\.attn\.add_q_proj"
     r"|transformer_blocks_\d+_attn_add_q_proj|context_embedder|x_embedder", "a DiT (Flux / SD3 family)"),
    (r"down_blocks|up_blocks|mid_block|input_blocks|output_blocks|middle_block", "a UNet (SD1.5 / SDXL family)"),
    (r"blocks\.\d+\.(self_attn|cross_attn)|blocks_\d+_(self_attn|cross_attn)", "a Wan-style video DiT"),
)


def model_key_map(model) -> dict:
    """ComfyUI's LoRA key map for this BaseModel: name -> weight key or (key, (dim, start, size))."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    add_flux2_keys(model, key_map)
    return key_map


def add_flux2_keys(model, key_map: dict) -> None:
    """Flux 2's diffusers module names, which ComfyUI 0.3.75 maps with Flux 1's layout or not at all
    (ff.linear_in/out, attn.to_qkv_mlp_proj, the shared modulations; its `proj_mlp` slice has Flux 1's
    width). Sizes come from the model's config; fused weights get `(key, (0, start, size))` row slices."""
    flux2 = getattr(comfy.model_base, "Flux2", None)
    if flux2 is None or not isinstance(model, flux2):
        return
    cfg = model.model_config.unet_config
    h = cfg["hidden_size"]
    mlp_in = int(h * cfg["mlp_ratio"]) * (2 if cfg.get("mlp_silu_act") else 1)  # SwiGLU: gate + value
    names = {}  # diffusers module -> ComfyUI weight key (without the "diffusion_model." prefix)
    for i in range(cfg["depth"]):
        d, c = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for s, qkv, ff, out in (("img", ("to_q", "to_k", "to_v"), "ff", "to_out.0"),
                                ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "ff_context", "to_add_out")):
            for j, n in enumerate(qkv):  # q, k, v are row blocks of one fused qkv
                names[f"{d}.attn.{n}"] = (f"{c}.{s}_attn.qkv.weight", (0, j * h, h))
            names[f"{d}.attn.{out}"] = f"{c}.{s}_attn.proj.weight"
            names[f"{d}.{ff}.linear_in"] = f"{c}.{s}_mlp.0.weight"
            names[f"{d}.{ff}.linear_out"] = f"{c}.{s}_mlp.2.weight"
    for i in range(cfg["depth_single_blocks"]):
        d, c = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        names[f"{d}.attn.to_qkv_mlp_proj"] = f"{c}.linear1.weight"  # linear1 = [q, k, v, mlp-in]
        names[f"{d}.attn.to_out"] = f"{c}.linear2.weight"  # linear2 = [attn-out | mlp-out] -> hidden
        for j, n in enumerate(("to_q", "to_k", "to_v")):  # Flux-1-style split names of linear1
            names[f"{d}.attn.{n}"] = (f"{c}.linear1.weight", (0, j * h, h))
        names[f"{d}.proj_mlp"] = (f"{c}.linear1.weight", (0, 3 * h, mlp_in))
    # modulations: diffusers chunks (shift, scale, gate) like ComfyUI's Modulation, so no reordering
    for m in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        names[f"{m}.linear"] = f"{m}.lin.weight"
    embedders = ("timestep", "time_in"), ("guidance", "guidance_in")
    for e, c in embedders[: 2 if cfg.get("guidance_embed") else 1]:
        names[f"time_guidance_embed.{e}_embedder.linear_1"] = f"{c}.in_layer.weight"
        names[f"time_guidance_embed.{e}_embedder.linear_2"] = f"{c}.out_layer.weight"
    for d, c in names.items():
        to = (f"diffusion_model.{c[0]}", c[1]) if isinstance(c, tuple) else f"diffusion_model.{c}"
        flat = d.replace(".", "_")  # the spellings ComfyUI uses for Flux: diffusers, SimpleTuner, OneTrainer
        key_map[f"transformer.{d}"] = key_map[f"lycoris_{flat}"] = key_map[f"lora_transformer_{flat}"] = to


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
