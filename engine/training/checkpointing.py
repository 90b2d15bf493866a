"""Gradient checkpointing of what a model runs one unit after another while it trains, and autograd's saved-tensor
copies for models that update activations in place."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable
from typing import Any

import torch


def copy_on_save(t: torch.Tensor) -> torch.Tensor:
    """What autograd keeps of a tensor it saves under `saved_copies`: a copy, except for the model's weights (and
    views of them), which nothing updates in place: copying them would double the weights' memory."""
    base = t if t._base is None else t._base
    return t if isinstance(base, torch.nn.Parameter) else t.clone()


def _same(t: torch.Tensor) -> torch.Tensor:
    return t


def saved_copies(on: bool = True):
    """Autograd keeps copies of the tensors it saves: some of ComfyUI's models update residual streams in place
    (`x += ...` in Flux blocks, after a LayerNorm saved x), which would otherwise invalidate what backward needs.
    Costly (a copy of every saved activation), so the loop turns it on only for models that need it."""
    if not on:
        return contextlib.nullcontext()
    return torch.autograd.graph.saved_tensors_hooks(copy_on_save, _same)


INPLACE_ERROR = "modified by an inplace operation"


_DUMMY: list[torch.Tensor] = []


def checkpoint_units(diffusion_model: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
    """The modules the model's forward calls one after another, by path in the diffusion model: the items of its
    top-level ModuleLists (the DiTs' transformer blocks) and, in ComfyUI's UNet, the layers of each
    `TimestepEmbedSequential` (`forward_timestep_embed` calls those, never the sequential's own forward), a spatial
    transformer of several blocks as its blocks (SDXL's depth-10 ones would otherwise be recomputed whole, all ten
    blocks' activations at once)."""
    from comfy.ldm.modules.attention import SpatialTransformer
    from comfy.ldm.modules.diffusionmodules.openaimodel import TimestepEmbedSequential

    def layers(name: str, seq: torch.nn.Module) -> list[tuple[str, torch.nn.Module]]:
        out = []
        for i, layer in seq.named_children():
            blocks = layer.transformer_blocks if type(layer) is SpatialTransformer else ()
            if len(blocks) > 1:
                out += [(f"{name}.{i}.transformer_blocks.{j}", b) for j, b in enumerate(blocks)]
            else:
                out.append((f"{name}.{i}", layer))
        return out

    units = []
    for name, child in diffusion_model.named_children():
        if isinstance(child, TimestepEmbedSequential):
            units += layers(name, child)
        elif isinstance(child, torch.nn.ModuleList):
            for i, item in enumerate(child):
                path = f"{name}.{i}"
                units += layers(path, item) if isinstance(item, TimestepEmbedSequential) else [(path, item)]
    return units


class _Tensor:
    """Where a tensor argument goes back (its index among the tensors passed to the checkpoint)."""

    def __init__(self, i: int):
        self.i = i


class _Dict:
    """A dict argument, and a copy of it as it was at the call."""

    def __init__(self, d: dict):
        self.d, self.then = d, dict(d)


def _split(args: tuple, kwargs: dict) -> tuple[list[torch.Tensor], Callable[[list, bool], tuple[list, dict]]]:
    """The tensor arguments (also inside tuples and lists: LTX-2's blocks take `(vx, ax)`), and how to put tensors
    back: with the dicts as they are, or as they were at the call."""
    tensors: list[torch.Tensor] = []

    def take(v):
        if isinstance(v, torch.Tensor):
            tensors.append(v)
            return _Tensor(len(tensors) - 1)
        if type(v) in (tuple, list) and any(isinstance(e, torch.Tensor) for e in v):
            return type(v)(take(e) for e in v)
        return _Dict(v) if isinstance(v, dict) else v

    args_, kwargs_ = [take(v) for v in args], {k: take(v) for k, v in kwargs.items()}

    def put(ts: list, then: bool) -> tuple[list, dict]:
        def back(v):
            if isinstance(v, _Tensor):
                return ts[v.i]
            if isinstance(v, _Dict):
                return dict(v.then) if then else v.d
            return type(v)(back(e) for e in v) if type(v) in (tuple, list) else v
        return [back(v) for v in args_], {k: back(v) for k, v in kwargs_.items()}

    return tensors, put


def checkpoint_blocks(diffusion_model: torch.nn.Module, copies: Callable[[], bool], targets: Iterable[str]
                      ) -> list[tuple[torch.nn.Module, Any]]:
    """Gradient checkpointing of `checkpoint_units`: each unit runs without keeping activations and is recomputed
    in the backward pass, there with `saved_copies` where the model needs them, and with the dicts it was called
    with as they were at the call (the UNet's loop updates `transformer_options` after each block). Each run gets
    copies of its tensor inputs: a unit that updates an input in place and returns it (Flux's blocks:
    `img += ...`) would make the checkpoint return its own changed input, which autograd does not follow (wrong
    gradients, silently, where that input needs none: Flux's first block under the attention targets). Reentrant
    checkpointing, with every tensor argument passed positionally so gradients reach earlier units, and a constant
    that requires grad so the LoRA parameters inside always get theirs. A unit with no target layer (`targets`:
    paths in the diffusion model) whose inputs need no gradient runs as is (it keeps nothing).
    Returns what to restore."""
    from torch.utils.checkpoint import checkpoint

    if not _DUMMY:
        with torch.inference_mode(False):
            _DUMMY.append(torch.ones((), requires_grad=True))
    targets = tuple(targets)
    done = []
    for path, unit in checkpoint_units(diffusion_model):
        own = unit.__dict__.get("forward")
        orig = unit.forward
        trains = any(t == path or t.startswith(f"{path}.") for t in targets)

        def fwd(*args, _orig=orig, _trains=trains, **kwargs):
            if not torch.is_grad_enabled():
                return _orig(*args, **kwargs)
            tensors, put = _split(args, kwargs)
            if not (_trains or any(t.requires_grad for t in tensors)):
                return _orig(*args, **kwargs)
            runs = []

            def run(_dummy, *ts):
                a, kw = put([t.clone() for t in ts], bool(runs))  # a recomputation: the dicts as at the call
                runs.append(1)
                with saved_copies(copies()):
                    return _orig(*a, **kw)

            return checkpoint(run, _DUMMY[0], *tensors, use_reentrant=True)

        unit.forward = fwd
        done.append((unit, own))
    return done


def uncheckpoint(done: list[tuple[torch.nn.Module, Any]]) -> None:
    for block, own in done:
        if own is None:
            block.__dict__.pop("forward", None)
        else:
            block.forward = own
