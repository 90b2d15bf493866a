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

import logging
import os
import time
from collections.abc import Callable

import comfy.model_management
import torch

from ...tlora_core import TLoRAError
from ...tlora_core.embed import source_record
from ...tlora_core.training import TrainableTLoRA, lycoris_config
from .. import timesteps
from ..apply import compute_dtype
from ..patcher import require_api
from ..train_targets import LYCORIS_CLASSES, trainable_targets
from . import bands
from .checkpointing import saved_copies
from .export import standard_names
from .files import RunFiles
from .loop import Loop, TrainSampler
from .modules import init_modules
from .patch import KEY, TrainingPatch, TrainSlot, deinference
from .preview import Previewer, PreviewSettings
from .resume import resume_modules
from .settings import DTYPES, LOSS_SPACES, OPTIMIZERS, SAMPLINGS, Progress, TrainResult, TrainSettings

log = logging.getLogger("tlora.train")

__all__ = ["DTYPES", "KEY", "LOSS_SPACES", "OPTIMIZERS", "SAMPLINGS", "PreviewSettings", "Previewer", "TrainResult",
           "TrainSettings", "TrainSlot", "TrainableTLoRA", "TrainingPatch", "bands", "check_inputs", "deinference",
           "saved_copies", "train"]


def check_inputs(patcher, latents: list[torch.Tensor], positive: list, s: TrainSettings, out: str) -> str:
    """Everything that can be refused before any work; returns the timestep rule's description."""
    problems = s.problems()
    if problems:
        raise TLoRAError(out, "; ".join(problems))
    if not latents:
        raise TLoRAError(out, "no latents to train on: connect the encoded training image(s)")
    shapes = {tuple(t.shape[1:]) for t in latents}
    if len(shapes) > 1:
        raise TLoRAError(out, f"latents of different sizes {sorted(shapes)}: resize the training images to one size")
    n = sum(t.shape[0] for t in latents)
    if len(positive) not in (1, n):
        raise TLoRAError(out, f"{len(positive)} conditionings for {n} latents: give one conditioning, or one per "
                              "latent")
    require_api(patcher)
    try:
        return timesteps.resolve(s.timestep_mode, patcher.get_model_object("model_sampling"), patcher.model)[1]
    except ValueError as e:
        raise TLoRAError(out, str(e)) from None


def train(patcher, latents: list[torch.Tensor], positive: list, s: TrainSettings, out: str,
          resume: str | None = None, progress: Progress | None = None,
          svd_progress: Callable[[int, int], None] | None = None, source_name: str = "",
          preview: Previewer | None = None) -> TrainResult:
    """Train a T-LoRA on `patcher`'s model and write it to `out` (with its training state beside it). `positive`: one
    conditioning (a list of [tensor, dict] entries, its first entry used) for all latents, or one per latent.
    `resume`: a T-LoRA file to continue (checked against the settings; its state, when beside it, continues the
    run exactly). An interrupt writes the last finished step as a checkpoint before it stops the run. `preview`:
    renders the preview prompts at its steps (each then also a checkpoint) and at the end, each row saved beside its
    file."""
    t0 = time.perf_counter()
    how = check_inputs(patcher, latents, positive, s, out)
    if preview is not None and preview.p.problems():
        raise TLoRAError(out, "; ".join(preview.p.problems()))
    targets = trainable_targets(patcher.model, s.targets)
    if not targets:
        raise TLoRAError(out, f"no layer of this {type(patcher.model).__name__} model is known to the key maps "
                              f"under the '{s.targets}' targets: the pack cannot map this family")
    export_names = standard_names(patcher.model, targets, out) if s.export_standard else None
    model = type(patcher.model).__name__
    device = comfy.model_management.get_torch_device()
    modules, digests, storage = init_modules(patcher, targets, s, out, device, svd_progress)
    resumed = resume_modules(modules, resume, s, model) if resume else None
    with torch.inference_mode(False):
        for m in modules.values():
            m.to(device)
    log.info("Train T-LoRA: %d modules (%s) on %s, rank %d, min_rank %d, alpha %g, %d steps%s; timesteps: %s",
             len(modules), s.targets, model, s.rank, s.min_rank, s.alpha, s.steps,
             f", continuing {resumed.describe()}" if resumed else "", how)

    latent = torch.cat(latents).float()
    cond_of = [0] * latent.shape[0] if len(positive) == 1 else list(range(latent.shape[0]))
    entries = [c[0] for c in positive]
    if s.guidance and (patcher.model.model_config.unet_config.get("guidance_embed")):
        entries = [[t, {**d, "guidance": s.guidance}] for t, d in entries]

    patch = TrainingPatch(patcher, targets, modules, s)
    config = lycoris_config(s.rank, s.linear_alpha or s.rank, s.min_rank, s.alpha, LYCORIS_CLASSES[s.targets])
    facts = {"timesteps": how, "modules": len(modules), "images": int(latent.shape[0]), "model": model}
    loop: Loop | None = None
    files = RunFiles(out, modules, s, config, source_record(source_name, digests, storage, "Train T-LoRA"), facts,
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
            guider.sample(torch.zeros_like(latent), latent, TrainSampler(loop, cond_of), sigmas, seed=s.seed)
    except comfy.model_management.InterruptProcessingException:
        saved = _save_interrupted(loop)
        log.warning("Train T-LoRA interrupted after %d of %d steps: no final file written%s", loop.done, s.steps,
                    f"; checkpoints kept: {', '.join(loop.checkpoints)} (resume_from {os.path.basename(saved)} "
                    "continues the run)" if saved else "")
        raise
    finally:
        patch.close()
    files.final(s.steps, loop.run_state())
    if preview is not None and preview.rows and preview.rows[-1][0] == loop.steps_before + s.steps:
        loop.previews.append(preview.save(out))
    skipped = f", {loop.scaler.skipped} steps skipped by fp16 loss scaling" if loop.scaler.enabled else ""
    log.info("Train T-LoRA: wrote %s (%d modules, %d steps, loss %.4g -> %.4g%s)", out, len(modules),
             loop.steps_before + s.steps, loop.losses[0], loop.losses[-1], skipped)
    return TrainResult(out, loop.losses, modules, patch.state.calls, loop.checkpoints, time.perf_counter() - t0,
                       loop.drawn, loop.steps_before + s.steps, loop.scaler.skipped, loop.scaler.enabled,
                       resumed.describe() if resumed else "", loop.sample_losses, loop.previews)


def _save_interrupted(loop: Loop) -> str | None:
    """The last finished step as a checkpoint with its state (already written when save_every fell on it)."""
    try:
        loop.checkpoint()
    except Exception:  # the interrupt is what the user must see; the failed write is logged with its cause
        log.exception("Train T-LoRA: could not write the interrupted run's last step")
        return None
    return loop.checkpoints[-1] if loop.checkpoints else None
