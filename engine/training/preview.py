"""Previews while Train T-LoRA trains: at each preview step every preview prompt is sampled with the current T-LoRA
through ComfyUI's own sampler (`comfy.sample.sample`) on the training clone itself, whose slots and APPLY_MODEL
wrapper then run as Load T-LoRA runs a file (the same rank rule, the factors as the file stores them, no gradient).
Nothing is reloaded or copied, and the run goes on unchanged: the preview has its own seeded noise, every random
stream is restored, no autograd graph is built, and the training flags (ComfyUI's `in_training`, the held rank mask,
the recorded calls) are put back."""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import comfy.model_management
import comfy.sample
import numpy as np
import torch
from PIL import Image, ImageDraw

log = logging.getLogger("tlora.train")

LABEL_H = 14  # the band above each grid row that names its step
Show = Callable[[int, Image.Image], None]  # (step, the grid so far): live previews on the node


@dataclass(frozen=True)
class PreviewSettings:
    vae: Any
    prompts: list  # CONDITIONINGs, one preview prompt each
    negative: list | None = None  # a CONDITIONING; None: the first prompt zeroed out (ComfyUI's ConditioningZeroOut)
    every: int = 0  # preview every N steps (and at the end); 0: off
    seed: int = 0
    steps: int = 20
    cfg: float = 5.0
    sampler: str = "euler"
    scheduler: str = "normal"
    width: int = 0  # 0: the first training latent's size
    height: int = 0

    def problems(self) -> list[str]:
        if self.every <= 0:
            return []
        out = []
        if self.vae is None:
            out.append("previews need a vae (connect the model's VAE)")
        if not self.prompts:
            out.append("previews need preview_prompts (one CONDITIONING per prompt)")
        if self.steps < 1:
            out.append(f"preview_steps {self.steps} is out of range")
        return out


def zeroed(cond: list) -> list:
    """A CONDITIONING with every tensor zeroed, as ComfyUI's ConditioningZeroOut makes one."""
    return [[torch.zeros_like(t), {k: torch.zeros_like(v) if torch.is_tensor(v) else v for k, v in d.items()}]
            for t, d in cond]


class Previewer:
    """Renders the preview prompts at the preview steps of one run, keeps the rows for the grid, saves each step's
    row beside its checkpoint (`<file>.preview.png`) and hands the grid so far to `show`."""

    def __init__(self, p: PreviewSettings, show: Show | None = None):
        self.p, self.show = p, show
        self.rows: list[tuple[int, torch.Tensor]] = []  # (step, images (prompts, H, W, 3) in 0..1)
        self.latents: list[tuple[int, torch.Tensor]] = []  # (step, the sampled latents, one per prompt)
        self.seconds = 0.0

    def due(self, done: int, last: bool) -> bool:
        return self.p.every > 0 and (last or done % self.p.every == 0)

    def empty_latent(self, model, first: torch.Tensor) -> torch.Tensor:
        if not (self.p.width and self.p.height):
            return torch.zeros_like(first[:1])
        f = int(self.p.vae.spacial_compression_encode())
        return comfy.sample.fix_empty_latent_channels(
            model, torch.zeros(1, first.shape[1], self.p.height // f, self.p.width // f))

    def sample(self, model, latent: torch.Tensor) -> list[torch.Tensor]:
        """Every prompt sampled with `model` as the KSampler node samples (its noise from preview_seed). An interrupt
        stops it at the next layer (ComfyUI's ops check for one at every op)."""
        negative = self.p.negative if self.p.negative is not None else zeroed(self.p.prompts[0])
        noise = comfy.sample.prepare_noise(latent, self.p.seed)
        return [comfy.sample.sample(model, noise, self.p.steps, self.p.cfg, self.p.sampler, self.p.scheduler,
                                    prompt, negative, latent, disable_pbar=True, seed=self.p.seed)
                for prompt in self.p.prompts]

    def render(self, patch, first: torch.Tensor, step: int) -> torch.Tensor:
        """The row of `step`: every prompt sampled on the training clone with the modules as they are now, then
        decoded. The run's state is as it was after the call."""
        t0 = time.perf_counter()
        calls, mask = len(patch.state.calls), patch.state.mask
        model = patch.clone.model
        current = model.__dict__.get("current_patcher")  # the training sampler's (the nested one clears it)
        in_training = getattr(comfy.model_management, "in_training", None)
        devices = [torch.cuda.current_device()] if torch.cuda.is_available() else []
        try:
            with torch.random.fork_rng(devices=devices), torch.no_grad():
                if in_training is not None:  # the sampling paths Load T-LoRA runs on
                    comfy.model_management.in_training = False
                latents = self.sample(patch.clone, self.empty_latent(patch.clone, first))
                images = torch.cat([_decode(self.p.vae, s) for s in latents])
        finally:
            if in_training is not None:
                comfy.model_management.in_training = in_training
            del patch.state.calls[calls:]
            patch.state.mask = mask
            if current is not None:
                model.current_patcher = current
        # decoding may have moved the model to make room for the VAE: load it back (nothing happens if it is loaded)
        comfy.model_management.load_models_gpu([patch.clone], force_full_load=True)
        self.latents.append((step, torch.cat(latents).cpu()))
        self.rows.append((step, images.float().cpu().clamp(0, 1)))
        self.seconds += time.perf_counter() - t0
        log.info("Train T-LoRA: previews at step %d (%d prompts, %.1f s)", step, len(latents),
                 time.perf_counter() - t0)
        if self.show is not None:
            self.show(step, to_pil(self.grid()))
        return images

    def save(self, beside: str) -> str:
        """The last row as `<file without .safetensors>.preview.png` beside the file it belongs to."""
        step, images = self.rows[-1]
        path = preview_path(beside)
        to_pil(row_image(images, step)).save(path)
        return path

    def grid(self) -> torch.Tensor:
        """An IMAGE (1, H, W, 3): a row per preview step (its step written above it), a column per prompt."""
        if not self.rows:
            return torch.zeros(1, 64, 64, 3)
        rows = [row_image(images, step) for step, images in self.rows]
        width = max(r.shape[1] for r in rows)
        rows = [torch.nn.functional.pad(r, (0, 0, 0, width - r.shape[1])) for r in rows]
        return torch.cat(rows)[None]


def _decode(vae, samples: torch.Tensor) -> torch.Tensor:
    images = vae.decode(samples)
    return images.reshape(-1, *images.shape[-3:])  # video VAEs give (batch, frames, H, W, 3)


def row_image(images: torch.Tensor, step: int) -> torch.Tensor:
    """(H + label, prompts * W, 3): the prompts side by side under a band that names the step."""
    strip = torch.cat(list(images), dim=1)
    label = Image.new("RGB", (strip.shape[1], LABEL_H), (0, 0, 0))
    ImageDraw.Draw(label).text((3, 1), f"step {step}", fill=(255, 255, 255))
    band = torch.from_numpy(np.asarray(label, dtype=np.float32) / 255.0)
    return torch.cat([band, strip.float()])


def to_pil(image: torch.Tensor) -> Image.Image:
    a = image[0] if image.ndim == 4 else image
    return Image.fromarray((a.clamp(0, 1).numpy() * 255).round().astype(np.uint8))


def preview_path(checkpoint: str) -> str:
    return f"{os.path.splitext(checkpoint)[0]}.preview.png"
