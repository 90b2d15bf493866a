"""Seeded standard LoRAs for a ComfyUI model, in the names a LoRA of its family has (ComfyUI's own key map decides
what exists): kohya `lora_unet_` names for the UNets, with every conv as a LoCon (kohya conv_dim: a k x k down
kernel, a 1x1 up); diffusers (PEFT) names for Flux; ComfyUI's `diffusion_model.` names (PEFT) for the video DiTs."""

from __future__ import annotations

import math

import torch

PREFIX = {"sd15": "lora_unet_", "sdxl": "lora_unet_", "flux": "transformer.", "wan21": "diffusion_model."}


def standard_lora(patcher, family: str, rank: int = 4, alpha: float = 2.0, seed: int = 3) -> dict[str, torch.Tensor]:
    import comfy.lora

    key_map = comfy.lora.model_lora_keys_unet(patcher.model, {})
    g = torch.Generator().manual_seed(seed)
    prefix = PREFIX[family]
    weights = patcher.model.state_dict()
    sd, seen = {}, set()
    for name, target in key_map.items():
        if not name.startswith(prefix) or (family == "wan21" and name.startswith("diffusion_model.") and
                                           not name.startswith("diffusion_model.blocks.")):
            continue
        key = target if isinstance(target, str) else target[0]
        w = weights.get(key)
        if w is None or w.ndim not in ((2, 4) if prefix == "lora_unet_" else (2,)) or str(target) in seen:
            continue  # one name per weight (or slice), as a file has
        seen.add(str(target))
        out = w.shape[0] if isinstance(target, str) or target[1] is None else target[1][2]
        down = torch.randn(rank, *w.shape[1:], generator=g) / math.sqrt(w[0].numel())
        up = 0.5 * torch.randn(out, rank, *([1, 1] if w.ndim == 4 else []), generator=g) / math.sqrt(rank)
        a, b = ("lora_down", "lora_up") if prefix == "lora_unet_" else ("lora_A", "lora_B")
        sd |= {f"{name}.{a}.weight": down, f"{name}.{b}.weight": up, f"{name}.alpha": torch.tensor(alpha)}
    if len(sd) < 3 * 8:
        raise ValueError(f"{family}: only {len(sd) // 3} modules")
    return sd
