"""Train T-LoRA node: trains a T-LoRA on one or a few images and returns the model running it."""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field

import comfy.utils
import folder_paths
from comfy_api.v0_0_2 import io, ui

from ..engine import Settings, apply_tlora, output_path, read_file
from ..engine.timesteps import AUTO, MODES
from ..engine.train_targets import ATTENTION, PRESETS
from ..engine.training import DTYPES, INITS, LOSS_SPACES, OPTIMIZERS, PAPER, SAMPLINGS, SCHEDULES, TrainSettings, train
from ..tlora_core.export import standard_path
from .common import progress_bar
from .train_preview import live, outputs, preview_inputs, preview_outputs, previewer
from .train_recipe import CUSTOM, PRESET_NAMES, PRESET_VALUES, departures, describe

log = logging.getLogger("tlora.train")
__all__ = ["PRESET_NAMES", "PRESET_VALUES", "NodeTrainSettings", "TLoRATrain", "preset_departures"]

NONE = "none"


def preset_departures(preset: str, values: dict) -> dict[str, dict]:
    """The values that depart from the named preset's source recipe, each with its reason (`train_recipe`)."""
    return departures(preset, values)


@dataclass(frozen=True)
class NodeTrainSettings(TrainSettings):
    """The settings the node trains with, plus the preset they were chosen under and the values that depart from it
    (recorded with the others in the file's `tlora_training`)."""

    preset: str = CUSTOM
    preset_departures: dict = field(default_factory=dict)


def _inputs() -> list:
    loras = [NONE, *folder_paths.get_filename_list("loras")]
    return [
        io.Model.Input("model", tooltip="The diffusion model to customise (its weights stay untouched)."),
        io.Latent.Input("latents", tooltip="The training image(s), encoded with the model's VAE: one LATENT, a batch, "
                                           "or a list (as ComfyUI's dataset nodes make), of any sizes: each size is "
                                           "a bucket, every model call one size."),
        io.Conditioning.Input("positive", tooltip="The caption(s): one conditioning for all images, one per image, or "
                                                  "one entry per image in order (Resolution Bucket)."),
        io.String.Input("filename", default="tlora/my_tlora",
                        tooltip="Where to save the T-LoRA, inside models/loras (.safetensors is added)."),
        io.Combo.Input("preset", options=PRESET_NAMES, default=PRESET_NAMES[0],
                       tooltip="A recipe: 'paper, single image' (rank 64, min_rank 32, schedule exponent 1, LyCORIS "
                               "alpha 0 = scale 1, attention, AdamW at a constant lr 1e-4, 800 steps, the paper's "
                               "random init), 'SimpleTuner' (rank 64, min_rank 1, LyCORIS alpha 32, attention + "
                               "feed-forward, principal init). Choosing one writes its values into steps, "
                               "learning_rate, rank, min_rank, alpha, linear_alpha, targets, init, optimizer and "
                               "lr_schedule; editing one of those turns this to 'custom'. What trains is always the "
                               "widgets' values; the node says where they depart from the preset's recipe, and why."),
        io.Int.Input("steps", default=800, min=1, max=100000, tooltip="Optimizer steps."),
        io.Float.Input("learning_rate", default=1e-4, min=1e-7, max=1.0, step=1e-5,
                       tooltip="Learning rate (AdamW's 1e-4 is the paper's)."),
        io.Int.Input("rank", default=64, min=1, max=512, tooltip="T-LoRA rank R (linear_dim)."),
        io.Int.Input("min_rank", default=32, min=1, max=512,
                     tooltip="Ranks active at the noisiest timestep (tlora_min_rank)."),
        io.Float.Input("alpha", default=1.0, min=0.05, max=10.0, step=0.05,
                       tooltip="Schedule exponent (tlora_alpha; not LyCORIS alpha): how the active rank grows from "
                               "min_rank to rank as noise falls; 1 = linearly."),
        io.Float.Input("linear_alpha", default=0.0, min=0.0, max=1024.0, step=1.0,
                       tooltip="LyCORIS alpha (linear_alpha; not the schedule exponent): the delta is scaled by "
                               "linear_alpha / rank; 0 = rank (scale 1)."),
        io.Combo.Input("targets", options=list(PRESETS), default=ATTENTION,
                       tooltip="Which layers: attention projections, plus feed-forward, or every linear the pack "
                               "maps."),
        io.Int.Input("batch_size", default=1, min=1, max=64,
                     tooltip="Samples per step (each with its own noise, timestep and rank)."),
        io.Int.Input("grad_accumulation", default=1, min=1, max=64, tooltip="Batches summed before each step."),
        io.Combo.Input("optimizer", options=list(OPTIMIZERS), default="AdamW",
                       tooltip="AdamW (weight decay 1e-4, the paper's SDXL choice), Adam, SGD, Prodigy (the "
                               "paper's Flux choice, learning_rate 1; needs the prodigyopt package) or AdamW "
                               "schedule-free (needs the schedulefree package; files store its averaged weights)."),
        io.Float.Input("max_grad_norm", default=1.0, min=0.0, max=100.0, step=0.1,
                       tooltip="Gradient clipping; 0 = off."),
        io.Boolean.Input("gradient_checkpointing", default=True,
                         tooltip="Recompute each block in the backward pass: much less memory, ~30% slower."),
        io.Combo.Input("training_dtype", options=list(DTYPES), default="auto",
                       tooltip="Compute dtype of the model while training; auto = the model's own (fp16 for SD1.5 "
                               "and SDXL on most GPUs). fp16 trains with dynamic loss scaling: steps whose gradients "
                               "overflow are skipped and counted. The trained factors are always float32."),
        io.Combo.Input("timestep_sampling", options=list(SAMPLINGS), default="auto",
                       tooltip="How training timesteps are drawn. auto: uniform integer timesteps for SD-style "
                               "models, logit-normal noise levels (with the model's shift) for flow models."),
        io.Combo.Input("timestep_mode", options=list(MODES), default=AUTO,
                       tooltip="How a sample's sigma becomes the timestep its rank comes from (the same rule Load "
                               "T-LoRA uses when sampling)."),
        io.Combo.Input("loss_space", options=list(LOSS_SPACES), default="prediction",
                       tooltip="prediction: MSE of the model's own prediction (noise, v or flow velocity), as "
                               "SimpleTuner and the paper train; x0: MSE of the denoised image."),
        io.Float.Input("guidance", default=1.0, min=0.0, max=100.0, step=0.1,
                       tooltip="Guidance value for guidance-distilled models (Flux dev); ignored by other models."),
        io.Int.Input("seed", default=0, min=0, max=2**31 - 1, tooltip="Seed of the noise, timesteps and batches."),
        io.Boolean.Input("store_base", default=True,
                         tooltip="Store the SVD base in the file: exact on any storage of the model (fp8, GGUF); "
                                 "doubles the file size."),
        io.Int.Input("save_every", default=0, min=0, max=100000,
                     tooltip="Also save a checkpoint every N steps (<name>_step<N>.safetensors, its .train_state "
                             "beside it); 0 = only the end. An interrupt saves the last finished step."),
        io.Combo.Input("resume_from", options=loras, default=NONE,
                       tooltip="Continue a run from a file it wrote (a checkpoint or the final file: with its "
                               ".train_state the run continues exactly) or from another trainer's T-LoRA (its factors "
                               "only). steps = how many more. Refused unless rank, min_rank, alpha, linear_alpha, "
                               "targets and model are the file's."),
        io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing file of the same name."),
        io.Boolean.Input("export_standard", default=False, optional=True,
                         tooltip="Also write <name>.standard.safetensors (and one beside each checkpoint): the "
                                 "T-LoRA as a rank-2R standard LoRA that LoraLoader and other tools apply at every "
                                 "rank (no schedule), and Load T-LoRA runs with its schedule."),
        io.Float.Input("caption_dropout", default=0.0, min=0.0, max=1.0, step=0.01, optional=True,
                       tooltip="The probability that a sample trains with the empty caption (0.05-0.1 is common); "
                               "keeps the model's unconditional prediction."),
        io.Conditioning.Input("empty_caption", optional=True,
                              tooltip="What a dropped caption trains with, e.g. the encoded empty prompt; not "
                                      "connected: the captions zeroed (as ConditioningZeroOut does)."),
        io.Mask.Input("masks", optional=True,
                      tooltip="Loss masks, one per training image (or one for all), e.g. from a segmentation node: "
                              "the loss counts each latent element by the mask's mean over its pixels (1 = train, "
                              "0 = ignore)."),
        io.Combo.Input("init", options=list(INITS), default=PAPER, optional=True,
                       tooltip="How the T-LoRA starts: the last SVD components of a random matrix (the paper's "
                               "choice, seeded by seed; the file always stores this base) or the principal SVD "
                               "components of the layer's weights (LyCORIS' and SimpleTuner's). Both start with no "
                               "change to the model."),
        io.Combo.Input("lr_schedule", options=list(SCHEDULES), default=SCHEDULES[0], optional=True,
                       tooltip="The learning rate over the run: constant (the paper's), warm-up then cosine decay to "
                               "0, or linear decay to 0; a resumed run continues it from its step."),
        io.Int.Input("warmup_steps", default=0, min=0, max=100000, optional=True,
                     tooltip="Steps over which the learning rate rises linearly to learning_rate (every schedule); "
                             "0 = none."),
        *preview_inputs(),
    ]


class TLoRATrain(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRATrain",
            display_name="Train T-LoRA",
            category="loaders/T-LoRA",
            description=("Trains a T-LoRA (timestep-dependent LoRA) on one or a few images, the way the paper and "
                         "SimpleTuner do: each sample uses only the first r(t) ranks of its own timestep. Saves a "
                         "standard LyCORIS 'tlora' file into models/loras (and, with export_standard, a rank-2R "
                         "standard LoRA of it for other loaders) and returns the model running it exactly as Load "
                         "T-LoRA would."),
            is_input_list=True,
            is_output_node=True,
            inputs=_inputs(),
            outputs=[
                io.Model.Output(display_name="MODEL", tooltip="The input model with the trained T-LoRA applied."),
                io.Custom("LOSS_MAP").Output(display_name="LOSS", tooltip="The loss of every step (Plot Loss Graph)."),
                io.String.Output(display_name="FILE", tooltip="The saved file's name in models/loras."),
                *preview_outputs(),
            ],
            hidden=[io.Hidden.unique_id],
        )

    @classmethod
    def execute(cls, model, latents, positive, **widgets) -> io.NodeOutput:
        links = {k: widgets.pop(k, None) for k in ("empty_caption", "masks")}  # lists; None when not connected
        links = {k: v for k, v in links.items() if v is not None and any(x is not None for x in v)}
        pbar = comfy.utils.ProgressBar(1)
        pv = previewer(widgets, live(pbar))
        one = {k: v[0] if isinstance(v, list) else v for k, v in widgets.items()}
        resume, filename, overwrite = one.pop("resume_from"), one.pop("filename"), one.pop("overwrite")
        out = output_path(filename, folder_paths.get_folder_paths("loras")[0], overwrite, where="models/loras")
        # the values sent are the values trained; a preset only names where they came from
        departs = preset_departures(one["preset"], one)
        if departs:
            log.warning("Train T-LoRA: preset '%s' departed from, training the values given: %s", one["preset"],
                        describe(departs))
        settings = NodeTrainSettings(**one, preset_departures=departs)
        tensors = [lat["samples"] for lat in latents]
        pbar.total = settings.steps
        node_id = cls.hidden.unique_id if getattr(cls, "hidden", None) is not None else None

        def progress(step: int, total: int, loss: float) -> None:
            pbar.update_absolute(step, total)
            _progress_text(f"step {step}/{total}  loss {loss:.4g}", node_id)

        resume_path = folder_paths.get_full_path_or_raise("loras", resume) if resume != NONE else None
        result = train(model[0], tensors, positive, settings, out, resume_path, progress, progress_bar(),
                       source_name=f"{type(model[0].model).__name__}", masks=links.get("masks"),
                       empty=links["empty_caption"][0] if "empty_caption" in links else None,
                       preview=pv)
        name = os.path.relpath(out, folder_paths.get_folder_paths("loras")[0])
        tl = read_file(out, False)
        trained, _ = apply_tlora(model[0], tl, Settings(1.0, settings.rank, settings.min_rank, settings.alpha,
                                                        settings.timestep_mode))
        text = f"{name}: {result.steps} steps, loss {result.losses[0]:.4g} -> {result.losses[-1]:.4g}"
        if result.loss_scaling:
            text += f", fp16 loss scaling: {result.skipped} steps skipped"
        if result.resumed:
            text += f"; continued {result.resumed}"
        if settings.init == PAPER and not settings.store_base:
            text += "; base stored (store_base off is overridden: the paper's random init cannot be rebuilt)"
        if settings.export_standard:
            text += f"; standard LoRA (every rank): {standard_path(name)}"
        if pv is not None:
            text += f"; previews at {len(pv.rows)} steps ({pv.seconds:.1f} s), saved beside each checkpoint"
        if departs:
            text += f"\ndeparts from preset '{settings.preset}': {describe(departs)}"
        grid, band_plot = outputs(pv, result, settings.batch_size * settings.grad_accumulation, settings.steps)
        shown = {"text": [text]}
        if pv is not None:  # the grid stays on the node after the run (a temp image, as Preview Image saves one)
            shown.update(ui.PreviewImage(grid).as_dict())
        return io.NodeOutput(trained, {"loss": result.losses}, name, grid, band_plot, ui=shown)


def _progress_text(text: str, node_id) -> None:
    try:
        from server import PromptServer
    except ImportError:
        return
    server = getattr(PromptServer, "instance", None)
    if server is not None and node_id is not None and hasattr(server, "send_progress_text"):
        server.send_progress_text(text, node_id)
