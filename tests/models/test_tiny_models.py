"""The tiny-model generator: ComfyUI and diffusers twins compute the same thing, ComfyUI's loaders
accept the detectable files, and the T-LoRA writers produce the documented layouts."""

from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tools import tiny_models as tm

CACHE = Path(os.environ.get("TLORA_TINY_DIR") or tm.REPO / ".cache" / "tiny")  # as tests/conftest.py
TOL = dict(atol=1e-5, rtol=1e-5)


@pytest.fixture(scope="module")
def comfy():
    return tm.import_comfy()


def _unet_inputs(pooled_dim, context_dim, size=16):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 4, size, size, generator=g)
    ctx = torch.randn(2, 7, context_dim, generator=g)
    pooled = torch.randn(2, pooled_dim, generator=g) if pooled_dim else None
    return x, torch.tensor([10.0, 700.0]), ctx, pooled


@torch.no_grad()
def _unet_outputs(comfy_model, unet, x, t, ctx, pooled):
    """ComfyUI `diffusion_model(x, timesteps, context, y)` and diffusers `unet(x, t, ...)`; SDXL's `y`
    comes from ComfyUI's own `encode_adm` (pooled text + sinusoidal size/crop ids)."""
    kw, dkw = {}, {}
    if pooled is not None:
        h, w = x.shape[-2] * 8, x.shape[-1] * 8
        kw["y"] = comfy_model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0,
                                         target_width=w, target_height=h)
        ids = torch.tensor([[h, w, 0, 0, h, w]] * x.shape[0], dtype=torch.float32)
        dkw["added_cond_kwargs"] = {"text_embeds": pooled, "time_ids": ids}
    return comfy_model.diffusion_model(x, t, ctx, **kw), unet(x, t, encoder_hidden_states=ctx, **dkw).sample


def _flux_inputs(spec, h=8, w=6):
    g = torch.Generator().manual_seed(2)
    return (torch.randn(2, 16, h, w, generator=g), torch.tensor([0.3, 0.9]),
            torch.randn(2, 5, spec.context_dim, generator=g), torch.randn(2, spec.vec_dim, generator=g),
            torch.tensor([3.5, 1.0]))


# ---------------------------------------------------------------------------------------------
# In-process twins, built through ComfyUI's own detection (tools/families)
# ---------------------------------------------------------------------------------------------
def _family_params():
    from tools import families

    tm.import_comfy()
    return [pytest.param(f, id=f.name) for f in families.available()]


@pytest.mark.parametrize("family", _family_params())
def test_family_twin_matches_its_diffusers_model(comfy, family):
    """ComfyUI's detection gives the family's class, and without a T-LoRA both forwards agree."""
    from tools.families.base import capture, rel_l2, sigma_for

    twin = family.build(0)
    assert type(twin.patcher.model).__name__ == family.comfy_class
    x, conds = family.inputs(twin, torch.Generator().manual_seed(1))
    call = capture(twin.patcher, x, sigma_for(twin.patcher, 600, family.flow), conds)
    assert call.out.abs().max() > 0.05  # a real signal, not zeros
    with torch.no_grad():
        assert rel_l2(call.out, family.reference(twin, call)) < 1e-4


# ---------------------------------------------------------------------------------------------
# Files that ComfyUI's own detection accepts
# ---------------------------------------------------------------------------------------------
STRUCTURE = ("model_channels", "num_res_blocks", "channel_mult", "transformer_depth", "transformer_depth_output",
             "transformer_depth_middle", "context_dim", "use_linear_in_transformer", "adm_in_channels")


@pytest.mark.parametrize("make", [tm.make_sd15, tm.make_sdxl], ids=["sd15", "sdxl_koala"])
def test_detectable_unet_file(comfy, make):
    from diffusers import UNet2DConditionModel

    info = make(CACHE)
    assert make(CACHE)["cached"]  # stamped: a second call rebuilds nothing
    comfy_sd, meta = comfy.utils.load_torch_file(str(info["comfy_file"]), return_metadata=True)
    assert "tiny_models" in meta
    detected = comfy.model_detection.detect_unet_config(comfy_sd, "")
    assert {k: detected[k] for k in STRUCTURE} == {k: info["unet_config"][k] for k in STRUCTURE}

    patcher = comfy.sd.load_diffusion_model(str(info["comfy_file"]), model_options={"dtype": torch.float32})
    assert type(patcher.model.model_config).__name__ == info["expected_class"]
    family = comfy.supported_models.SDXL if info["unet_config"]["adm_in_channels"] else comfy.supported_models.SD15
    assert isinstance(patcher.model.model_config, family)

    unet = UNet2DConditionModel.from_pretrained(str(info["diffusers_dir"]), torch_dtype=torch.float32).eval()
    key_map = comfy.utils.unet_to_diffusers(info["unet_config"])
    converted = tm.diffusers_to_comfy(unet.state_dict(), key_map)
    assert converted.keys() == comfy_sd.keys()
    assert all(torch.equal(converted[k], comfy_sd[k].float()) for k in comfy_sd)  # identical values

    pooled_dim = 1280 if info["unet_config"]["adm_in_channels"] else None
    a, b = _unet_outputs(patcher.model, unet, *_unet_inputs(pooled_dim, info["unet_config"]["context_dim"], 8))
    torch.testing.assert_close(a, b, **TOL)


def test_detectable_flux_file(comfy):
    from diffusers import FluxTransformer2DModel

    info = tm.make_flux(CACHE)
    patcher = comfy.sd.load_diffusion_model(str(info["comfy_file"]), model_options={"dtype": torch.float32})
    assert type(patcher.model.model_config) is comfy.supported_models.Flux  # guidance_in present: not Schnell
    assert type(patcher.model) is comfy.model_base.Flux
    transformer = FluxTransformer2DModel.from_pretrained(str(info["diffusers_dir"]), torch_dtype=torch.float32)
    x, sigma, ctx, y, guidance = _flux_inputs(tm.FLUX_SPEC, 4, 4)
    with torch.no_grad():
        a = patcher.model.diffusion_model(x, sigma, ctx, y=y, guidance=guidance)
        b = tm.run_diffusers_flux(transformer.eval(), x, sigma, ctx, y, guidance)
    torch.testing.assert_close(a, b, **TOL)


def test_vae_files(comfy):
    info = tm.make_vae(CACHE)
    for n in (4, 16):
        vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(info[f"vae_{n}ch"])))
        assert vae.latent_channels == n
        image = vae.decode(torch.randn(1, n, 8, 8))
        assert image.shape == (1, 64, 64, 3) and torch.isfinite(image).all()


# ---------------------------------------------------------------------------------------------
# T-LoRA writers
# ---------------------------------------------------------------------------------------------
def test_lycoris_tlora_file_and_reference(comfy, tmp_path):
    from lycoris import create_lycoris_from_weights
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    from tools.families import FAMILIES

    twin = FAMILIES["sd15"].build(0)
    model, unet = twin.patcher.model, twin.diffusers
    inputs = _unet_inputs(None, 768, 8)
    base = _unet_outputs(model, unet, *inputs)[1]
    path = tmp_path / "pytorch_lora_weights.safetensors"
    net = tm.write_lycoris_tlora(unet, path, rank=4, alpha=2.0, seed=3, metadata={"note": "test"})
    try:
        sd = load_file(str(path))
        names = {k.split(".")[0] for k in sd}
        assert len(names) == len(net.loras) == 40
        assert "lycoris_down_blocks_0_attentions_0_transformer_blocks_0_attn2_to_k" in names
        assert "lycoris_mid_block_attentions_0_transformer_blocks_0_ff_net_0_proj" in names
        for n in names:
            assert {k[len(n) + 1:] for k in sd if k.startswith(n + ".")} == {
                "q_layer.weight", "p_layer.weight", "lambda_layer", "alpha"}
            assert sd[f"{n}.lambda_layer"].shape == (1, 4) and sd[f"{n}.alpha"].item() == 2.0
        # ComfyUI's own key map knows every module (the pack maps through it)
        assert names <= comfy.lora.model_lora_keys_unet(model, {}).keys()

        with torch.no_grad():
            outs = {}
            for t in (0, 999):
                set_timestep_mask(compute_timestep_mask(t, 1000, 4, 1, 1.0))
                outs[t] = unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample
            assert (outs[0] - base).abs().max() > 1e-2 and (outs[0] - outs[999]).abs().max() > 1e-3
            net.restore()  # the file, re-loaded the way LyCORIS users do, reproduces the same outputs
            with tm.fast_lycoris():
                ref, _ = create_lycoris_from_weights(1.0, str(path), unet)
            ref.apply_to()
            for t, expected in outs.items():
                set_timestep_mask(compute_timestep_mask(t, 1000, 4, 1, 1.0))
                torch.testing.assert_close(unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample,
                                           expected, **TOL)
            ref.restore()
            torch.testing.assert_close(unet(inputs[0], inputs[1], encoder_hidden_states=inputs[2]).sample, base)
    finally:
        clear_timestep_mask()
        net.restore()


def test_lycoris_flux_names_map_to_fused_comfy_weights(comfy, tmp_path):
    from tools.families import FAMILIES

    twin = FAMILIES["flux"].build(0)
    net = tm.write_lycoris_tlora(twin.diffusers, tmp_path / "flux.safetensors", 4, 4.0, targets=tm.FLUX_TARGETS)
    net.restore()
    names = {lora.lora_name for lora in net.loras}
    assert len(names) == 20 and "lycoris_single_transformer_blocks_0_proj_mlp" in names
    key_map = comfy.lora.model_lora_keys_unet(twin.patcher.model, {})
    assert names <= key_map.keys()
    h = twin.patcher.model.model_config.unet_config["hidden_size"]
    assert key_map["lycoris_transformer_blocks_0_attn_to_k"] == ("diffusion_model.double_blocks.0.img_attn.qkv.weight",
                                                                (0, h, h))
    assert key_map["lycoris_single_transformer_blocks_0_proj_mlp"] == (
        "diffusion_model.single_blocks.0.linear1.weight", (0, 3 * h, 4 * h))


@pytest.mark.parametrize("ortho", [True, False])
def test_official_sdxl_layout(tmp_path, ortho):
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**tm.SDXL_VARIANTS["koala"][0].diffusers_config())
    sd = tm.write_official_sdxl(unet, tmp_path / "w.safetensors", rank=4, ortho=ortho)
    assert load_file(str(tmp_path / "w.safetensors")).keys() == sd.keys()
    n_attn = len(unet.attn_processors)
    leaves = ({"q_layer.weight", "p_layer.weight", "lambda_layer", "base_q.weight", "base_p.weight", "base_lambda"}
              if ortho else {"down.weight", "up.weight"})
    assert len(sd) == n_attn * 4 * len(leaves)
    p = "unet.down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora."
    assert {k[len(p):] for k in sd if k.startswith(p)} == leaves
    if ortho:
        assert sd[p + "q_layer.weight"].shape == (4, 2048) and sd[p + "p_layer.weight"].shape == (320, 4)
        assert not torch.equal(sd[p + "q_layer.weight"], sd[p + "base_q.weight"])
    else:
        assert sd[p + "down.weight"].shape == (4, 2048) and sd[p + "up.weight"].shape == (320, 4)


def test_official_flux_pt_layout(tmp_path):
    from tools.families import FAMILIES

    transformer = FAMILIES["flux"].build(0).diffusers
    tm.write_official_flux_pt(transformer, tmp_path / "lora.pt", rank=4)
    sd = torch.load(str(tmp_path / "lora.pt"), weights_only=True)
    assert len(sd) == 2 * 7 * 2  # (1 double + 1 single block) x 7 adapters x down/up
    assert sd["transformer_blocks.0.attn.processor.to_q_proj_lora.down.weight"].shape == (4, 128)
    assert sd["single_transformer_blocks.0.attn.processor.to_v_lora.up.weight"].shape == (128, 4)
