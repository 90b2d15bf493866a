"""SD1.5 and SDXL: the tiny UNets ComfyUI's detection accepts (320 channels, context 768 / 2048), and their
diffusers twins (UNet2DConditionModel)."""

from __future__ import annotations

import torch

from tools import tiny_models as tm

from .base import Call, Family, Twin, arg, load_detected

UNET_TARGETS = tm.UNET_TARGETS  # SimpleTuner's documented generic preset: Attention, FeedForward


def _build(spec: tm.UNetSpec):
    def build(seed: int) -> Twin:
        unet, comfy_sd = tm._unet_pair(spec, seed, None)
        return Twin(unet.eval(), load_detected(comfy_sd), {"spec": spec})
    return build


def _inputs(twin: Twin, g: torch.Generator):
    spec = twin.info["spec"]
    x = torch.randn(1, 4, 8, 8, generator=g)
    conds = {"c_crossattn": torch.randn(1, 6, spec.context_dim, generator=g)}
    twin.info["added"] = {}
    if spec.pooled_dim:
        pooled = torch.randn(1, spec.pooled_dim, generator=g)
        h = w = 64
        conds["y"] = twin.patcher.model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0,
                                                   target_width=w, target_height=h)
        time_ids = torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32)
        twin.info["added"] = {"added_cond_kwargs": {"text_embeds": pooled, "time_ids": time_ids}}
    return x, conds


def _reference(twin: Twin, call: Call) -> torch.Tensor:
    return twin.diffusers(arg(call, 0, "x"), arg(call, 1, "timesteps"), encoder_hidden_states=call.kwargs["context"],
                          **twin.info["added"]).sample


SD15 = Family("sd15", "SD 1.5", "BaseModel", "SD15", UNET_TARGETS, _build(tm.SD15_SPEC), _inputs, _reference,
              flow=False)
SDXL = Family("sdxl", "SDXL (KOALA layout)", "SDXL", "SDXL", UNET_TARGETS, _build(tm.SDXL_VARIANTS["koala"][0]),
              _inputs, _reference, flow=False)
