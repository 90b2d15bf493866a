"""Small pieces the nodes share."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io

from ..engine import apply_text_encoder, file_key
from ..tlora_core import TLoRA, TLoRAError


def progress_bar() -> Callable[[int, int], None]:
    """A progress callback (done, total) that drives ComfyUI's progress bar, created on the first report."""
    pbar = None

    def progress(done: int, total: int) -> None:
        nonlocal pbar
        pbar = pbar or comfy.utils.ProgressBar(total)
        pbar.update_absolute(done, total)

    return progress


def file_fingerprint(lora_name: str, *switches: Any) -> Any:
    """A loras-folder file as it is on disk now (and the switches that change how it is read): an edited file, or
    an edited sidecar beside it, runs again."""
    try:
        return (lora_name, file_key(folder_paths.get_full_path("loras", lora_name) or "", *switches))
    except OSError:
        return lora_name


def model_and_clip(path: str, tl: TLoRA, model, clip, strength_clip: float,
                   apply_model: Callable[[Callable[[int, int], None]], Any]) -> io.NodeOutput:
    """The node's MODEL (`apply_model(progress)` where the file has diffusion-model modules, else the model as it
    came) and CLIP (its text-encoder modules applied statically)."""
    progress = progress_bar()
    out_model = model
    if tl.modules:
        out_model = apply_model(progress)
    elif clip is None:
        raise TLoRAError(path, "holds text-encoder modules only: connect the clip input")
    return io.NodeOutput(out_model, apply_text_encoder(clip, tl, strength_clip, progress))


def lora_inputs(model: str, clip: str, file: str, strength_model: str, strength_clip: str) -> list:
    """The inputs both loaders start with (model, clip, lora_name, strength_model, strength_clip), with their
    tooltips."""
    strength = {"default": 1.0, "min": -10.0, "max": 10.0, "step": 0.01}
    return [
        io.Model.Input("model", tooltip=model),
        io.Clip.Input("clip", optional=True, tooltip=clip),
        io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"), tooltip=file),
        io.Float.Input("strength_model", **strength, tooltip=strength_model),
        io.Float.Input("strength_clip", **strength, tooltip=strength_clip),
    ]
