"""What `bench_train.py` trains on, built in-process with seeded weights (nothing downloaded): an SDXL- or
Flux.1-layout ComfyUI model, its latents and conditioning (one image, or several images at one or two sizes), and a
TAESD-shaped VAE for the previews (`tools.tiny_models.make_vae`'s construction)."""

from __future__ import annotations

import tempfile

import torch

from benchmarks.bench_step import SDXL_SPEC, SMOKE_SPEC, TINY_SPEC
from tools import tiny_models as tm

FLUX_FULL = tm.FluxSpec(3072, 24, 19, 38, 4096, 768, (16, 56, 56))  # Flux.1 dev's shape
FLUX_TINY = tm.FluxSpec(256, 2, 2, 4, 256, 64, (16, 56, 56))  # heads of 128, as Flux.1's
FLUX_SMOKE = tm.FluxSpec(128, 1, 1, 1, 64, 32, (16, 56, 56))

# (layout, mode): the model spec, device, dtype, latent side, rank, steps (each run takes 2 * steps), text tokens,
# and the preview sampling a user of that model would pick (Flux.1 dev: guidance-distilled, CFG 1)
MODES = {
    ("sdxl", "tiny"): dict(spec=TINY_SPEC, device="cpu", dtype="float32", latent=32, rank=16, steps=8, tokens=77),
    ("sdxl", "full"): dict(spec=SDXL_SPEC, device="cuda", dtype="bfloat16", latent=128, rank=64, steps=10, tokens=77),
    ("sdxl", "smoke"): dict(spec=SMOKE_SPEC, device="cpu", dtype="float32", latent=16, rank=8, steps=2, tokens=77),
    ("flux", "tiny"): dict(spec=FLUX_TINY, device="cpu", dtype="float32", latent=32, rank=16, steps=8, tokens=64),
    ("flux", "full"): dict(spec=FLUX_FULL, device="cuda", dtype="bfloat16", latent=128, rank=64, steps=10,
                           tokens=256),
    ("flux", "smoke"): dict(spec=FLUX_SMOKE, device="cpu", dtype="float32", latent=16, rank=8, steps=2, tokens=16),
}
PREVIEW = {"sdxl": dict(cfg=5.0, scheduler="normal"), "flux": dict(cfg=1.0, scheduler="simple")}


def seed_(model: torch.nn.Module, dev) -> None:
    """N(0, 1/fan_in) weights, biases N(0, 0.02²), norm scales near 1; from seed 0."""
    g = torch.Generator(dev).manual_seed(0)
    with torch.no_grad():
        for name, p in model.named_parameters():
            v = torch.randn(p.shape, generator=g, device=dev) / p[0].numel() ** 0.5 if p.ndim >= 2 else (
                0.02 * torch.randn(p.shape, generator=g, device=dev) if name.endswith("bias") else
                1 + 0.1 * torch.randn(p.shape, generator=g, device=dev))
            p.copy_(v.to(p.dtype))


def model(layout: str, spec, dev, dtype, disable_dynamic: bool = False):
    """A ComfyUI model of the layout (ComfyUI's own classes, as its detection would build them), in a patcher. It
    carries the factory that rebuilds it (`cached_patcher_init`, as ComfyUI's loaders set): ComfyUI 0.33's
    TrainLoraNode trains a fresh copy made by it."""
    import comfy.model_patcher
    import comfy.supported_models

    if layout == "flux":
        mc = comfy.supported_models.Flux(spec.comfy_unet_config())
    else:
        mc = comfy.supported_models.SDXL(dict(spec.comfy_unet_config()))
        mc.unet_config.update(num_heads=spec.num_heads, num_head_channels=spec.head_channels)
    mc.set_inference_dtype(dtype, None)
    with torch.device(dev):
        m = mc.get_model({}, "", device=dev).eval()
    seed_(m.diffusion_model, dev)
    patcher = comfy.model_patcher.ModelPatcher(m, load_device=dev, offload_device=torch.device("cpu"))
    if hasattr(patcher, "cached_patcher_init"):
        patcher.cached_patcher_init = (model, (layout, spec, dev, dtype))
    return patcher


def channels(layout: str) -> int:
    return 16 if layout == "flux" else 4


def conditioning(layout: str, mode: dict) -> list:
    g = torch.Generator().manual_seed(2)
    spec = mode["spec"]
    width, pooled = (spec.context_dim, spec.vec_dim) if layout == "flux" else (spec.context_dim, spec.pooled_dim)
    return [[torch.randn(1, mode["tokens"], width, generator=g), {"pooled_output": torch.randn(1, pooled,
                                                                                                generator=g)}]]


def latents(layout: str, side: int, data: str) -> list[torch.Tensor]:
    """`single`: one image at side²; `one_size`: 4 images at side²; `buckets`: 2 at side² and 2 at
    (3/4 side) x (5/4 side) (15/16 of the area; both sides multiples of 8 for the UNet's downsampling)."""
    g = torch.Generator().manual_seed(1)
    c = channels(layout)
    if data == "single":
        return [torch.randn(1, c, side, side, generator=g)]
    if data == "one_size":
        return [torch.randn(4, c, side, side, generator=g)]
    h, w = 3 * side // 4 // 8 * 8, 5 * side // 4 // 8 * 8
    return [torch.randn(2, c, side, side, generator=g), torch.randn(2, c, h, w, generator=g)]


def vae(comfy, layout: str):
    """A TAESD-shaped VAE (ComfyUI's own TAESD class, seeded weights, VAELoader's scale/shift) for the layout's
    latent channels, built as `tools.tiny_models.make_vae` builds the project's tiny VAEs, in fp32."""
    import comfy.sd
    import comfy.utils

    n = channels(layout)
    with tempfile.TemporaryDirectory() as d:
        path = tm.make_vae(d, seed=0, latent_channels=(n,), dtype=torch.float32, force=True)[f"vae_{n}ch"]
        return comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(path)))

