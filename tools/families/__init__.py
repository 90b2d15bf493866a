"""Model families with tiny diffusers twins, for conformance of this pack against LyCORIS (see base.py)."""

from __future__ import annotations

from . import chroma_longcat_kandinsky, image_dits, video
from .base import Family
from .mmdit import FLUX, FLUX2, SD3
from .unet import SD15, SDXL

GROUPS = (image_dits, chroma_longcat_kandinsky, video)
FAMILIES: dict[str, Family] = {f.name: f for f in (SD15, SDXL, SD3, FLUX, FLUX2, *(f for g in GROUPS
                                                                                   for f in g.FAMILIES_HERE))}


def available() -> list[Family]:
    """The families this ComfyUI host can run."""
    return [f for f in FAMILIES.values() if f.available()]
