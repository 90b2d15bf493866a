"""Video DiTs: Wan 2.1 / 2.2, HunyuanVideo (1.5 and v1), LTX-Video and LTX-2: tiny diffusers transformers with
tiny latents (2-3 latent frames, a few pixels), loaded into ComfyUI the way ComfyUI loads them.

ComfyUI has no diffusers-format loading for any of them, so each twin is converted with its own key map (renames;
HunyuanVideo fuses q/k/v and swaps the final modulation's halves). Detection fixes a few widths a tiny model cannot
have (Wan's 4096-wide text input, LTX's 32 heads, ...): `overrides` replaces those. One sampler sigma per call:
the pack and SimpleTuner both give every frame (and LTX-2's audio) the rank of int(sigma * 1000).
"""

from __future__ import annotations

import re

import torch

from tools.tiny_models import import_comfy

from .base import Call, Family, Twin, arg, convert, load_detected, renamed, seeded

# ------------------------------------------------------------------------------------------------ Wan 2.1 / 2.2
WAN_TARGETS = ("WanTransformerBlock",)
_WAN_RENAMES = [  # diffusers -> ComfyUI (Wan's original names); order matters
    (".attn1.to_out.0.", ".self_attn.o."), (".attn2.to_out.0.", ".cross_attn.o."),
    (".attn1.to_", ".self_attn."), (".attn2.to_", ".cross_attn."), (".attn1.", ".self_attn."),
    (".attn2.add_k_proj.", ".cross_attn.k_img."), (".attn2.add_v_proj.", ".cross_attn.v_img."),
    (".attn2.norm_added_k.", ".cross_attn.norm_k_img."), (".attn2.", ".cross_attn."),
    (".norm2.", ".norm3."),  # diffusers' norm2 is Wan's affine cross-attention norm3
    (".ffn.net.0.proj.", ".ffn.0."), (".ffn.net.2.", ".ffn.2."),
    ("condition_embedder.text_embedder.linear_1.", "text_embedding.0."),
    ("condition_embedder.text_embedder.linear_2.", "text_embedding.2."),
    ("condition_embedder.time_embedder.linear_1.", "time_embedding.0."),
    ("condition_embedder.time_embedder.linear_2.", "time_embedding.2."),
    ("condition_embedder.time_proj.", "time_projection.1."),
]


def _wan_key_map(sd: dict[str, torch.Tensor]):
    out = renamed(sd, _WAN_RENAMES)
    for k in sd:
        if k.endswith("scale_shift_table"):
            out[k] = k.replace("scale_shift_table", "modulation") if k.startswith("blocks.") else "head.modulation"
        elif k.startswith("proj_out."):
            out[k] = "head.head." + k.split(".")[-1]
    return out


def _wan(channels: int):
    def build(seed: int) -> Twin:
        from diffusers import WanTransformer3DModel

        # ComfyUI detection: heads = dim // 128; text_dim is not detected (default 4096)
        d = seeded(WanTransformer3DModel(patch_size=(1, 2, 2), num_attention_heads=2, attention_head_dim=32,
                                         in_channels=channels, out_channels=channels, text_dim=32, freq_dim=256,
                                         ffn_dim=96, num_layers=2, cross_attn_norm=True,
                                         qk_norm="rms_norm_across_heads"), seed)
        sd = {k: v.clone() for k, v in d.state_dict().items()}
        return Twin(d, load_detected(convert(sd, _wan_key_map(sd)), {"num_heads": 2, "text_dim": 32}))
    return build


def _wan21_inputs(twin: Twin, g: torch.Generator):
    return torch.randn(1, 16, 3, 4, 6, generator=g), {"c_crossattn": torch.randn(1, 5, 32, generator=g)}


def _wan22_inputs(twin: Twin, g: torch.Generator):
    """TI2V: the first latent frame is the (clean) image, so ComfyUI gives the model per-frame timesteps."""
    mask = torch.ones(1, 1, 3, 4, 6)
    mask[:, :, 0] = 0
    return torch.randn(1, 48, 3, 4, 6, generator=g), {"c_crossattn": torch.randn(1, 5, 32, generator=g),
                                                      "denoise_mask": mask}


def _wan_reference(twin: Twin, call: Call) -> torch.Tensor:
    x, t = arg(call, 0, "x"), arg(call, 1, "t")
    if t.ndim == 2:  # per-frame timesteps (Wan 2.2 TI2V) -> per token, as diffusers' expand_timesteps wants
        t = t.repeat_interleave(x.shape[3] * x.shape[4] // 4, dim=1)
    return twin.diffusers(hidden_states=x, timestep=t, encoder_hidden_states=call.kwargs["context"],
                          return_dict=False)[0]


# ------------------------------------------------------------------------------- HunyuanVideo 1.5 and v1
# every Linear of the blocks and the token refiner; the final AdaLayerNormContinuous exercises the swapped rows
HV15_TARGETS = ("HunyuanVideo15TransformerBlock", "HunyuanVideo15IndividualTokenRefinerBlock", "AdaLayerNormContinuous")
HV_TARGETS = ("HunyuanVideoTransformerBlock", "HunyuanVideoSingleTransformerBlock",
              "HunyuanVideoIndividualTokenRefinerBlock", "AdaLayerNormContinuous")
_HV_BLOCK = re.compile(r"(transformer_blocks|single_transformer_blocks|context_embedder\.token_refiner\.refiner_blocks)"
                       r"\.(\d+)\.(.+)")
_HV_FUSED = {  # diffusers module in a block -> (ComfyUI module, row block); proj_mlp follows q, k, v in linear1
    "transformer_blocks": {"attn.to_q": ("img_attn.qkv", 0), "attn.to_k": ("img_attn.qkv", 1),
                           "attn.to_v": ("img_attn.qkv", 2), "attn.add_q_proj": ("txt_attn.qkv", 0),
                           "attn.add_k_proj": ("txt_attn.qkv", 1), "attn.add_v_proj": ("txt_attn.qkv", 2)},
    "single_transformer_blocks": {"attn.to_q": ("linear1", 0), "attn.to_k": ("linear1", 1),
                                  "attn.to_v": ("linear1", 2), "proj_mlp": ("linear1", 3)},
    "context_embedder.token_refiner.refiner_blocks": {"attn.to_q": ("self_attn.qkv", 0),
                                                      "attn.to_k": ("self_attn.qkv", 1),
                                                      "attn.to_v": ("self_attn.qkv", 2)},
}
_HV_RENAMED = {  # diffusers module in a block -> ComfyUI module (q/k norms: `.scale`, which both hosts load)
    "transformer_blocks": {"attn.to_out.0": "img_attn.proj", "attn.to_add_out": "txt_attn.proj",
                           "norm1.linear": "img_mod.lin", "norm1_context.linear": "txt_mod.lin",
                           "ff.net.0.proj": "img_mlp.0", "ff.net.2": "img_mlp.2", "ff_context.net.0.proj": "txt_mlp.0",
                           "ff_context.net.2": "txt_mlp.2", "attn.norm_q": "img_attn.norm.query_norm",
                           "attn.norm_k": "img_attn.norm.key_norm", "attn.norm_added_q": "txt_attn.norm.query_norm",
                           "attn.norm_added_k": "txt_attn.norm.key_norm"},
    "single_transformer_blocks": {"proj_out": "linear2", "norm.linear": "modulation.lin",
                                  "attn.norm_q": "norm.query_norm", "attn.norm_k": "norm.key_norm"},
    "context_embedder.token_refiner.refiner_blocks": {"attn.to_out.0": "self_attn.proj", "ff.net.0.proj": "mlp.0",
                                                      "ff.net.2": "mlp.2", "norm_out.linear": "adaLN_modulation.1",
                                                      "norm1": "norm1", "norm2": "norm2"},
}
_HV_PREFIX = {"transformer_blocks": "double_blocks", "single_transformer_blocks": "single_blocks",
              "context_embedder.token_refiner.refiner_blocks": "txt_in.individual_token_refiner.blocks"}
_HV_TOP = {
    "x_embedder.proj": "img_in.proj", "context_embedder.proj_in": "txt_in.input_embedder",
    "time_text_embed.timestep_embedder": "time_in", "time_embed.timestep_embedder": "time_in",
    "time_text_embed.guidance_embedder": "guidance_in", "time_text_embed.text_embedder": "vector_in",
    "context_embedder.time_text_embed.timestep_embedder": "txt_in.t_embedder",
    "context_embedder.time_text_embed.text_embedder": "txt_in.c_embedder",
    "image_embedder.norm_in": "vision_in.proj.0", "image_embedder.linear_1": "vision_in.proj.1",
    "image_embedder.linear_2": "vision_in.proj.3", "image_embedder.norm_out": "vision_in.proj.4",
    "context_embedder_2.norm": "byt5_in.layernorm", "context_embedder_2.linear_1": "byt5_in.fc1",
    "context_embedder_2.linear_2": "byt5_in.fc2", "context_embedder_2.linear_3": "byt5_in.fc3",
    "cond_type_embed": "cond_type_embedding", "proj_out": "final_layer.linear",
}


def _swap_halves(w: torch.Tensor) -> torch.Tensor:
    a, b = w.chunk(2, dim=0)
    return torch.cat([b, a], dim=0)


def _hv_target(key: str, h: int, mlp: int):
    module, param = key.rsplit(".", 1)
    if module == "norm_out.linear":  # diffusers (scale, shift) -> ComfyUI (shift, scale)
        return f"final_layer.adaLN_modulation.1.{param}", None, _swap_halves
    m = _HV_BLOCK.fullmatch(module)
    if m is None:
        for end, new in (("linear_1", "in_layer"), ("linear_2", "out_layer")):  # the time / text embedders
            if module.endswith(end) and module[: -len(end) - 1] in _HV_TOP:
                return f"{_HV_TOP[module[: -len(end) - 1]]}.{new}.{param}"
        return f"{_HV_TOP[module]}.{param}"
    prefix = f"{_HV_PREFIX[m[1]]}.{m[2]}"
    if m[3] in _HV_FUSED[m[1]]:
        new, j = _HV_FUSED[m[1]][m[3]]
        return f"{prefix}.{new}.{param}", (0, j * h, mlp if j == 3 else h)
    new = _HV_RENAMED[m[1]][m[3]]
    return f"{prefix}.{new}.{'scale' if new.endswith('_norm') else param}"


def _hv(v15: bool):
    def build(seed: int) -> Twin:
        import diffusers

        # head_dim 32 (ComfyUI detection: heads = hidden // 128, rope axes (16, 56, 56)); v1.5: ComfyUI's ByT5
        # mapper is fixed at 1472 -> 2048 and its vision input at 1152
        common = dict(num_attention_heads=2, attention_head_dim=32, num_layers=1, num_refiner_layers=2,
                      patch_size_t=1, text_embed_dim=24, rope_axes_dim=(8, 12, 12))
        if v15:
            d = diffusers.HunyuanVideo15Transformer3DModel(in_channels=65, out_channels=32, patch_size=1,
                                                           text_embed_2_dim=1472, image_embed_dim=1152, **common)
        else:
            d = diffusers.HunyuanVideoTransformer3DModel(in_channels=16, out_channels=16, patch_size=2,
                                                         num_single_layers=1, guidance_embeds=True,
                                                         pooled_projection_dim=768, rope_theta=256.0, **common)
        d = seeded(d, seed)
        h = d.config.num_attention_heads * d.config.attention_head_dim
        sd = {k: v.clone() for k, v in d.state_dict().items()}
        sd = convert(sd, {k: _hv_target(k, h, int(h * d.config.mlp_ratio)) for k in sd})
        return Twin(d, load_detected(sd, {"num_heads": 2, "axes_dim": [8, 12, 12]}))
    return build


def _hv15_inputs(twin: Twin, g: torch.Generator):
    """Latent, then the I2V concat (image latent + mask, 33 channels), text, ByT5 glyph tokens, vision tokens."""
    return torch.randn(1, 32, 2, 4, 6, generator=g), {
        "c_concat": torch.randn(1, 33, 2, 4, 6, generator=g), "c_crossattn": torch.randn(1, 5, 24, generator=g),
        "txt_byt5": torch.randn(1, 3, 1472, generator=g), "clip_fea": torch.randn(1, 4, 1152, generator=g)}


def _hv15_reference(twin: Twin, call: Call) -> torch.Tensor:
    ctx, byt5, img = call.kwargs["context"], call.kwargs["txt_byt5"], call.kwargs["clip_fea"]
    return twin.diffusers(hidden_states=arg(call, 0, "x"), timestep=arg(call, 1, "timestep"),
                          encoder_hidden_states=ctx, encoder_attention_mask=torch.ones(ctx.shape[:2]),
                          encoder_hidden_states_2=byt5, encoder_attention_mask_2=torch.ones(byt5.shape[:2]),
                          image_embeds=img, return_dict=False)[0]


def _hv_inputs(twin: Twin, g: torch.Generator):
    return torch.randn(1, 16, 2, 4, 6, generator=g), {"c_crossattn": torch.randn(1, 5, 24, generator=g),
                                                      "y": torch.randn(1, 768, generator=g),
                                                      "guidance": torch.tensor([6.0])}


def _hv_reference(twin: Twin, call: Call) -> torch.Tensor:
    """ComfyUI embeds guidance * 1000 itself; diffusers' pipeline passes it pre-multiplied."""
    ctx = call.kwargs["context"]
    return twin.diffusers(hidden_states=arg(call, 0, "x"), timestep=arg(call, 1, "timestep"),
                          encoder_hidden_states=ctx, encoder_attention_mask=torch.ones(ctx.shape[:2]),
                          pooled_projections=call.kwargs["y"], guidance=call.kwargs["guidance"] * 1000.0,
                          return_dict=False)[0]


# ------------------------------------------------------------------------------------- LTX-Video and LTX-2
LTXV_TARGETS = ("LTXVideoTransformerBlock",)
LTX2_TARGETS = ("LTX2VideoTransformerBlock",)
_LTX_RENAMES = [  # diffusers -> ComfyUI; the blocks' names are the same but for the q/k norms
    ("audio_proj_in.", "audio_patchify_proj."), ("audio_time_embed.", "audio_adaln_single."),
    ("audio_prompt_adaln.", "audio_prompt_adaln_single."),
    ("av_cross_attn_video_scale_shift.", "av_ca_video_scale_shift_adaln_single."),
    ("av_cross_attn_audio_scale_shift.", "av_ca_audio_scale_shift_adaln_single."),
    ("av_cross_attn_video_a2v_gate.", "av_ca_a2v_gate_adaln_single."),
    ("av_cross_attn_audio_v2a_gate.", "av_ca_v2a_gate_adaln_single."),
    ("video_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_video"),
    ("audio_a2v_cross_attn_scale_shift_table", "scale_shift_table_a2v_ca_audio"),
    (".norm_q.", ".q_norm."), (".norm_k.", ".k_norm."),
]


def _ltx_key_map(sd: dict[str, torch.Tensor]):
    out = renamed(sd, _LTX_RENAMES)
    for k, v in out.items():  # top-level video modules (after the audio ones, which contain their names)
        for a, b in (("proj_in.", "patchify_proj."), ("time_embed.", "adaln_single."),
                     ("prompt_adaln.", "prompt_adaln_single.")):
            if v.startswith(a):
                out[k] = b + v[len(a):]
    return out


def _ltxv(seed: int) -> Twin:
    from diffusers import LTXVideoTransformer3DModel

    d = seeded(LTXVideoTransformer3DModel(in_channels=32, out_channels=32, num_attention_heads=2, attention_head_dim=32,
                                          cross_attention_dim=64, num_layers=2, caption_channels=24), seed)
    sd = {k: v.clone() for k, v in d.state_dict().items()}
    # ComfyUI: heads fixed at 32, input and caption widths are class defaults (real files carry them in metadata)
    cfg = {"num_attention_heads": 2, "attention_head_dim": 32, "in_channels": 32, "caption_channels": 24}
    return Twin(d, load_detected(convert(sd, _ltx_key_map(sd)), cfg))


def _ltxv_inputs(twin: Twin, g: torch.Generator):
    return torch.randn(1, 32, 2, 3, 4, generator=g), {"c_crossattn": torch.randn(1, 5, 24, generator=g),
                                                      "frame_rate": 25.0, "attention_mask": None}


def _ltxv_reference(twin: Twin, call: Call) -> torch.Tensor:
    """ComfyUI's LTX models take sigma and scale it by 1000 themselves; diffusers takes sigma * 1000."""
    x, ctx, fps = arg(call, 0, "x"), call.kwargs["context"], call.kwargs["frame_rate"]
    b, c, t, h, w = x.shape
    out = twin.diffusers(hidden_states=x.flatten(2).transpose(1, 2), encoder_hidden_states=ctx,
                         timestep=arg(call, 1, "timestep") * 1000, encoder_attention_mask=torch.ones(ctx.shape[:2]),
                         num_frames=t, height=h, width=w, rope_interpolation_scale=(8 / fps, 32, 32),
                         return_dict=False)[0]
    return out.transpose(1, 2).reshape(b, c, t, h, w)


_LTX2 = dict(in_channels=16, num_attention_heads=2, attention_head_dim=16, cross_attention_dim=32,
             audio_in_channels=128, audio_num_attention_heads=2, audio_attention_head_dim=8,
             audio_cross_attention_dim=16, num_layers=1, caption_channels=24)
# what real LTX-2 files carry in their metadata and detection reads from there (diffusers' defaults here)
_LTX2_COMFY = dict(_LTX2, connector_attention_head_dim=8, connector_num_attention_heads=3,
                   causal_temporal_positioning=True, frequencies_precision="float64",
                   av_ca_timestep_scale_multiplier=1000.0, rope_type="interleaved", use_middle_indices_grid=True)


def _v2a_reads_updated_video() -> bool:
    """Whether this host's LTX-2 block feeds the video->audio cross-attention the video stream after the
    audio->video update (ComfyUI 0.33) rather than before it (0.28 and earlier, diffusers, Lightricks' own code,
    which normalise the video stream once, `vx_norm3`, for both)."""
    import importlib
    import inspect

    import_comfy()
    try:
        av = importlib.import_module("comfy.ldm.lightricks.av_model")
    except ImportError:  # a host without LTX-2
        return False
    return "vx_norm3" not in inspect.getsource(av.BasicAVTransformerBlock.forward)


def _follow_host_v2a(model: torch.nn.Module) -> None:
    """Make the diffusers twin compute what this host's LTX-2 computes: on hosts whose video->audio cross-attention
    reads the updated video stream, renormalise it there (per block instance, from diffusers' own source)."""
    import inspect
    import textwrap
    import types

    import diffusers.models.transformers.transformer_ltx2 as m

    if not _v2a_reads_updated_video():
        return
    src = textwrap.dedent(inspect.getsource(m.LTX2VideoTransformerBlock.forward))
    anchor = "        if use_v2a_cross_attention:\n"
    assert src.count(anchor) == 1, "diffusers' LTX-2 block changed: update tools/families/video.py"
    src = src.replace(anchor, anchor + "            norm_hidden_states = self.audio_to_video_norm(hidden_states)\n")
    code = next(c for c in compile(src, m.__file__, "exec").co_consts if getattr(c, "co_name", "") == "forward")
    original = m.LTX2VideoTransformerBlock.forward
    forward = types.FunctionType(code, vars(m), "forward", original.__defaults__)  # the same function, one line added
    forward.__kwdefaults__ = original.__kwdefaults__
    for block in model.modules():
        if isinstance(block, m.LTX2VideoTransformerBlock):
            block.forward = forward.__get__(block)


def _ltx2(seed: int) -> Twin:
    """ComfyUI's LTXAV model returns [video, audio]; `_apply_model` packs them into one tensor right after. The
    twin's diffusion model packs them itself (same numbers), so a call's output is one tensor.

    ComfyUI 0.33 changed what the video->audio cross-attention reads (see `_follow_host_v2a`): the twin follows the
    host, so that a T-LoRA's effect is checked on the model ComfyUI actually runs."""
    from diffusers import LTX2VideoTransformer3DModel

    d = seeded(LTX2VideoTransformer3DModel(out_channels=16, audio_out_channels=128, **_LTX2), seed)
    _follow_host_v2a(d)
    for name, m in d.named_modules():  # ComfyUI's LTX attention normalises q and k with eps 1e-5 (diffusers: 1e-6)
        if name.endswith(("norm_q", "norm_k")):
            m.eps = 1e-5
    sd = {k: v.clone() for k, v in d.state_dict().items()}
    patcher = load_detected(convert(sd, _ltx_key_map(sd)), dict(_LTX2_COMFY))
    dm = patcher.model.diffusion_model
    forward = dm.forward
    dm.forward = lambda *a, **k: import_comfy().utils.pack_latents(forward(*a, **k))[0]
    return Twin(d, patcher)


def _ltx2_inputs(twin: Twin, g: torch.Generator):
    video, audio = torch.randn(1, 16, 2, 3, 4, generator=g), torch.randn(1, 8, 5, 16, generator=g)
    x, shapes = import_comfy().utils.pack_latents([video, audio])
    return x, {"c_crossattn": torch.randn(1, 4, 48, generator=g), "latent_shapes": shapes, "frame_rate": 25.0,
               "attention_mask": None}


def _ltx2_reference(twin: Twin, call: Call) -> torch.Tensor:
    """diffusers on ComfyUI's [video, audio] and (video, audio) sigmas; its video and audio text halves."""
    dtype = next(twin.diffusers.parameters()).dtype
    (vx, ax), (vt, at) = ([v.to(dtype) for v in arg(call, i, n)] for i, n in ((0, "x"), (1, "timestep")))
    ctx, fps = call.kwargs["context"].to(dtype), call.kwargs["frame_rate"]
    b, c, t, h, w = vx.shape
    v, a = twin.diffusers(hidden_states=vx.flatten(2).transpose(1, 2),
                          audio_hidden_states=ax.transpose(1, 2).flatten(2),
                          encoder_hidden_states=ctx[..., :24], audio_encoder_hidden_states=ctx[..., 24:],
                          timestep=(vt * 1000)[:, None].expand(b, t * h * w),
                          audio_timestep=(at * 1000)[:, None].expand(b, ax.shape[2]), sigma=vt * 1000,
                          num_frames=t, height=h, width=w, fps=fps, audio_num_frames=ax.shape[2], return_dict=False)
    v = v.transpose(1, 2).reshape(b, c, t, h, w)
    a = a.reshape(b, ax.shape[2], ax.shape[1], ax.shape[3]).transpose(1, 2)
    return import_comfy().utils.pack_latents([v, a])[0]


WAN21 = Family("wan21", "Wan 2.1 / 2.2 (T2V)", "WAN21", "WAN21_T2V", WAN_TARGETS, _wan(16), _wan21_inputs,
               _wan_reference)
WAN22_TI2V = Family("wan22_ti2v", "Wan 2.2 TI2V-5B", "WAN22", "WAN22_T2V", WAN_TARGETS, _wan(48), _wan22_inputs,
                    _wan_reference)
HV15 = Family("hunyuan_video15", "HunyuanVideo 1.5", "HunyuanVideo15", "HunyuanVideo15", HV15_TARGETS, _hv(True),
               _hv15_inputs, _hv15_reference)
HV = Family("hunyuan_video", "HunyuanVideo", "HunyuanVideo", "HunyuanVideo", HV_TARGETS, _hv(False), _hv_inputs,
            _hv_reference)
LTX2 = Family("ltx2", "LTX-2", "LTXAV", "LTXAV", LTX2_TARGETS, _ltx2, _ltx2_inputs, _ltx2_reference)
LTXV = Family("ltxv", "LTX-Video 0.9", "LTXV", "LTXV", LTXV_TARGETS, _ltxv, _ltxv_inputs, _ltxv_reference)

FAMILIES_HERE: tuple[Family, ...] = (WAN21, WAN22_TI2V, HV15, HV, LTX2, LTXV)
