"""Fixtures of the reliability tier: reference latents from the session's real ComfyUI server."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.reliability import helpers as h


@pytest.fixture(scope="session")
def sdxl_tlora_file(loras) -> Path:
    """The LyCORIS T-LoRA written on the tiny SDXL's own weights (the session's `tlora_sdxl/...`)."""
    return Path(loras) / h.SDXL_LORA


@pytest.fixture(scope="session")
def base_latent(server, tiny):
    """family -> the latent of the plain model (no T-LoRA), sampled once per session before anything else."""
    return {fam: h.sample(server, h.graph(tiny, fam)) for fam in ("sdxl", "sd15")}


@pytest.fixture(scope="session")
def tlora_latent(server, tiny, base_latent):
    """The latent of the tiny SDXL with its T-LoRA (schedule from the file's sidecar)."""
    out = h.sample(server, h.graph(tiny, chains=[[h.tlora(h.SDXL_LORA)]]))
    assert not h.same(out, base_latent["sdxl"]), "the T-LoRA must change the result"
    return out



def _stock_lora(tlora_file: Path, path: Path, rank: int = 4, seed: int = 7) -> None:
    """A stock kohya LoRA (lora_unet_<diffusers path>.lora_down/lora_up/alpha, no T-LoRA marker) on the same
    layers as a LyCORIS T-LoRA file; ComfyUI's own key map knows these names."""
    import torch
    from safetensors.torch import load_file, save_file

    g = torch.Generator().manual_seed(seed)
    src = load_file(str(tlora_file))
    sd = {}
    for k in sorted(src):
        if not k.endswith(".q_layer.weight"):
            continue
        module = k[: -len(".q_layer.weight")]
        stem = "lora_unet_" + module[len("lycoris_"):]
        n_in, n_out = src[k].shape[1], src[f"{module}.p_layer.weight"].shape[0]
        sd[f"{stem}.lora_down.weight"] = torch.randn(rank, n_in, generator=g) / n_in ** 0.5
        sd[f"{stem}.lora_up.weight"] = 0.5 * torch.randn(n_out, rank, generator=g) / rank ** 0.5
        sd[f"{stem}.alpha"] = torch.tensor(float(rank))
    save_file(sd, str(path))


# names of the extra files in the server's loras folder
SECOND, RANK4, STOCK = "rel_second_tlora.safetensors", "rel_rank4_tlora.safetensors", "rel_stock_lora.safetensors"


@pytest.fixture(scope="session")
def extra_loras(server, tiny, sdxl_tlora_file, tmp_path_factory):
    """More files for the tiny SDXL, linked into the server's loras folder for the session (removed after):
    SECOND: another LyCORIS T-LoRA of the same rank (other seed, same size as the session's);
    RANK4: a LyCORIS T-LoRA of rank 4; STOCK: a stock kohya LoRA on the same layers."""
    import torch
    from diffusers import UNet2DConditionModel

    from tools import tiny_models as tm

    d = tmp_path_factory.mktemp("extra_loras")
    files = {SECOND: d / SECOND, RANK4: d / RANK4, STOCK: d / STOCK}
    unet = UNet2DConditionModel.from_pretrained(str(tiny["sdxl"]["diffusers_dir"]), torch_dtype=torch.float32)
    tm.write_lycoris_tlora(unet, files[SECOND], 8, 4, seed=21, strength=0.5).restore()
    tm.write_lycoris_tlora(unet, files[RANK4], 4, 4, seed=22, strength=0.5).restore()
    _stock_lora(sdxl_tlora_file, files[STOCK])
    with h.in_loras(server, files):
        yield files
