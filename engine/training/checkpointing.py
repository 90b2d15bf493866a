"""Gradient checkpointing of a model's repeated blocks while it trains, and autograd's saved-tensor copies for models
that update activations in place."""

from __future__ import annotations

import contextlib
from collections.abc import Callable
from typing import Any

import torch


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


def checkpoint_blocks(diffusion_model: torch.nn.Module, copies: Callable[[], bool]
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


def uncheckpoint(done: list[tuple[torch.nn.Module, Any]]) -> None:
    for block, own in done:
        if own is None:
            block.__dict__.pop("forward", None)
        else:
            block.forward = own


