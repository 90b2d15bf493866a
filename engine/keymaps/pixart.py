"""PixArt Alpha / Sigma: ComfyUI maps their diffusers names only as `transformer.<name>` (and two PEFT prefixes)
through `comfy.utils.pixart_to_diffusers`; the same map, sized by the model's own hidden width, gives the
SimpleTuner `lycoris_`, OneTrainer and bare spellings here. Fused weights: self-attention q / k / v are row blocks
of `attn.qkv`, cross-attention k / v of `cross_attn.kv_linear`."""

from __future__ import annotations

import comfy.utils

from .common import put_diffusers_map

# only PixArt's own names: its blocks' Linear names (attn1, attn2, ff.net) are LTX-Video's too
HINTS = ((r"adaln_single|cross_attn[._](kv|q)_linear", "PixArt"),)


def add_keys(model, key_map: dict) -> None:
    """Every weight of ComfyUI's PixArt diffusers map (depth and hidden width from the model's config)."""
    config = model.model_config.unet_config
    put_diffusers_map(key_map, comfy.utils.pixart_to_diffusers(config, output_prefix="diffusion_model."))


EXTRA = {"PixArt": add_keys}
