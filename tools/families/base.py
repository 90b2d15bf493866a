"""What one model family needs for conformance: a tiny diffusers twin with seeded weights, the same weights loaded
through ComfyUI's own detection, model inputs, and the diffusers forward on the inputs ComfyUI's model received.

The ComfyUI side always goes through `comfy.sd.load_diffusion_model_state_dict` (`detect_unet_config`,
`process_unet_state_dict`, the class's own model building), so a new ComfyUI changes the test model the way it
changes users' models. Where detection hard-codes a full-size width that a tiny model cannot have (heads fixed at
24, a 3584-wide text input, ...), `overrides` replaces just those values in the detected config.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch

from tools.tiny_models import fill_random_, import_comfy

KeyMap = dict[str, Any]  # diffusers key -> ComfyUI key | (key, (dim, start, size)) | (key, None, fn)


@dataclass
class Twin:
    diffusers: torch.nn.Module
    patcher: Any  # ComfyUI ModelPatcher built by detection
    info: dict[str, Any] = field(default_factory=dict)  # family-specific values the inputs / reference need


@dataclass
class Call:
    """What the ComfyUI diffusion model received in one `apply_model` call, and what it returned."""

    args: tuple
    kwargs: dict[str, Any]
    out: torch.Tensor


@dataclass(frozen=True)
class Family:
    name: str  # short id, e.g. "flux"
    title: str  # for the README, e.g. "Flux.1"
    comfy_class: str  # the model_base class detection must give, e.g. "Flux"
    supported: str  # the supported_models class the host must have for this family to exist there
    targets: tuple[str, ...]  # LyCORIS preset target classes on the diffusers side
    build: Callable[[int], Twin]  # seed -> twin
    inputs: Callable[[Twin, torch.Generator], tuple[torch.Tensor, dict[str, Any]]]  # x, apply_model conds
    reference: Callable[[Twin, Call], torch.Tensor]  # diffusers forward on ComfyUI's captured inputs
    flow: bool = True  # rectified flow (t = int(sigma * 1000)) or a discrete model (its own timestep)

    def available(self) -> bool:
        comfy = import_comfy()
        return hasattr(comfy.supported_models, self.supported)


def seeded(model: torch.nn.Module, seed: int) -> torch.nn.Module:
    """Seeded N(0, 1/fan_in) weights, norm scales near 1, small biases; fp32, eval mode."""
    return fill_random_(model, seed)


def convert(sd: dict[str, torch.Tensor], key_map: KeyMap, keep: bool = False) -> dict[str, torch.Tensor]:
    """A diffusers state dict in ComfyUI's keys with a `*_to_diffusers`-style map (slices of fused weights
    assembled, transforms applied). Every diffusers tensor must be mapped unless `keep` (then it is kept as is)."""
    out: dict[str, torch.Tensor] = {}
    missing = []
    for k, w in sd.items():
        t = key_map.get(k)
        if t is None:
            if keep:
                out[k] = w
            else:
                missing.append(k)
            continue
        if isinstance(t, str):
            out[t] = w
            continue
        fn = t[2] if len(t) > 2 else (lambda a: a)
        if t[1] is None:
            out[t[0]] = fn(w)
            continue
        dim, start, size = t[1]
        old = out.get(t[0])
        if old is None or old.shape[dim] < start + size:
            shape = list(w.shape)
            shape[dim] = start + size if old is None else max(start + size, old.shape[dim])
            new = torch.zeros(shape, dtype=w.dtype)
            if old is not None:
                new.narrow(dim, 0, old.shape[dim]).copy_(old)
            old = new
        old.narrow(dim, start, size).copy_(fn(w))
        out[t[0]] = old
    if missing:
        raise KeyError(f"{len(missing)} diffusers tensors have no ComfyUI key, e.g. {missing[:5]}")
    return out


def renamed(sd: dict[str, torch.Tensor], pairs: list[tuple[str, str]]) -> KeyMap:
    """{diffusers key: the key with each (old, new) substring replaced in order}."""
    out = {}
    for k in sd:
        new = k
        for a, b in pairs:
            new = new.replace(a, b)
        out[k] = new
    return out


@contextlib.contextmanager
def detection(overrides: dict[str, Any] | None, force: str | None) -> Iterator[None]:
    comfy = import_comfy()
    md = comfy.model_detection
    orig_detect, orig_pick = md.detect_unet_config, md.model_config_from_unet_config

    def detect(state_dict, key_prefix, *args, **kwargs):
        cfg = orig_detect(state_dict, key_prefix, *args, **kwargs)
        if cfg is not None and overrides:
            cfg.update(overrides)
        return cfg

    def pick(unet_config, *args, **kwargs):
        if force is None:
            return orig_pick(unet_config, *args, **kwargs)
        return getattr(comfy.supported_models, force)(unet_config)

    md.detect_unet_config, md.model_config_from_unet_config = detect, pick
    try:
        yield
    finally:
        md.detect_unet_config, md.model_config_from_unet_config = orig_detect, orig_pick


def load_detected(sd: dict[str, torch.Tensor], overrides: dict[str, Any] | None = None,
                  force: str | None = None, dtype: torch.dtype = torch.float32):
    """A ComfyUI ModelPatcher for a ComfyUI-format diffusion-model state dict, through ComfyUI's own loader.

    overrides: detected config values a tiny model must replace (widths detection hard-codes).
    force: a supported_models class to use where detection picks classes by a full-size width.
    dtype: the model's weight and compute dtype (ComfyUI's `weight_dtype`)."""
    comfy = import_comfy()
    with detection(overrides, force):
        patcher = comfy.sd.load_diffusion_model_state_dict(dict(sd), model_options={"dtype": dtype})
    if patcher is None:
        raise RuntimeError("ComfyUI did not recognise the tiny model's state dict")
    return patcher


def capture(patcher, x: torch.Tensor, sigma: torch.Tensor, conds: dict[str, Any]) -> Call:
    """One model call through ComfyUI's `apply_model` with the patcher's wrappers and injections live, recording
    the diffusion model's inputs and output."""
    import_comfy()
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher])
    calls: list[Call] = []
    hook = patcher.model.diffusion_model.register_forward_hook(
        lambda _m, args, kwargs, out: calls.append(Call(args, dict(kwargs), out)), with_kwargs=True)
    try:
        with torch.no_grad():
            patcher.model.apply_model(x, sigma, transformer_options={
                "wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)}, **conds)
    finally:
        hook.remove()
    (call,) = calls
    return call


def arg(call: Call, index: int, name: str) -> Any:
    """A diffusion-model input by position or keyword."""
    return call.args[index] if len(call.args) > index else call.kwargs[name]


def sigma_for(patcher, t: int, flow: bool) -> torch.Tensor:
    """A sampler sigma whose trainer timestep is exactly t."""
    if flow:
        return torch.tensor([(t + 0.5) / 1000.0 if t < 999 else 0.9995])
    ms = patcher.model.model_sampling
    sigma = ms.sigma(torch.tensor([float(t)]))
    assert int(ms.timestep(sigma).item()) == t
    return sigma


def heads_of(width: int, head_dim: int) -> int:
    assert width % head_dim == 0, (width, head_dim)
    return width // head_dim


def pack_2x2(x: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): Flux-style 2x2 patch tokens."""
    b, c, h, w = x.shape
    return x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)


def unpack_2x2(x: torch.Tensor, c: int, h: int, w: int) -> torch.Tensor:
    b = x.shape[0]
    return x.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


def grid_ids(h: int, w: int, axes: int, rows: int = 1, cols: int = 2) -> torch.Tensor:
    """(h*w, axes) position ids with the row index in column `rows` and the column index in column `cols`."""
    ids = torch.zeros(h, w, axes)
    ids[..., rows] = torch.arange(h)[:, None]
    ids[..., cols] = torch.arange(w)[None, :]
    return ids.reshape(-1, axes)


def rel_max(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    return float((a.double() - b.double()).abs().max() / b.double().abs().max().clamp_min(1e-30))


def rel_l2(a: torch.Tensor, b: torch.Tensor) -> float:
    """|a - b| / |b| (Frobenius norms): the relative error."""
    return float((a.detach().double() - b.detach().double()).norm() / b.detach().double().norm().clamp_min(1e-30))




# --- LyCORIS as the oracle -------------------------------------------------------------------------------------
def exact_bases(net) -> dict[str, tuple[torch.Tensor, ...]]:
    """The exact top-r SVD base (float64) of every LyCORIS module's layer, in LyCORIS' buffer shapes (LyCORIS builds
    its own with a float32 SVD, whose rank-one terms are off by ~3e-5)."""
    out = {}
    for lo in net.loras:
        w = lo.org_module[0].weight.detach().double()
        u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1), full_matrices=False)
        r = lo.lora_dim
        out[lo.lora_name] = (vh[:r].reshape(lo.base_q.shape), u[:, :r].reshape(lo.base_p.shape),
                             s[:r].reshape(lo.base_lambda.shape))
    return out


def set_bases(net, bases) -> None:
    """LyCORIS modules' base buffers (base_q, base_p, base_lambda) <- `bases`."""
    for lo in net.loras:
        for buf, val in zip((lo.base_q, lo.base_p, lo.base_lambda), bases[lo.lora_name], strict=True):
            buf.copy_(val)


def lycoris_delta(lora, rank: int) -> torch.Tensor:
    """A LyCORIS T-LoRA module's own weight change with its first `rank` ranks active, as (out, in)."""
    from lycoris.modules.tlora import set_timestep_mask

    mask = torch.zeros(1, lora.lora_dim)
    mask[:, :rank] = 1
    set_timestep_mask(mask)
    return lora.get_diff_weight()[0].reshape(lora.shape[0], -1)
