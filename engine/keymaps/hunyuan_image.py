"""HunyuanImage 2.1: ComfyUI builds it as HunyuanVideo's model (Flux-style names, fused q/k/v, the token refiner,
the ByT5 input), and diffusers names it as HunyuanVideo's, so HunyuanVideo's map applies; what differs is the
time embedder (`time_guidance_embed`) and the patch embedder (`x_embedder.proj`)."""

from __future__ import annotations

from . import hunyuan_video
from .common import put, weight

# no name of its own: its blocks and token refiner are HunyuanVideo's (whose hints name it), `time_guidance_embed`
# is also Flux 2's
HINTS: tuple[tuple[str, str], ...] = ()


def add_keys(model, key_map: dict) -> None:
    """HunyuanVideo's names, and HunyuanImage's own embedders."""
    hunyuan_video.add_keys(model, key_map)
    for d, c in (("timestep_embedder", "time_in"), ("guidance_embedder", "guidance_in"),
                 ("timestep_embedder_r", "time_r_in")):
        put(key_map, f"time_guidance_embed.{d}.linear_1", weight(f"{c}.in_layer"))
        put(key_map, f"time_guidance_embed.{d}.linear_2", weight(f"{c}.out_layer"))
    put(key_map, "x_embedder.proj", weight("img_in.proj"))


EXTRA = {"HunyuanImage21": add_keys}
