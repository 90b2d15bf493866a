"""Tiny, seeded, random-weight models and T-LoRA files for tests (CPU, fp32 maths, no downloads).

Two kinds of pairs, both holding *identical* weights on the ComfyUI side and the diffusers side:

* detectable files (`make_sd15`, `make_sdxl`, `make_flux`, `make_vae`): ComfyUI's own detection
  (`comfy.sd.load_diffusion_model`, `comfy.sd.VAE`) accepts them, so they work in real graphs;
  the diffusers twin is saved with `save_pretrained` beside them;
* in-process pairs (`build_comfy_unet_small`, `build_comfy_flux_small`): ComfyUI model classes built
  directly from a much smaller config (detection skipped) plus the equivalent diffusers model.

Weights are N(0, 1/fan_in) for matrices, 1 + N(0, 0.1^2) for norm scales and N(0, 0.02^2) for biases.
Diffusers weights become ComfyUI weights through ComfyUI's own key maps
(`comfy.utils.unet_to_diffusers` / `comfy.utils.flux_to_diffusers`), fused q/k/v slices included.

The T-LoRA writers produce the three on-disk formats of docs/formats.md: LyCORIS `tlora`
(what SimpleTuner saves), and the official ControlGenAI/T-LoRA SDXL (`save_attn_procs`) and Flux
(`lora.pt`) layouts.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import time
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

log = logging.getLogger("tlora.tests.tiny_models")

REPO = Path(__file__).resolve().parents[1]
STAMP_VERSION = 1
UNET_TARGETS = ("Attention", "FeedForward")  # SimpleTuner's documented generic LyCORIS preset
# diffusers >= 0.35 names Flux attention `FluxAttention`, so the generic preset only reaches Flux's
# feed-forwards; targeting the blocks reaches every Linear (to_q..., proj_mlp, norm1.linear, ...).
FLUX_TARGETS = ("FluxTransformerBlock", "FluxSingleTransformerBlock")


# --------------------------------------------------------------------------------------------
# ComfyUI import
# --------------------------------------------------------------------------------------------
def import_comfy():
    """Import ComfyUI from $COMFYUI_PATH or <repo>/.host/ComfyUI, in CPU mode when there is no GPU."""
    from tools.harness.inproc import import_comfy as _import

    _import()
    import comfy.lora
    import comfy.model_base
    import comfy.model_detection
    import comfy.model_management
    import comfy.model_patcher
    import comfy.sd
    import comfy.supported_models
    import comfy.utils

    return comfy


# --------------------------------------------------------------------------------------------
# Weights
# --------------------------------------------------------------------------------------------
@torch.no_grad()
def fill_random_(model: torch.nn.Module, seed: int, round_to: torch.dtype | None = None) -> torch.nn.Module:
    """Overwrite every parameter with seeded random values (see module doc); a meta model is
    materialised on the CPU first. `round_to` rounds the values through that dtype (e.g. fp16) so a
    file stored in it holds exactly what the fp32 model computes with."""
    if any(p.is_meta for p in model.parameters()):
        model.to_empty(device="cpu")
    g = torch.Generator().manual_seed(seed)
    for name, p in model.named_parameters():
        if p.ndim >= 2:
            v = torch.randn(p.shape, generator=g) / math.sqrt(p[0].numel())
        elif name.endswith("bias"):
            v = 0.02 * torch.randn(p.shape, generator=g)
        else:  # GroupNorm / LayerNorm / RMSNorm scales
            v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
        p.copy_(v.to(round_to) if round_to is not None else v)
    return model.float().eval()


def diffusers_to_comfy(sd: dict[str, torch.Tensor], key_map: dict[str, Any]) -> dict[str, torch.Tensor]:
    """Convert a diffusers state dict with a ComfyUI `*_to_diffusers` map (diffusers key -> ComfyUI key,
    `(key, (dim, start, size))` for a slice of a fused weight, or `(key, None, fn)` for a transform).
    Every diffusers tensor must be used and every fused weight filled without gaps."""
    out, parts, used = {}, {}, set()
    for dkey, target in key_map.items():
        if dkey not in sd:
            continue
        used.add(dkey)
        t = sd[dkey]
        if isinstance(target, str):
            out[target] = t
        elif target[1] is None:
            out[target[0]] = target[2](t)
        else:
            ckey, (dim, start, size) = target
            assert dim == 0 and t.shape[0] == size, (dkey, t.shape, target)
            parts.setdefault(ckey, []).append((start, t))
    for ckey, pieces in parts.items():
        pieces.sort(key=lambda s: s[0])
        pos = 0
        for start, t in pieces:
            assert start == pos, f"gap or overlap in fused {ckey} at row {pos}"
            pos += t.shape[0]
        out[ckey] = torch.cat([t for _, t in pieces])
    missing = sorted(set(sd) - used)
    if missing:
        raise KeyError(f"{len(missing)} diffusers tensors have no ComfyUI key, e.g. {missing[:5]}")
    return out


def _nbytes(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file()) if path.is_dir() else path.stat().st_size


def _fresh(stamp_path: Path, stamp: dict, files: list[Path]) -> bool:
    try:
        return json.loads(stamp_path.read_text()) == json.loads(json.dumps(stamp)) and all(f.exists() for f in files)
    except (OSError, ValueError):
        return False


def _result(name: str, t0: float, files: dict[str, Path], cached: bool, **extra) -> dict:
    res = {"name": name, **files, **extra, "cached": cached, "seconds": round(time.perf_counter() - t0, 2)}
    res["bytes"] = sum(_nbytes(p) for p in files.values())
    log.info("%s: %s in %.1f s (%.1f MiB)", name, "cached" if cached else "built", res["seconds"], res["bytes"] / 2**20)
    return res


# --------------------------------------------------------------------------------------------
# UNets (SD1.5 / SDXL families)
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class UNetSpec:
    """One UNet, described once and rendered as a diffusers config and a ComfyUI unet_config."""

    channels: tuple[int, ...]  # block_out_channels; ComfyUI model_channels = channels[0]
    res_blocks: int  # res blocks per level on the way down (one more on the way up)
    depth: tuple[int, ...]  # transformer depth per level on the way down (0 = no attention)
    up_depth: tuple[int, ...]  # same on the way up, listed shallow -> deep like `depth`
    mid_depth: int | None  # transformers in the middle block; None = no middle block
    context_dim: int
    num_heads: int = -1  # SD1.5 style: fixed head count ...
    head_channels: int = -1  # ... or SDXL style: fixed head width
    linear_proj: bool = False  # SDXL: Linear proj_in/proj_out instead of 1x1 convs
    pooled_dim: int | None = None  # SDXL: pooled text width; adm = pooled_dim + 6 * 256 (size/crop ids)

    def heads(self, level: int) -> int:
        return self.num_heads if self.num_heads > 0 else self.channels[level] // self.head_channels

    def diffusers_config(self) -> dict:
        n = len(self.channels)
        if self.mid_depth and self.depth[-1] and self.mid_depth != self.depth[-1]:
            raise ValueError("diffusers' middle block repeats the deepest level's transformer depth")
        tl = [d or 1 for d in self.depth]  # entries of attention-free levels are ignored by diffusers
        tl[-1] = self.depth[-1] or self.mid_depth or 1
        cfg = dict(
            sample_size=32,
            in_channels=4,
            out_channels=4,
            down_block_types=tuple("CrossAttnDownBlock2D" if d else "DownBlock2D" for d in self.depth),
            up_block_types=tuple("CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(self.up_depth)),
            mid_block_type="UNetMidBlock2DCrossAttn" if self.mid_depth else None,
            block_out_channels=self.channels,
            layers_per_block=self.res_blocks,
            cross_attention_dim=self.context_dim,
            attention_head_dim=tuple(self.heads(i) for i in range(n)),  # diffusers' legacy name: head *count*
            transformer_layers_per_block=tuple(tl),
            reverse_transformer_layers_per_block=tuple(d or 1 for d in reversed(self.up_depth)),
            use_linear_projection=self.linear_proj,
        )
        if self.pooled_dim is not None:
            cfg.update(
                addition_embed_type="text_time",
                addition_time_embed_dim=256,
                projection_class_embeddings_input_dim=self.pooled_dim + 6 * 256,
            )
        return cfg

    def comfy_unet_config(self) -> dict:
        n, r = len(self.channels), self.res_blocks
        cfg = dict(
            use_checkpoint=False,
            image_size=32,
            use_spatial_transformer=True,
            legacy=False,
            in_channels=4,
            out_channels=4,
            model_channels=self.channels[0],
            num_res_blocks=[r] * n,
            channel_mult=[c // self.channels[0] for c in self.channels],
            transformer_depth=[d for d in self.depth for _ in range(r)],
            transformer_depth_output=[d for d in self.up_depth for _ in range(r + 1)],
            transformer_depth_middle=self.mid_depth if self.mid_depth else -2,
            use_linear_in_transformer=self.linear_proj,
            context_dim=self.context_dim,
            num_heads=self.num_heads,
            num_head_channels=self.head_channels,
            adm_in_channels=None,
            use_temporal_resblock=False,
            use_temporal_attention=False,
        )
        if self.pooled_dim is not None:
            cfg.update(num_classes="sequential", adm_in_channels=self.pooled_dim + 6 * 256)
        return cfg


# Smallest configs that ComfyUI 0.3.75 detection maps to these classes (see comfy/supported_models.py:
# SD15 needs model_channels 320 + context 768 + conv proj; SDXL-family classes need 320 / 2048 / adm 2816
# and an exact per-res-block input transformer_depth list).
SD15_SPEC = UNetSpec((320,), 1, (1,), (1,), 1, 768, num_heads=8)
SDXL_VARIANTS = {  # variant -> (spec, ComfyUI class); all SDXL subclasses built as model_base.SDXL
    "koala": (UNetSpec((320,) * 3, 1, (0, 2, 5), (0, 1, 1), None, 2048, head_channels=64, linear_proj=True,
                       pooled_dim=1280), "KOALA_700M"),
    "vega": (UNetSpec((320,) * 3, 2, (0, 1, 2), (0, 1, 1), None, 2048, head_channels=64, linear_proj=True,
                      pooled_dim=1280), "Segmind_Vega"),
    "sdxl": (UNetSpec((320,) * 3, 2, (0, 2, 10), (0, 1, 1), None, 2048, head_channels=64, linear_proj=True,
                      pooled_dim=1280), "SDXL"),
}


def _unet_pair(spec: UNetSpec, seed: int, round_to: torch.dtype | None):
    """(diffusers UNet2DConditionModel, ComfyUI-key state dict) with identical weights."""
    comfy = import_comfy()
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.diffusers_config())
    fill_random_(unet, seed, round_to)
    key_map = comfy.utils.unet_to_diffusers(spec.comfy_unet_config())
    return unet, diffusers_to_comfy(unet.state_dict(), key_map)


def _save_pair(name, out_dir, model, comfy_sd, dtype, stamp, t0, **extra) -> dict:
    comfy_file, diff_dir = out_dir / f"{name}_comfy.safetensors", out_dir / f"{name}_diffusers"
    save_file({k: v.to(dtype).contiguous() for k, v in comfy_sd.items()}, str(comfy_file),
              metadata={"tiny_models": json.dumps(stamp)})
    torch.nn.Module.to(model, dtype).save_pretrained(str(diff_dir))  # plain cast: ModelMixin.to() warns
    (out_dir / f"{name}.stamp.json").write_text(json.dumps(stamp, indent=1))
    return _result(name, t0, {"comfy_file": comfy_file, "diffusers_dir": diff_dir}, False, **extra)


def _make_unet(name, spec, expected_class, out_dir, seed, dtype, force) -> dict:
    t0, out_dir = time.perf_counter(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = {"version": STAMP_VERSION, "name": name, "seed": seed, "dtype": str(dtype),
             "spec": dataclasses.asdict(spec)}
    files = {"comfy_file": out_dir / f"{name}_comfy.safetensors", "diffusers_dir": out_dir / f"{name}_diffusers"}
    extra = {"expected_class": expected_class, "unet_config": spec.comfy_unet_config(),
             "diffusers_config": spec.diffusers_config()}
    if not force and _fresh(out_dir / f"{name}.stamp.json", stamp, list(files.values())):
        return _result(name, t0, files, True, **extra)
    unet, comfy_sd = _unet_pair(spec, seed, dtype)
    return _save_pair(name, out_dir, unet, comfy_sd, dtype, stamp, t0, **extra)


def make_sd15(out_dir, seed: int = 0, dtype: torch.dtype = torch.float16, force: bool = False) -> dict:
    """Tiny SD1.5 UNet (320 ch, 1 level, 1 res block, 1 transformer, middle block, context 768, 8 heads).

    Writes `<out>/sd15_comfy.safetensors` (ComfyUI keys) and `<out>/sd15_diffusers/` (save_pretrained),
    both in `dtype` from the same rounded values. Returns a dict: comfy_file, diffusers_dir,
    expected_class ("SD15"), unet_config (ComfyUI), diffusers_config, cached, seconds, bytes."""
    return _make_unet("sd15", SD15_SPEC, "SD15", out_dir, seed, dtype, force)


def make_sdxl(out_dir, seed: int = 0, dtype: torch.dtype = torch.float16, force: bool = False,
              variant: str = "koala") -> dict:
    """Tiny SDXL-family UNet (320 ch, context 2048, adm 2816 = pooled 1280 + 6 x 256, 3 levels,
    no middle block, one transformer per up res block on the two attention levels).

    `variant` picks the input transformer layout ComfyUI detection requires: "koala" ([0, 2, 5], 1 res
    block per level -> class KOALA_700M, smallest), "vega" ([0,0,1,1,2,2] -> Segmind_Vega) or "sdxl"
    ([0,0,2,2,10,10] -> SDXL). All three build `comfy.model_base.SDXL` with SDXL's latent format and
    conditioning. Files: `<out>/sdxl_<variant>_comfy.safetensors`, `<out>/sdxl_<variant>_diffusers/`.
    Returns the same dict as `make_sd15`."""
    spec, cls = SDXL_VARIANTS[variant]
    return _make_unet(f"sdxl_{variant}", spec, cls, out_dir, seed, dtype, force)


# --------------------------------------------------------------------------------------------
# Flux
# --------------------------------------------------------------------------------------------
@dataclasses.dataclass(frozen=True)
class FluxSpec:
    hidden: int
    heads: int
    depth: int
    single: int
    context_dim: int
    vec_dim: int
    axes_dim: tuple[int, ...]
    guidance: bool = True

    def diffusers_config(self) -> dict:
        return dict(patch_size=1, in_channels=64, out_channels=None, num_layers=self.depth,
                    num_single_layers=self.single, attention_head_dim=self.hidden // self.heads,
                    num_attention_heads=self.heads, joint_attention_dim=self.context_dim,
                    pooled_projection_dim=self.vec_dim, guidance_embeds=self.guidance, axes_dims_rope=self.axes_dim)

    def comfy_unet_config(self) -> dict:
        return dict(image_model="flux", in_channels=16, out_channels=16, vec_in_dim=self.vec_dim,
                    context_in_dim=self.context_dim, hidden_size=self.hidden, mlp_ratio=4.0, num_heads=self.heads,
                    depth=self.depth, depth_single_blocks=self.single, axes_dim=list(self.axes_dim), theta=10000,
                    patch_size=2, qkv_bias=True, guidance_embed=self.guidance)


# ComfyUI's Flux detection fixes 24 heads and axes (16, 56, 56), hence hidden 3072; context and vec
# widths are read from the file (4096 / 768 kept so T5/CLIP-shaped conditioning fits).
FLUX_SPEC = FluxSpec(3072, 24, 1, 0, 4096, 768, (16, 56, 56))


def _flux_pair(spec: FluxSpec, seed: int, round_to: torch.dtype | None):
    comfy = import_comfy()
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        model = FluxTransformer2DModel(**spec.diffusers_config())
    fill_random_(model, seed, round_to)
    key_map = comfy.utils.flux_to_diffusers(spec.comfy_unet_config())
    return model, diffusers_to_comfy(model.state_dict(), key_map)


def make_flux(out_dir, seed: int = 0, dtype: torch.dtype = torch.float16, force: bool = False,
              single_blocks: int = 0) -> dict:
    """Tiny Flux.1-dev-shaped transformer (hidden 3072 = 24 x 128, 1 double block, `single_blocks`
    single blocks, guidance embedding -> class Flux, not FluxSchnell). ~743 MiB per side in fp16 with
    0 single blocks, ~+283 MiB per single block. Files: `<out>/flux_comfy.safetensors`,
    `<out>/flux_diffusers/`. Returns the same dict as `make_sd15`."""
    t0, out_dir = time.perf_counter(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    spec = dataclasses.replace(FLUX_SPEC, single=single_blocks)
    stamp = {"version": STAMP_VERSION, "name": "flux", "seed": seed, "dtype": str(dtype),
             "spec": dataclasses.asdict(spec)}
    files = {"comfy_file": out_dir / "flux_comfy.safetensors", "diffusers_dir": out_dir / "flux_diffusers"}
    extra = {"expected_class": "Flux", "unet_config": spec.comfy_unet_config(),
             "diffusers_config": spec.diffusers_config()}
    if not force and _fresh(out_dir / "flux.stamp.json", stamp, list(files.values())):
        return _result("flux", t0, files, True, **extra)
    model, comfy_sd = _flux_pair(spec, seed, dtype)
    return _save_pair("flux", out_dir, model, comfy_sd, dtype, stamp, t0, **extra)


def run_diffusers_flux(transformer, x, timestep, context, y, guidance=None) -> torch.Tensor:
    """Call a diffusers Flux transformer like ComfyUI's `Flux.forward(x, timestep, context, y, guidance)`:
    x is a (B, 16, H, W) latent (H, W even), timestep/guidance are (B,) in ComfyUI units (sigma, cfg);
    packs 2x2 patches, builds img_ids (0, row, col) / zero txt_ids, and unpacks the output."""
    b, c, h, w = x.shape
    packed = x.reshape(b, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(b, h * w // 4, c * 4)
    ids = torch.zeros(h // 2, w // 2, 3)
    ids[..., 1] = torch.arange(h // 2)[:, None]
    ids[..., 2] = torch.arange(w // 2)[None, :]
    out = transformer(hidden_states=packed, encoder_hidden_states=context, pooled_projections=y,
                      timestep=timestep, img_ids=ids.reshape(-1, 3), txt_ids=torch.zeros(context.shape[1], 3),
                      guidance=guidance, return_dict=False)[0]
    return out.reshape(b, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(b, c, h, w)


# --------------------------------------------------------------------------------------------
# VAE
# --------------------------------------------------------------------------------------------
# ComfyUI's VAELoader values for taesd (SD1.5) and taef1 (Flux): decode does (z - shift) * scale.
_TAESD_SCALE_SHIFT = {4: (0.18215, 0.0), 16: (0.3611, 0.1159)}


def make_vae(out_dir, seed: int = 0, latent_channels=(4, 16), dtype: torch.dtype = torch.float16,
             force: bool = False) -> dict:
    """TAESD-shaped VAEs that `comfy.sd.VAE(sd=...)` detects by `taesd_decoder.1.weight` (its input
    width sets the latent channels). Built from ComfyUI's own `comfy.taesd.taesd.TAESD` with random
    weights and VAELoader's scale/shift. Files `<out>/taesd_<n>ch.safetensors`; returns
    {"files": {n: path}, cached, seconds, bytes}."""
    t0, out_dir = time.perf_counter(), Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    stamp = {"version": STAMP_VERSION, "name": "vae", "seed": seed, "dtype": str(dtype),
             "latent_channels": list(latent_channels)}
    files = {f"vae_{n}ch": out_dir / f"taesd_{n}ch.safetensors" for n in latent_channels}
    if not force and _fresh(out_dir / "vae.stamp.json", stamp, list(files.values())):
        return _result("vae", t0, files, True)
    import_comfy()
    from comfy.taesd.taesd import TAESD

    for n in latent_channels:
        with torch.device("meta"):
            taesd = TAESD(latent_channels=n)
        fill_random_(taesd, seed + n)
        sd = {k: v.to(dtype) for k, v in taesd.state_dict().items()}
        scale, shift = _TAESD_SCALE_SHIFT.get(n, (1.0, 0.0))
        sd["vae_scale"], sd["vae_shift"] = torch.tensor(scale), torch.tensor(shift)
        save_file(sd, str(files[f"vae_{n}ch"]), metadata={"tiny_models": json.dumps(stamp)})
    (out_dir / "vae.stamp.json").write_text(json.dumps(stamp, indent=1))
    return _result("vae", t0, files, False)


# --------------------------------------------------------------------------------------------
# T-LoRA files
# --------------------------------------------------------------------------------------------
@contextlib.contextmanager
def fast_lycoris():
    """Create or load LyCORIS T-LoRA networks quickly: its init runs `gc.collect()` once per module
    (0.2-1 s each in a process holding ComfyUI + diffusers) and one small SVD per module, which
    multi-threaded LAPACK makes 10-60x slower on a busy 2-core machine. Skips the former and runs on
    one thread; numerically irrelevant."""
    import types

    import lycoris.modules.tlora as tlora

    real_gc, threads = tlora.gc, torch.get_num_threads()
    tlora.gc = types.SimpleNamespace(collect=lambda *a: 0)
    torch.set_num_threads(1)
    try:
        yield
    finally:
        tlora.gc = real_gc
        torch.set_num_threads(threads)


def lycoris_network(model: torch.nn.Module, rank: int, alpha: float, targets=UNET_TARGETS):
    """LyCORIS' own `tlora` network on `model`, made the way SimpleTuner makes it and applied:
    `LycorisNetwork.apply_preset({"target_module": targets})` + `create_lycoris(model, 1.0, linear_dim=rank,
    linear_alpha=alpha, algo="tlora")` + `apply_to()`. LyCORIS' class-level preset is restored afterwards."""
    from lycoris import LycorisNetwork, create_lycoris

    keys = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
            "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {k: getattr(LycorisNetwork, k) for k in keys}
    try:
        LycorisNetwork.apply_preset({"target_module": list(targets)})
        with fast_lycoris():
            net = create_lycoris(model, 1.0, linear_dim=rank, linear_alpha=alpha, algo="tlora")
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)
    net.apply_to()
    return net


def write_lycoris_tlora(model: torch.nn.Module, path, rank: int, alpha: float, targets=UNET_TARGETS,
                        seed: int = 0, metadata: dict[str, str] | None = None, strength: float = 0.3):
    """Write a LyCORIS `tlora` file the way SimpleTuner does and return the applied network.

    `LycorisNetwork.apply_preset({"target_module": targets})` + `create_lycoris(model, 1.0,
    linear_dim=rank, linear_alpha=alpha, algo="tlora")` + `apply_to()`; then the trained factors
    (q_layer, p_layer, lambda_layer) are moved off their SVD init by seeded noise of relative size
    `strength` (the frozen base stays the SVD init, so the delta is non-zero) and
    `save_weights(path, torch.float32, metadata)`. Module names are `lycoris_<diffusers path, '.' -> '_'>`.

    The returned network stays applied to `model` (so `model` is the reference forward): set the rank
    mask with `lycoris.modules.tlora.set_timestep_mask(compute_timestep_mask(t, 1000, R, Rmin, a))`,
    call `network.restore()` to detach it. The LyCORIS class-level preset is restored afterwards."""
    net = lycoris_network(model, rank, alpha, targets)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for lora in net.loras:
            for w in (lora.q_layer.weight, lora.p_layer.weight):
                w.add_(strength * w.std() * torch.randn(w.shape, generator=g))
            lam = lora.lambda_layer
            lam.mul_(1 + strength * torch.randn(lam.shape, generator=g))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    net.save_weights(str(path), torch.float32, metadata)
    log.info("lycoris tlora: %d modules -> %s", len(net.loras), path)
    return net


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    """A (rows, cols) matrix with orthonormal rows (rows <= cols) or columns (rows > cols)."""
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g))
    return q.T.contiguous() if rows <= cols else q.contiguous()


def _official_adapter(prefix: str, n_in: int, n_out: int, rank: int, ortho: bool, g, strength: float) -> dict:
    """One official-repo adapter: ortho (q/p/lambda + frozen base_*) or vanilla (down/up)."""
    if not ortho:
        return {f"{prefix}.down.weight": torch.randn(rank, n_in, generator=g) / rank,  # the repo's init std
                f"{prefix}.up.weight": strength * math.sqrt(rank / n_in) * torch.randn(n_out, rank, generator=g)}
    q0, p0 = _orthonormal(rank, n_in, g), _orthonormal(n_out, rank, g)
    lam0 = torch.rand(1, rank, generator=g) + 0.5
    return {
        f"{prefix}.q_layer.weight": q0 + strength * torch.randn(q0.shape, generator=g) / math.sqrt(n_in),
        f"{prefix}.p_layer.weight": p0 + strength * torch.randn(p0.shape, generator=g) / math.sqrt(n_out),
        f"{prefix}.lambda_layer": lam0 * (1 + strength * torch.randn(1, rank, generator=g)),
        f"{prefix}.base_q.weight": q0,
        f"{prefix}.base_p.weight": p0,
        f"{prefix}.base_lambda": lam0.clone(),
    }


def write_official_sdxl(unet, path, rank: int, ortho: bool = True, prefix: str = "unet.", seed: int = 0,
                        strength: float = 0.3) -> dict[str, torch.Tensor]:
    """Write a file shaped like ControlGenAI/T-LoRA's SDXL `save_attn_procs` output (fp32 safetensors):
    `<prefix><block>.attn{1,2}.processor.to_{q,k,v,out}_lora.<q_layer.weight|p_layer.weight|lambda_layer|
    base_q.weight|base_p.weight|base_lambda>` (ortho) or `...to_q_lora.{down,up}.weight` (vanilla), for
    every attention processor of `unet`, rank min(rank, widths) like the repo. Returns the tensors."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name in unet.attn_processors:  # "<block path>.attn1.processor"
        attn = unet.get_submodule(name.rsplit(".processor", 1)[0])
        r = min(rank, attn.to_q.in_features, attn.to_k.in_features)
        for proj, lin in (("to_q", attn.to_q), ("to_k", attn.to_k), ("to_v", attn.to_v), ("to_out", attn.to_out[0])):
            sd.update(_official_adapter(f"{prefix}{name}.{proj}_lora", lin.in_features, lin.out_features, r,
                                        ortho, g, strength))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path))
    return sd


def write_official_flux_pt(transformer, path, rank: int, seed: int = 0, strength: float = 0.3) -> dict:
    """Write a `torch.save` dict shaped like ControlGenAI/T-LoRA's Flux `checkpoint-N/lora.pt` (vanilla
    LoRA, fp32): `<block>.attn.processor.{to_q,to_k,to_v,to_out,to_q_proj,to_k_proj,to_v_proj}_lora.
    {down,up}.weight` for every double *and* single block (the repo creates all seven everywhere;
    single blocks never use to_out / *_proj). Returns the tensors."""
    g = torch.Generator().manual_seed(seed)
    h = transformer.inner_dim
    sd = {}
    for name in transformer.attn_processors:  # "transformer_blocks.0.attn.processor", "single_transformer_..."
        for proj in ("to_q", "to_k", "to_v", "to_out", "to_q_proj", "to_k_proj", "to_v_proj"):
            sd.update(_official_adapter(f"{name}.{proj}_lora", h, h, rank, False, g, strength))
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    torch.save(sd, str(path))
    return sd


def flux2_to_diffusers(unet_config: dict) -> dict[str, Any]:
    """diffusers Flux2Transformer2DModel key -> ComfyUI Flux 2 key, in the format of ComfyUI's
    `*_to_diffusers` maps (ComfyUI 0.3.75 has none for Flux 2). Read off both model definitions:
    double blocks fuse to_q/k/v (add_q/k/v_proj) into `img_attn.qkv` (`txt_attn.qkv`); single blocks'
    `attn.to_qkv_mlp_proj` / `attn.to_out` already are ComfyUI's fused `linear1` / `linear2`; the final
    AdaLayerNormContinuous emits (scale, shift), ComfyUI's LastLayer (shift, scale). No biases anywhere."""
    import comfy.utils

    h = unet_config["hidden_size"]
    km: dict[str, Any] = {}
    for i in range(unet_config["depth"]):
        d, c = f"transformer_blocks.{i}", f"double_blocks.{i}"
        for s, qkv, ff, out, (nq, nk) in (("img", ("to_q", "to_k", "to_v"), "ff", "to_out.0", ("norm_q", "norm_k")),
                                          ("txt", ("add_q_proj", "add_k_proj", "add_v_proj"), "ff_context",
                                           "to_add_out", ("norm_added_q", "norm_added_k"))):
            for j, n in enumerate(qkv):
                km[f"{d}.attn.{n}.weight"] = (f"{c}.{s}_attn.qkv.weight", (0, j * h, h))
            km[f"{d}.attn.{out}.weight"] = f"{c}.{s}_attn.proj.weight"
            km[f"{d}.attn.{nq}.weight"] = f"{c}.{s}_attn.norm.query_norm.scale"
            km[f"{d}.attn.{nk}.weight"] = f"{c}.{s}_attn.norm.key_norm.scale"
            km[f"{d}.{ff}.linear_in.weight"] = f"{c}.{s}_mlp.0.weight"
            km[f"{d}.{ff}.linear_out.weight"] = f"{c}.{s}_mlp.2.weight"
    for i in range(unet_config["depth_single_blocks"]):
        d, c = f"single_transformer_blocks.{i}.attn", f"single_blocks.{i}"
        km.update({f"{d}.to_qkv_mlp_proj.weight": f"{c}.linear1.weight", f"{d}.to_out.weight": f"{c}.linear2.weight",
                   f"{d}.norm_q.weight": f"{c}.norm.query_norm.scale",
                   f"{d}.norm_k.weight": f"{c}.norm.key_norm.scale"})
    basic = {"x_embedder": "img_in", "context_embedder": "txt_in", "proj_out": "final_layer.linear",
             "time_guidance_embed.timestep_embedder.linear_1": "time_in.in_layer",
             "time_guidance_embed.timestep_embedder.linear_2": "time_in.out_layer",
             "double_stream_modulation_img.linear": "double_stream_modulation_img.lin",
             "double_stream_modulation_txt.linear": "double_stream_modulation_txt.lin",
             "single_stream_modulation.linear": "single_stream_modulation.lin"}
    if unet_config.get("guidance_embed"):
        basic.update({"time_guidance_embed.guidance_embedder.linear_1": "guidance_in.in_layer",
                      "time_guidance_embed.guidance_embedder.linear_2": "guidance_in.out_layer"})
    km.update({f"{d}.weight": f"{c}.weight" for d, c in basic.items()})
    km["norm_out.linear.weight"] = ("final_layer.adaLN_modulation.1.weight", None, comfy.utils.swap_scale_shift)
    return km
