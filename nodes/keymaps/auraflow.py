"""AuraFlow: ComfyUI maps its diffusers names only as `transformer.<name>` (through
`comfy.utils.auraflow_to_diffusers`); the same map gives the SimpleTuner `lycoris_`, OneTrainer and bare
spellings here. No fused weights; the final modulation (`norm_out.linear` -> `modF.1`) has its scale / shift rows
swapped (`swap_scale_shift`)."""

from __future__ import annotations

import comfy.utils

from .common import put

HINTS = ((r"joint_transformer_blocks|ff[._]out_projection|double_layers[._]\d+[._](attn[._]w\dq|mlpX)", "AuraFlow"),)


def add_keys(model, key_map: dict) -> None:
    """Every weight of ComfyUI's AuraFlow diffusers map (sizes from the model's config), in every spelling."""
    diffusers = comfy.utils.auraflow_to_diffusers(model.model_config.unet_config, output_prefix="diffusion_model.")
    for name, target in diffusers.items():
        if name.endswith(".weight"):
            put(key_map, name[: -len(".weight")], target)


EXTRA = {"AuraFlow": add_keys}
