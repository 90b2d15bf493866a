"""The trainable modules on a clone of a ComfyUI model: a slot per target layer, the APPLY_MODEL wrapper that sets
each sample's rank from its sigma and holds it through the backward pass, and the model made usable by autograd.
Everything is undone in `TrainingPatch.close()`; the input model is never changed."""

from __future__ import annotations

import logging
from typing import Any

import comfy.model_management
import comfy.patcher_extension
import comfy.utils
import torch

from ...tlora_core.slot import rank_mask
from ...tlora_core.training import TrainableTLoRA
from ..conv import conv_args
from ..patcher import RankState, _dispatch_forward, _undispatch
from ..train_targets import TrainTarget
from .checkpointing import checkpoint_blocks, uncheckpoint
from .settings import TrainSettings

log = logging.getLogger("tlora.train")

KEY = "tlora_train"


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
            self.slots[t.path, t.out_slice] = TrainSlot(modules[t.name], self.state, t, conv_args(module))
        self.clone.set_injections(KEY, [comfy.patcher_extension.PatcherInjection(self._inject, self._eject)])
        self.clone.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, KEY, self._wrapper)
        self._restore: list = []
        self._frozen: list[tuple[torch.nn.Parameter, bool]] = []
        self.copies = False  # saved_copies(): found out by the loop's first batch (`Loop.probe`)

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
            paths = [path.removeprefix("diffusion_model.") for path, _ in self.slots]
            self._restore = checkpoint_blocks(dm, lambda: self.copies, paths)

    def close(self) -> None:
        if getattr(self, "_in_training", None) is not None:
            comfy.model_management.in_training = self._in_training
            self._in_training = None
        uncheckpoint(self._restore)
        self._restore = []
        for p, flag in self._frozen:
            p.requires_grad_(flag)
        self._frozen = []
        self.clone.unpatch_model()
        self._eject(self.clone)
        self.state.mask = None


