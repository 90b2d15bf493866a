"""Shared fixtures: tiny models, T-LoRA files written by real producers, and a real ComfyUI server."""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

TINY_DIR = Path(os.environ.get("TLORA_TINY_DIR", ROOT / ".cache" / "tiny"))

def _host_tag() -> str:
    from tools.harness.server import comfy_path, host_version

    try:
        return f"comfyui-{host_version(comfy_path())}"
    except (OSError, RuntimeError):
        return "no-comfyui"


ARTIFACTS = ROOT / "test_artifacts" / _host_tag()


RUN_ID = f"{time.strftime('%Y-%m-%dT%H:%M:%S')}-{os.getpid()}"  # this pytest session


def save_results(name: str, results: dict) -> None:
    """Write a module's measured results to this host's `test_artifacts/<host>/<name>` (read by
    scripts/families_table.py). Modules of one session add to one file; a file left by an earlier session is
    replaced, never merged, so a README table always comes from one run per host."""
    if results:
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        out = ARTIFACTS / name
        old = json.loads(out.read_text()) if out.exists() else {}
        kept = old.get("results", {}) if old.get("run") == RUN_ID else {}
        out.write_text(json.dumps({"run": RUN_ID, "results": {**kept, **results}}, indent=1, sort_keys=True))


HOST_FREE_TIERS = ("unit", "frontend", "registry")  # they never start or import ComfyUI
HOST_FIXTURES = {"server", "pack", "tiny", "loras"}


def pytest_collection_modifyitems(config, items):
    """A test in a ComfyUI-free tier that asks for a ComfyUI fixture is a mistake in the test, reported as one."""
    for item in items:
        tier = Path(str(item.fspath)).relative_to(ROOT / "tests").parts[0]
        used = HOST_FIXTURES & set(getattr(item, "fixturenames", ()))
        if tier in HOST_FREE_TIERS and used:
            raise pytest.UsageError(f"{item.nodeid}: the {tier} tier runs without ComfyUI but asks for {sorted(used)}")


# The schedule the server-tier T-LoRA files record in their SimpleTuner-style sidecar.
RANK, LINEAR_ALPHA, MIN_RANK, TLORA_ALPHA = 8, 4, 2, 1.5


@pytest.fixture(scope="session")
def artifacts() -> Path:
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    return ARTIFACTS


@pytest.fixture(scope="session")
def tiny():
    """Tiny ComfyUI-detectable models (cached in .cache/tiny) and their diffusers twins."""
    from tools import tiny_models

    return {"sd15": tiny_models.make_sd15(TINY_DIR), "sdxl": tiny_models.make_sdxl(TINY_DIR),
            "flux": tiny_models.make_flux(TINY_DIR), "vae": tiny_models.make_vae(TINY_DIR)}


def _write_sidecar(folder: Path, extra: dict | None = None) -> None:
    cfg = {"algo": "tlora", "multiplier": 1.0, "linear_dim": RANK, "linear_alpha": LINEAR_ALPHA,
           "tlora_min_rank": MIN_RANK, "tlora_alpha": TLORA_ALPHA,
           "apply_preset": {"target_module": ["Attention", "FeedForward"]}}
    cfg.update(extra or {})
    (folder / "lycoris_config.json").write_text(json.dumps(cfg, indent=2))


SD_SCRIPTS_SDXL = "sd_scripts_tlora_sdxl.safetensors"
STYLE_LORA_SDXL = "style_lora_sdxl.safetensors"  # a plain kohya LoRA, for Load LoRA (timestep schedule)
STYLE_LORA_FLUX = "style_lora_flux.safetensors"  # the same for the tiny Flux (its attention Linears)


def _write_sd_scripts_sdxl(checkpoint: Path, out: Path) -> None:
    """A T-LoRA in the layout of sd-scripts with 67372a's LyCORIS fork on the tiny SDXL: kohya names of every
    attention Linear and 3x3 conv of the UNet, the stored base, `algo: tlora` and no min_rank (its default:
    ceil(R / 2))."""
    from safetensors import safe_open

    from tools import writer_files

    layers = []
    with safe_open(str(checkpoint), "pt") as f:
        for key in f.keys():
            shape = f.get_slice(key).get_shape()
            if key.endswith(".weight") and (".attn" in key and len(shape) == 2 or len(shape) == 4 and shape[2] == 3):
                path = key.removesuffix(".weight").removeprefix("model.diffusion_model.")
                layers.append(writer_files.Layer("lora_unet_" + path.replace(".", "_"), shape[0], shape[1],
                                                 len(shape) == 4))
    writer_files.write_ortho(out, layers, RANK, LINEAR_ALPHA, {
        "ss_network_module": "lycoris.kohya", "ss_network_dim": str(RANK),
        "ss_network_args": json.dumps({"algo": "tlora", "preset": "full"})}, seed=4)


@pytest.fixture(scope="session")
def loras(tiny, tmp_path_factory) -> Path:
    """A loras folder with LyCORIS T-LoRA files written by LyCORIS on the tiny models' diffusers twins."""
    import torch
    from diffusers import UNet2DConditionModel

    from tools import tiny_models, writer_files

    folder = tmp_path_factory.mktemp("loras")
    for family, seed in (("sdxl", 1), ("sd15", 2)):
        sub = folder / f"tlora_{family}"
        sub.mkdir()
        unet = UNet2DConditionModel.from_pretrained(str(tiny[family]["diffusers_dir"]), torch_dtype=torch.float32)
        net = tiny_models.write_lycoris_tlora(unet, sub / "pytorch_lora_weights.safetensors", RANK, LINEAR_ALPHA,
                                              seed=seed, strength=0.5)
        net.restore()
        _write_sidecar(sub)
    # the official repo's Flux checkpoint: a torch.save'd dict of vanilla LoRA tensors, no schedule recorded
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        config = FluxTransformer2DModel.load_config(str(tiny["flux"]["diffusers_dir"]))
        flux = FluxTransformer2DModel.from_config(config)
    (folder / "tlora_flux").mkdir()
    tiny_models.write_official_flux_pt(flux, folder / "tlora_flux" / "lora.pt", RANK, seed=3, strength=0.5)
    _write_sd_scripts_sdxl(Path(tiny["sdxl"]["comfy_file"]), folder / SD_SCRIPTS_SDXL)
    writer_files.write_style_lora(Path(tiny["sdxl"]["comfy_file"]), folder / STYLE_LORA_SDXL)
    writer_files.write_style_lora(Path(tiny["flux"]["comfy_file"]), folder / STYLE_LORA_FLUX, attention="_attn.")
    # files the loader must refuse with the server's own message: a VAE, a stock kohya LoRA (no T-LoRA marker)
    (folder / "not_a_lora.safetensors").symlink_to(Path(tiny["vae"]["vae_4ch"]).absolute())
    from safetensors.torch import save_file

    save_file({"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4),
               "lora_unet_x.alpha": torch.tensor(4.0)}, str(folder / "standard_lora.safetensors"))
    return folder


def make_server(base: Path, tiny: dict, loras: Path, frontend: str | None = None, svd_cache: Path | None = None):
    """A real ComfyUI server (not started) with the pack, the tiny models and the T-LoRA files; `frontend`: a
    version from .host/frontend instead of the host's own; `svd_cache`: another server's SVD base cache (servers
    that never run prompts at the same time can share one)."""
    from tools.harness.server import ComfyServer

    trace = base / "trace.jsonl"
    files = {"diffusion_models": [tiny[k]["comfy_file"] for k in ("sd15", "sdxl", "flux")],
             "vae": list(tiny["vae"][k] for k in ("vae_4ch", "vae_16ch")),
             "loras": list(loras.iterdir())}
    env = {"TLORA_TRACE": trace, "TLORA_CACHE_DIR": svd_cache or base / "svd_cache"}
    srv = ComfyServer(base, models=files, env=env, frontend=frontend)
    srv.trace_path = trace
    return srv


@pytest.fixture(scope="session")
def server(tiny, loras, tmp_path_factory):
    """One real ComfyUI server for the session, with the pack, the tiny models and the T-LoRA files."""
    srv = make_server(tmp_path_factory.mktemp("comfy"), tiny, loras)
    srv.start()
    try:
        yield srv
    finally:
        srv.stop()
        ARTIFACTS.mkdir(parents=True, exist_ok=True)
        (ARTIFACTS / "server.log").write_text(srv.log_text())
