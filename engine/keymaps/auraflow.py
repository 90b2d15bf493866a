"""AuraFlow: ComfyUI maps its diffusers names only as `transformer.<name>` (through
`comfy.utils.auraflow_to_diffusers`); the same map gives the SimpleTuner `lycoris_`, OneTrainer and bare
spellings here. No fused weights; the final modulation (`norm_out.linear` -> `modF.1`) has its scale / shift rows
swapped (`swap_scale_shift`)."""

from __future__ import annotations

import comfy.utils

from .common import put_diffusers_map

HINTS = ((r"joint_transformer_blocks|ff[._]out_projection|double_layers[._]\d+[._](attn[._]w\dq|mlpX)", "AuraFlow"),)


def add_keys(model, key_map: dict) -> None:
    """Every weight of ComfyUI's AuraFlow diffusers map (sizes from the model's config), in every spelling."""
    config = model.model_config.unet_config
    put_diffusers_map(key_map, comfy.utils.auraflow_to_diffusers(config, output_prefix="diffusion_model."))


EXTRA = {"AuraFlow": add_keys}
