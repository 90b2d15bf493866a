"""LongCat-Image: ComfyUI maps its blocks with Flux's layout (LongCatImage is a Flux subclass there), but not the
diffusers name of its time embedder (`time_embed.timestep_embedder`, Flux's `time_text_embed.timestep_embedder`),
ComfyUI's `time_in`."""

from __future__ import annotations

from .common import put, weight

# no name of its own: its blocks are Flux's, its `time_embed.timestep_embedder` also HunyuanVideo 1.5's and Bria's
HINTS: tuple[tuple[str, str], ...] = ()


def add_keys(model, key_map: dict) -> None:
    """The time embedder's two Linears."""
    put(key_map, "time_embed.timestep_embedder.linear_1", weight("time_in.in_layer"))
    put(key_map, "time_embed.timestep_embedder.linear_2", weight("time_in.out_layer"))


EXTRA = {"LongCatImage": add_keys}
