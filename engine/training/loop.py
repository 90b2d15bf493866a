"""The training loop: timestep draws, micro-batches through ComfyUI's guider, the loss, the optimizer, checkpoints.
It runs inside `Guider_Basic.sample` as a `comfy.samplers.Sampler` (what ComfyUI's own trainer does)."""

from __future__ import annotations

import logging
from collections.abc import Callable

import comfy.model_management
import comfy.samplers
import torch

from ...tlora_core.training import LOGIT_NORMAL, UNIFORM, TrainableTLoRA, draw_discrete_t, draw_flow_u, loss_weight
from .. import timesteps
from .checkpointing import INPLACE_ERROR, saved_copies
from .patch import TrainingPatch
from .settings import Progress, TrainSettings

log = logging.getLogger("tlora.train")


class Loop:
    def __init__(self, s: TrainSettings, modules: dict[str, TrainableTLoRA], patch: TrainingPatch,
                 save: Callable[[int], str | None], progress: Progress | None, device):
        self.s, self.modules, self.patch, self.state = s, modules, patch, patch.state
        self.save, self.progress, self.device = save, progress, device
        self.generator = torch.Generator().manual_seed(s.seed)
        params = [p for m in modules.values() for p in m.parameters()]
        if s.optimizer == "AdamW":
            self.opt: torch.optim.Optimizer = torch.optim.AdamW(params, lr=s.learning_rate,
                                                                weight_decay=s.weight_decay)
        elif s.optimizer == "Adam":
            self.opt = torch.optim.Adam(params, lr=s.learning_rate)
        else:
            self.opt = torch.optim.SGD(params, lr=s.learning_rate)
        self.params = params
        self.losses: list[float] = []
        self.checkpoints: list[str] = []
        self.drawn: list[float] = []  # the trainer's timestep of every sample drawn, in order (tests, diagnostics)

    def draw_sigmas(self, ms, n: int, generator: torch.Generator | None = None) -> torch.Tensor:
        """One sigma per sample: integer DDPM timesteps (their table entry) for discrete models, the model's own
        shift of a logit-normal or uniform noise fraction for flow models, the SD table for EDM ones."""
        kind = timesteps.kind_of(ms)
        how = self.s.timestep_sampling
        own = generator is None
        generator = self.generator if generator is None else generator
        if kind in ("discrete", "edm"):
            if how == LOGIT_NORMAL:
                t = (draw_flow_u(generator, n) * timesteps.schedule.MAX_TIMESTEP).long().clamp(0, 999)
            else:
                t = draw_discrete_t(generator, n)
            table = ms.sigmas if kind == "discrete" else timesteps.sd_sigmas()
            self.drawn += [float(v) for v in t] if own else []
            return table.detach().float().cpu()[t]
        u = draw_flow_u(generator, n, UNIFORM if how == UNIFORM else LOGIT_NORMAL)
        sigma = torch.tensor([float(ms.percent_to_sigma(1.0 - float(v))) for v in u])
        self.drawn += [float(v) * timesteps.schedule.MAX_TIMESTEP for v in sigma] if own else []
        return sigma

    def probe(self, model_wrap, extra_args, ms, cond, latent: torch.Tensor) -> None:
        """One forward and backward with a sample of its own (the training draws are not touched, nothing is kept):
        does this model need `saved_copies`? Models that update activations in place fail without them."""
        g = torch.Generator().manual_seed(self.s.seed + 1)
        noise = torch.randn(latent[:1].shape, generator=g)
        sigma = self.draw_sigmas(ms, 1, g)
        calls = len(self.state.calls)
        try:
            self.micro_batch(model_wrap, extra_args, ms, cond, latent[:1], noise, sigma)
        except RuntimeError as e:
            if INPLACE_ERROR not in str(e):
                raise
            self.patch.copies = True
            log.info("Train T-LoRA: this model updates activations in place; autograd keeps copies")
        finally:
            del self.state.calls[calls:]
            self.opt.zero_grad(set_to_none=True)

    def run(self, model_wrap, extra_args, latent: torch.Tensor, cond_of: list[int]) -> None:
        ms = model_wrap.inner_model.model_sampling
        conds = model_wrap.conds["positive"]
        s, n_images = self.s, latent.shape[0]
        self.probe(model_wrap, extra_args, ms, conds[cond_of[0]], latent)
        for step in range(s.steps):
            comfy.model_management.throw_exception_if_processing_interrupted()
            step_losses = []
            for _ in range(s.grad_accumulation):
                idx = torch.randint(0, n_images, (s.batch_size,), generator=self.generator)
                noise = torch.randn((s.batch_size, *latent.shape[1:]), generator=self.generator)
                sigma = self.draw_sigmas(ms, s.batch_size)
                for ci in sorted({cond_of[int(i)] for i in idx}):  # one conditioning per model call
                    sel = torch.tensor([j for j, i in enumerate(idx.tolist()) if cond_of[i] == ci])
                    step_losses += self.micro_batch(model_wrap, extra_args, ms, conds[ci], latent[idx[sel]],
                                                    noise[sel], sigma[sel])
            if s.max_grad_norm > 0:
                torch.nn.utils.clip_grad_norm_(self.params, s.max_grad_norm)
            self.opt.step()
            self.opt.zero_grad(set_to_none=True)
            loss = sum(step_losses) / len(step_losses)
            self.losses.append(loss)
            if self.progress is not None:
                self.progress(step + 1, s.steps, loss)
            if s.save_every and (step + 1) % s.save_every == 0 and step + 1 < s.steps:
                saved = self.save(step + 1)
                if saved:
                    self.checkpoints.append(saved)

    def micro_batch(self, model_wrap, extra_args, ms, cond, x0, noise, sigma) -> list[float]:
        device = self.device
        x0, noise, sigma = x0.to(device), noise.to(device, x0.dtype), sigma.to(device)
        xt = ms.noise_scaling(sigma, noise, x0)
        model_wrap.conds["positive"] = [cond]
        calls = len(self.state.calls)
        try:
            with torch.enable_grad(), saved_copies(self.patch.copies):
                denoised = model_wrap(xt, sigma, **extra_args)
                if len(self.state.calls) != calls + 1:
                    raise RuntimeError(f"Train T-LoRA: {len(self.state.calls) - calls} model calls for one batch")
                err = (denoised.float() - x0.float()).square().flatten(1).mean(1)
                if self.s.loss_space == "prediction":
                    ones = torch.ones_like(x0[:, :1, ...])
                    c_out = ms.calculate_denoised(sigma, ones, torch.zeros_like(ones))
                    err = err * loss_weight(c_out.flatten(1)[:, 0]).to(err.dtype)
                total = self.s.batch_size * self.s.grad_accumulation
                (err.sum() / total).backward()
        finally:
            self.state.mask = None  # the ranks held through the backward pass
        return [float(e) for e in err.detach().cpu()]


class TrainSampler(comfy.samplers.Sampler):
    """Runs the training loop where a sampler would sample (ComfyUI's guider has loaded the model and processed
    the conditioning)."""

    def __init__(self, loop: Loop, cond_of: list[int]):
        self.loop, self.cond_of = loop, cond_of

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.loop.run(model_wrap, extra_args, latent_image, self.cond_of)
        return torch.zeros_like(latent_image)


