"""AuraFlow, PixArt Sigma, Lumina 2, Z-Image, HiDream and Qwen-Image: tiny diffusers transformers loaded into
ComfyUI the way ComfyUI loads them.

AuraFlow, HiDream and Qwen-Image load straight from diffusers keys (AuraFlow through `convert_diffusers_mmdit`,
the other two share ComfyUI's names); PixArt and Z-Image go through ComfyUI's own `pixart_to_diffusers` /
`z_image_to_diffusers` maps (PixArt's built-in conversion assumes the full 1152 width, 0.3.75 cannot load Z-Image
diffusers keys); Lumina 2, which ComfyUI cannot load from diffusers keys, through the inverse of diffusers'
`convert_lumina2_to_diffusers` (`lumina2_map`). Detection fixes most widths of these models (heads, caption
widths, head counts), which `overrides` replaces; Z-Image's class needs the full 3840 width, so it is forced.

Output conventions: ComfyUI's NextDiT (Lumina 2, Z-Image) and HiDream return -(diffusers output) (ComfyUI's CONST
sampling takes -v where the diffusers pipelines negate the prediction), so their references return the negated
diffusers output; PixArt's ComfyUI model returns only the eps half of diffusers' learned-sigma output.

Where the two ports differ by more than round-off, which would move the T-LoRA's effect by ~1e-5 (the test's
floor for the pack's own fp32 error), the twin takes ComfyUI's choice, each outside what is tested: AuraFlow's
timestep sinusoid rounding, NextDiT's q / k RMSNorm eps and its float32 t = 1 - sigma, and Z-Image's timestep-MLP
width (ComfyUI min(dim, 1024), diffusers 1024, which keeps the twin 256 wide instead of 1024).
"""

from __future__ import annotations

import torch

from tools.tiny_models import import_comfy

from .base import Call, Family, KeyMap, Twin, arg, convert, load_detected, pack_2x2, seeded, unpack_2x2

AURAFLOW_TARGETS = ("AuraFlowJointTransformerBlock", "AuraFlowSingleTransformerBlock")
PIXART_TARGETS = ("BasicTransformerBlock",)
LUMINA2_TARGETS = ("Lumina2TransformerBlock",)
ZIMAGE_TARGETS = ("ZImageTransformerBlock",)
HIDREAM_TARGETS = ("HiDreamImageTransformerBlock", "HiDreamImageSingleTransformerBlock")
QWEN_TARGETS = ("QwenImageTransformerBlock",)


def _sd(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items()}


# --- AuraFlow: ComfyUI needs cond_seq_dim (joint_attention_dim) 2048; dim / heads / global_conddim are defaults
class _ComfySinusoid(torch.nn.Module):
    """AuraFlow's timestep sinusoid in ComfyUI's fp32 rounding: (1000 * freq) * t, where diffusers rounds
    (t * freq) * 1000. Arguments near 1000 rad make the two differ by up to ~6e-5 rad, which moves the T-LoRA's
    effect by ~1e-5 at t = 999: a difference of the two models' fp32 arithmetic, not of the pack, so the
    reference uses ComfyUI's (both compute it in fp32; everything else stays diffusers')."""

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        import_comfy()
        from comfy.ldm.aura.mmdit import TimestepEmbedder

        return TimestepEmbedder.timestep_embedding(t.float(), 256)


def _auraflow(seed: int) -> Twin:
    from diffusers import AuraFlowTransformer2DModel

    heads, hd = 2, 32
    d = seeded(AuraFlowTransformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_mmdit_layers=1,
                                          num_single_dit_layers=1, attention_head_dim=hd, num_attention_heads=heads,
                                          joint_attention_dim=2048, caption_projection_dim=heads * hd,
                                          out_channels=4, pos_embed_max_size=64), seed)
    d.time_step_embed = _ComfySinusoid()
    dim = heads * hd
    return Twin(d, load_detected(_sd(d), {"dim": dim, "n_heads": heads, "global_conddim": dim}))


def _auraflow_inputs(twin: Twin, g: torch.Generator):
    return torch.randn(1, 4, 8, 8, generator=g), {"c_crossattn": torch.randn(1, 5, 2048, generator=g)}


def _auraflow_reference(twin: Twin, call: Call) -> torch.Tensor:
    return twin.diffusers(hidden_states=arg(call, 0, "x"), encoder_hidden_states=arg(call, 2, "context"),
                          timestep=arg(call, 1, "timestep"), return_dict=False)[0]


# --- PixArt Sigma: detection fixes hidden 1152 / 16 heads / caption 4096; pe_interpolation needs a 64x64 latent
def _pixart(seed: int) -> Twin:
    comfy = import_comfy()
    from diffusers import PixArtTransformer2DModel

    heads, hd, cap = 2, 32, 64
    hid = heads * hd
    d = seeded(PixArtTransformer2DModel(num_attention_heads=heads, attention_head_dim=hd, in_channels=4,
                                        out_channels=8, num_layers=2, cross_attention_dim=hid, sample_size=64,
                                        caption_channels=cap, use_additional_conditions=False,
                                        interpolation_scale=1), seed)
    sd = convert(_sd(d), comfy.utils.pixart_to_diffusers({"depth": 2, "hidden_size": hid}))
    return Twin(d, load_detected(sd, {"hidden_size": hid, "num_heads": heads, "caption_channels": cap}))


def _pixart_inputs(twin: Twin, g: torch.Generator):
    return torch.randn(1, 4, 64, 64, generator=g), {"c_crossattn": torch.randn(1, 5, 64, generator=g)}


def _pixart_reference(twin: Twin, call: Call) -> torch.Tensor:
    out = twin.diffusers(hidden_states=arg(call, 0, "x"), encoder_hidden_states=arg(call, 2, "context"),
                         timestep=arg(call, 1, "timesteps"), added_cond_kwargs={"resolution": None,
                                                                                 "aspect_ratio": None},
                         return_dict=False)[0]
    return out[:, :4]  # ComfyUI returns the eps half of the learned-sigma output


# --- Lumina 2: GQA qkv fused in ComfyUI; heads / kv heads / axes / ffn are set by detection for 2304 wide only
LUMINA2_RENAMES = [
    ("time_caption_embed.timestep_embedder.linear_1", "t_embedder.mlp.0"),
    ("time_caption_embed.timestep_embedder.linear_2", "t_embedder.mlp.2"),
    ("time_caption_embed.caption_embedder", "cap_embedder"), ("norm_out.linear_1", "final_layer.adaLN_modulation.1"),
    ("norm_out.linear_2", "final_layer.linear"), (".attn.to_out.0.", ".attention.out."),
    (".attn.norm_q.", ".attention.q_norm."), (".attn.norm_k.", ".attention.k_norm."),
    (".feed_forward.linear_1.", ".feed_forward.w1."), (".feed_forward.linear_2.", ".feed_forward.w2."),
    (".feed_forward.linear_3.", ".feed_forward.w3."), (".norm1.linear.", ".adaLN_modulation.1."),
    (".norm1.norm.", ".attention_norm1."), (".norm2.", ".attention_norm2."), (".norm1.", ".attention_norm1."),
]


def lumina2_map(sd: dict[str, torch.Tensor], n_heads: int, n_kv: int, head_dim: int) -> KeyMap:
    """Diffusers Lumina2Transformer2DModel keys -> ComfyUI NextDiT keys (q | k | v rows of attention.qkv)."""
    qd, kd = n_heads * head_dim, n_kv * head_dim
    out: KeyMap = {}
    for k in sd:
        c = k
        for a, b in LUMINA2_RENAMES:
            c = c.replace(a, b)
        for name, (start, size) in {"to_q": (0, qd), "to_k": (qd, kd), "to_v": (qd + kd, kd)}.items():
            if f".attn.{name}." in c:
                c = (c.replace(f".attn.{name}.", ".attention.qkv."), (0, start, size))
        out[k] = c
    return out


def comfy_qk_eps(model: torch.nn.Module) -> torch.nn.Module:
    """ComfyUI's NextDiT builds its q / k RMSNorms without an eps (torch's default: float32 machine eps in an fp32
    model), diffusers with 1e-5: a 5e-6 difference of the two ports, which the twin drops by using ComfyUI's."""
    for name, module in model.named_modules():
        if name.endswith((".norm_q", ".norm_k")):
            module.eps = torch.finfo(torch.float32).eps
    return model


def _lumina2(seed: int) -> Twin:
    from diffusers import Lumina2Transformer2DModel

    nh, nkv, hd, cap = 2, 1, 96, 64  # axes (32, 32, 32): head_dim 96 as in the real model (24 x 96, kv 8)
    d = seeded(Lumina2Transformer2DModel(sample_size=16, hidden_size=nh * hd, num_layers=1, num_refiner_layers=2,
                                         num_attention_heads=nh, num_kv_heads=nkv, multiple_of=256,
                                         ffn_dim_multiplier=None, axes_dim_rope=(32, 32, 32),
                                         axes_lens=(300, 512, 512), cap_feat_dim=cap), seed)
    comfy_qk_eps(d)
    sd = convert(_sd(d), lumina2_map(d.state_dict(), nh, nkv, hd))
    ovr = {"n_heads": nh, "n_kv_heads": nkv, "axes_dims": [32, 32, 32], "axes_lens": [300, 512, 512],
           "rope_theta": 10000.0, "ffn_dim_multiplier": 4.0}
    return Twin(d, load_detected(sd, ovr))


def _nextdit_inputs(twin: Twin, g: torch.Generator):
    cap = twin.patcher.model.model_config.unet_config["cap_feat_dim"]
    return torch.randn(1, 16, 8, 8, generator=g), {"c_crossattn": torch.randn(1, 5, cap, generator=g),
                                                   "num_tokens": 5}


def _lumina2_reference(twin: Twin, call: Call) -> torch.Tensor:
    x, ctx, sigma = arg(call, 0, "x"), arg(call, 2, "context"), arg(call, 1, "timesteps")
    out = twin.diffusers(hidden_states=x, timestep=_one_minus(sigma), encoder_hidden_states=ctx,
                         encoder_attention_mask=torch.ones(ctx.shape[:2], dtype=torch.bool), return_dict=False)[0]
    return -out


# --- Z-Image: the class needs dim 3840 (forced); head_dim 128 (axes 32 + 48 + 48). ComfyUI's timestep MLP is
# min(dim, 1024) wide inside, diffusers' always 1024: below 1024 wide the twin gets ComfyUI's width (outside the
# blocks, not a LyCORIS target), which keeps the model 256 wide.
ZIMAGE_OVERRIDES = {"axes_dims": [32, 48, 48], "axes_lens": [1536, 512, 512], "rope_theta": 256.0,
                    "ffn_dim_multiplier": 8.0 / 3.0, "multiple_of": 2, "z_image_modulation": True,
                    "time_scale": 1000.0, "pad_tokens_multiple": 32}


def _zimage(seed: int) -> Twin:
    comfy = import_comfy()
    from diffusers import ZImageTransformer2DModel
    from diffusers.models.transformers.transformer_z_image import TimestepEmbedder

    dim, nh, cap = 256, 2, 64
    d = ZImageTransformer2DModel(dim=dim, n_layers=1, n_refiner_layers=2, n_heads=nh, n_kv_heads=nh,
                                 cap_feat_dim=cap)
    d.t_embedder = TimestepEmbedder(min(dim, 256), mid_size=min(dim, 1024))
    d = comfy_qk_eps(seeded(d, seed))
    sd = convert(_sd(d), comfy.utils.z_image_to_diffusers({"n_layers": 1, "dim": dim}))
    return Twin(d, load_detected(sd, {"n_heads": nh, "n_kv_heads": nh, **ZIMAGE_OVERRIDES}, force="ZImage"))


def _one_minus(sigma: torch.Tensor) -> torch.Tensor:
    """NextDiT's t = 1 - sigma in float32, as ComfyUI's model computes it: Z-Image scales t by 1000 into its
    float32 sinusoid, where a float64 t would round differently, by up to ~6e-5 rad."""
    return 1 - sigma.float()


def _zimage_reference(twin: Twin, call: Call) -> torch.Tensor:
    x, ctx, sigma = arg(call, 0, "x"), arg(call, 2, "context"), arg(call, 1, "timesteps")
    out = twin.diffusers(x=[xi.unsqueeze(1) for xi in x], t=_one_minus(sigma), cap_feats=list(ctx),
                         return_dict=False)[0]
    return -torch.stack([o.squeeze(1) for o in out])


# --- HiDream: detection hard-codes every width; caption_channels = [t5 width, llama width]
HIDREAM_CONFIG = {"attention_head_dim": 128, "num_attention_heads": 1, "num_layers": 1, "num_single_layers": 1,
                  "caption_channels": [48, 64], "text_emb_dim": 32, "num_routed_experts": 4,
                  "num_activated_experts": 2, "axes_dims_rope": [64, 32, 32], "max_resolution": [128, 128],
                  "llama_layers": [0, 1]}


def _hidream(seed: int) -> Twin:
    from diffusers import HiDreamImageTransformer2DModel

    d = seeded(HiDreamImageTransformer2DModel(patch_size=2, in_channels=16, out_channels=16, **HIDREAM_CONFIG), seed)
    return Twin(d, load_detected(_sd(d), dict(HIDREAM_CONFIG)))


def _hidream_inputs(twin: Twin, g: torch.Generator):
    t5, llama = HIDREAM_CONFIG["caption_channels"]
    return torch.randn(1, 16, 8, 8, generator=g), {
        "c_crossattn": torch.randn(1, 5, t5, generator=g), "y": torch.randn(1, HIDREAM_CONFIG["text_emb_dim"],
                                                                             generator=g),
        "encoder_hidden_states_llama3": torch.randn(1, len(HIDREAM_CONFIG["llama_layers"]), 5, llama, generator=g)}


def _hidream_reference(twin: Twin, call: Call) -> torch.Tensor:
    out = twin.diffusers(hidden_states=arg(call, 0, "x"), timesteps=arg(call, 1, "t"),
                         encoder_hidden_states_t5=arg(call, 3, "context"),
                         encoder_hidden_states_llama3=arg(call, 4, "encoder_hidden_states_llama3").movedim(1, 0),
                         pooled_embeds=arg(call, 2, "y"), return_dict=False)[0]
    return -out


# --- Qwen-Image: detection infers only in_channels / layers; heads and the 3584-wide text input are defaults
def _qwen(seed: int) -> Twin:
    from diffusers import QwenImageTransformer2DModel

    d = seeded(QwenImageTransformer2DModel(patch_size=2, in_channels=64, out_channels=16, num_layers=2,
                                           attention_head_dim=128, num_attention_heads=1, joint_attention_dim=64,
                                           axes_dims_rope=(16, 56, 56)), seed)
    return Twin(d, load_detected(_sd(d), {"num_attention_heads": 1, "joint_attention_dim": 64}))


def _qwen_inputs(twin: Twin, g: torch.Generator):
    return torch.randn(1, 16, 1, 8, 8, generator=g), {"c_crossattn": torch.randn(1, 5, 64, generator=g)}


def _qwen_reference(twin: Twin, call: Call) -> torch.Tensor:
    x, ctx = arg(call, 0, "x"), arg(call, 2, "context")
    b, c, _, h, w = x.shape
    out = twin.diffusers(hidden_states=pack_2x2(x[:, :, 0]), encoder_hidden_states=ctx,
                         encoder_hidden_states_mask=torch.ones(ctx.shape[:2]), timestep=arg(call, 1, "timestep"),
                         img_shapes=[[(1, h // 2, w // 2)]] * b, return_dict=False)[0]
    return unpack_2x2(out, c, h, w).unsqueeze(2)


AURAFLOW = Family("auraflow", "AuraFlow", "AuraFlow", "AuraFlow", AURAFLOW_TARGETS, _auraflow, _auraflow_inputs,
                  _auraflow_reference)
PIXART_SIGMA = Family("pixart_sigma", "PixArt Sigma", "PixArt", "PixArtSigma", PIXART_TARGETS, _pixart,
                      _pixart_inputs, _pixart_reference, flow=False)
LUMINA2 = Family("lumina2", "Lumina Image 2.0", "Lumina2", "Lumina2", LUMINA2_TARGETS, _lumina2, _nextdit_inputs,
                 _lumina2_reference)
ZIMAGE = Family("zimage", "Z-Image", "Lumina2", "ZImage", ZIMAGE_TARGETS, _zimage, _nextdit_inputs,
                _zimage_reference)
HIDREAM = Family("hidream", "HiDream-I1", "HiDream", "HiDream", HIDREAM_TARGETS, _hidream, _hidream_inputs,
                 _hidream_reference)
QWEN_IMAGE = Family("qwen_image", "Qwen-Image", "QwenImage", "QwenImage", QWEN_TARGETS, _qwen, _qwen_inputs,
                    _qwen_reference)

FAMILIES_HERE: tuple[Family, ...] = (AURAFLOW, PIXART_SIGMA, LUMINA2, ZIMAGE, HIDREAM, QWEN_IMAGE)
