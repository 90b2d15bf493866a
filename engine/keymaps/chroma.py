"""Chroma: ComfyUI maps its blocks with Flux's layout (Chroma is a Flux subclass there), but not the diffusers names
of the approximator (`distilled_guidance_layer`, the MLP that makes every block's modulation): its
`layers.N.linear_1/linear_2` are ComfyUI's `layers.N.in_layer/out_layer`."""

from __future__ import annotations

from .common import put, weight

HINTS = ((r"distilled_guidance_layer", "Chroma"),)


def add_keys(model, key_map: dict) -> None:
    """The approximator's Linears; the layer count comes from the model's config."""
    cfg = model.model_config.unet_config
    a = "distilled_guidance_layer"
    for n in ("in_proj", "out_proj"):
        put(key_map, f"{a}.{n}", weight(f"{a}.{n}"))
    for i in range(cfg.get("n_layers", 0)):
        put(key_map, f"{a}.layers.{i}.linear_1", weight(f"{a}.layers.{i}.in_layer"))
        put(key_map, f"{a}.layers.{i}.linear_2", weight(f"{a}.layers.{i}.out_layer"))


EXTRA = {"Chroma": add_keys}
