"""A tiny Anima (ComfyUI 0.33's Cosmos-Predict2 image DiT with an LLM adapter) in ComfyUI's own module names.

No diffusers class exists for Anima, so there is no twin: the model is ComfyUI's, built at a tiny width, seeded, and
loaded back through ComfyUI's detection. Its T-LoRA trainers (AnimaLoraStudio, lora-scripts-next) are not
installable, so the tests check it against each trainer's formula (tests/comfy/test_writers.py). Anima's LLM
adapter is fixed at 1024 wide; it runs only on token ids, which these tests do not pass, so only the one weight
detection looks for is stored (the rest stays as ComfyUI allocates it, unused).
"""

from __future__ import annotations

import torch

from tools.tiny_models import fill_random_, import_comfy

from .base import load_detected

CONFIG = {"model_channels": 64, "num_blocks": 2, "num_heads": 2, "crossattn_emb_channels": 48, "adaln_lora_dim": 16}
TARGETS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.output_proj", "cross_attn.q_proj",
           "cross_attn.k_proj", "cross_attn.v_proj", "cross_attn.output_proj", "mlp.layer1", "mlp.layer2")


def available() -> bool:
    return hasattr(import_comfy().supported_models, "Anima")


def build(seed: int):
    """A ComfyUI ModelPatcher of a tiny Anima with seeded weights."""
    import_comfy()
    import comfy.ldm.anima.model
    import comfy.ops

    cfg = dict(max_img_h=240, max_img_w=240, max_frames=128, in_channels=16, out_channels=16, patch_spatial=2,
               patch_temporal=1, concat_padding_mask=True, pos_emb_cls="rope3d", pos_emb_learnable=True,
               pos_emb_interpolation="crop", min_fps=1, max_fps=30, use_adaln_lora=True,
               extra_per_block_abs_pos_emb=False, rope_h_extrapolation_ratio=4.0, rope_w_extrapolation_ratio=4.0,
               **CONFIG)
    model = comfy.ldm.anima.model.Anima(**cfg, image_model="anima", operations=comfy.ops.disable_weight_init)
    sd = {}
    for name, module in model.named_children():
        if name != "llm_adapter":
            fill_random_(module, seed)
            sd.update({f"{name}.{k}": v.detach().clone() for k, v in module.state_dict().items()})
    sd.update({k: torch.zeros(v.shape) for k, v in model.state_dict().items()
               if k.startswith("llm_adapter.blocks.0.cross_attn.q_proj.")})
    return load_detected(sd, dict(CONFIG))


def inputs(g: torch.Generator, batch: int = 1) -> tuple[torch.Tensor, dict]:
    """A latent (B, 16, 1, 8, 8) and its apply_model conds (text features in the DiT's cross-attention width)."""
    x = torch.randn(batch, 16, 1, 8, 8, generator=g)
    return x, {"c_crossattn": torch.randn(batch, 5, CONFIG["crossattn_emb_channels"], generator=g)}
