"""Conformance for the DiTs diffusers also has (SD3, Flux 2): ComfyUI + this pack equals LyCORIS on the
diffusers twin at every timestep (in-process, fp32). Same method and oracle as test_conformance.py; the
T-LoRA targets every Linear in the transformer blocks, fused ComfyUI weights (qkv, linear1) included.
"""

from __future__ import annotations

import pytest
import torch

from tools import tiny_models as tm
from tools.harness.inproc import import_pack

from .test_conformance import (
    ALPHA,
    LINEAR_ALPHA,
    MIN_RANK,
    TIMESTEPS,
    TOL,
    R,
    clear_mask,
    lycoris_mask,
    rel_err,
    run_comfy,
    sigma_for,
)

QKV = ("to_q", "to_k", "to_v", "add_q_proj", "add_k_proj", "add_v_proj")


@pytest.fixture(scope="module")
def pack():
    return import_pack()


def run_comfy_hooked(patcher, x, sigma, **conds):
    """`run_comfy` for a network whose forward runs no DIFFUSION_MODEL wrappers (ComfyUI 0.3.75's SD3
    MMDiT): the same apply_model call, with a forward hook recording the network's inputs and output."""
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher])
    calls = []
    hook = patcher.model.diffusion_model.register_forward_hook(
        lambda _m, args, kwargs, out: calls.append((args, kwargs, out)), with_kwargs=True)
    try:
        with torch.no_grad():
            patcher.model.apply_model(x, sigma, transformer_options={
                "wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)}, **conds)
    finally:
        hook.remove()
    (args, kwargs, out), = calls
    return args, kwargs, out


def sd3_call(model, transformer, clone, sigma, g):
    x, ctx = torch.randn(1, 16, 8, 6, generator=g), torch.randn(1, 5, 32, generator=g)
    y = torch.randn(1, 32, generator=g)
    (xin, ts), kw, out = run_comfy_hooked(clone, x, sigma, c_crossattn=ctx, y=y)
    return out, lambda: tm.run_diffusers_sd3(transformer, xin, ts, kw["context"], kw["y"])


def flux2_call(model, transformer, clone, sigma, g):
    x, ctx = torch.randn(1, 16, 4, 6, generator=g), torch.randn(1, 5, 32, generator=g)
    args, out = run_comfy(clone, x, sigma, c_crossattn=ctx, guidance=torch.tensor([3.5]))
    xin, ts, ctx_in, _y, guidance = args[:5]
    return out, lambda: tm.run_diffusers_flux2(transformer, xin, ts, ctx_in, guidance)


FAMILIES = {  # builder, LyCORIS targets, one model call -> (ComfyUI output, reference thunk)
    "sd3": (tm.build_comfy_sd3_small, tm.SD3_TARGETS, sd3_call),
    "flux2": (tm.build_comfy_flux2_small, tm.FLUX2_TARGETS, flux2_call),
}


def test_small_dit_pairs_match():
    """The twins compute the same thing without a T-LoRA (batch of 2, different timesteps)."""
    comfy = tm.import_comfy()
    g = torch.Generator().manual_seed(2)
    model, transformer = tm.build_comfy_sd3_small()
    assert type(model) is comfy.model_base.SD3
    x, ctx, y, ts = torch.randn(2, 16, 8, 6, generator=g), torch.randn(2, 5, 32, generator=g), torch.randn(
        2, 32, generator=g), torch.tensor([300.0, 900.0])
    with torch.no_grad():
        a, b = model.diffusion_model(x, ts, context=ctx, y=y), tm.run_diffusers_sd3(transformer, x, ts, ctx, y)
    assert a.abs().max() > 0.1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)
    model, transformer = tm.build_comfy_flux2_small()
    assert type(model) is comfy.model_base.Flux2
    x, ctx, ts, gd = torch.randn(2, 16, 4, 6, generator=g), torch.randn(2, 5, 32, generator=g), torch.tensor(
        [0.3, 0.9]), torch.tensor([3.5, 1.0])
    with torch.no_grad():
        a, b = model.diffusion_model(x, ts, ctx, guidance=gd), tm.run_diffusers_flux2(transformer, x, ts, ctx, gd)
    assert a.abs().max() > 0.1
    torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


# ComfyUI maps SD3's last-block `norm1_context.linear` (AdaLayerNormContinuous: scale, shift) onto its
# adaLN_modulation (shift, scale) as `(key, None, swap_scale_shift)`; the pack must reorder the delta's rows.


def is_transform(hit) -> bool:
    return isinstance(hit, tuple) and len(hit) > 2


def conformance(pack, family: str, tmp_path) -> dict[int, float]:
    """Write a LyCORIS tlora on the diffusers twin, apply it with the pack, and return {t: relative error}
    of ComfyUI's output against LyCORIS at each timestep. Asserts that every module maps and that exactly
    the q/k/v projections land on row slices of fused weights."""
    import comfy.model_patcher

    from tlora_core import load_tlora

    build, targets, call = FAMILIES[family]
    model, transformer = build(seed=15)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    net = tm.write_lycoris_tlora(transformer, path, R, LINEAR_ALPHA, targets=targets, seed=8, strength=0.5)
    try:
        tl = load_tlora(path)
        assert tl.format == "lycoris_tlora" and len(tl.modules) == len(net.loras)
        patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
        _, unmatched, skipped = pack.nodes.apply.plan(patcher, tl)
        assert not unmatched and not skipped, f"{family}: unmatched {unmatched}, skipped {skipped}"
        if family == "sd3":  # the file reaches a transform-mapped (row-swapped) module
            key_map = pack.nodes.keymap.model_key_map(model)
            swapped = {n for n in tl.modules if is_transform(pack.nodes.keymap.resolve(n, tl.naming, key_map))}
            assert swapped == {"lycoris_transformer_blocks_1_norm1_context_linear"}, swapped
        clone, app = pack.nodes.apply.apply_tlora(patcher, tl, 1.0, R, MIN_RANK, ALPHA)
        assert len(app.bindings) == len(tl.modules)
        # the q/k/v projections (attn, add_*_proj, SD3.5 attn2) land on row slices of fused qkv / linear1
        fused = {slot.adapter.name for _, slot in app.bindings if slot.out_slice is not None}
        expected = {n for n in tl.modules if n.rsplit("_attn_", 1)[-1].rsplit("_attn2_", 1)[-1] in QKV}
        assert fused == expected and fused, f"{family}: fused slices {sorted(fused)}"
        errors = {}
        for t in TIMESTEPS:
            sigma = sigma_for(model, t, flow=True)
            assert app.state.ranks_for(sigma, model.model_sampling)[0] == [t]
            out, reference = call(model, transformer, clone, sigma, torch.Generator().manual_seed(4))
            lycoris_mask(t)
            with torch.no_grad():
                errors[t] = rel_err(out, reference())
        print(f"{family}: max relative error per t", {t: f"{e:.1e}" for t, e in errors.items()})
        return errors
    finally:
        clear_mask()
        net.restore()


@pytest.mark.parametrize("family", ["flux2", "sd3"])
def test_dit_matches_lycoris_at_every_timestep(pack, family, tmp_path):
    errors = conformance(pack, family, tmp_path)
    assert max(errors.values()) < TOL, f"{family}: relative errors against LyCORIS {errors}"


def test_flux2_key_map_agrees_with_weight_conversion(pack):
    """Every Linear of diffusers Flux 2 maps (as `lycoris_` name) to the ComfyUI weight or row slice the
    tiny-model weight conversion puts it in; `proj_mlp` (Flux-1-style split names) covers the rest of
    linear1 at Flux 2's own width."""
    model, transformer = tm.build_comfy_flux2_small()
    key_map = pack.nodes.keymap.model_key_map(model)
    conv = tm.flux2_to_diffusers(model.model_config.unet_config)
    linears = [n for n, m in transformer.named_modules() if isinstance(m, torch.nn.Linear)]
    for name in linears:
        target = conv[f"{name}.weight"]
        hit = key_map.get(f"lycoris_{name.replace('.', '_')}")
        if len(target) == 3:  # norm_out: (scale, shift) vs (shift, scale) -- a transform, not a slice
            assert hit == ("diffusion_model." + target[0], None, target[2])
            continue
        want = (f"diffusion_model.{target[0]}", target[1]) if isinstance(target, tuple) else f"diffusion_model.{target}"
        assert hit == want, name
    sd = model.state_dict()
    for i in range(len(model.diffusion_model.single_blocks)):
        key, (dim, start, size) = key_map[f"lycoris_single_transformer_blocks_{i}_proj_mlp"]
        assert dim == 0 and start == 3 * model.diffusion_model.hidden_size and start + size == sd[key].shape[0]
