"""HunyuanVideo (v1, I2V, SkyReels) and HunyuanVideo 1.5: diffusers module names, which ComfyUI maps only in the
original repo's spelling (diffusion-pipe). ComfyUI fuses q/k/v (double blocks, token refiner) and q/k/v + MLP-in
(single blocks' linear1) into one weight, so those get row slices; the final modulation's halves are swapped
(diffusers: scale, shift; ComfyUI: shift, scale)."""

from __future__ import annotations

import re

import comfy.utils

from .common import put, rows, weight

# block names alone do not tell HunyuanVideo v1 from HunyuanImage 2.1 (or, without single blocks, from 1.5)
HINTS = ((r"image_embedder[._]linear_\d", "HunyuanVideo 1.5"),
         (r"token_refiner[._]refiner_blocks", "HunyuanVideo (v1 / 1.5) or HunyuanImage 2.1"))


def _double(key_map: dict, i: int, h: int) -> None:
    """Double block i: image and text streams, each with a fused qkv."""
    d, c = f"transformer_blocks.{i}", f"double_blocks.{i}"
    for s, qkv, out, norm, ff in (("img", ("to_q", "to_k", "to_v"), "to_out.0", "norm1", "ff"),
                                  ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "to_add_out", "norm1_context",
                                   "ff_context")):
        for j, n in enumerate(qkv):  # q, k, v are row blocks of one fused qkv
            put(key_map, f"{d}.attn.{n}", rows(f"{c}.{s}_attn.qkv", j * h, h))
        put(key_map, f"{d}.attn.{out}", weight(f"{c}.{s}_attn.proj"))
        put(key_map, f"{d}.{norm}.linear", weight(f"{c}.{s}_mod.lin"))
        put(key_map, f"{d}.{ff}.net.0.proj", weight(f"{c}.{s}_mlp.0"))
        put(key_map, f"{d}.{ff}.net.2", weight(f"{c}.{s}_mlp.2"))


def _single(key_map: dict, i: int, h: int, mlp: int) -> None:
    """Single block i: q, k, v and the MLP input are row blocks of linear1."""
    d, c = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
    for j, n in enumerate(("to_q", "to_k", "to_v")):  # linear1 = [q; k; v; mlp-in]
        put(key_map, f"{d}.attn.{n}", rows(f"{c}.linear1", j * h, h))
    put(key_map, f"{d}.proj_mlp", rows(f"{c}.linear1", 3 * h, mlp))
    put(key_map, f"{d}.proj_out", weight(f"{c}.linear2"))  # input cat(attn, mlp) on both sides
    put(key_map, f"{d}.norm.linear", weight(f"{c}.modulation.lin"))


def _refiner(key_map: dict, i: int, h: int) -> None:
    """Token-refiner block i of the text input (fused qkv)."""
    d, c = f"context_embedder.token_refiner.refiner_blocks.{i}", f"txt_in.individual_token_refiner.blocks.{i}"
    for j, n in enumerate(("to_q", "to_k", "to_v")):
        put(key_map, f"{d}.attn.{n}", rows(f"{c}.self_attn.qkv", j * h, h))
    for dn, cn in (("attn.to_out.0", "self_attn.proj"), ("ff.net.0.proj", "mlp.0"), ("ff.net.2", "mlp.2"),
                   ("norm_out.linear", "adaLN_modulation.1")):
        put(key_map, f"{d}.{dn}", weight(f"{c}.{cn}"))


def _embedders(key_map: dict, v15: bool) -> None:
    """Top-level Linears: time / guidance / text / vision / ByT5 embedders and the final layer."""
    time = "time_embed" if v15 else "time_text_embed"  # HunyuanVideo 1.5 / v1 name of the time embedder
    pairs = [(f"{time}.timestep_embedder", "time_in"), ("time_text_embed.guidance_embedder", "guidance_in"),
             ("time_text_embed.text_embedder", "vector_in"), ("time_embed.timestep_embedder_r", "time_r_in"),
             ("context_embedder.time_text_embed.timestep_embedder", "txt_in.t_embedder"),
             ("context_embedder.time_text_embed.text_embedder", "txt_in.c_embedder")]
    for d, c in pairs:
        put(key_map, f"{d}.linear_1", weight(f"{c}.in_layer"))
        put(key_map, f"{d}.linear_2", weight(f"{c}.out_layer"))
    for d, c in (("context_embedder.proj_in", "txt_in.input_embedder"), ("proj_out", "final_layer.linear"),
                 ("image_embedder.linear_1", "vision_in.proj.1"), ("image_embedder.linear_2", "vision_in.proj.3"),
                 ("context_embedder_2.linear_1", "byt5_in.fc1"), ("context_embedder_2.linear_2", "byt5_in.fc2"),
                 ("context_embedder_2.linear_3", "byt5_in.fc3")):
        put(key_map, d, weight(c))
    put(key_map, "norm_out.linear", (weight("final_layer.adaLN_modulation.1"), None, comfy.utils.swap_scale_shift))


def _count(keys, pattern: str) -> int:
    """How many distinct indices `pattern`'s group 1 takes over `keys`."""
    return len({m[1] for k in keys if (m := re.match(pattern, k))})


def add_keys(model, key_map: dict) -> None:
    """Blocks counted from the model's weights, widths from its config (hidden size, MLP ratio)."""
    cfg = model.model_config.unet_config
    h = cfg["hidden_size"]
    keys = model.state_dict().keys()
    for i in range(cfg["depth"]):
        _double(key_map, i, h)
    for i in range(cfg.get("depth_single_blocks", 0)):
        _single(key_map, i, h, int(h * cfg["mlp_ratio"]))
    for i in range(_count(keys, r"diffusion_model\.txt_in\.individual_token_refiner\.blocks\.(\d+)\.")):
        _refiner(key_map, i, h)
    _embedders(key_map, bool(cfg.get("vision_in_dim")))


EXTRA = {"HunyuanVideo": add_keys}
