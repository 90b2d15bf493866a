"""T-LoRA Schedule Preview node: the rank schedule as a plot and a table, and the ranks a sampler uses."""

from __future__ import annotations

import io as _io
import json
import logging
import types

import comfy.samplers
import numpy as np
import torch
from comfy_api.v0_0_2 import io, ui

from ..engine import timesteps
from ..engine.patcher import RankState
from ..engine.scheduled import scheduled_loras
from ..tlora_core import schedule
from ..tlora_core.strength import percent_of, sigma_ticks

log = logging.getLogger("tlora.preview")


class _CallRecorder:
    """Stands in for the denoiser: records each call's sigma and predicts a zero image."""

    def __init__(self, model_sampling):
        self.sigmas: list[float] = []
        self.inner_model = types.SimpleNamespace(inner_model=types.SimpleNamespace(model_sampling=model_sampling),
                                                 model_sampling=model_sampling)

    def __call__(self, x, sigma, **kwargs):
        self.sigmas.append(float(sigma.reshape(-1)[0]))
        return torch.zeros_like(x)


def step_sigmas(model_sampling, scheduler: str, steps: int, denoise: float) -> torch.Tensor:
    """The sigmas KSampler uses for (scheduler, steps, denoise)."""
    if denoise >= 0.9999:
        return comfy.samplers.calculate_sigmas(model_sampling, scheduler, steps).cpu()
    new_steps = int(steps / denoise)
    return comfy.samplers.calculate_sigmas(model_sampling, scheduler, new_steps).cpu()[-(steps + 1):]


def sampler_call_sigmas(model_sampling, sampler_name: str, sigmas: torch.Tensor) -> tuple[list[float], bool]:
    """Sigmas of every model call the sampler makes (simulated on a zero denoiser), and whether it worked."""
    rec = _CallRecorder(model_sampling)
    try:
        sampler = comfy.samplers.ksampler(sampler_name)
        x = torch.zeros(1, 4, 8, 8)
        with torch.no_grad():
            sampler.sampler_function(rec, x, sigmas.clone(), extra_args={"seed": 0}, callback=None, disable=True,
                                     **sampler.extra_options)
        if rec.sigmas:
            return rec.sigmas, True
    except Exception as e:  # samplers that need a real model: fall back to one call per step
        log.info("preview: cannot simulate sampler %s (%s); showing one call per step", sampler_name, e)
    return [float(s) for s in sigmas[:-1]], False


_GRID = 201  # points of a strength curve over the sampling


def strength_series(model, call_sigmas: list[float]) -> list[dict]:
    """For each scheduled LoRA on `model`: its strength over the sampling and at each of the sampler's calls, on the
    sampling `model` has (ModelSampling nodes after the LoRA included), as its calls get it."""
    ms = model.get_model_object("model_sampling")
    out = []
    for name, strength_model, rule in scheduled_loras(model):
        grid = [i / (_GRID - 1) for i in range(_GRID)]
        sig = [float(ms.sigma_max) if p <= 0 else float(ms.percent_to_sigma(p)) if p < 1 else 0.0 for p in grid]
        out.append({"name": name, "strength_model": strength_model,
                    "curve": [[p, strength_model * rule(x, ms)] for p, x in zip(grid, sig, strict=True)],
                    "calls": [{"sigma": x, "percent": percent_of(ms, x), "strength": strength_model * rule(x, ms)}
                              for x in call_sigmas],
                    "sigma_ticks": sigma_ticks(ms)})
    return out


def _strength_panel(ax, series: list[dict]) -> None:
    colors = ["#10b981", "#f59e0b", "#a855f7", "#06b6d4"]
    for i, s in enumerate(series):
        c = colors[i % len(colors)]
        ax.plot([p for p, _ in s["curve"]], [v for _, v in s["curve"]], color=c, lw=2, label=s["name"])
        ax.scatter([r["percent"] for r in s["calls"]], [r["strength"] for r in s["calls"]], color="#ef4444", s=14,
                   zorder=3, label="sampler calls" if i == 0 else None)
    ax.set_xlim(0, 1)
    ax.set_xlabel("sampling progress (noise \u2192 clean)")
    ax.set_ylabel("LoRA strength")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left", fontsize=8)
    top = ax.twiny()  # the same axis in the model's sigma
    ticks = series[0]["sigma_ticks"]
    top.set_xlim(0, 1)
    top.set_xticks([p for p, _ in ticks])
    top.set_xticklabels([f"{x:.3g}" for _, x in ticks], fontsize=8)
    top.set_xlabel("sigma", fontsize=8)


def plot(max_rank: int, min_rank: int, alpha: float, calls: list[tuple[int, int]] | None,
         curve: str = schedule.POWER, strengths: list[dict] | None = None) -> torch.Tensor:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    ts = np.arange(0, schedule.MAX_TIMESTEP + 1)
    ranks = [schedule.active_rank(t, max_rank, min_rank, alpha, curve=curve) for t in ts]
    if strengths:
        fig, (ax, ax2) = plt.subplots(2, 1, figsize=(6.4, 6.4), dpi=100, height_ratios=(1, 1))
        _strength_panel(ax2, strengths)
    else:
        fig, ax = plt.subplots(figsize=(6.4, 3.6), dpi=100)
    ax.step(ts, ranks, where="post", color="#3b82f6", lw=2, label="active rank r(t)")
    if calls:
        ax.scatter([c[0] for c in calls], [c[1] for c in calls], color="#ef4444", s=18, zorder=3,
                   label="sampler calls")
    ax.set_xlim(schedule.MAX_TIMESTEP, 0)
    ax.set_ylim(0, max_rank * 1.05 + 0.5)
    ax.set_xlabel("timestep t (noise \u2192 clean)")
    ax.set_ylabel("active ranks")
    ax.set_title(f"T-LoRA schedule: max_rank {max_rank}, min_rank {min_rank}, schedule exponent {alpha:g}"
                 + ("" if curve == schedule.POWER else f", {curve}"))
    ax.grid(alpha=0.3)
    ax.legend(loc="upper left")
    fig.tight_layout()
    buf = _io.BytesIO()
    fig.savefig(buf, format="png")
    plt.close(fig)
    from PIL import Image

    img = np.asarray(Image.open(buf).convert("RGB"), dtype=np.float32) / 255.0
    return torch.from_numpy(img)[None]


class TLoRASchedulePreview(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRASchedulePreview",
            display_name="T-LoRA Schedule Preview",
            category="loaders/T-LoRA",
            description=("Plots active rank against timestep for a T-LoRA schedule, on the node itself. Given a "
                         "model, also shows the rank each call of the chosen sampler, scheduler, steps and denoise "
                         "will use, and, for every scheduled LoRA on that model, its strength curve against "
                         "sampling progress and sigma with each call's strength."),
            is_output_node=True,
            inputs=[
                io.Int.Input("max_rank", default=64, min=1, max=1024, tooltip="The T-LoRA's rank (linear_dim)."),
                io.Int.Input("min_rank", default=1, min=1, max=1024, tooltip="Ranks active at the noisiest step."),
                io.Float.Input("alpha", default=1.0, min=0.05, max=10.0, step=0.05,
                               tooltip="Schedule exponent (tlora_alpha; not LyCORIS alpha): 1 = linear."),
                io.Model.Input("model", optional=True,
                               tooltip="Optional: the model to sample with, to show the ranks of real sampler calls "
                                       "and the strength each call gets from the scheduled LoRAs on it."),
                io.Combo.Input("sampler_name", options=comfy.samplers.SAMPLER_NAMES, default="euler",
                               tooltip="Sampler whose model calls to show (used with a model)."),
                io.Combo.Input("scheduler", options=comfy.samplers.SCHEDULER_NAMES, default="normal",
                               tooltip="Scheduler that makes the sigmas (used with a model)."),
                io.Int.Input("steps", default=20, min=1, max=1000, tooltip="Sampling steps (used with a model)."),
                io.Float.Input("denoise", default=1.0, min=0.01, max=1.0, step=0.01,
                               tooltip="Denoise strength; < 1 starts part-way (img2img)."),
                io.Combo.Input("timestep_mode", options=list(timesteps.MODES), default=timesteps.AUTO,
                               tooltip="How sigma becomes the trainer's timestep; auto picks by model type."),
                io.Combo.Input("curve", options=list(schedule.CURVES), default=schedule.POWER, optional=True,
                               tooltip="The trainer's rank curve: power (LyCORIS, SimpleTuner, the official repo, "
                                       "sd-scripts forks), power_ceil (AnimaLoraStudio), linear / cosine "
                                       "(lora-scripts-next). Load T-LoRA picks it from the file."),
            ],
            outputs=[
                io.Image.Output(display_name="IMAGE",
                                tooltip="The schedule plot, with sampler calls when a model is given."),
                io.String.Output(display_name="TABLE", tooltip="JSON: the schedule at key timesteps and, with a "
                                                               "model, one row per sampler call (sigma, t, rank) "
                                                               "and each scheduled LoRA's strength per call."),
            ],
        )

    @classmethod
    def execute(cls, max_rank, min_rank, alpha, sampler_name, scheduler, steps, denoise, timestep_mode,
                model=None, curve=schedule.POWER) -> io.NodeOutput:
        schedule.validate(max_rank, min_rank, alpha)
        table = {"max_rank": max_rank, "min_rank": min_rank, "alpha": alpha, "curve": curve,
                 "schedule": schedule.schedule_table(max_rank, min_rank, alpha, [0, 250, 500, 750, 999], curve)}
        calls = strengths = None
        if model is not None:
            ms = model.get_model_object("model_sampling")
            sigmas = step_sigmas(ms, scheduler, steps, denoise)
            call_sigmas, simulated = sampler_call_sigmas(ms, sampler_name, sigmas)
            # the sigma trainers' curves take sigma unrounded
            state = RankState("preview", max_rank, min_rank, alpha, timestep_mode, curve == schedule.POWER, curve)
            rows = []
            for s in call_sigmas:
                ts, rs = state.ranks_for(torch.tensor([s]), ms)
                rows.append({"sigma": s, "t": ts[0], "rank": rs[0]})
            table.update(sampler=sampler_name, scheduler=scheduler, steps=steps, denoise=denoise,
                         timestep_mode=timesteps.resolve(timestep_mode, ms)[0], simulated=simulated, calls=rows)
            calls = [(r["t"], r["rank"]) for r in rows]
            strengths = strength_series(model, call_sigmas)
            if strengths:
                table["scheduled_loras"] = [{k: v for k, v in s.items() if k != "curve"} for s in strengths]
        image, text = plot(max_rank, min_rank, alpha, calls, curve, strengths), json.dumps(table)
        # the plot and the table on the node itself, like ComfyUI's own preview outputs
        return io.NodeOutput(image, text, ui={**ui.PreviewImage(image, cls=cls).as_dict(), "text": [text]})
