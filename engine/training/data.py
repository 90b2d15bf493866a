"""The training data: latents of any size in size buckets (each model call one size), a caption per image, caption
dropout, and per-image loss masks.

Latents arrive as ComfyUI's dataset nodes give them: a list of LATENT tensors (one image each, or batches such as
ResolutionBucket's, one per size), their rows in order being the images. Captions follow ComfyUI's trainer: one
conditioning per image, or the entries of the conditionings in order (ResolutionBucket: one list per bucket), or one
for all. Every random choice (the bucket, the images, the dropped captions) is drawn from the loop's generator, so a
resumed run continues exactly; a dataset of one size and no caption dropout draws exactly what a single latent did.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

EMPTY = -1  # the caption id of a dropped caption


def empty_caption(entry: list) -> list:
    """ComfyUI's ConditioningZeroOut of one conditioning entry: the tokens and pooled output zeroed, same shapes."""
    tokens, extra = entry
    d = dict(extra)
    for k in ("pooled_output", "conditioning_lyrics"):
        if d.get(k) is not None:
            d[k] = torch.zeros_like(d[k])
    return [torch.zeros_like(tokens), d]


def caption_of_images(positive: list, n: int) -> tuple[list, list[int]] | None:
    """(the conditioning entries, each image's entry index), or None when the captions do not fit `n` images."""
    if len(positive) == n:  # one conditioning per image (MakeTrainingDataset), its first entry
        return [c[0] for c in positive], list(range(n))
    flat = [e for c in positive for e in c]
    if len(flat) == n:  # the entries in order, one per image (ResolutionBucket's lists, a batch's conditioning)
        return flat, list(range(n))
    if len(positive) == 1:  # one for all
        return [positive[0][0]], [0] * n
    return None


@dataclass
class Bucket:
    latent: torch.Tensor  # (Bi, C, ..., h, w), float32
    images: list[int]  # the dataset index of each row
    weight: torch.Tensor | None  # (Bi, 1, ..., h, w) loss weights from the masks, or None (every element weighs 1)


def area_resize(mask: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """A pixel-space mask (H, W) as loss weights of a latent of `size` (h, w): each latent element weighs the mean of
    the pixels it covers (area interpolation, as SimpleTuner resizes its masks)."""
    return F.interpolate(mask.float()[None, None], size=size, mode="area")[0, 0].clamp(0.0, 1.0)


def mask_problem(mask: torch.Tensor, latent_hw: tuple[int, int], i: int) -> str | None:
    (mh, mw), (h, w) = mask.shape[-2:], latent_hw
    if abs(mh / h - mw / w) > 0.1 * max(mh / h, mw / w):
        return (f"mask {i} is {mw}x{mh} px but its image's latent is {w}x{h}: give one mask per training image, of "
                "that image's size")
    return None


class Data:
    """The images by size: `buckets` in the order their sizes first appear, each image's caption entry."""

    def __init__(self, latents: list[torch.Tensor], cond_of: list[int], masks: list[torch.Tensor] | None = None):
        rows = [r for t in latents for r in t.float()]
        self.n, self.cond_of = len(rows), cond_of
        shapes: dict[tuple[int, ...], list[int]] = {}
        for i, r in enumerate(rows):
            shapes.setdefault(tuple(r.shape), []).append(i)
        self.buckets = []
        for shape, images in shapes.items():
            if len(shapes) == 1:  # the same tensor a single latent trained on (bit-identical draws)
                latent = torch.cat([t.float() for t in latents])
            else:
                latent = torch.stack([rows[i] for i in images])
            weight = None
            if masks is not None:
                per = [area_resize(masks[i], shape[-2:]) for i in images]
                weight = torch.stack(per).reshape(len(images), *([1] * (len(shape) - 2)), *shape[-2:])
            self.buckets.append(Bucket(latent, images, weight))
        self.sizes = [tuple(b.latent.shape[2:]) for b in self.buckets]
        self.weights = torch.tensor([float(len(b.images)) for b in self.buckets])

    def draw(self, generator: torch.Generator, batch_size: int) -> tuple[int, torch.Tensor]:
        """One micro-batch: a bucket (weighted by its number of images; none drawn when there is one), then
        `batch_size` of its rows with replacement (each sample has its own noise and timestep)."""
        b = int(torch.multinomial(self.weights, 1, generator=generator)) if len(self.buckets) > 1 else 0
        return b, torch.randint(0, len(self.buckets[b].images), (batch_size,), generator=generator)

    def captions(self, b: int, rows: torch.Tensor, generator: torch.Generator, dropout: float) -> list[int]:
        """Each sample's caption entry, EMPTY where caption dropout drops it (no draw at dropout 0)."""
        ids = [self.cond_of[self.buckets[b].images[int(r)]] for r in rows]
        if dropout <= 0:
            return ids
        drop = torch.rand(len(ids), generator=generator) < dropout
        return [EMPTY if d else c for c, d in zip(ids, drop.tolist(), strict=True)]

    def processed(self, process, device) -> list[torch.Tensor]:
        """Each bucket's latents on `device` through the model's `process_latent_in`, as ComfyUI's guider treats a
        sampler's latent (an all-zero dataset is left as it is, as there)."""
        on = [b.latent.to(device) for b in self.buckets]
        if not any(torch.count_nonzero(t) for t in on):
            return on
        return [process(t) for t in on]
