"""Lumina Image 2.0 (ComfyUI NextDiT, model class Lumina2): its diffusers module names. ComfyUI's Lumina2 key map
only knows Z-Image's diffusers names (`attention.to_q`, `feed_forward.w1`, via `z_image_to_diffusers`), which
Z-Image files use and this adds nothing for; Lumina 2's diffusers names (`attn.to_q`, `feed_forward.linear_1`,
`norm1.linear`) are built here, the inverse of diffusers' `convert_lumina2_to_diffusers`. Fused weights: q / k / v
are row blocks of `attention.qkv`, with grouped-query k / v (n_kv_heads) narrower than q.

Also the "looks like" hints of the image DiTs whose names ComfyUI maps itself (Z-Image, HiDream, Qwen-Image)."""

from __future__ import annotations

from .common import put, rows, weight

HINTS = (
    (r"(noise|context)_refiner[._]\d+[._]attn[._]|layers[._]\d+[._]feed_forward[._]linear_1", "Lumina 2"),
    (r"(noise|context)_refiner[._]\d+[._]attention[._]|all_x_embedder|all_final_layer", "Z-Image"),
    (r"double_stream_blocks|single_stream_blocks|ff_i[._]experts", "HiDream"),
    (r"transformer_blocks[._]\d+[._](img_mlp|txt_mlp|img_mod|txt_mod)", "Qwen-Image"),
)
_TOP = {
    "x_embedder": "x_embedder",
    "time_caption_embed.timestep_embedder.linear_1": "t_embedder.mlp.0",
    "time_caption_embed.timestep_embedder.linear_2": "t_embedder.mlp.2",
    "time_caption_embed.caption_embedder.1": "cap_embedder.1",
    "norm_out.linear_1": "final_layer.adaLN_modulation.1",  # the final scale only: no rows to reorder
    "norm_out.linear_2": "final_layer.linear",
}


def _block(key_map: dict, name: str, qd: int, kd: int, modulated: bool) -> None:
    """One Lumina2TransformerBlock (`layers.N`, `noise_refiner.N`; `context_refiner.N` is not modulated)."""
    for n, (start, size) in (("to_q", (0, qd)), ("to_k", (qd, kd)), ("to_v", (qd + kd, kd))):
        put(key_map, f"{name}.attn.{n}", rows(f"{name}.attention.qkv", start, size))
    put(key_map, f"{name}.attn.to_out.0", weight(f"{name}.attention.out"))
    for i in (1, 2, 3):
        put(key_map, f"{name}.feed_forward.linear_{i}", weight(f"{name}.feed_forward.w{i}"))
    if modulated:
        put(key_map, f"{name}.norm1.linear", weight(f"{name}.adaLN_modulation.1"))


def add_keys(model, key_map: dict) -> None:
    """Lumina 2's diffusers names, sized by the model's config (dim, heads, kv heads); none for Z-Image."""
    cfg = model.model_config.unet_config
    if cfg.get("z_image_modulation"):
        return
    head_dim = cfg["dim"] // cfg["n_heads"]
    qd, kd = cfg["n_heads"] * head_dim, cfg.get("n_kv_heads", cfg["n_heads"]) * head_dim
    refiners = cfg.get("n_refiner_layers", 2)
    for prefix, count, modulated in (("layers", cfg["n_layers"], True), ("noise_refiner", refiners, True),
                                     ("context_refiner", refiners, False)):
        for i in range(count):
            _block(key_map, f"{prefix}.{i}", qd, kd, modulated)
    for d, c in _TOP.items():
        put(key_map, d, weight(c))


EXTRA = {"Lumina2": add_keys}
