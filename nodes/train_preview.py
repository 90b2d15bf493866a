"""Train T-LoRA's preview inputs and outputs: the renders of the preview prompts at the preview steps (live on the
node, as an IMAGE grid, and beside each checkpoint) and the plot of the loss per noise band."""

from __future__ import annotations

from collections.abc import Callable

import comfy.samplers
import torch
from comfy_api.v0_0_2 import io

from ..engine.training import Previewer, PreviewSettings, TrainResult, bands

PREVIEW_KEYS = ("vae", "preview_prompts", "preview_negative", "preview_every", "preview_seed", "preview_steps",
                "preview_cfg", "preview_sampler", "preview_scheduler", "preview_width", "preview_height")
LIVE_SIZE = 1024  # the longest side of the grid shown on the node while it trains


def preview_inputs() -> list:
    """The preview inputs, all optional, after the node's others."""
    return [
        io.Vae.Input("vae", optional=True, tooltip="The model's VAE, to decode the previews."),
        io.Conditioning.Input("preview_prompts", optional=True,
                              tooltip="The prompts to preview, one CONDITIONING each (a list gives one column per "
                                      "prompt): e.g. the training caption and prompts that put the subject "
                                      "elsewhere. A subject that is right while those prompts still win is the "
                                      "checkpoint to pick."),
        io.Conditioning.Input("preview_negative", optional=True,
                              tooltip="The previews' negative prompt; unconnected: the first preview prompt zeroed "
                                      "out."),
        io.Int.Input("preview_every", default=0, min=0, max=100000, optional=True,
                     tooltip="Render the previews every N steps and at the end (0 = no previews). Each preview step "
                             "is also a checkpoint (<name>_step<N>.safetensors), its previews saved beside it as "
                             "<name>_step<N>.preview.png."),
        io.Int.Input("preview_seed", default=0, min=0, max=2**31 - 1, optional=True,
                     tooltip="The previews' noise seed (the same at every preview step, so rows compare)."),
        io.Int.Input("preview_steps", default=20, min=1, max=200, optional=True,
                     tooltip="Sampling steps of each preview."),
        io.Float.Input("preview_cfg", default=5.0, min=0.0, max=100.0, step=0.1, optional=True,
                       tooltip="CFG of the previews (1 for guidance-distilled models such as Flux dev)."),
        io.Combo.Input("preview_sampler", options=comfy.samplers.KSampler.SAMPLERS, default="euler", optional=True,
                       tooltip="The previews' sampler (ComfyUI's)."),
        io.Combo.Input("preview_scheduler", options=comfy.samplers.KSampler.SCHEDULERS, default="normal",
                       optional=True, tooltip="The previews' scheduler (ComfyUI's)."),
        io.Int.Input("preview_width", default=0, min=0, max=8192, step=8, optional=True,
                     tooltip="Width of the previews in pixels; 0 (with height 0) = the first training image's."),
        io.Int.Input("preview_height", default=0, min=0, max=8192, step=8, optional=True,
                     tooltip="Height of the previews in pixels; 0 (with width 0) = the first training image's."),
    ]


def preview_outputs() -> list:
    return [
        io.Image.Output(display_name="PREVIEWS",
                        tooltip="The previews: a row per preview step (its step written on it), a column per "
                                "preview prompt. A black square when previews are off."),
        io.Image.Output(display_name="LOSS_BANDS",
                        tooltip="The loss per noise band: each sample's loss under its timestep's band (t 800-999 "
                                "the noisiest), a running mean per band over the steps. Memorising the image shows "
                                "first as the high-noise bands falling."),
    ]


def previewer(widgets: dict, show: Callable[[int, object], None] | None) -> Previewer | None:
    """The run's previewer from the node's inputs (taken out of `widgets`), or None when previews are off."""
    got = {k: widgets.pop(k, None) for k in PREVIEW_KEYS}

    def one(key: str, default):
        v = got[key]
        return v[0] if isinstance(v, list) and v else default

    every = one("preview_every", 0)
    if not every:
        return None
    p = PreviewSettings(vae=one("vae", None), prompts=list(got["preview_prompts"] or []),
                        negative=one("preview_negative", None), every=every, seed=one("preview_seed", 0),
                        steps=one("preview_steps", 20), cfg=one("preview_cfg", 5.0),
                        sampler=one("preview_sampler", "euler"), scheduler=one("preview_scheduler", "normal"),
                        width=one("preview_width", 0), height=one("preview_height", 0))
    return Previewer(p, show)


def live(pbar) -> Callable[[int, object], None]:
    """Shows the grid so far on the node, as ComfyUI shows a sampler's previews (the progress bar's image)."""
    def show(step: int, image) -> None:
        pbar.update_absolute(pbar.current, pbar.total, ("JPEG", image, LIVE_SIZE))
    return show


def outputs(pv: Previewer | None, result: TrainResult, batch: int, steps: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(PREVIEWS, LOSS_BANDS) of a finished run."""
    grid = pv.grid() if pv is not None else torch.zeros(1, 64, 64, 3)
    split = bands.split(result.drawn, result.sample_losses, batch)
    return grid, bands.plot(split, steps, result.steps - steps + 1)
