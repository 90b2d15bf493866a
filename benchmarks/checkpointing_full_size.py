"""Autograd's saved bytes of one Train T-LoRA step on full-size SD1.5, SDXL and Flux.1 (dev), counted on the meta
device: the models are built with ComfyUI's own classes from their real configs, with shapes and no values, and
autograd saves the same tensors it would save on a GPU. Attention runs PyTorch's memory-efficient kernel (what SDPA
picks on NVIDIA GPUs: it keeps q, k, v, the output and a log-sum-exp, not the attention matrix). What this leaves
out: the weights, the training state, the largest op's working memory and the allocator's slack. Used by
`bench_checkpointing.py --full-size`."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator

import torch

from tools import train_memory as tmem

META = torch.device("meta")
RANK, MIN_RANK, TARGETS, ACTIVE = 64, 32, "attention", 48  # the paper's recipe; a mid-schedule rank
SD15_CONFIG = dict(use_checkpoint=False, image_size=32, use_spatial_transformer=True, legacy=False, in_channels=4,
                   out_channels=4, model_channels=320, num_res_blocks=[2] * 4, channel_mult=[1, 2, 4, 4],
                   transformer_depth=[1] * 6 + [0] * 2, transformer_depth_output=[1] * 9 + [0] * 3,  # shallow first
                   transformer_depth_middle=1, use_linear_in_transformer=False, context_dim=768, num_heads=8,
                   num_head_channels=-1, adm_in_channels=None, use_temporal_resblock=False,
                   use_temporal_attention=False)
FLUX_DEV = dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=768, context_in_dim=4096,
                hidden_size=3072, mlp_ratio=4.0, num_heads=24, depth=19, depth_single_blocks=38, axes_dim=[16, 56, 56],
                theta=10000, patch_size=2, qkv_bias=True, guidance_embed=True)


def _efficient(q, k, v, heads, mask=None, attn_precision=None, skip_reshape=False, skip_output_reshape=False,
               **kwargs):
    if not skip_reshape:
        b, _, width = q.shape
        q, k, v = (t.view(b, -1, heads, width // heads).transpose(1, 2) for t in (q, k, v))
    out = torch.ops.aten._scaled_dot_product_efficient_attention(q, k, v, mask, True)[0]
    return out if skip_output_reshape else out.transpose(1, 2).reshape(out.shape[0], -1, out.shape[1] * out.shape[3])


@contextlib.contextmanager
def meta_host() -> Iterator[None]:
    """ComfyUI's memory planner and attention made to run on the meta device, for the duration."""
    import comfy.model_management as mm

    free = mm.get_free_memory

    def get_free_memory(dev=None, torch_free_too=False):
        if dev is not None and torch.device(dev).type == "meta":
            return (1 << 50, 1 << 50) if torch_free_too else 1 << 50
        return free(dev, torch_free_too)

    patched = [(m, m.optimized_attention) for name, m in list(sys.modules.items())
               if name.startswith("comfy.ldm") and hasattr(m, "optimized_attention")]
    mm.get_free_memory = get_free_memory
    for m, _ in patched:
        m.optimized_attention = _efficient
    try:
        yield
    finally:
        mm.get_free_memory = free
        for m, f in patched:
            m.optimized_attention = f


def _build(cls: str, config: dict):
    import comfy.model_patcher
    import comfy.supported_models

    mc = getattr(comfy.supported_models, cls)(dict(config))
    mc.set_inference_dtype(torch.bfloat16, None)
    with torch.device(META):
        model = mc.get_model({}, "", device=META).eval()
    return comfy.model_patcher.ModelPatcher(model, load_device=META, offload_device=META)


def models() -> dict:
    """name -> (title, ComfyUI class, unet_config, latent, conditioning): bf16, batch 1."""
    import comfy.ldm.flux.model  # noqa: F401  (imported before meta_host patches its attention)
    import comfy.ldm.modules.attention  # noqa: F401

    from benchmarks.bench_step import SDXL_SPEC

    sdxl = dict(SDXL_SPEC.comfy_unet_config(), num_heads=SDXL_SPEC.num_heads,
                num_head_channels=SDXL_SPEC.head_channels)
    e = torch.empty
    return {"sd15_512": ("SD1.5, 512²", "SD15", SD15_CONFIG, (1, 4, 64, 64), {"context": e(1, 77, 768)}),
            "sdxl_1024": ("SDXL, 1024²", "SDXL", sdxl, (1, 4, 128, 128),
                          {"context": e(1, 77, 2048), "y": e(1, 2816)}),
            "flux_1024": ("Flux.1 dev, 1024²", "Flux", FLUX_DEV, (1, 16, 128, 128),
                          {"context": e(1, 512, 4096), "y": e(1, 768), "guidance": e(1)})}


def measure(pack, name: str) -> dict:
    title, cls, config, latent, conds = models()[name]
    with meta_host():
        patcher = _build(cls, config)
        found = pack.engine.train_targets.trainable_targets(patcher.model, TARGETS)
        modules = {t.name: pack.tlora_core.training.TrainableTLoRA(
            t.name, torch.empty(t.out_features, RANK, device=META), torch.ones(RANK, device=META),
            torch.empty(t.in_features, RANK, device=META), 1.0, t.conv) for t in found}
        x = torch.empty(latent, device=META, dtype=torch.bfloat16)
        kwargs = {k: v.to(META, torch.bfloat16) for k, v in conds.items()}

        def forward(patch):  # no sigma on the meta device: the rank is set as the APPLY_MODEL rule would
            patch.state.mask = pack.tlora_core.slot.rank_mask([ACTIVE], RANK, META)
            return patch.clone.model.diffusion_model(x, torch.empty(1, device=META), transformer_options={},
                                                     **kwargs)

        row = {"model": title, "latent": list(latent), "targets": len(found), "rank": RANK, "dtype": "bfloat16"}
        for on in (False, True):
            s = pack.engine.training.TrainSettings(rank=RANK, min_rank=MIN_RANK, targets=TARGETS,
                                                   gradient_checkpointing=on)
            st = tmem.one_step(pack, patcher, found, modules, s, x, None, {}, forward=forward)
            row["on" if on else "off"] = {"kept_bytes": st.forward_bytes, "peak_bytes": st.peak_bytes,
                                          "layers_recomputed": st.rerun, "layers": st.layers,
                                          "saved_copies": st.copies}
    row["kept_saved"] = round(1 - row["on"]["kept_bytes"] / row["off"]["kept_bytes"], 3)
    row["peak_saved"] = round(1 - row["on"]["peak_bytes"] / row["off"]["peak_bytes"], 3)
    return row
