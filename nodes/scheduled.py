"""Load LoRA (timestep schedule): any standard LoRA with its strength on a curve over the sampling."""

from __future__ import annotations

from comfy_api.v0_0_2 import io

from ..engine import lora_path
from ..engine.scheduled import apply_scheduled_lora, read_lora
from ..tlora_core import TLoRAError
from ..tlora_core.strength import SHAPES, StrengthCurve, parse_keyframes, sigma_ticks
from .common import file_fingerprint, lora_inputs, model_and_clip

SIGMA_TICKS_EVENT = "tlora.sigma_ticks"  # js/tlora_scheduled.js listens for it


def _ticks(model_sampling) -> list[list[float]]:
    return [list(t) for t in sigma_ticks(model_sampling)]


def _sender(node_id):
    """Sends the node's frontend the sigmas of each sampling that runs with its LoRA, for its curve's labels: what
    the node sees when it runs is only a first guess (a ModelSampling node may come after it), so the engine
    reports the sampling at the start of every run (engine.scheduled._announcer) and this sends it to the client
    that queued the prompt, as ComfyUI sends its own progress."""
    def send(model_sampling) -> None:
        try:
            from server import PromptServer
        except ImportError:  # not inside a ComfyUI server (tools, in-process tests)
            return
        server = getattr(PromptServer, "instance", None)
        sid = getattr(server, "client_id", None)
        if sid is not None:
            server.send_sync(SIGMA_TICKS_EVENT, {"node": node_id, "ticks": _ticks(model_sampling)}, sid)
    return send


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
                               "noise), in ComfyUI's percent-to-sigma sense, on the sampling the model samples with "
                               "(a ModelSampling node after this one included)."),
        io.Float.Input("end_percent", default=1.0, **pct,
                       tooltip="Where it stops (1 = the end): the call that reaches its sigma is already past it. "
                               "Outside start..end its strength is 0."),
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
            hidden=[io.Hidden.unique_id],
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
        node_id = cls.hidden.unique_id if getattr(cls, "hidden", None) is not None else None
        send = _sender(node_id) if node_id is not None else None
        out = model_and_clip(path, tl, model, clip, strength_clip, lambda progress: apply_scheduled_lora(
            model, tl, strength_model, schedule, progress, send)[0])
        # the sigmas at a few percents of the sampling the model has now, a first guess for the labels of the node's
        # live curve; every sampling run then sends its own (`_sender`)
        return io.NodeOutput(*out.args, ui={"tlora_sigma_ticks": _ticks(model.get_model_object("model_sampling"))})
