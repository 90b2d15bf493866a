"""SD3, Flux.1 and Flux.2: tiny diffusers transformers, loaded into ComfyUI the way ComfyUI loads them.

SD3 and Flux.1 go through ComfyUI's own diffusers-format loading (`convert_diffusers_mmdit`); Flux.2, which that
does not cover, through `tiny_models.flux2_to_diffusers`. Detection reads the widths from the weights except
where older hosts fix them (0.3.75: Flux 24 heads, Flux.2 48 heads), which `overrides` replaces.
"""

from __future__ import annotations

import torch

from tools import tiny_models as tm

from .base import Call, Family, Twin, arg, convert, grid_ids, load_detected, pack_2x2, seeded, unpack_2x2

# SD3: hidden = 64 x depth (detection reads depth from pos_embed), SD3.5-style dual attention in block 0.
SD3_TARGETS = ("JointTransformerBlock",)
# every Linear of the blocks (diffusers >= 0.35 names Flux attention FluxAttention, missed by "Attention")
FLUX_TARGETS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")
FLUX2_TARGETS = ("Flux2TransformerBlock", "Flux2SingleTransformerBlock")


def _sd3(seed: int) -> Twin:
    from diffusers import SD3Transformer2DModel

    d = seeded(SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=16, num_layers=2, attention_head_dim=64,
                                     num_attention_heads=2, joint_attention_dim=32, caption_projection_dim=128,
                                     pooled_projection_dim=32, pos_embed_max_size=8, qk_norm="rms_norm",
                                     dual_attention_layers=(0,)), seed)
    return Twin(d, load_detected({k: v.clone() for k, v in d.state_dict().items()}))


def _sd3_inputs(twin: Twin, g: torch.Generator):
    return torch.randn(1, 16, 8, 6, generator=g), {"c_crossattn": torch.randn(1, 5, 32, generator=g),
                                                   "y": torch.randn(1, 32, generator=g)}


def _sd3_reference(twin: Twin, call: Call) -> torch.Tensor:
    return twin.diffusers(hidden_states=arg(call, 0, "x"), encoder_hidden_states=call.kwargs["context"],
                          pooled_projections=call.kwargs["y"], timestep=arg(call, 1, "timesteps"),
                          return_dict=False)[0]


def _flux(seed: int) -> Twin:
    from diffusers import FluxTransformer2DModel

    d = seeded(FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                      attention_head_dim=128, num_attention_heads=1, joint_attention_dim=32,
                                      pooled_projection_dim=16, guidance_embeds=True, axes_dims_rope=(16, 56, 56)),
               seed)
    return Twin(d, load_detected({k: v.clone() for k, v in d.state_dict().items()}, {"num_heads": 1}))


def _flux_inputs(twin: Twin, g: torch.Generator):
    return torch.randn(1, 16, 8, 6, generator=g), {"c_crossattn": torch.randn(1, 5, 32, generator=g),
                                                   "y": torch.randn(1, 16, generator=g),
                                                   "guidance": torch.tensor([3.5])}


def _flux_reference(twin: Twin, call: Call) -> torch.Tensor:
    x, ctx = arg(call, 0, "x"), arg(call, 2, "context")
    b, c, h, w = x.shape
    out = twin.diffusers(hidden_states=pack_2x2(x), encoder_hidden_states=ctx, pooled_projections=arg(call, 3, "y"),
                         timestep=arg(call, 1, "timestep"), img_ids=grid_ids(h // 2, w // 2, 3),
                         txt_ids=torch.zeros(ctx.shape[1], 3), guidance=arg(call, 4, "guidance"), return_dict=False)[0]
    return unpack_2x2(out, c, h, w)


def _flux2(seed: int) -> Twin:
    from diffusers import Flux2Transformer2DModel

    d = seeded(Flux2Transformer2DModel(patch_size=1, in_channels=128, num_layers=1, num_single_layers=1,
                                       attention_head_dim=128, num_attention_heads=1, joint_attention_dim=32,
                                       mlp_ratio=3.0, axes_dims_rope=(32, 32, 32, 32), rope_theta=2000,
                                       guidance_embeds=True), seed)
    cfg = {"hidden_size": 128, "depth": 1, "depth_single_blocks": 1, "guidance_embed": True}
    sd = convert({k: v.clone() for k, v in d.state_dict().items()}, tm.flux2_to_diffusers(cfg))
    return Twin(d, load_detected(sd, {"num_heads": 1}))


def _flux2_inputs(twin: Twin, g: torch.Generator):
    return torch.randn(1, 128, 4, 6, generator=g), {"c_crossattn": torch.randn(1, 5, 32, generator=g),
                                                    "guidance": torch.tensor([3.5])}


def _flux2_reference(twin: Twin, call: Call) -> torch.Tensor:
    x, ctx = arg(call, 0, "x"), arg(call, 2, "context")
    b, c, h, w = x.shape
    txt_ids = torch.zeros(ctx.shape[1], 4)
    txt_ids[:, 3] = torch.arange(ctx.shape[1])
    out = twin.diffusers(hidden_states=x.reshape(b, c, h * w).transpose(1, 2), encoder_hidden_states=ctx,
                         timestep=arg(call, 1, "timestep"), img_ids=grid_ids(h, w, 4), txt_ids=txt_ids,
                         guidance=call.kwargs.get("guidance", arg(call, 4, "guidance")), return_dict=False)[0]
    return out.transpose(1, 2).reshape(b, c, h, w)


SD3 = Family("sd3", "SD3 / SD3.5", "SD3", "SD3", SD3_TARGETS, _sd3, _sd3_inputs, _sd3_reference)
FLUX = Family("flux", "Flux.1", "Flux", "Flux", FLUX_TARGETS, _flux, _flux_inputs, _flux_reference)
FLUX2 = Family("flux2", "Flux.2", "Flux2", "Flux2", FLUX2_TARGETS, _flux2, _flux2_inputs, _flux2_reference)
