"""Wan 2.1 / 2.2 (T2V, I2V, FLF, TI2V-5B, VACE): diffusers module names, which ComfyUI maps only in Wan's own
(original-repo) spelling. The layout is the same on both sides (no fused weights, no reordered rows): only the
names differ, so every diffusers name is built from the model's own weight keys."""

from __future__ import annotations

import re

from .common import put, weight

HINTS = ((r"blocks[._]\d+[._]ffn[._]net[._]|condition_embedder[._]time_proj", "Wan 2.1 / 2.2"),)

# ComfyUI module inside a block -> diffusers module inside a block (blocks.N / vace_blocks.N)
_BLOCK = {
    "self_attn.q": "attn1.to_q", "self_attn.k": "attn1.to_k", "self_attn.v": "attn1.to_v",
    "self_attn.o": "attn1.to_out.0",
    "cross_attn.q": "attn2.to_q", "cross_attn.k": "attn2.to_k", "cross_attn.v": "attn2.to_v",
    "cross_attn.o": "attn2.to_out.0", "cross_attn.k_img": "attn2.add_k_proj", "cross_attn.v_img": "attn2.add_v_proj",
    "ffn.0": "ffn.net.0.proj", "ffn.2": "ffn.net.2",
    "before_proj": "proj_in", "after_proj": "proj_out",  # VACE blocks
}
# top-level ComfyUI module -> diffusers module
_TOP = {
    "text_embedding.0": "condition_embedder.text_embedder.linear_1",
    "text_embedding.2": "condition_embedder.text_embedder.linear_2",
    "time_embedding.0": "condition_embedder.time_embedder.linear_1",
    "time_embedding.2": "condition_embedder.time_embedder.linear_2",
    "time_projection.1": "condition_embedder.time_proj",
    "img_emb.proj.1": "condition_embedder.image_embedder.ff.net.0.proj",
    "img_emb.proj.3": "condition_embedder.image_embedder.ff.net.2",
    "head.head": "proj_out",
}
_BLOCK_KEY = re.compile(r"diffusion_model\.((?:vace_)?blocks\.\d+)\.(.+)\.weight")


def add_keys(model, key_map: dict) -> None:
    """Every Linear of the blocks and the embedders, under its diffusers name, from the model's weight keys."""
    for key in model.state_dict():
        m = _BLOCK_KEY.fullmatch(key)
        if m is not None and m[2] in _BLOCK:
            put(key_map, f"{m[1]}.{_BLOCK[m[2]]}", key)
            continue
        module = key[len("diffusion_model."):-len(".weight")] if key.endswith(".weight") else None
        if module in _TOP:
            put(key_map, _TOP[module], weight(module))


EXTRA = {"WAN21": add_keys}
