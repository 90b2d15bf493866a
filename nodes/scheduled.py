"""Load LoRA (timestep schedule): any standard LoRA with its strength on a curve over the sampling."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..engine import lora_path
from ..engine.scheduled import apply_scheduled_lora, read_lora, sigma_ticks
from ..tlora_core import TLoRAError
from ..tlora_core.strength import SHAPES, StrengthCurve, parse_keyframes
from .common import file_fingerprint, lora_inputs, model_and_clip


def _inputs() -> list:
    pct = {"min": 0.0, "max": 1.0, "step": 0.01}
    return [
        *lora_inputs("The diffusion model to apply the LoRA to (never modified itself).",
                     "Optional text encoder: its modules apply at strength_clip, statically (a text encoder runs "
                     "once, with no timestep).",
                     "Any standard LoRA: kohya, PEFT / diffusers, ComfyUI-trained, LyCORIS LoRA. T-LoRA files go to "
                     "Load T-LoRA.",
                     "Strength on the diffusion model, times the curve at each model call.",
                     "Strength on the text encoder (static)."),
        io.Float.Input("start_percent", default=0.0, **pct,
                       tooltip="Where the LoRA starts acting, as a percent of the sampling (0 = first step, pure "
                               "noise), in ComfyUI's percent-to-sigma sense."),
        io.Float.Input("end_percent", default=1.0, **pct,
                       tooltip="Where it stops (1 = the end). Outside start..end its strength is 0."),
        io.Float.Input("strength_start", default=1.0, min=-10.0, max=10.0, step=0.01,
                       tooltip="The curve's value at start_percent (a multiplier of strength_model)."),
        io.Float.Input("strength_end", default=1.0, min=-10.0, max=10.0, step=0.01,
                       tooltip="The curve's value at end_percent (ignored by the constant curve)."),
        io.Combo.Input("curve", options=list(SHAPES), default="linear",
                       tooltip="How strength goes from strength_start to strength_end between the two percents: "
                               "constant (strength_start throughout), linear, cosine, smoothstep."),
        io.String.Input("keyframes", default="", multiline=True, optional=True,
                        tooltip="Anything else: percent:strength pairs, e.g. '0:0, 0.5:1, 1:0.6', piecewise "
                                "linear, held flat outside. When given, it replaces the curve above."),
    ]


class TLoRAScheduledLoRA(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRAScheduledLoRA",
            display_name="Load LoRA (timestep schedule)",
            category="loaders/T-LoRA",
            description=("Loads a standard LoRA that acts only on part of the sampling, with its strength on a "
                         "curve (a fade in or out, style late, composition early), set at every model call from "
                         "that call's sigma. The LoRA is added per call without touching the weights, so it works "
                         "on fp8, GGUF and quantized models and with Dynamic VRAM, and stacks with other LoRAs."),
            inputs=_inputs(),
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the scheduled LoRA."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder with the LoRA's text-encoder modules."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, **kwargs):
        return file_fingerprint(lora_name, True)

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, start_percent, end_percent, strength_start,
                strength_end, curve, keyframes="", clip=None) -> io.NodeOutput:
        path = lora_path(lora_name)
        try:
            schedule = StrengthCurve(start_percent, end_percent, strength_start, strength_end, curve,
                                     parse_keyframes(keyframes))
        except ValueError as e:
            raise TLoRAError(path, f"bad schedule: {e}") from None
        tl = read_lora(path)
        out = model_and_clip(path, tl, model, clip, strength_clip,
                             lambda progress: apply_scheduled_lora(model, tl, strength_model, schedule, progress)[0])
        # the model's sigma at a few percents: the node's live curve labels its progress axis with them
        ticks = sigma_ticks(model.get_model_object("model_sampling"))
        return io.NodeOutput(*out.args, ui={"tlora_sigma_ticks": [list(t) for t in ticks]})
