"""The training loop: timestep draws, micro-batches through ComfyUI's guider, the loss (scaled for fp16 models), the
optimizer, checkpoints with the run's state. It runs inside `Guider_Basic.sample` as a `comfy.samplers.Sampler`
(what ComfyUI's own trainer does)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.model_management
import comfy.samplers
import torch

from ...tlora_core.loss_scale import LossScaler
from ...tlora_core.training import LOGIT_NORMAL, UNIFORM, TrainableTLoRA, draw_discrete_t, draw_flow_u, loss_weight
from .. import timesteps
from . import state as run_state
from .checkpointing import INPLACE_ERROR, saved_copies
from .data import Data
from .optim import evaluating, make_optimizer, set_lr, to_train
from .patch import TrainingPatch
from .preview import Previewer
from .resume import Resumed
from .settings import Progress, TrainSettings

log = logging.getLogger("tlora.train")

Save = Callable[[int, run_state.RunState], str]


def one_step_schedule(sigma: torch.Tensor) -> torch.Tensor:
    """`sample_sigmas` for a training call: the schedule of one step from the call's noise level(s) to 0 (a training
    call denoises straight to x0), so readers of the schedule (hook keyframes, context windows, HunyuanVideo 1.5)
    find the call's sigma in it."""
    levels = sorted({float(v) for v in sigma.detach().float().reshape(-1).tolist()}, reverse=True)
    return torch.tensor([*levels, 0.0], device=sigma.device)


class Loop:
    def __init__(self, s: TrainSettings, modules: dict[str, TrainableTLoRA], patch: TrainingPatch, save: Save,
                 progress: Progress | None, device, resumed: Resumed | None = None):
        self.s, self.modules, self.patch, self.state = s, modules, patch, patch.state
        self.save, self.progress, self.device = save, progress, device
        self.steps_before = resumed.steps if resumed is not None else 0
        # a resumed run without a state never repeats the first run's draws
        self.generator = torch.Generator().manual_seed(s.seed + (self.steps_before << 32))
        self.names = run_state.param_names(modules)
        self.params = [p for m in modules.values() for p in m.parameters()]
        self.opt = make_optimizer(s, self.params)
        self.scaler = LossScaler(False)
        self.losses: list[float] = list(resumed.losses) if resumed is not None else []  # the whole run's
        self.done = 0  # steps finished by this run
        self.checkpoints: list[str] = []
        self.saved_at = -1  # the step (of this run) last written with its state
        self.drawn: list[float] = []  # the trainer's timestep of every sample drawn, in order (tests, diagnostics)
        self.sample_losses: list[float] = []  # the loss of every sample, in the order of `drawn`
        self.preview: Previewer | None = None
        self.previews: list[str] = []  # the preview images saved beside checkpoints
        self.resumed = resumed
        self.rng_done = self.generator.get_state()  # the generator as the last finished step left it
        self.lrs: list[float] = []  # the learning rate of every step this run took (tests, diagnostics)

    def start(self, fp16: bool) -> None:
        """Once the model is loaded: loss scaling for an fp16 model, then the resumed run's state (if any)."""
        self.scaler = LossScaler(fp16)
        st = self.resumed.state if self.resumed is not None else None
        if st is None:
            return
        self.generator.set_state(st.generator)
        self.rng_done = self.generator.get_state()
        self.scaler.load_state_dict(st.scaler)
        if st.optimizer == type(self.opt).__name__:
            run_state.restore_optimizer(self.opt, self.names, st)
            for g in self.opt.param_groups:  # this run's decay (its learning rate is set at each step, from the
                if self.s.optimizer not in ("Adam", "SGD"):  # step's position in the whole run)
                    g["weight_decay"] = self.s.weight_decay
            to_train(self.opt)  # schedule-free AdamW: its state was saved with the eval-mode parameters
        else:
            log.info("Train T-LoRA: optimizer %s (the state holds %s): it starts afresh", self.s.optimizer,
                     st.optimizer)

    def run_state(self) -> run_state.RunState:
        """Everything needed to continue after the last finished step."""
        return run_state.capture(self.opt, self.names, self.rng_done, self.scaler.state_dict(),
                                 self.steps_before + self.done, self.losses, self.s.record(),
                                 run_state.factors_digest(self.modules))

    def checkpoint(self) -> str | None:
        """Write the last finished step with its state, unless it is already written (or no step finished)."""
        if self.done == 0 or self.saved_at == self.done:
            return None
        with evaluating(self.opt):  # what a file stores (schedule-free AdamW: its eval-mode parameters)
            path = self.save(self.done, self.run_state())
        self.saved_at = self.done
        self.checkpoints.append(path)
        return path

    def draw_sigmas(self, ms, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One sigma per sample: integer DDPM timesteps (their table entry) for discrete models; for flow and EDM
        models the model's own `percent_to_sigma` of a uniform or logit-normal noise fraction: the shift of flow
        models, and the whole of an EDM model's range (Playground 2.5 to 80, CosXL to 120), log-uniform."""
        kind = timesteps.kind_of(ms)
        how = self.s.timestep_sampling
        own = generator is None
        generator = self.generator if generator is None else generator
        if kind == "discrete":
            if how == LOGIT_NORMAL:
                t = (draw_flow_u(generator, n) * timesteps.schedule.MAX_TIMESTEP).long().clamp(0, 999)
            else:
                t = draw_discrete_t(generator, n)
            self.drawn += [float(v) for v in t] if own else []
            return ms.sigmas.detach().float().cpu()[t]
        if how not in (UNIFORM, LOGIT_NORMAL):  # auto: SimpleTuner's logit-normal for flow, uniform for EDM
            how = LOGIT_NORMAL if kind == "flow" else UNIFORM
        u = draw_flow_u(generator, n, how)
        sigma = torch.tensor([float(ms.percent_to_sigma(1.0 - float(v))) for v in u])
        if own and kind == "flow":
            self.drawn += [float(v) * timesteps.schedule.MAX_TIMESTEP for v in sigma]
        elif own:  # EDM: the timestep the loader gives this sigma
            self.drawn += timesteps.rule(self.s.timestep_mode, ms)(sigma)
        return sigma

    def probe(self, model_wrap, extra_args, ms, cond, latent: torch.Tensor, weight: torch.Tensor | None) -> None:
        """One forward and backward with a sample of its own (the training draws are not touched, nothing is kept):
        does this model need `saved_copies`? Models that update activations in place fail without them."""
        g = torch.Generator().manual_seed(self.s.seed + 1)
        noise = torch.randn(latent[:1].shape, generator=g)
        sigma = self.draw_sigmas(ms, 1, g)
        calls = len(self.state.calls)
        try:
            self.micro_batch(model_wrap, extra_args, ms, cond, latent[:1], noise, sigma, weight)
        except RuntimeError as e:
            if INPLACE_ERROR not in str(e):
                raise
            self.patch.copies = True
            log.info("Train T-LoRA: this model updates activations in place; autograd keeps copies")
        finally:
            del self.state.calls[calls:]
            self.opt.zero_grad(set_to_none=True)

    def run(self, model_wrap, extra_args, data: Data) -> None:
        """The steps: each micro-batch from one size bucket, one model call per caption in it."""
        ms = model_wrap.inner_model.model_sampling
        conds = model_wrap.conds["positive"]  # the captions, then the empty caption (EMPTY = -1)
        latents = data.processed(model_wrap.inner_model.process_latent_in, self.device)
        weights = [b.weight.to(self.device).clone() if b.weight is not None else None for b in data.buckets]
        s = self.s
        first = weights[0][:1] if weights[0] is not None else None
        self.probe(model_wrap, extra_args, ms, conds[data.cond_of[data.buckets[0].images[0]]], latents[0], first)
        for step in range(s.steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            step_losses = []
            for _ in range(s.grad_accumulation):
                b, idx = data.draw(self.generator, s.batch_size)
                noise = torch.randn((s.batch_size, *latents[b].shape[1:]), generator=self.generator)
                sigma = self.draw_sigmas(ms, s.batch_size)
                caps = data.captions(b, idx, self.generator, s.caption_dropout)
                drawn_losses = [0.0] * s.batch_size
                for ci in sorted(set(caps)):  # one conditioning per model call
                    sel = torch.tensor([j for j, c in enumerate(caps) if c == ci])
                    w = weights[b][idx[sel]] if weights[b] is not None else None
                    got = self.micro_batch(model_wrap, extra_args, ms, conds[ci], latents[b][idx[sel]], noise[sel],
                                           sigma[sel], w)
                    step_losses += got
                    for j, v in zip(sel.tolist(), got, strict=True):
                        drawn_losses[j] = v
                    self.state.calls[-1].update(images=[data.buckets[b].images[int(i)] for i in idx[sel]],
                                                caption=ci)
                self.sample_losses += drawn_losses
            # the rate at this step's position in the whole run (the resumed steps included)
            self.lrs.append(set_lr(self.opt, s, self.steps_before + step, self.steps_before + s.steps))
            finite = self.scaler.unscale(self.params)  # gradients in true units, before clipping
            if finite:
                if s.max_grad_norm > 0:
                    torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
                self.opt.step()
            else:
                log.info("Train T-LoRA: step %d skipped: fp16 gradients overflowed at loss scale %g",
                         self.steps_before + step + 1, self.scaler.scale)
            self.scaler.update(finite)
            self.opt.zero_grad(set_to_none=True)
            self.losses.append(sum(step_losses) / len(step_losses))
            self.done, self.rng_done = step + 1, self.generator.get_state()
            if self.progress is not None:
                self.progress(step + 1, s.steps, self.losses[-1])
            due = self.preview is not None and self.preview.due(step + 1, step + 1 == s.steps)
            if ((s.save_every and (step + 1) % s.save_every == 0) or due) and step + 1 < s.steps:
                self.checkpoint()  # a preview step is a checkpoint: the user picks the file the previews show
            if due:
                self.render_previews(latents[0])  # the size of the first image's bucket

    def render_previews(self, latent: torch.Tensor) -> None:
        """The previews of the last finished step, saved beside its checkpoint (the final file's are saved when it
        is written). Schedule-free AdamW renders its eval-mode factors, the ones the file stores."""
        assert self.preview is not None
        with evaluating(self.opt):
            self.preview.render(self.patch, latent, self.steps_before + self.done)
        if self.done < self.s.steps and self.checkpoints:
            self.previews.append(self.preview.save(self.checkpoints[-1]))

    def micro_batch(self, model_wrap, extra_args, ms, cond, x0, noise, sigma, weight=None) -> list[float]:
        """One model call and its backward pass. `weight` (the masks, broadcast over channels): each sample's loss is
        the weighted mean of its squared error (sum of weight * error over the sum of weight)."""
        device = self.device
        x0, noise, sigma = x0.to(device), noise.to(device, x0.dtype), sigma.to(device)
        xt = ms.noise_scaling(sigma, noise, x0)
        model_wrap.conds["positive"] = [cond]
        extra_args["model_options"].setdefault("transformer_options", {})["sample_sigmas"] = one_step_schedule(sigma)
        calls = len(self.state.calls)
        try:
            with torch.enable_grad(), saved_copies(self.patch.copies):
                denoised = model_wrap(xt, sigma, **extra_args)
                if len(self.state.calls) != calls + 1:
                    raise RuntimeError(f"Train T-LoRA: {len(self.state.calls) - calls} model calls for one batch")
                sq = (denoised.float() - x0.float()).square()
                if weight is None:
                    err = sq.flatten(1).mean(1)
                else:
                    w = weight.to(device, torch.float32).expand_as(sq)
                    err = (sq * w).flatten(1).sum(1) / w.flatten(1).sum(1).clamp_min(1e-12)
                if self.s.loss_space == "prediction":
                    ones = torch.ones_like(x0[:, :1, ...])
                    c_out = ms.calculate_denoised(sigma, ones, torch.zeros_like(ones))
                    err = err * loss_weight(c_out.flatten(1)[:, 0]).to(err.dtype)
                total = self.s.batch_size * self.s.grad_accumulation
                self.scaler.scale_loss(err.sum() / total).backward()
        finally:
            self.state.mask = None  # the ranks held through the backward pass
        return [float(e) for e in err.detach().cpu()]


class TrainSampler(comfy.samplers.Sampler):
    """Runs the training loop where a sampler would sample (ComfyUI's guider has loaded the model and processed
    the conditioning)."""

    def __init__(self, loop: Loop, data: Data):
        self.loop, self.data = loop, data

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.loop.run(model_wrap, extra_args, self.data)
        return torch.zeros_like(latent_image)
