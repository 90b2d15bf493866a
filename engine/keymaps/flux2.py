"""Flux 2: its diffusers module names, which ComfyUI 0.3.75 maps with Flux 1's layout or not at all
(ff.linear_in/out, attn.to_qkv_mlp_proj, the shared modulations; its `proj_mlp` slice has Flux 1's width), and
which ComfyUI 0.28 still misses for the time/guidance embedders and the shared modulations."""

from __future__ import annotations

from .common import put, rows, weight

HINTS = ((r"double_stream_modulation|single_stream_modulation|to_qkv_mlp_proj", "Flux 2"),)


def add_keys(model, key_map: dict) -> None:
    """Sizes come from the model's config; fused weights get `(key, (0, start, size))` row slices."""
    cfg = model.model_config.unet_config
    h = cfg["hidden_size"]
    mlp_in = int(h * cfg["mlp_ratio"]) * (2 if cfg.get("mlp_silu_act") else 1)  # SwiGLU: gate + value
    for i in range(cfg["depth"]):
        d, c = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for s, qkv, ff, out in (("img", ("to_q", "to_k", "to_v"), "ff", "to_out.0"),
                                ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "ff_context", "to_add_out")):
            for j, n in enumerate(qkv):  # q, k, v are row blocks of one fused qkv
                put(key_map, f"{d}.attn.{n}", rows(f"{c}.{s}_attn.qkv", j * h, h))
            put(key_map, f"{d}.attn.{out}", weight(f"{c}.{s}_attn.proj"))
            put(key_map, f"{d}.{ff}.linear_in", weight(f"{c}.{s}_mlp.0"))
            put(key_map, f"{d}.{ff}.linear_out", weight(f"{c}.{s}_mlp.2"))
    for i in range(cfg["depth_single_blocks"]):
        d, c = f"single_transformer_blocks.{i}", f"single_blocks.{i}"
        put(key_map, f"{d}.attn.to_qkv_mlp_proj", weight(f"{c}.linear1"))  # linear1 = [q, k, v, mlp-in]
        put(key_map, f"{d}.attn.to_out", weight(f"{c}.linear2"))  # linear2 = [attn-out | mlp-out] -> hidden
        for j, n in enumerate(("to_q", "to_k", "to_v")):  # Flux-1-style split names of linear1
            put(key_map, f"{d}.attn.{n}", rows(f"{c}.linear1", j * h, h))
        put(key_map, f"{d}.proj_mlp", rows(f"{c}.linear1", 3 * h, mlp_in))
    # modulations: diffusers chunks (shift, scale, gate) like ComfyUI's Modulation, so no reordering
    for m in ("double_stream_modulation_img", "double_stream_modulation_txt", "single_stream_modulation"):
        put(key_map, f"{m}.linear", weight(f"{m}.lin"))
    embedders = ("timestep", "time_in"), ("guidance", "guidance_in")
    for e, c in embedders[: 2 if cfg.get("guidance_embed") else 1]:
        put(key_map, f"time_guidance_embed.{e}_embedder.linear_1", weight(f"{c}.in_layer"))
        put(key_map, f"time_guidance_embed.{e}_embedder.linear_2", weight(f"{c}.out_layer"))


EXTRA = {"Flux2": add_keys}
