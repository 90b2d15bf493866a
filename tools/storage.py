"""Checkpoints in the storage kinds ComfyUI users load, written from one fp32 ComfyUI-format state dict:

  float32 / bfloat16 / float16   the weights in that dtype (loaded with that dtype)
  fp8                            an fp16 file loaded with UNETLoader's weight_dtype fp8_e4m3fn
  scaled_fp8                     ComfyUI's "fp8_scaled" files: every 2-D weight as fp8 W / s plus
                                 `<layer>.scale_weight`, and the `scaled_fp8` marker (ComfyUI 0.3.75 runs them with
                                 scaled_fp8_ops; 0.28 converts them to QuantizedTensor weights on load)
  mixed_fp8                      ComfyUI mixed precision: fp8 weights + `<layer>.weight_scale`, listed in the
                                 `_quantization_metadata` of the file (QuantizedTensor weights in both hosts)
`load(path, kind)` loads one the way UNETLoader does (`comfy.sd.load_diffusion_model`).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

KINDS = ("float32", "bfloat16", "float16", "fp8", "scaled_fp8", "mixed_fp8")
FP8 = torch.float8_e4m3fn
_FP8_MAX = torch.finfo(FP8).max


def _linear(key: str, t: torch.Tensor) -> bool:
    return key.endswith(".weight") and t.ndim == 2


def _fp8_scaled(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    scale = (t.float().abs().amax() / _FP8_MAX).clamp(min=1e-12)
    return (t.float() / scale).clamp(-_FP8_MAX, _FP8_MAX).to(FP8), scale.reshape(())


def write(sd: dict[str, torch.Tensor], kind: str, path: Path) -> Path:
    """`sd` (ComfyUI diffusion-model keys, no prefix, fp32) stored as `kind` at `path`."""
    meta: dict[str, str] = {}
    if kind in ("float32", "bfloat16", "float16", "fp8"):
        dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}.get(kind, torch.float16)
        out = {k: v.to(dtype) for k, v in sd.items()}
    elif kind == "scaled_fp8":
        out = {}
        for k, v in sd.items():
            if _linear(k, v):
                out[k], out[k[: -len("weight")] + "scale_weight"] = _fp8_scaled(v)
            else:
                out[k] = v.to(torch.float16)
        out["scaled_fp8"] = torch.empty(0, dtype=FP8)  # marker: its dtype is the storage dtype
    elif kind == "mixed_fp8":
        out, layers = {}, {}
        for k, v in sd.items():
            if _linear(k, v):
                out[k], out[k[: -len("weight")] + "weight_scale"] = _fp8_scaled(v)
                layers[k[: -len(".weight")]] = {"format": "float8_e4m3fn"}
            else:
                out[k] = v.to(torch.bfloat16)
        meta["_quantization_metadata"] = json.dumps({"format_version": "1.0", "layers": layers})
    else:
        raise ValueError(f"unknown storage kind {kind!r}; one of {KINDS}")
    save_file({k: v.contiguous() for k, v in out.items()}, str(path), metadata=meta)
    return path


def model_options(kind: str) -> dict:
    """What UNETLoader passes for this storage (weight_dtype)."""
    dtypes = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16, "fp8": FP8}
    return {"dtype": dtypes[kind]} if kind in dtypes else {}


def load(path: Path, kind: str, overrides: dict | None = None):
    """A ComfyUI ModelPatcher for the file, loaded like UNETLoader does (`overrides`: detected config values a tiny
    model replaces, see tools/families/base.py)."""
    import comfy.sd

    from tools.families.base import detection

    with detection(overrides, None):
        return comfy.sd.load_diffusion_model(str(path), model_options=model_options(kind))


def values(pack, loaded) -> dict[str, torch.Tensor]:
    """The loaded model's parameters as the values it computes with (dequantized by the pack), fp32, by key."""
    out = {}
    for name, module in loaded.model.named_modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            key = f"{name}.{pname}"
            if pname == "weight":
                out[key] = pack.engine.weights.layer_weight(loaded, key).dequantized("cpu")
            elif p.is_floating_point():
                out[key] = p.detach().float()
    return out


def reference(patcher, net, exact, stored_values, targets, x, sigma, conds, rank):
    """(output, output without the T-LoRA) of `patcher`'s fp32 model holding `stored_values` (a loaded storage's
    values), plus LyCORIS' exact masked delta at `rank` merged into each target (`net`: the LyCORIS network on the
    twin; `exact`: its exact bases); the model's own values are restored afterwards."""
    import comfy.utils

    from tools.families.base import capture, lycoris_delta, set_bases

    params = dict(patcher.model.named_parameters())
    saved = {k: v.detach().clone() for k, v in params.items()}
    loras = {lo.lora_name: lo for lo in net.loras}
    try:
        with torch.no_grad():
            for k, v in stored_values.items():
                if k in params and params[k].shape == v.shape:
                    params[k].copy_(v)
            base = capture(patcher, x, sigma, conds).out
            set_bases(net, exact)
            for t in targets:
                w = comfy.utils.get_attr(patcher.model, t.key)
                delta = lycoris_delta(loras[t.adapter.name], rank).to(w.dtype)
                delta = t.reorder(delta) if t.reorder is not None else delta
                rows = w if t.out_slice is None else w.narrow(0, *t.out_slice)
                rows.add_(delta.reshape(rows.shape))
            out = capture(patcher, x, sigma, conds).out
    finally:
        with torch.no_grad():
            for k, v in saved.items():
                params[k].copy_(v)
    return out, base
