"""A target layer's base weight as the layer computes with it, whatever the checkpoint's storage.

Read through the layer, never its raw bytes: the weight before any LoRA patch (`ModelPatcher.backup` holds it
while patches are baked in), dequantized the way ComfyUI itself does before patching (`module.convert_weight`:
scaled fp8 x `scale_weight` in 0.3.75; `QuantizedTensor.dequantize()` in 0.28), or with ComfyUI-GGUF's own
`dequantize_tensor` for its GGMLTensor. Any other storage is refused by name before any work is done.
"""

from __future__ import annotations

import hashlib
import inspect
import sys
from dataclasses import dataclass
from functools import cached_property

import comfy.utils
import torch

from ..tlora_core.digest import cache_key

FP8_DTYPES = tuple(getattr(torch, n) for n in ("float8_e4m3fn", "float8_e5m2", "float8_e4m3fnuz", "float8_e5m2fnuz")
                   if hasattr(torch, n))



class UnreadableWeight(ValueError):
    """A layer's weight cannot be read as floats (the message names the layer, its storage and what to do)."""


# storage kind -> precision class (what the user is told about a base rebuilt from it)
EXACT, HALF, LOW = "exact", "half", "low"


def _quantized_tensor_class() -> type | None:
    try:
        from comfy.quant_ops import QuantizedTensor
    except Exception:  # ComfyUI without mixed-precision support, or comfy_kitchen missing
        return None
    return QuantizedTensor if isinstance(QuantizedTensor, type) else None


def _is_gguf(w: torch.Tensor) -> bool:
    return hasattr(w, "tensor_type") and hasattr(w, "tensor_shape")


@dataclass(frozen=True)
class LayerWeight:
    """One layer's stored base weight and how to read it."""

    key: str  # weight key in the BaseModel, e.g. "diffusion_model.input_blocks.1.1.proj_in.weight"
    module: torch.nn.Module
    stored: torch.Tensor  # the weight before LoRA patches, as stored

    @property
    def kind(self) -> str:
        """float32 / float16 / bfloat16 / fp8 / scaled_fp8 / quantized:<layout> / gguf:<type>."""
        w = self.stored
        if _is_gguf(w):
            return f"gguf:{getattr(w.tensor_type, 'name', w.tensor_type)}"
        qt = _quantized_tensor_class()
        if qt is not None and isinstance(w, qt):
            layout = getattr(w, "_layout_type", None) or getattr(w, "layout_cls", None)  # 0.3.75 / comfy_kitchen
            return f"quantized:{getattr(layout, '__name__', layout) or 'unknown'}"
        if getattr(self.module, "scale_weight", None) is not None:
            return "scaled_fp8"
        return "fp8" if w.dtype in FP8_DTYPES else str(w.dtype).removeprefix("torch.")

    @property
    def precision(self) -> str:
        kind = self.kind
        if kind in ("float32", "float64"):
            return EXACT
        return HALF if kind in ("float16", "bfloat16") else LOW

    def dequantized(self, device: torch.device | str | None = None) -> torch.Tensor:
        """The float32 weight the layer computes with (before LoRA patches), on `device`."""
        w, shape = self.stored, tuple(self.stored.shape)
        with torch.no_grad():
            if _is_gguf(w):
                out = _gguf_dequantize(self.key, w)
            elif (qt := _quantized_tensor_class()) is not None and isinstance(w, qt):
                # 0.28 (comfy_kitchen): .to(float32) relabels the output dtype; 0.3.75 ignores .to(dtype)
                out = (w.to(torch.float32) if hasattr(w, "params") else w).dequantize()
            else:
                convert = getattr(self.module, "convert_weight", None)
                out = convert(w, inplace=False) if convert is not None else w
                if qt is not None and isinstance(out, qt):
                    out = out.dequantize()
            if type(out) not in (torch.Tensor, torch.nn.Parameter):
                out = out.as_subclass(torch.Tensor)
            if tuple(out.shape) != shape or not out.is_floating_point():
                raise UnreadableWeight(f"layer '{self.key}': its {self.kind} weight dequantized to "
                                       f"{tuple(out.shape)} {out.dtype}, expected {shape}")
            return out.detach().to(device=device, dtype=torch.float32)

    def digest(self) -> str:
        """Content key of the weight: its bytes where they alone define the values, else the dequantized values."""
        w = self.stored
        if type(w) in (torch.Tensor, torch.nn.Parameter) and getattr(self.module, "scale_weight", None) is None \
                and self.kind in ("float32", "float16", "bfloat16", "float64"):
            return cache_key(w)
        return cache_key(self.kind, self.dequantized("cpu"))

    @cached_property
    def quick_key(self) -> tuple:
        """An in-process key of this exact stored tensor: its identity plus a sample of its bytes, so a tensor
        rewritten in place (ComfyUI copies weights with `param.data.copy_`, which keeps identity and version)
        gets a new key."""
        w = self.stored
        raw = (w.as_subclass(torch.Tensor) if type(w) not in (torch.Tensor, torch.nn.Parameter) else w).detach()
        flat = raw.reshape(-1) if raw.is_contiguous() else raw.contiguous().reshape(-1)
        n = flat.numel()
        idx = torch.linspace(0, n - 1, min(n, 4096), device=flat.device).long()
        sample = flat[idx].cpu()
        scale = getattr(self.module, "scale_weight", None)
        h = hashlib.blake2b(sample.view(torch.uint8).numpy().tobytes(), digest_size=16)
        if scale is not None:
            h.update(scale.detach().float().cpu().numpy().tobytes())
        return (id(w), raw.data_ptr(), tuple(w.shape), str(w.dtype), self.kind, h.hexdigest())


def _gguf_dequantizer(key: str, w: torch.Tensor):
    """ComfyUI-GGUF's own `dequantize_tensor`, from the module that defines the tensor's class (ComfyUI registers
    custom-node packages under path-based names, so the tensor's class is the one way to reach it)."""
    mod = sys.modules.get(type(w).__module__)
    deq = getattr(mod, "dequantize_tensor", None)
    if deq is None:
        raise UnreadableWeight(f"layer '{key}' holds a GGUF tensor ({type(w).__module__}.{type(w).__name__}, "
                               f"{getattr(w.tensor_type, 'name', w.tensor_type)}) but the ComfyUI-GGUF module that "
                               "loaded it offers no dequantize_tensor: update ComfyUI-GGUF, or load the model "
                               "without GGUF")
    return deq


def _gguf_where(deq) -> str:
    mod = sys.modules.get(getattr(deq, "__module__", ""), None)
    return f"{getattr(mod, '__file__', None) or getattr(deq, '__module__', '?')}, dequantize_tensor{_signature(deq)}"


def _signature(fn) -> str:
    try:
        return str(inspect.signature(fn))
    except (TypeError, ValueError):
        return "(?)"


def _gguf_dequantize(key: str, w: torch.Tensor) -> torch.Tensor:
    """ComfyUI-GGUF's `dequantize_tensor` to float32, in either of its released signatures: `(tensor, dtype=None,
    dequant_dtype=None)` (through 2025), or `(tensor, dtype=None, config: GGUFConfig = None)` with
    `GGUFConfig.dequant_dtype` (its `dequant.py` defines `GGUFConfig`)."""
    deq = _gguf_dequantizer(key, w)
    try:
        params = inspect.signature(deq).parameters
    except (TypeError, ValueError):
        params = {}
    try:
        if "config" in params:
            config = getattr(sys.modules.get(deq.__module__), "GGUFConfig", None)
            if config is None:
                raise UnreadableWeight(f"layer '{key}': ComfyUI-GGUF's dequantize_tensor takes a config but its module "
                                       f"has no GGUFConfig ({_gguf_where(deq)}): update ComfyUI-GGUF")
            return deq(w, torch.float32, config=config(dequant_dtype=torch.float32))
        if "dequant_dtype" in params:
            return deq(w, torch.float32, dequant_dtype=torch.float32)
    except UnreadableWeight:
        raise
    except Exception as e:
        raise UnreadableWeight(f"layer '{key}': ComfyUI-GGUF could not dequantize its "
                               f"{getattr(w.tensor_type, 'name', w.tensor_type)} weight ({_gguf_where(deq)}): "
                               f"{type(e).__name__}: {e}") from None
    raise UnreadableWeight(f"layer '{key}': this ComfyUI-GGUF has a dequantize_tensor this pack does not know "
                           f"({_gguf_where(deq)}; known: (tensor, dtype, dequant_dtype) and (tensor, dtype, config)): "
                           "use a ComfyUI-GGUF release from 2025-2026, or a self-contained T-LoRA file (Save T-LoRA "
                           "with base)")


def layer_weight(patcher, key: str) -> LayerWeight:
    """The stored base weight of `key` (a BaseModel weight key), checked to be readable."""
    module = comfy.utils.get_attr(patcher.model, key.rsplit(".", 1)[0])
    bk = getattr(patcher, "backup", {}).get(key)
    stored = bk.weight if bk is not None else None
    if stored is None:
        hbk = getattr(patcher, "hook_backup", {}).get(key)
        stored = hbk[0] if hbk is not None else getattr(module, key.rsplit(".", 1)[1], None)
    if stored is None or getattr(stored, "is_meta", False):
        raise UnreadableWeight(f"layer '{key}' has no weight in memory ({'meta' if stored is not None else 'None'}): "
                               "load the model fully (without lazy or meta loading) to apply a T-LoRA")
    check_storage(key, module, stored)
    return LayerWeight(key, module, stored)


def check_storage(key: str, module: torch.nn.Module, w: torch.Tensor) -> None:
    """Refuse storage that cannot be dequantized, naming the layer type and what to do."""
    if _is_gguf(w):
        _gguf_dequantizer(key, w)
        return
    qt = _quantized_tensor_class()
    if qt is not None and isinstance(w, qt):
        return
    if type(w) in (torch.Tensor, torch.nn.Parameter) and w.is_floating_point():
        return
    what = f"{type(w).__module__}.{type(w).__qualname__}" if type(w) not in (torch.Tensor, torch.nn.Parameter) \
        else f"{w.dtype} tensor"
    raise UnreadableWeight(f"layer '{key}' ({type(module).__name__}) stores its weight as {what}, which this pack "
                           "cannot dequantize (it reads float, fp8, ComfyUI scaled-fp8 and QuantizedTensor, and "
                           "ComfyUI-GGUF weights): load the checkpoint in one of those forms, or use a "
                           "self-contained T-LoRA file (Save T-LoRA with base) with the model loaded normally")
