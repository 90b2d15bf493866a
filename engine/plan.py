"""Which layer of a ComfyUI model each module of a T-LoRA patches (a row slice of it for fused weights).

Nothing here reads weight values: shapes only, so a file for another architecture is refused before any work.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import comfy.utils
import torch

from ..tlora_core import TLoRA, TLoRAError
from ..tlora_core.adapter import ModuleAdapter
from . import keymaps

RowTransform = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class LayerTarget:
    """One module of the file on one layer of the model."""

    path: str  # the layer's module path in the BaseModel
    key: str  # its weight key ("<path>.weight")
    adapter: ModuleAdapter
    out_slice: tuple[int, int] | None = None  # (start, size) in the output rows of a fused layer
    # the row order of ComfyUI key-map entries `(key, None, fn)` (e.g. swap_scale_shift: diffusers' (scale, shift)
    # vs ComfyUI's (shift, scale)): maps the model's rows to the file's order
    reorder: RowTransform | None = None


@dataclass
class Plan:
    targets: list[LayerTarget] = field(default_factory=list)
    unmatched: list[str] = field(default_factory=list)  # module names the model has no layer for
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why the layer cannot take it


def plan(patcher, tl: TLoRA) -> Plan:
    """Map every diffusion-model module of `tl` onto `patcher`'s model. Raises when nothing matches, or when a
    module's shape says the file is for another architecture."""
    out = map_modules(tl, tl.modules, keymaps.model_key_map(patcher.model), patcher.model)
    if not out.targets:
        family = keymaps.guess_family(tl.modules)
        looks = f" Its module names look like {family}." if family else ""
        raise TLoRAError(tl.path, f"matched 0 of {len(tl.modules)} modules to this {type(patcher.model).__name__} "
                                  f"model.{looks} Load it on the model family it was trained for.")
    return out


def map_modules(tl: TLoRA, modules: dict[str, ModuleAdapter], key_map: dict, model: torch.nn.Module) -> Plan:
    """Map `modules` through `key_map` onto the weights of `model` (a BaseModel, or a text encoder)."""
    model_keys = set(model.state_dict().keys())
    out = Plan()
    for name, adapter in modules.items():
        hit = keymaps.resolve(name, tl.naming, key_map)
        key, rows, reorder = keymaps.split_hit(hit) if hit is not None else ("", None, None)
        if not key.endswith(".weight") or key not in model_keys:
            out.unmatched.append(name)
            continue
        path = key[: -len(".weight")]
        shape = tuple(comfy.utils.get_attr(model, key).shape)
        if rows is not None:
            if rows[0] != 0:
                raise TLoRAError(tl.path, f"module '{name}' maps to a slice along dim {rows[0]} of '{key}', which "
                                          "is not supported")
            shape = (rows[2], *shape[1:])
        why = adapter.fit_error(shape)
        if why is not None and len(shape) > 2 and any(k != 1 for k in shape[2:]):
            out.skipped[name] = why  # a k x k convolution: LyCORIS cannot run it either
            continue
        if why is not None:
            raise TLoRAError(tl.path, f"module '{name}' has shape {adapter.out_features}x{adapter.in_features} but "
                                      f"the model's '{key}' is {'x'.join(map(str, shape))}: this T-LoRA was trained "
                                      "for a different model architecture")
        out.targets.append(LayerTarget(path, key, adapter, None if rows is None else (rows[1], rows[2]), reorder))
    return out
