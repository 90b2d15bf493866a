"""LTX-Video (0.9.x) and LTX-2 (audio + video): diffusers module names. ComfyUI's blocks already use them (its
key map knows the bare names, not `lycoris_` / `transformer.`); a few top-level modules are renamed. No fused or
reordered weights. The text connectors ComfyUI holds inside the model are a separate model in diffusers."""

from __future__ import annotations

from .common import put

HINTS = ((r"transformer_blocks[._]\d+[._](?:audio_attn1|audio_to_video_attn|video_to_audio_attn|audio_ff)", "LTX-2"),)

# ComfyUI top-level module -> diffusers module (LTX-2 names included; the rest of the path is the same)
_TOP = {
    "patchify_proj": "proj_in", "audio_patchify_proj": "audio_proj_in",
    "adaln_single": "time_embed", "audio_adaln_single": "audio_time_embed",
    "prompt_adaln_single": "prompt_adaln", "audio_prompt_adaln_single": "audio_prompt_adaln",
    "av_ca_video_scale_shift_adaln_single": "av_cross_attn_video_scale_shift",
    "av_ca_audio_scale_shift_adaln_single": "av_cross_attn_audio_scale_shift",
    "av_ca_a2v_gate_adaln_single": "av_cross_attn_video_a2v_gate",
    "av_ca_v2a_gate_adaln_single": "av_cross_attn_audio_v2a_gate",
    "caption_projection": "caption_projection", "audio_caption_projection": "audio_caption_projection",
    "proj_out": "proj_out", "audio_proj_out": "audio_proj_out",
    "transformer_blocks": "transformer_blocks",
}


def add_keys(model, key_map: dict) -> None:
    """Every weight of the blocks and top-level layers under its diffusers name, from the model's weight keys."""
    for key in model.state_dict():
        if not (key.startswith("diffusion_model.") and key.endswith(".weight")):
            continue
        module = key[len("diffusion_model."):-len(".weight")]
        head, dot, rest = module.partition(".")
        if head in _TOP:
            put(key_map, _TOP[head] + dot + rest, key)


EXTRA = {"LTXV": add_keys, "LTXAV": add_keys}
