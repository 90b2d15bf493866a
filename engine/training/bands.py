"""The run's loss per noise band: every sample's loss in the band of its timestep (five equal-width bands of t in
[0, 1000)), and a plot of each band's loss over the steps. Memorising the image shows first in the noisiest bands
(where the model should only lay out the picture), while the low-noise bands hold the detail."""

from __future__ import annotations

import io

import numpy as np
import torch

N_BANDS = 5
WIDTH = 1000 // N_BANDS


def band_of(t: float) -> int:
    """The band of timestep t (t in [0, 1000); flow models: sigma * 1000)."""
    return min(max(int(t // WIDTH), 0), N_BANDS - 1)


def band_name(b: int) -> str:
    return f"t {b * WIDTH}-{(b + 1) * WIDTH - 1}"


def split(drawn: list[float], losses: list[float], per_step: int) -> dict[str, list[tuple[int, float]]]:
    """{band name: [(step, loss), ...]}: each sample's loss (in draw order, `per_step` samples a step) under the band
    of its own timestep, with the step (from 1) it trained in."""
    if len(drawn) != len(losses):
        raise ValueError(f"{len(drawn)} timesteps for {len(losses)} sample losses")
    out: dict[str, list[tuple[int, float]]] = {band_name(b): [] for b in range(N_BANDS)}
    for i, (t, loss) in enumerate(zip(drawn, losses, strict=True)):
        out[band_name(band_of(t))].append((i // per_step + 1, loss))
    return out


def smoothed(points: list[tuple[int, float]], window: int) -> tuple[list[float], list[float]]:
    """Steps and the mean loss of the band's last `window` samples at each: a band gets a sample now and then, so
    its raw losses jump with each draw's noise."""
    steps = [float(s) for s, _ in points]
    values = np.array([v for _, v in points], dtype=np.float64)
    c = np.cumsum(np.concatenate([[0.0], values]))
    idx = np.arange(1, len(values) + 1)
    lo = np.maximum(idx - window, 0)
    return steps, list((c[idx] - c[lo]) / (idx - lo))


def plot(bands: dict[str, list[tuple[int, float]]], steps: int, first_step: int = 1) -> torch.Tensor:
    """An IMAGE (1, H, W, 3): each band's loss over the run (a running mean of its samples), log scale, one line per
    band, noisiest in red."""
    import matplotlib

    matplotlib.use("Agg")
    from matplotlib import pyplot as plt

    fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    try:
        colors = plt.get_cmap("coolwarm")(np.linspace(0, 1, N_BANDS))
        window = max(1, sum(len(v) for v in bands.values()) // (N_BANDS * 20))
        drew = False
        for (name, points), color in zip(bands.items(), colors, strict=True):
            if not points:
                continue
            x, y = smoothed(points, window)
            ax.plot([v + first_step - 1 for v in x], y, color=color, label=f"{name} ({len(points)})")
            drew = True
        if drew and all(v > 0 for p in bands.values() for _, v in p):
            ax.set_yscale("log")
        ax.set_xlim(first_step, max(first_step + steps - 1, first_step + 1))
        ax.set_xlabel("step")
        ax.set_ylabel(f"loss (mean of {window})" if window > 1 else "loss")
        ax.set_title("Loss per noise band")
        ax.legend(fontsize=7, loc="upper right")
        fig.tight_layout()
        buf = io.BytesIO()
        fig.savefig(buf, format="png")
    finally:
        plt.close(fig)
    from PIL import Image

    buf.seek(0)
    a = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(a)[None]
