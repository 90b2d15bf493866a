"""GGUF weights are read through ComfyUI-GGUF's own `dequantize_tensor`, found from the tensor's class, in both of
the signatures its releases have had. ComfyUI-GGUF is not on PyPI, so each test builds a module that stands where
its `ops.py` stands (defining the tensor class, importing `dequantize_tensor`) with exactly that release's
signature; the weights are quantized and dequantized by the `gguf` package, the library ComfyUI-GGUF itself uses.
`scripts/check_gguf.py --gguf-pack DIR` runs the same read against a real ComfyUI-GGUF checkout."""

from __future__ import annotations

import sys
import types
from typing import NamedTuple

import numpy as np
import pytest
import torch

from tools.families import FAMILIES

QTYPES = ("Q8_0", "Q4_0")


def _module(name: str, dequantize) -> types.ModuleType:
    """A module in sys.modules defining a GGMLTensor class and `dequantize_tensor`, like ComfyUI-GGUF's ops.py."""
    mod = types.ModuleType(name)

    class GGMLTensor(torch.Tensor):  # packed bytes; `shape` is the logical one, and detach keeps the instance
        def __new__(cls, data, tensor_type, tensor_shape):
            t = torch.Tensor._make_subclass(cls, data)
            t.tensor_type, t.tensor_shape = tensor_type, tensor_shape
            return t

        def detach(self, *args, **kwargs):
            return self

        @property
        def shape(self):
            return self.tensor_shape

    GGMLTensor.__module__ = name
    mod.GGMLTensor = GGMLTensor
    # defined in this module, as ComfyUI-GGUF's comes from its own dequant.py (where GGUFConfig lives too)
    mod.dequantize_tensor = types.FunctionType(dequantize.__code__, dequantize.__globals__, dequantize.__name__,
                                               dequantize.__defaults__)
    mod.dequantize_tensor.__module__ = name
    sys.modules[name] = mod
    return mod


def _gguf_values(tensor) -> torch.Tensor:
    import gguf

    raw = tensor.as_subclass(torch.Tensor).detach().cpu().numpy()
    return torch.from_numpy(gguf.quants.dequantize(raw, tensor.tensor_type).copy()).reshape(tensor.tensor_shape)


def released_2024(tensor, dtype=None, dequant_dtype=None):  # dequant.py up to 2025
    assert dequant_dtype in (None, torch.float32, torch.float16, torch.bfloat16), dequant_dtype
    return _gguf_values(tensor).to(dequant_dtype or dtype).to(dtype)


class GGUFConfig(NamedTuple):  # dequant.py of 2026: the options travel in one config
    dequant_dtype: object = None
    patch_dtype: object = None


def released_2026(tensor, dtype=None, config: GGUFConfig | None = None):
    config = config or GGUFConfig()
    assert isinstance(config, GGUFConfig), f"config is {type(config).__name__}, not GGUFConfig"
    return _gguf_values(tensor).to(config.dequant_dtype or dtype).to(dtype)


def unknown_signature(tensor):
    return _gguf_values(tensor)


def broken(tensor, dtype=None, dequant_dtype=None):
    raise RuntimeError("unsupported block layout")


@pytest.fixture
def layer(pack):
    """A target layer of the tiny SD1.5 model and its key; its weight is swapped per test."""
    twin = FAMILIES["sd15"].build(61)
    key = next(k for k, v in twin.patcher.model.state_dict().items()
               if k.endswith("attn1.to_q.weight") and v.shape[1] % 32 == 0)
    import comfy.utils

    return twin.patcher, key, comfy.utils.get_attr(twin.patcher.model, key.rsplit(".", 1)[0])


def _quantize(module, name: str, qtype: str):
    import gguf

    w = module.weight.detach().float()
    q = gguf.quants.quantize(w.numpy(), getattr(gguf.GGMLQuantizationType, qtype))
    cls = sys.modules[name].GGMLTensor
    packed = cls(torch.from_numpy(q), getattr(gguf.GGMLQuantizationType, qtype), w.shape)
    module.weight = torch.nn.Parameter(packed, requires_grad=False)  # as ComfyUI-GGUF's loader sets it
    return w


@pytest.mark.parametrize("qtype", QTYPES)
@pytest.mark.parametrize("release", ["released_2024", "released_2026"])
def test_gguf_weights_are_read_through_comfyui_gguf_in_either_signature(pack, layer, monkeypatch, release, qtype):
    patcher, key, module = layer
    name = f"custom_nodes_gguf_{release}.ops"
    mod = _module(name, globals()[release])
    if release == "released_2026":
        mod.GGUFConfig = GGUFConfig
    monkeypatch.setitem(sys.modules, name, mod)
    original = _quantize(module, name, qtype)
    lw = pack.engine.weights.layer_weight(patcher, key)
    assert lw.kind == f"gguf:{qtype}" and lw.precision == "low"
    got = lw.dequantized()
    want = _gguf_values(module.weight)
    assert got.dtype == torch.float32 and torch.equal(got, want)  # exactly gguf's own values
    err = float((got - original).norm() / original.norm())
    assert 1e-5 < err < (0.02 if qtype == "Q8_0" else 0.2), err  # quantized, and still the layer's weight
    assert isinstance(np.asarray(got), np.ndarray)


@pytest.mark.parametrize("case", ["unknown_signature", "broken", "config_without_class"])
def test_a_comfyui_gguf_it_cannot_call_gets_a_clear_error(pack, layer, monkeypatch, case):
    patcher, key, module = layer
    name = f"custom_nodes_gguf_{case}.ops"
    fn = {"unknown_signature": unknown_signature, "broken": broken, "config_without_class": released_2026}[case]
    monkeypatch.setitem(sys.modules, name, _module(name, fn))
    _quantize(module, name, "Q8_0")
    with pytest.raises(pack.engine.weights.UnreadableWeight) as e:
        pack.engine.weights.layer_weight(patcher, key).dequantized()
    msg = str(e.value)
    assert key in msg and "ComfyUI-GGUF" in msg and "dequantize_tensor(" in msg, msg
    cause = {"unknown_signature": "does not know", "broken": "unsupported block layout",
             "config_without_class": "no GGUFConfig"}[case]
    assert cause in msg, msg
