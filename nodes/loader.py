"""Load T-LoRA node: reads a T-LoRA file and returns a model that runs it with its rank schedule."""

from __future__ import annotations

import logging

from comfy_api.v0_0_2 import io

from ..engine import Settings, apply_tlora, lora_path, read_file, resolve_schedule
from ..engine.timesteps import AUTO, MODES
from ..tlora_core.recorded import SCHEDULE_SOURCES
from ..tlora_core.writers import STANDARD_LAYOUTS
from .common import file_fingerprint, lora_inputs, model_and_clip

log = logging.getLogger("tlora.loader")


def _inputs() -> list:
    """The node's inputs, each with its tooltip."""
    return [
        *lora_inputs("The diffusion model to apply the T-LoRA to.",
                     "Optional text encoder; text-encoder modules in the file are applied statically (they have no "
                     "timestep).",
                     "The T-LoRA file, from ComfyUI's models/loras folder.",
                     "How strongly to apply the T-LoRA to the diffusion model (1 = as trained).",
                     "How strongly to apply text-encoder modules, if the file has any."),
        io.Combo.Input("schedule_source", options=list(SCHEDULE_SOURCES), default="file",
                       tooltip="file: use min_rank and the schedule exponent (alpha) recorded in the file "
                               "(metadata or a lycoris_config.json beside it) where it records them, else the sliders. "
                               "sliders: always use the sliders. all_ranks: every rank at every step, "
                               "what merging the LoRA does (for comparisons; images burn)."),
        io.Int.Input("min_rank", default=1, min=1, max=1024, step=1, display_mode=io.NumberDisplay.slider,
                     tooltip="Ranks active at the noisiest step (tlora_min_rank; the official recipe "
                             "uses half the rank, e.g. 32 of 64)."),
        io.Float.Input("alpha", default=1.0, min=0.05, max=10.0, step=0.05,
                       display_mode=io.NumberDisplay.slider,
                       tooltip="Schedule exponent (tlora_alpha; not LyCORIS alpha): 1 = linear, > 1 keeps ranks off "
                               "longer."),
        io.Int.Input("max_rank", default=0, min=0, max=1024, step=1,
                     tooltip="Rank the schedule ramps up to; 0 = the file's rank (linear_dim)."),
        io.Combo.Input("timestep_mode", options=list(MODES), default=AUTO,
                       tooltip="How sigma becomes the trainer's timestep. auto: flow models (SD3, Flux, "
                               "Flux 2, Wan, ...) use int(sigma*1000), discrete models their own timestep, "
                               "EDM models the SD/SDXL timestep of the same noise level."),
        io.Boolean.Input("vanilla_tlora", default=False,
                         tooltip="Accept a standard LoRA layout (kohya lora_down/lora_up, PEFT lora_A/B) "
                                 "as a vanilla T-LoRA. Needed only when the file's metadata does not "
                                 "say it is a T-LoRA."),
        io.Combo.Input("standard_layout", options=list(STANDARD_LAYOUTS), default="auto", optional=True,
                       tooltip="How the ranks of a standard-layout T-LoRA switch on. auto: as the file's metadata "
                               "says. ranks: one rank per index (a vanilla T-LoRA). pairs: LyCORIS' rank-2R tlora "
                               "export (convert_tlora.py, or LyCORIS' save since its pull request 280), where rank i "
                               "and rank R+i switch together; such files record nothing, so choose this for them."),
    ]


class TLoRALoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRALoader",
            display_name="Load T-LoRA",
            category="loaders/T-LoRA",
            description=("Loads a T-LoRA (timestep-dependent LoRA) and runs it the way it was trained: at every "
                         "sampler call only the first r(t) ranks are active, few at high noise, all at the end. "
                         "Reads the files of SimpleTuner/LyCORIS, the official T-LoRA repo, sd-scripts forks "
                         "(Enferlain, 67372a), LyCORIS' rank-2R export, AnimaLoraStudio, lora-scripts-next, and "
                         "vanilla T-LoRAs in standard LoRA layouts, each with its trainer's schedule."),
            inputs=_inputs(),
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The model with the T-LoRA and its rank schedule."),
                io.Clip.Output(display_name="CLIP", tooltip="The text encoder, with text-encoder modules if any."),
            ],
        )

    @classmethod
    def fingerprint_inputs(cls, lora_name, vanilla_tlora=False, standard_layout="auto", **kwargs):
        return file_fingerprint(lora_name, bool(vanilla_tlora), standard_layout)

    @classmethod
    def execute(cls, model, lora_name, strength_model, strength_clip, schedule_source, min_rank, alpha,
                max_rank, timestep_mode, vanilla_tlora, standard_layout="auto", clip=None) -> io.NodeOutput:
        path = lora_path(lora_name)
        tl = read_file(path, vanilla_tlora, standard_layout)
        r, mr, al, why = resolve_schedule(tl, schedule_source, max_rank, min_rank, alpha)
        log.info("T-LoRA %s: written by %s%s; schedule %s", lora_name, tl.writer.title,
                 f" ({tl.layout_why})" if tl.layout_why else "", why)
        if tl.writer.assumed:
            log.warning("T-LoRA %s: %s", lora_name, tl.writer.assumed)
        settings = Settings(strength_model, r, mr, al, timestep_mode)
        return model_and_clip(path, tl, model, clip, strength_clip,
                              lambda progress: apply_tlora(model, tl, settings, progress)[0])
