"""Development-only nodes for the demo and tests (never published): seeded conditioning without a CLIP.

The tiny test models have no text encoder worth loading; this node gives them a conditioning
tensor of the right shape, deterministic from a seed.
"""

import zlib

import torch


class TLoRADevConditioning:
    DESCRIPTION = "Seeded random conditioning of a given shape, for tiny test models (development only)."
    CATEGORY = "T-LoRA/dev"
    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {
            "seed": ("INT", {"default": 0, "min": 0, "max": 2**31 - 1, "tooltip": "Seed of the random tensor."}),
            "tokens": ("INT", {"default": 8, "min": 1, "max": 512, "tooltip": "Sequence length."}),
            "context_dim": ("INT", {"default": 768, "min": 1, "max": 8192, "tooltip": "Width of each token."}),
            "pooled_dim": ("INT", {"default": 0, "min": 0, "max": 8192,
                                   "tooltip": "Width of the pooled vector (SDXL 1280, Flux 768), 0 for none."}),
        }}

    def make(self, seed, tokens, context_dim, pooled_dim, text=None):
        g = torch.Generator().manual_seed((seed + (zlib.crc32(text.encode()) if text else 0)) % 2**63)
        cond = torch.randn(1, tokens, context_dim, generator=g)
        extra = {}
        if pooled_dim:
            extra["pooled_output"] = torch.randn(1, pooled_dim, generator=g)
        return ([[cond, extra]],)


class TLoRADevCaptionConditioning(TLoRADevConditioning):
    DESCRIPTION = "Seeded random conditioning per caption (the caption's CRC32 added to the seed; development only)."

    @classmethod
    def INPUT_TYPES(cls):
        spec = super().INPUT_TYPES()
        spec["required"]["text"] = ("STRING", {"forceInput": True, "tooltip": "A caption (a list: one each)."})
        return spec


NODE_CLASS_MAPPINGS = {"TLoRADevConditioning": TLoRADevConditioning,
                       "TLoRADevCaptionConditioning": TLoRADevCaptionConditioning}
NODE_DISPLAY_NAME_MAPPINGS = {"TLoRADevConditioning": "T-LoRA Dev Conditioning",
                              "TLoRADevCaptionConditioning": "T-LoRA Dev Caption Conditioning"}
