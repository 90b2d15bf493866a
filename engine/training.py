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
"""

from __future__ import annotations

import contextlib
import logging
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

import comfy.model_management
import comfy.patcher_extension
import comfy.samplers
import comfy.utils
import torch

from ..tlora_core import TLoRAError, load_tlora, schedule
from ..tlora_core.digest import weight_digest
from ..tlora_core.embed import source_record
from ..tlora_core.slot import rank_mask
from ..tlora_core.svd import compute_base_triplets, default_workers
from ..tlora_core.training import (
    LOGIT_NORMAL,
    UNIFORM,
    TrainableTLoRA,
    draw_discrete_t,
    draw_flow_u,
    loss_weight,
    lycoris_config,
    write_trained,
)
from . import bases, timesteps
from .files import svd_cache
from .patcher import RankState, _dispatch_forward, _undispatch, require_api
from .plan import LayerTarget
from .train_targets import ATTENTION, LYCORIS_CLASSES, PRESETS, TrainTarget, trainable_targets
from .weights import UnreadableWeight, layer_weight

log = logging.getLogger("tlora.train")

OPTIMIZERS = ("AdamW", "Adam", "SGD")
SAMPLINGS = ("auto", UNIFORM, LOGIT_NORMAL)
LOSS_SPACES = ("prediction", "x0")
DTYPES = ("auto", "fp32", "bf16", "fp16")
KEY = "tlora_train"
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 800
    learning_rate: float = 1e-4
    rank: int = 64
    min_rank: int = 32
    alpha: float = 1.0
    linear_alpha: float = 0.0  # 0: the rank (scale 1, the official recipe)
    targets: str = ATTENTION
    batch_size: int = 1
    grad_accumulation: int = 1
    optimizer: str = "AdamW"
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    timestep_sampling: str = "auto"
    timestep_mode: str = timesteps.AUTO
    loss_space: str = "prediction"
    training_dtype: str = "auto"
    gradient_checkpointing: bool = True
    seed: int = 0
    store_base: bool = True
    save_every: int = 0
    guidance: float = 1.0

    def problems(self) -> list[str]:
        out = []
        try:
            schedule.validate(self.rank, self.min_rank, self.alpha)
        except ValueError as e:
            out.append(f"bad schedule: {e}")
        for name, ok in (("steps", self.steps >= 1), ("learning_rate", 0 < self.learning_rate < 10),
                         ("batch_size", self.batch_size >= 1), ("grad_accumulation", self.grad_accumulation >= 1),
                         ("linear_alpha", self.linear_alpha >= 0), ("max_grad_norm", self.max_grad_norm >= 0),
                         ("save_every", self.save_every >= 0), ("guidance", math.isfinite(self.guidance))):
            if not ok:
                out.append(f"{name} {getattr(self, name)!r} is out of range")
        for name, allowed in (("targets", PRESETS), ("optimizer", OPTIMIZERS), ("timestep_sampling", SAMPLINGS),
                              ("timestep_mode", timesteps.MODES), ("loss_space", LOSS_SPACES),
                              ("training_dtype", DTYPES)):
            if getattr(self, name) not in allowed:
                out.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        return out

    @property
    def scale(self) -> float:
        return (self.linear_alpha or self.rank) / self.rank

    def record(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class TrainResult:
    path: str
    losses: list[float]
    modules: dict[str, TrainableTLoRA]
    calls: list[dict[str, Any]] = field(default_factory=list)  # per model call: sigma, t, rank (tests, diagnostics)
    checkpoints: list[str] = field(default_factory=list)
    seconds: float = 0.0
    drawn: list[float] = field(default_factory=list)  # the timestep of every sample drawn (flow: sigma * 1000)


class _State:
    """The ranks of the training call in progress. A plain attribute, not per thread: training runs one call at a
    time, and the backward pass (which may run on another thread) must see the ranks its forward used."""

    def __init__(self, rank: int):
        self.width = rank
        self.mask: torch.Tensor | None = None
        self.calls: list[dict[str, Any]] = []


class TrainSlot:
    """Adds one trainable module's delta to one layer's output (a row slice of it for fused layers, in the layer's
    row order for reordered ones); out of place, so autograd sees everything."""

    def __init__(self, module: TrainableTLoRA, state: _State, t: TrainTarget, conv_args: dict | None):
        self.module, self.state, self.t, self.conv_args = module, state, t, conv_args

    def __call__(self, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        d = self.module.delta(x, self.state.mask, self.conv_args)
        dim = 1 if self.conv_args is not None else -1
        if self.t.reorder is not None:
            d = self.t.reorder(d.movedim(dim, 0)).movedim(0, dim)
        d = d.to(y.dtype)
        if self.t.out_slice is None:
            return y + d
        start, size = self.t.out_slice
        n = y.shape[dim]
        return torch.cat([y.narrow(dim, 0, start), y.narrow(dim, start, size) + d,
                          y.narrow(dim, start + size, n - start - size)], dim=dim)


def _conv_args(module) -> dict | None:
    if isinstance(module, torch.nn.Conv2d):
        return {"stride": module.stride, "padding": module.padding, "dilation": module.dilation,
                "groups": module.groups}
    return None


def deinference(model: torch.nn.Module) -> int:
    """Replace plain float tensors created under inference mode by normal copies of the same values (autograd cannot
    save inference tensors for backward). Quantized storage (fp8 with a cast, QuantizedTensor, GGUF) computes with
    fresh dequantized tensors and is left alone. Returns how many were replaced."""
    n = 0
    with torch.inference_mode(False):
        for module in model.modules():
            for name, p in list(module._parameters.items()):
                if p is not None and type(p) in (torch.Tensor, torch.nn.Parameter) and p.is_inference():
                    module._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                    n += 1
            for name, b in list(module._buffers.items()):
                if b is not None and type(b) is torch.Tensor and b.is_inference():
                    module._buffers[name] = b.clone()
                    n += 1
    return n


def _copy_on_save(t: torch.Tensor) -> torch.Tensor:
    return t.clone()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def saved_copies(on: bool = True):
    """Autograd keeps copies of the tensors it saves: some of ComfyUI's models update residual streams in place
    (`x += ...` in Flux blocks, after a LayerNorm saved x), which would otherwise invalidate what backward needs.
    Costly (a copy of every saved activation), so the loop turns it on only for models that need it."""
    if not on:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(_copy_on_save, _same)


INPLACE_ERROR = "modified by an inplace operation"


_DUMMY: list[torch.Tensor] = []


def _checkpoint_blocks(diffusion_model: torch.nn.Module, copies: Callable[[], bool]
                       ) -> list[tuple[torch.nn.Module, Any]]:
    """Gradient checkpointing of the model's repeated blocks (the items of its top-level ModuleLists): each block runs
    without keeping activations and is recomputed in the backward pass, there with `saved_copies` (blocks update
    their inputs in place). Reentrant checkpointing, with every tensor argument passed positionally so gradients
    reach earlier blocks, and a constant that requires grad so the LoRA parameters inside always get theirs.
    Returns what to restore."""
    from torch.utils.checkpoint import checkpoint

    if not _DUMMY:
        with torch.inference_mode(False):
            _DUMMY.append(torch.ones((), requires_grad=True))
    done = []
    for child in diffusion_model.children():
        if not isinstance(child, torch.nn.ModuleList):
            continue
        for block in child:
            own = block.__dict__.get("forward")
            orig = block.forward

            def fwd(*args, _orig=orig, **kwargs):
                if not torch.is_grad_enabled():
                    return _orig(*args, **kwargs)
                names = [k for k, v in kwargs.items() if isinstance(v, torch.Tensor)]
                rest = {k: v for k, v in kwargs.items() if k not in names}
                n = len(args)

                def run(_dummy, *tensors):
                    with saved_copies(copies()):
                        fresh = [t.clone() if isinstance(t, torch.Tensor) and t.requires_grad else t for t in tensors]
                        return _orig(*fresh[:n], **rest, **dict(zip(names, fresh[n:], strict=True)))

                return checkpoint(run, _DUMMY[0], *args, *(kwargs[k] for k in names), use_reentrant=True)

            block.forward = fwd
            done.append((block, own))
    return done


def _uncheckpoint(done: list[tuple[torch.nn.Module, Any]]) -> None:
    for block, own in done:
        if own is None:
            block.__dict__.pop("forward", None)
        else:
            block.forward = own


def _init_modules(patcher, targets: list[TrainTarget], s: TrainSettings, out: str, device,
                  progress: Callable[[int, int], None] | None) -> tuple[dict[str, TrainableTLoRA], dict[str, str], set]:
    """The principal SVD init of every target from the weight the layer computes with (dequantized; row slice and
    order as the trainer sees the module), through the SVD cache the loader shares; plus the weights' digests."""
    layer_targets = [LayerTarget(t.path, t.key, _shape_only(t, s.rank), t.out_slice, t.reorder) for t in targets]
    try:
        weights = {t.key: layer_weight(patcher, t.key) for t in layer_targets}
    except UnreadableWeight as e:
        raise TLoRAError(out, str(e)) from None
    jobs = bases.jobs(patcher.model, layer_targets, weights, device)
    triplets = compute_base_triplets(jobs, svd_cache(), progress, workers=default_workers(device))
    modules = {t.name: TrainableTLoRA(t.name, *triplets[t.name], s.scale, t.conv) for t in targets}
    digests = {t.name: weight_digest(bases.with_rows(lt, weights[t.key].dequantized("cpu")))
               for t, lt in zip(targets, layer_targets, strict=True)}
    return modules, digests, {w.kind for w in weights.values()}


def _shape_only(t: TrainTarget, rank: int):
    """A stand-in adapter with a target's name, rank and shape (what the SVD jobs read)."""
    from ..tlora_core.adapter import ORTHO, ModuleAdapter

    return ModuleAdapter(name=t.name, kind=ORTHO, up=torch.empty(t.out_features, rank, device="meta"),
                         down=torch.empty(rank, t.in_features, device="meta"), svd_base=True, conv=t.conv)


def _resume(modules: dict[str, TrainableTLoRA], path: str, s: TrainSettings) -> int:
    """Continue from a file: its trained factors (and stored base, else the one just rebuilt). Returns its steps."""
    tl = load_tlora(path)
    missing = [n for n in modules if n not in tl.modules]
    if missing:
        raise TLoRAError(path, f"has no module for {len(missing)} of the {len(modules)} targets (e.g. {missing[0]}): "
                               "resume from a file trained on this model with the same targets")
    for name, m in modules.items():
        a = tl.modules[name]
        if a.rank != s.rank:
            raise TLoRAError(path, f"module '{name}' has rank {a.rank}, not {s.rank}: resume with its rank")
        if a.needs_svd_base:
            a = a.with_base(m.p0, m.lam0, m.q0.T)
        modules[name] = TrainableTLoRA.from_adapter(a)
    try:
        import json

        return int(json.loads(tl.metadata.get("tlora_training", "{}")).get("steps", 0))
    except (ValueError, TypeError):
        return 0


class TrainingPatch:
    """The trainable modules on a clone of a model: a slot per target layer, the APPLY_MODEL wrapper that sets each
    sample's rank from its sigma (the inference rule) and holds it through the backward pass, and, once loaded,
    gradient checkpointing. `close()` undoes all of it; the input model is never changed."""

    def __init__(self, patcher, targets: list[TrainTarget], modules: dict[str, TrainableTLoRA], s: TrainSettings):
        self.s = s
        dynamic = getattr(patcher, "is_dynamic", lambda: False)()
        self.clone = patcher.clone(disable_dynamic=True) if dynamic else patcher.clone()
        if s.training_dtype != "auto":
            self.clone.set_model_compute_dtype({"fp32": torch.float32, "bf16": torch.bfloat16,
                                                "fp16": torch.float16}[s.training_dtype])
        self.state = _State(s.rank)
        self.rank_state = RankState("train", s.rank, s.min_rank, s.alpha, s.timestep_mode)
        self.slots = {}
        for t in targets:
            module = comfy.utils.get_attr(self.clone.model, t.path)
            self.slots[t.path, t.out_slice] = TrainSlot(modules[t.name], self.state, t, _conv_args(module))
        self.clone.set_injections(KEY, [comfy.patcher_extension.PatcherInjection(self._inject, self._eject)])
        self.clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, self._wrapper)
        self._restore: list = []
        self._frozen: list[tuple[torch.nn.Parameter, bool]] = []
        self.copies = False  # saved_copies(): found out by the loop's first batch (`_Loop.probe`)

    def _wrapper(self, executor, x, t, *args, **kwargs):
        ts, ranks = self.rank_state.ranks_for(t, executor.class_obj.model_sampling)
        self.state.mask = rank_mask(ranks, self.s.rank, x.device)  # held through the backward pass
        self.state.calls.append({"sigma": t.detach().float().cpu().tolist(), "t": ts, "rank": ranks})
        return executor(x, t, *args, **kwargs)

    def _inject(self, p) -> None:
        for (path, sl), slot in self.slots.items():
            _dispatch_forward(comfy.utils.get_attr(p.model, path))[f"{KEY}#{path}#{sl}"] = slot

    def _eject(self, p) -> None:
        for path, sl in self.slots:
            m = comfy.utils.get_attr(p.model, path)
            if m.__dict__.get("_tlora_slots") is not None:
                m._tlora_slots.pop(f"{KEY}#{path}#{sl}", None)
                _undispatch(m)

    def load(self) -> None:
        """Load the clone fully, make its weights usable by autograd, checkpoint its blocks (inference mode off)."""
        comfy.model_management.load_models_gpu([self.clone], memory_required=1e20, force_full_load=True)
        # ComfyUI (0.28+) picks autograd-friendly paths for fused kernels (rope, norms) while this is set, as its own
        # trainer does; 0.3.75 has no such flag and no such kernels
        self._in_training = getattr(comfy.model_management, "in_training", None)
        if self._in_training is not None:
            comfy.model_management.in_training = True
        dm = self.clone.model.diffusion_model
        replaced = deinference(dm)
        log.debug("Train T-LoRA: %d inference tensors replaced by normal copies", replaced)
        # the base stays frozen (no gradient is computed for it); the flags are put back as they were in close()
        self._frozen = [(p, p.requires_grad) for p in dm.parameters() if p.requires_grad]
        for p, _ in self._frozen:
            p.requires_grad_(False)
        if self.s.gradient_checkpointing:
            self._restore = _checkpoint_blocks(self.clone.model.diffusion_model, lambda: self.copies)

    def close(self) -> None:
        if getattr(self, "_in_training", None) is not None:
            comfy.model_management.in_training = self._in_training
            self._in_training = None
        _uncheckpoint(self._restore)
        self._restore = []
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen = []
        self.clone.unpatch_model()
        self._eject(self.clone)
        self.state.mask = None


class _Loop:
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


class _Sampler(comfy.samplers.Sampler):
    """Runs the training loop where a sampler would sample (ComfyUI's guider has loaded the model and processed
    the conditioning)."""

    def __init__(self, loop: _Loop, cond_of: list[int]):
        self.loop, self.cond_of = loop, cond_of

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        self.loop.run(model_wrap, extra_args, latent_image, self.cond_of)
        return torch.zeros_like(latent_image)


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
          svd_progress: Callable[[int, int], None] | None = None, source_name: str = "") -> TrainResult:
    """Train a T-LoRA on `patcher`'s model and write it to `out`. `positive`: one conditioning (a list of [tensor,
    dict] entries, its first entry used) for all latents, or one per latent."""
    t0 = time.perf_counter()
    how = check_inputs(patcher, latents, positive, s, out)
    targets = trainable_targets(patcher.model, s.targets)
    if not targets:
        raise TLoRAError(out, f"no layer of this {type(patcher.model).__name__} model is known to the key maps "
                              f"under the '{s.targets}' targets: the pack cannot map this family")
    device = comfy.model_management.get_torch_device()
    modules, digests, storage = _init_modules(patcher, targets, s, out, device, svd_progress)
    steps_before = _resume(modules, resume, s) if resume else 0
    with torch.inference_mode(False):
        for m in modules.values():
            m.to(device)
    log.info("Train T-LoRA: %d modules (%s) on %s, rank %d, min_rank %d, alpha %g, %d steps; timesteps: %s",
             len(modules), s.targets, type(patcher.model).__name__, s.rank, s.min_rank, s.alpha, s.steps, how)

    latent = torch.cat(latents).float()
    cond_of = [0] * latent.shape[0] if len(positive) == 1 else list(range(latent.shape[0]))
    entries = [c[0] for c in positive]
    if s.guidance and (patcher.model.model_config.unet_config.get("guidance_embed")):
        entries = [[t, {**d, "guidance": s.guidance}] for t, d in entries]

    patch = TrainingPatch(patcher, targets, modules, s)
    config = lycoris_config(s.rank, s.linear_alpha or s.rank, s.min_rank, s.alpha, LYCORIS_CLASSES[s.targets])
    base_source = source_record(source_name, digests, storage, "Train T-LoRA")

    def record(steps_done: int) -> dict[str, Any]:
        return {**s.record(), "steps": steps_before + steps_done, "timesteps": how, "modules": len(modules),
                "images": int(latent.shape[0]), "model": type(patcher.model).__name__,
                "comfyui": _comfy_version(), "resumed_from": os.path.basename(resume) if resume else None}

    def save(steps_done: int) -> str | None:
        stem = out[: -len(".safetensors")]
        path = f"{stem}_step{steps_before + steps_done}.safetensors"
        write_trained(path, modules, config, record(steps_done), base_source if s.store_base else None)
        log.info("Train T-LoRA: checkpoint %s", path)
        return path

    loop = _Loop(s, modules, patch, save, progress, device)
    try:
        with torch.inference_mode(False):
            patch.load()
            from comfy_extras.nodes_custom_sampler import Guider_Basic

            guider = Guider_Basic(patch.clone)
            guider.set_conds(entries)
            guider.sample(torch.zeros_like(latent), latent, _Sampler(loop, cond_of), torch.arange(latent.shape[0]),
                          seed=s.seed)
    except comfy.model_management.InterruptProcessingException:
        log.warning("Train T-LoRA interrupted after %d of %d steps: no file written%s", len(loop.losses), s.steps,
                    f"; checkpoints kept: {', '.join(loop.checkpoints)}" if loop.checkpoints else "")
        raise
    finally:
        patch.close()
    write_trained(out, modules, config, record(s.steps), base_source if s.store_base else None)
    log.info("Train T-LoRA: wrote %s (%d modules, %d steps, loss %.4g -> %.4g)", out, len(modules), s.steps,
             loop.losses[0], loop.losses[-1])
    return TrainResult(out, loop.losses, modules, patch.state.calls, loop.checkpoints, time.perf_counter() - t0,
                       loop.drawn)


def _comfy_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except ImportError:
        return "unknown"
