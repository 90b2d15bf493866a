"""Chroma, LongCat-Image, Kandinsky 5 (image, video) and HunyuanImage 2.1: tiny diffusers transformers, loaded
into ComfyUI the way ComfyUI loads them.

Chroma, LongCat-Image and HunyuanImage 2.1 have Flux-layout names in ComfyUI: converted with ComfyUI's own
`flux_to_diffusers` plus the renames it lacks (Chroma's approximator, the time embedders, HunyuanImage's token
refiner and ByT5 input). Kandinsky 5 keeps diffusers' names in ComfyUI, so its state dict loads as it is.
Detection fixes full-size widths (heads, RoPE axes, Chroma's approximator, Kandinsky's text widths) that
`overrides` replaces, and picks Kandinsky5Image only at 2560 wide, which `force` stands in for.
"""

from __future__ import annotations

import torch

from tools.tiny_models import import_comfy

from .base import Call, Family, Twin, arg, convert, grid_ids, load_detected, pack_2x2, renamed, seeded, unpack_2x2

# every Linear of the blocks, and of Chroma's approximator (the shared modulation MLP, which ComfyUI's map lacks)
CHROMA_TARGETS = ("ChromaTransformerBlock", "ChromaSingleTransformerBlock", "ChromaApproximator")
# + the time embedder (ComfyUI's map lacks its names) and norm_out (its rows reordered: swap_scale_shift)
LONGCAT_TARGETS = ("LongCatImageTransformerBlock", "LongCatImageSingleTransformerBlock",
                   "LongCatImageTimestepEmbeddings", "AdaLayerNormContinuous")
KANDINSKY5_TARGETS = ("Kandinsky5TransformerEncoderBlock", "Kandinsky5TransformerDecoderBlock")
# + the token refiner's blocks (fused qkv), the time embedder and norm_out (swap_scale_shift)
HUNYUAN_IMAGE_TARGETS = ("HunyuanImageTransformerBlock", "HunyuanImageSingleTransformerBlock",
                         "HunyuanImageIndividualTokenRefinerBlock", "HunyuanImageCombinedTimeGuidanceEmbedding",
                         "AdaLayerNormContinuous")
# Flux-style RoPE with head_dim 32 instead of 128: detection's fixed axes (16, 56, 56) are overridden
AXES = (8, 12, 12)
K5_AXES = (8, 12, 12)  # Kandinsky 5's RoPE axes, head_dim 32 (detection: (32, 48, 48) at full size)
CHROMA_MOD_ROWS = 344  # ComfyUI's Chroma hard-codes the full model's 3 * 38 + 12 * 19 + 2 modulation rows


def _flux_layout(d, hidden: int) -> dict:
    """ComfyUI's own diffusers -> Flux map for this model's depth and width."""
    comfy = import_comfy()
    cfg = {"depth": len(d.transformer_blocks), "depth_single_blocks": len(d.single_transformer_blocks),
           "hidden_size": hidden}
    return comfy.utils.flux_to_diffusers(cfg)


def _chroma(seed: int) -> Twin:
    from diffusers import ChromaTransformer2DModel
    from diffusers.models.embeddings import get_timestep_embedding

    d = seeded(ChromaTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                       attention_head_dim=sum(AXES), num_attention_heads=2, joint_attention_dim=32,
                                       axes_dims_rope=AXES, approximator_hidden_dim=32, approximator_layers=1), seed)
    # diffusers sizes its modulation-index table (a buffer) by the block count, 3 * S + 12 * D + 2 rows, and reads
    # the final layer's modulation from the last two; ComfyUI always builds the full model's 344 and reads rows
    # 342/343. The full model has 344 rows on both sides; the twin gets that table too.
    emb = d.time_text_embed
    emb.mod_proj = get_timestep_embedding(torch.arange(CHROMA_MOD_ROWS) * 1000, emb.mod_proj.shape[1],
                                          flip_sin_to_cos=True, downscale_freq_shift=0)
    sd = {k: v.clone() for k, v in d.state_dict().items()}
    key_map = _flux_layout(d, d.inner_dim)
    for k in sd:
        if k.startswith("distilled_guidance_layer."):  # RMSNorm `.scale`: the spelling 0.3.75's detection needs
            new = k.replace(".linear_1.", ".in_layer.").replace(".linear_2.", ".out_layer.")
            key_map[k] = new.replace(".weight", ".scale") if ".norms." in k else new
    over = {"num_heads": 2, "axes_dim": list(AXES), "out_dim": d.inner_dim, "hidden_dim": 32, "n_layers": 1}
    return Twin(d, load_detected(convert(sd, key_map), over))


def _chroma_inputs(twin: Twin, g: torch.Generator):
    return torch.randn(1, 16, 8, 6, generator=g), {"c_crossattn": torch.randn(1, 5, 32, generator=g),
                                                   "guidance": torch.tensor([0.0])}


def _chroma_reference(twin: Twin, call: Call) -> torch.Tensor:
    x, ctx = arg(call, 0, "x"), arg(call, 2, "context")
    b, c, h, w = x.shape
    out = twin.diffusers(hidden_states=pack_2x2(x), encoder_hidden_states=ctx, timestep=arg(call, 1, "timestep"),
                         img_ids=grid_ids(h // 2, w // 2, 3), txt_ids=torch.zeros(ctx.shape[1], 3),
                         return_dict=False)[0]
    return unpack_2x2(out, c, h, w)


CHROMA = Family("chroma", "Chroma", "Chroma", "Chroma", CHROMA_TARGETS, _chroma, _chroma_inputs, _chroma_reference)


def _longcat(seed: int) -> Twin:
    from diffusers import LongCatImageTransformer2DModel

    # the class is picked by a 3584-wide text input (Qwen2.5-VL), so the twin has it
    d = seeded(LongCatImageTransformer2DModel(patch_size=1, in_channels=64, num_layers=1, num_single_layers=1,
                                             attention_head_dim=sum(AXES), num_attention_heads=2,
                                             joint_attention_dim=3584, axes_dims_rope=AXES), seed)
    sd = {k: v.clone() for k, v in d.state_dict().items()}
    key_map = _flux_layout(d, d.inner_dim)
    for e in ("weight", "bias"):
        for n, c in (("linear_1", "in_layer"), ("linear_2", "out_layer")):
            key_map[f"time_embed.timestep_embedder.{n}.{e}"] = f"time_in.{c}.{e}"
    return Twin(d, load_detected(convert(sd, key_map), {"num_heads": 2, "axes_dim": list(AXES)}))


def _longcat_inputs(twin: Twin, g: torch.Generator):
    return torch.randn(1, 16, 8, 6, generator=g), {"c_crossattn": torch.randn(1, 5, 3584, generator=g)}


def _longcat_reference(twin: Twin, call: Call) -> torch.Tensor:
    """The pipeline's positions: text (0, i, i); image (1, L + row, L + col) after L text tokens."""
    x, ctx = arg(call, 0, "x"), arg(call, 2, "context")
    b, c, h, w = x.shape
    n = ctx.shape[1]
    txt_ids = torch.zeros(n, 3)
    txt_ids[:, 1] = txt_ids[:, 2] = torch.arange(n)
    img_ids = grid_ids(h // 2, w // 2, 3) + torch.tensor([1.0, n, n])
    out = twin.diffusers(hidden_states=pack_2x2(x), encoder_hidden_states=ctx, timestep=arg(call, 1, "timestep"),
                         img_ids=img_ids, txt_ids=txt_ids, return_dict=False)[0]
    return unpack_2x2(out, c, h, w)


LONGCAT = Family("longcat_image", "LongCat-Image", "LongCatImage", "LongCatImage", LONGCAT_TARGETS, _longcat,
                 _longcat_inputs, _longcat_reference)


class _NoDowncasts(torch.overrides.TorchFunctionMode):
    """diffusers' Kandinsky 5 casts inside its forward: q and k to bfloat16 after RoPE (a ~1e-3 perturbation even
    in an fp32 model, which ComfyUI's fp32 forward does not have), the time embedding and RMSNorm inputs to
    float32 (so a float64 model does not run). Inside this mode a cast to a narrower float type leaves the tensor
    as it is, so the reference is the model's own math in the model's dtype."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        x = args[0] if args else None
        if func in _CASTS and torch.is_tensor(x) and x.is_floating_point():
            to = _CASTS[func] or kwargs.get("dtype", next((a for a in args[1:] if isinstance(a, torch.dtype)), None))
            if to is not None and to.is_floating_point and torch.finfo(to).eps > torch.finfo(x.dtype).eps:
                return x
        return func(*args, **kwargs)


_CASTS = {torch.Tensor.to: None, torch.Tensor.float: torch.float32, torch.Tensor.bfloat16: torch.bfloat16,
          torch.Tensor.half: torch.float16}


def _kandinsky5_build(video: bool):
    """ComfyUI's names are diffusers' own, so the state dict loads unconverted. Image: the lite T2I layout, which
    detection calls Kandinsky5Image only at 2560 wide; video: 16 latent + 17 conditioning channels (image, mask)."""

    def build(seed: int) -> Twin:
        from diffusers import Kandinsky5Transformer3DModel

        d = seeded(Kandinsky5Transformer3DModel(in_visual_dim=16, out_visual_dim=16, in_text_dim=32, in_text_dim2=16,
                                                time_dim=32, patch_size=(1, 2, 2), model_dim=64, ff_dim=128,
                                                num_text_blocks=1, num_visual_blocks=1, axes_dims=K5_AXES,
                                                visual_cond=video), seed)
        over = {"axes_dims": K5_AXES, "in_text_dim": 32, "in_text_dim2": 16}
        if not video:  # what detection sets for the 2560-wide image model
            over["rope_scale_factor"] = (1.0, 1.0, 1.0)
        sd = {k: v.clone() for k, v in d.state_dict().items()}
        return Twin(d, load_detected(sd, over, force=None if video else "Kandinsky5Image"))
    return build


def _kandinsky5_inputs(video: bool):
    def inputs(twin: Twin, g: torch.Generator):
        shape = (1, 16, 3, 8, 6) if video else (1, 16, 8, 6)
        conds = {"c_crossattn": torch.randn(1, 5, 32, generator=g), "y": torch.randn(1, 16, generator=g)}
        if video:  # the first frame given (image-to-video), as Kandinsky5.concat_cond lays it out
            cond = torch.zeros(1, 17, *shape[2:])
            cond[:, :16, :1] = torch.randn(1, 16, 1, *shape[3:], generator=g)
            cond[:, 16, :1] = 1.0
            conds["c_concat"] = cond
        return torch.randn(*shape, generator=g), conds
    return inputs


def _kandinsky5_reference(twin: Twin, call: Call) -> torch.Tensor:
    """diffusers takes the latent channels-last with a frame axis: (B, T, H, W, C)."""
    x, ctx = arg(call, 0, "x"), arg(call, 2, "context")
    video = x.ndim == 5
    x = x if video else x.unsqueeze(2)
    t, h, w = x.shape[2:]
    with _NoDowncasts():
        out = twin.diffusers(hidden_states=x.permute(0, 2, 3, 4, 1), encoder_hidden_states=ctx,
                             timestep=arg(call, 1, "timestep"), pooled_projections=arg(call, 3, "y"),
                             visual_rope_pos=[torch.arange(t), torch.arange(h // 2), torch.arange(w // 2)],
                             text_rope_pos=torch.arange(ctx.shape[1]),
                             scale_factor=(1.0, 2.0, 2.0) if video else (1.0, 1.0, 1.0), return_dict=False)
    out = out.permute(0, 4, 1, 2, 3)
    return out if video else out[:, :, 0]


KANDINSKY5 = Family("kandinsky5_image", "Kandinsky 5 Image", "Kandinsky5Image", "Kandinsky5Image",
                    KANDINSKY5_TARGETS, _kandinsky5_build(False), _kandinsky5_inputs(False), _kandinsky5_reference)
KANDINSKY5_VIDEO = Family("kandinsky5_video", "Kandinsky 5 Video", "Kandinsky5", "Kandinsky5", KANDINSKY5_TARGETS,
                          _kandinsky5_build(True), _kandinsky5_inputs(True), _kandinsky5_reference)


def _hunyuan_image_map(d, sd: dict[str, torch.Tensor]) -> dict:
    """diffusers -> ComfyUI (HunyuanVideo's model): Flux's layout for the blocks and the output, renames for the
    embedders, row slices of the token refiner's fused qkv."""
    h = d.config.num_attention_heads * d.config.attention_head_dim
    key_map = _flux_layout(d, h)
    pairs = [("x_embedder.proj", "img_in.proj"), ("time_guidance_embed.timestep_embedder", "time_in"),
             ("context_embedder.time_text_embed.timestep_embedder", "txt_in.t_embedder"),
             ("context_embedder.time_text_embed.text_embedder", "txt_in.c_embedder"),
             ("context_embedder.proj_in", "txt_in.input_embedder"),
             ("context_embedder.token_refiner.refiner_blocks", "txt_in.individual_token_refiner.blocks"),
             ("context_embedder_2.norm", "byt5_in.layernorm"), ("context_embedder_2.linear_", "byt5_in.fc"),
             (".linear_1.", ".in_layer."), (".linear_2.", ".out_layer."), (".norm_out.linear.", ".adaLN_modulation.1."),
             (".attn.to_out.0.", ".self_attn.proj."), (".ff.net.0.proj.", ".mlp.0."), (".ff.net.2.", ".mlp.2.")]
    for k, new in renamed({k: v for k, v in sd.items() if k not in key_map}, pairs).items():
        key_map[k] = new
        for j, n in enumerate(("to_q", "to_k", "to_v")):  # only the token refiner is left with these
            if f".attn.{n}." in new:
                key_map[k] = (new.replace(f".attn.{n}.", ".self_attn.qkv."), (0, j * h, h))
    return key_map


def _hunyuan_image(seed: int) -> Twin:
    """Detection fixes the token refiner at 2 blocks and the ByT5 input at 1472 wide, so the twin has them."""
    from diffusers import HunyuanImageTransformer2DModel

    d = seeded(HunyuanImageTransformer2DModel(in_channels=64, out_channels=64, num_attention_heads=2,
                                              attention_head_dim=32, num_layers=1, num_single_layers=1,
                                              num_refiner_layers=2, text_embed_dim=32, text_embed_2_dim=1472,
                                              rope_axes_dim=(16, 16)), seed)
    sd = {k: v.clone() for k, v in d.state_dict().items()}
    return Twin(d, load_detected(convert(sd, _hunyuan_image_map(d, sd)), {"num_heads": 2, "axes_dim": [16, 16]}))


def _hunyuan_image_inputs(twin: Twin, g: torch.Generator):
    return torch.randn(1, 64, 4, 3, generator=g), {"c_crossattn": torch.randn(1, 5, 32, generator=g),
                                                   "txt_byt5": torch.randn(1, 3, 1472, generator=g)}


def _hunyuan_image_reference(twin: Twin, call: Call) -> torch.Tensor:
    ctx, byt5 = arg(call, 2, "context"), call.kwargs["txt_byt5"]
    return twin.diffusers(hidden_states=arg(call, 0, "x"), timestep=arg(call, 1, "timestep"),
                          encoder_hidden_states=ctx, encoder_attention_mask=torch.ones(ctx.shape[:2]),
                          encoder_hidden_states_2=byt5, encoder_attention_mask_2=torch.ones(byt5.shape[:2]),
                          return_dict=False)[0]


HUNYUAN_IMAGE = Family("hunyuan_image21", "HunyuanImage 2.1", "HunyuanImage21", "HunyuanImage21",
                       HUNYUAN_IMAGE_TARGETS, _hunyuan_image, _hunyuan_image_inputs, _hunyuan_image_reference)

FAMILIES_HERE: tuple[Family, ...] = (CHROMA, LONGCAT, KANDINSKY5, KANDINSKY5_VIDEO, HUNYUAN_IMAGE)
