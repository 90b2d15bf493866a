"""Train T-LoRA on a ComfyUI model: targets from the loader's key maps, the principal SVD init, a per-sample rank
from each sample's own sigma, ComfyUI's own guider for the model call, and a standard LyCORIS `tlora` file.

The loop runs inside `Guider_Basic.sample` as a `comfy.samplers.Sampler` (what ComfyUI's own trainer does): that
brings ComfyUI's conditioning processing (SDXL size conds, Flux guidance, ...), model loading, and other nodes'
wrappers. The trainable modules sit in the target layers as slots of the pack's forward dispatcher (activation
space: the weights are never touched, any storage works), and the pack's APPLY_MODEL rule turns each call's sigma
into each sample's rank, the rule inference uses. The rank stays set through the backward pass (gradient
checkpointing recomputes the forward there) and is cleared after it.

The input model is left as it was: the training runs on a clone, its slots, wrappers and checkpointing are removed
in `finally`, and the only change to the shared weights is that tensors created under inference mode are replaced by
normal copies of the same values (autograd cannot save inference tensors), so sampling with the input model after
training is bit-identical to before.

Every file a run writes has its training state beside it (`state.py`), so `resume_from` continues the run exactly
(`resume.py`, which also refuses files trained otherwise); a model that computes in fp16 trains with dynamic loss
scaling (`tlora_core.loss_scale`); an interrupt keeps the last finished step.
"""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from collections.abc import Callable

import comfy.model_management
import torch

from ...tlora_core import TLoRAError
from ...tlora_core.embed import source_record
from ...tlora_core.random_init import INITS, PAPER, PRINCIPAL, RANDOM_BASE
from ...tlora_core.training import TrainableTLoRA, lycoris_config
from .. import timesteps
from ..apply import compute_dtype
from ..patcher import require_api
from ..train_targets import LYCORIS_CLASSES, trainable_targets
from . import bands
from .checkpointing import saved_copies
from .data import Data, caption_of_images, empty_caption, mask_problem
from .export import standard_names
from .files import RunFiles
from .loop import Loop, TrainSampler
from .modules import init_modules
from .optim import OPTIMIZERS, OPTIONAL, SCHEDULES, MissingOptimizer, optional_class, to_eval
from .patch import KEY, TrainingPatch, TrainSlot, deinference
from .preview import Previewer, PreviewSettings
from .resume import resume_modules
from .settings import DTYPES, LOSS_SPACES, SAMPLINGS, Progress, TrainResult, TrainSettings

log = logging.getLogger("tlora.train")

__all__ = ["DTYPES", "INITS", "KEY", "LOSS_SPACES", "OPTIMIZERS", "PAPER", "PRINCIPAL", "SAMPLINGS", "SCHEDULES",
           "PreviewSettings", "Previewer", "TrainResult", "TrainSettings", "TrainSlot", "TrainableTLoRA",
           "TrainingPatch", "bands", "check_inputs", "deinference", "saved_copies", "train"]


def check_inputs(patcher, latents: list[torch.Tensor], positive: list, s: TrainSettings, out: str,
                 masks: list[torch.Tensor] | None = None) -> str:
    """Everything that can be refused before any work; returns the timestep rule's description."""
    problems = s.problems()
    if problems:
        raise TLoRAError(out, "; ".join(problems))
    if s.optimizer in OPTIONAL:
        try:
            optional_class(s.optimizer)
        except MissingOptimizer as e:
            raise TLoRAError(out, str(e)) from None
    if not latents:
        raise TLoRAError(out, "no latents to train on: connect the encoded training image(s)")
    kinds = {tuple(t.shape[1:-2]) for t in latents}
    if len(kinds) > 1:
        raise TLoRAError(out, f"latents of different kinds {sorted(kinds)} (channels, frames): encode every training "
                              "image with the same VAE")
    n = sum(t.shape[0] for t in latents)
    if caption_of_images(positive, n) is None:
        raise TLoRAError(out, f"{len(positive)} conditionings for {n} latents ({sum(len(c) for c in positive)} "
                              "entries): give one conditioning, or one per latent")
    if masks is not None:
        if len(masks) not in (1, n):
            raise TLoRAError(out, f"{len(masks)} masks for {n} latents: give one mask per training image, or one "
                                  "for all")
        sizes = [tuple(t.shape[-2:]) for t in latents for _ in range(t.shape[0])]
        for i, hw in enumerate(sizes):
            problem = mask_problem(masks[i if len(masks) > 1 else 0], hw, i)
            if problem:
                raise TLoRAError(out, problem)
    require_api(patcher)
    try:
        return timesteps.resolve(s.timestep_mode, patcher.get_model_object("model_sampling"), patcher.model)[1]
    except ValueError as e:
        raise TLoRAError(out, str(e)) from None


def train(patcher, latents: list[torch.Tensor], positive: list, s: TrainSettings, out: str,
          resume: str | None = None, progress: Progress | None = None,
          svd_progress: Callable[[int, int], None] | None = None, source_name: str = "",
          masks: list[torch.Tensor] | None = None, empty: list | None = None,
          preview: Previewer | None = None) -> TrainResult:
    """Train a T-LoRA on `patcher`'s model and write it to `out` (with its training state beside it). `latents`: the
    images' latents, any sizes (size buckets: each model call one size). `positive`: one conditioning (a list of
    [tensor, dict] entries, its first entry used) for all latents, one per latent, or entries one per latent in
    order (`data.caption_of_images`). `masks`: (H, W) pixel-space loss weights, one per image or one for all.
    `empty`: the conditioning a dropped caption trains with (default: the first caption zeroed, as
    ConditioningZeroOut does). `resume`: a T-LoRA file to continue (checked against the settings; its state, when
    beside it, continues the run exactly). An interrupt writes the last finished step as a checkpoint before it
    stops the run. `preview`: renders the preview prompts at its steps (each then also a checkpoint) and at the end,
    each row saved beside its file."""
    t0 = time.perf_counter()
    masks = [m.reshape(-1, *m.shape[-2:]) for m in masks] if masks is not None else None
    masks = [r for m in masks for r in m] if masks is not None else None  # one (H, W) per image
    how = check_inputs(patcher, latents, positive, s, out, masks)
    if preview is not None and preview.p.problems():
        raise TLoRAError(out, "; ".join(preview.p.problems()))
    if s.init == PAPER and not s.store_base:
        log.warning("Train T-LoRA: store_base switched on: a file trained from the paper's random init always stores "
                    "its base (it cannot be rebuilt from the model's weights)")
        s = dataclasses.replace(s, store_base=True)
    targets = trainable_targets(patcher.model, s.targets)
    if not targets:
        raise TLoRAError(out, f"no layer of this {type(patcher.model).__name__} model is known to the key maps "
                              f"under the '{s.targets}' targets: the pack cannot map this family")
    export_names = standard_names(patcher.model, targets, out) if s.export_standard else None
    model = type(patcher.model).__name__
    device = comfy.model_management.get_torch_device()
    modules, digests, storage = init_modules(patcher, targets, s, out, device, svd_progress, resuming=bool(resume))
    resumed = resume_modules(modules, resume, s, model) if resume else None
    with torch.inference_mode(False):
        for m in modules.values():
            m.to(device)
    log.info("Train T-LoRA: %d modules (%s) on %s, rank %d, min_rank %d, alpha %g, %d steps%s; init %s; %s, lr %g "
             "%s (warm-up %d); timesteps: %s", len(modules), s.targets, model, s.rank, s.min_rank, s.alpha, s.steps,
             f", continuing {resumed.describe()}" if resumed else "", s.init, s.optimizer, s.learning_rate,
             s.lr_schedule, s.warmup_steps, how)

    n = sum(t.shape[0] for t in latents)
    entries, cond_of = caption_of_images(positive, n) or ([], [])
    data = Data(latents, cond_of, (masks * n if len(masks) == 1 else masks) if masks is not None else None)
    if s.caption_dropout > 0:  # the last entry: a dropped caption's (data.EMPTY)
        entries = [*entries, empty[0] if empty else empty_caption(entries[0])]
    if len(data.buckets) > 1:
        log.info("Train T-LoRA: %d images in %d size buckets: %s", n, len(data.buckets),
                 ", ".join(f"{len(b.images)} at {'x'.join(map(str, b.latent.shape[2:]))}" for b in data.buckets))
    if s.guidance and (patcher.model.model_config.unet_config.get("guidance_embed")):
        entries = [[t, {**d, "guidance": s.guidance}] for t, d in entries]

    patch = TrainingPatch(patcher, targets, modules, s)
    config = lycoris_config(s.rank, s.linear_alpha or s.rank, s.min_rank, s.alpha, LYCORIS_CLASSES[s.targets])
    facts = {"timesteps": how, "modules": len(modules), "images": n, "model": model,
             "buckets": ["x".join(map(str, b.latent.shape[2:])) for b in data.buckets]}
    loop: Loop | None = None
    source = source_record(source_name, digests, storage, "Train T-LoRA")
    if s.init == PAPER:
        source["base_init"] = RANDOM_BASE
    files = RunFiles(out, modules, s, config, source, facts,
                     resumed.steps if resumed else 0, resume, export_names,
                     live=lambda: {"skipped_steps": loop.scaler.skipped, "loss_scaling": loop.scaler.enabled}
                     if loop else {})
    loop = Loop(s, modules, patch, files.checkpoint, progress, device, resumed)
    loop.preview = preview
    try:
        with torch.inference_mode(False):
            patch.load()
            loop.start(fp16=compute_dtype(patch.clone) == torch.float16)
            from comfy_extras.nodes_custom_sampler import Guider_Basic

            guider = Guider_Basic(patch.clone)
            guider.set_conds(entries)
            ms = patch.clone.get_model_object("model_sampling")
            sigmas = torch.tensor([float(ms.sigma_max), 0.0])  # each call then passes its own (Loop.micro_batch)
            latent = data.buckets[0].latent  # what the guider prepares for; the loop draws from every bucket
            guider.sample(torch.zeros_like(latent), latent, TrainSampler(loop, data), sigmas, seed=s.seed)
    except comfy.model_management.InterruptProcessingException:
        saved = _save_interrupted(loop)
        log.warning("Train T-LoRA interrupted after %d of %d steps: no final file written%s", loop.done, s.steps,
                    f"; checkpoints kept: {', '.join(loop.checkpoints)} (resume_from {os.path.basename(saved)} "
                    "continues the run)" if saved else "")
        raise
    finally:
        patch.close()
    to_eval(loop.opt)  # the factors a file stores and the run returns (schedule-free AdamW: its eval-mode ones)
    files.final(s.steps, loop.run_state())
    if preview is not None and preview.rows and preview.rows[-1][0] == loop.steps_before + s.steps:
        loop.previews.append(preview.save(out))
    skipped = f", {loop.scaler.skipped} steps skipped by fp16 loss scaling" if loop.scaler.enabled else ""
    log.info("Train T-LoRA: wrote %s (%d modules, %d steps, loss %.4g -> %.4g%s)", out, len(modules),
             loop.steps_before + s.steps, loop.losses[0], loop.losses[-1], skipped)
    return TrainResult(out, loop.losses, modules, patch.state.calls, loop.checkpoints, time.perf_counter() - t0,
                       loop.drawn, loop.steps_before + s.steps, loop.scaler.skipped, loop.scaler.enabled,
                       resumed.describe() if resumed else "", loop.lrs, loop.sample_losses, loop.previews)


def _save_interrupted(loop: Loop) -> str | None:
    """The last finished step as a checkpoint with its state (already written when save_every fell on it)."""
    try:
        loop.checkpoint()
    except Exception:  # the interrupt is what the user must see; the failed write is logged with its cause
        log.exception("Train T-LoRA: could not write the interrupted run's last step")
        return None
    return loop.checkpoints[-1] if loop.checkpoints else None
