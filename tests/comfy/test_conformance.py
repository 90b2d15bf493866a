"""Conformance: ComfyUI + this pack equals the trainer's own forward at every timestep (in-process, fp32).

Base weights and T-LoRA files are produced in diffusers + LyCORIS exactly as SimpleTuner does; the
oracle is LyCORIS `apply_to` + `set_timestep_mask(compute_timestep_mask(t, ...))` on the diffusers
twin, or, for the official repo's files, the official formula. ComfyUI's model is called through
`apply_model`, so the pack's APPLY_MODEL wrapper turns each sigma into the rank, as in sampling.
"""

from __future__ import annotations

import copy

import pytest
import torch

from tools import tiny_models as tm
from tools.harness.inproc import import_pack

R, LINEAR_ALPHA, MIN_RANK, ALPHA = 8, 4, 3, 1.7
TIMESTEPS = (999, 750, 500, 250, 0)
TOL = 1e-4


@pytest.fixture(scope="module")
def pack():
    return import_pack()


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


class Capture:
    """A DIFFUSION_MODEL wrapper recording the network's inputs and output of each call."""

    def __init__(self):
        self.calls = []

    def __call__(self, executor, *args, **kwargs):
        out = executor(*args, **kwargs)
        self.calls.append((args, out))
        return out


def run_comfy(patcher, x, sigma, **conds):
    """One model call through ComfyUI's apply_model with the patcher's wrappers and injections live."""
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher])
    cap = Capture()
    wrappers = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
    wrappers.setdefault(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}).setdefault("test", []).append(cap)
    with torch.no_grad():
        patcher.model.apply_model(x, sigma, transformer_options={"wrappers": wrappers}, **conds)
    (args, out), = cap.calls
    return args, out


def sigma_for(model, t: int, flow: bool) -> torch.Tensor:
    if flow:
        return torch.tensor([(t + 0.5) / 1000.0 if t < 999 else 0.9995])
    sigma = model.model_sampling.sigma(torch.tensor([float(t)]))
    assert int(model.model_sampling.timestep(sigma).item()) == t
    return sigma


def lycoris_mask(t: int) -> None:
    from lycoris.modules.tlora import compute_timestep_mask, set_timestep_mask

    set_timestep_mask(compute_timestep_mask(t, 1000, R, MIN_RANK, ALPHA))


def clear_mask() -> None:
    from lycoris.modules.tlora import clear_timestep_mask

    clear_timestep_mask()


def unet_conds(model, kind, batch=1, size=8, seed=3):
    g = torch.Generator().manual_seed(seed)
    spec = tm.SMALL_SPECS[kind]
    x = torch.randn(batch, 4, size, size, generator=g)
    ctx = torch.randn(batch, 6, spec.context_dim, generator=g)
    conds, dkw = {"c_crossattn": ctx}, {}
    if spec.pooled_dim:
        pooled = torch.randn(batch, spec.pooled_dim, generator=g)
        h = w = size * 8
        conds["y"] = model.encode_adm(pooled_output=pooled, width=w, height=h, crop_w=0, crop_h=0,
                                      target_width=w, target_height=h)
        dkw["added_cond_kwargs"] = {"text_embeds": pooled,
                                    "time_ids": torch.tensor([[h, w, 0, 0, h, w]] * batch, dtype=torch.float32)}
    return x, conds, dkw


@pytest.mark.parametrize("kind", ["sd15", "sdxl"])
def test_unet_matches_lycoris_at_every_timestep(pack, kind, tmp_path):
    import comfy.model_patcher

    from tlora_core import load_tlora

    model, unet = tm.build_comfy_unet_small(kind, seed=11)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    net = tm.write_lycoris_tlora(unet, path, R, LINEAR_ALPHA, seed=5, strength=0.5)
    tl = load_tlora(path)
    assert tl.format == "lycoris_tlora" and tl.rank == R and len(tl.modules) == len(net.loras)
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    clone, app = pack.nodes.apply.apply_tlora(patcher, tl, 1.0, R, MIN_RANK, ALPHA)
    assert len(app.bindings) == len(tl.modules)
    x, conds, dkw = unet_conds(model, kind)
    outs = {}
    try:
        for t in TIMESTEPS:
            sigma = sigma_for(model, t, flow=False)
            (xin, ts, ctx, *_), out = run_comfy(clone, x, sigma, **conds)
            lycoris_mask(t)
            with torch.no_grad():
                ref = unet(xin, ts, encoder_hidden_states=ctx, **dkw).sample
            err = rel_err(out, ref)
            assert err < TOL, f"t={t}: relative error {err:.2e} against LyCORIS"
            outs[t] = out
    finally:
        clear_mask()
        net.restore()
    # the schedule matters: each timestep's output differs from the same timestep at all ranks
    clone_all, _ = pack.nodes.apply.apply_tlora(patcher, tl, 1.0, R, R, 1.0)
    sigma = sigma_for(model, 999, flow=False)
    _, out_all = run_comfy(clone_all, x, sigma, **conds)
    assert rel_err(outs[999], out_all) > 100 * TOL
    # the base model's weights are bit-identical afterwards, and a base call sees no T-LoRA
    import comfy.model_management

    comfy.model_management.load_models_gpu([patcher])
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    _, base_out = run_comfy(patcher, x, sigma, **conds)
    with torch.no_grad():
        (xin, ts, ctx, *_), _ = run_comfy(patcher, x, sigma, **conds)
        plain = unet(xin, ts, encoder_hidden_states=ctx, **dkw).sample  # network restored: plain base
    assert rel_err(base_out, plain) < TOL


def test_flux_matches_lycoris_at_every_timestep(pack, tmp_path):
    import comfy.model_patcher

    from tlora_core import load_tlora

    model, transformer = tm.build_comfy_flux_small(seed=12)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    net = tm.write_lycoris_tlora(transformer, path, R, LINEAR_ALPHA, targets=tm.FLUX_TARGETS, seed=6, strength=0.5)
    tl = load_tlora(path)
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    clone, app = pack.nodes.apply.apply_tlora(patcher, tl, 1.0, R, MIN_RANK, ALPHA)
    fused = [b for b in app.bindings if b[1].out_slice is not None]
    assert fused, "Flux q/k/v must land on slices of the fused qkv / linear1 weights"
    g = torch.Generator().manual_seed(4)
    spec = tm.FLUX_SMALL_SPEC
    x = torch.randn(1, 16, 8, 6, generator=g)
    conds = {"c_crossattn": torch.randn(1, 5, spec.context_dim, generator=g),
             "y": torch.randn(1, spec.vec_dim, generator=g), "guidance": torch.tensor([3.5])}
    try:
        for t in TIMESTEPS:
            sigma = sigma_for(model, t, flow=True)
            args, out = run_comfy(clone, x, sigma, **conds)
            xin, ts, ctx, y, guidance = args[:5]
            assert app.state.ranks_for(sigma, model.model_sampling)[0] == [t]
            lycoris_mask(t)
            with torch.no_grad():
                ref = tm.run_diffusers_flux(transformer, xin, ts, ctx, y, guidance)
            err = rel_err(out, ref)
            assert err < TOL, f"t={t}: relative error {err:.2e} against LyCORIS"
    finally:
        clear_mask()
        net.restore()


def official_delta(adapter_tensors: dict, r: int, ortho: bool) -> torch.Tensor:
    """The official repo's layer as a weight: P(Q x * lambda * m) - P0(Q0 x * lambda0 * m), or up(down x * m)."""
    m = torch.zeros(adapter_tensors["down" if not ortho else "q"].shape[0])
    m[:r] = 1
    if ortho:
        d = adapter_tensors
        return d["p"] @ torch.diag(d["lam"].reshape(-1) * m) @ d["q"] - d["p0"] @ torch.diag(
            d["lam0"].reshape(-1) * m) @ d["q0"]
    return adapter_tensors["up"] @ torch.diag(m) @ adapter_tensors["down"]


@pytest.mark.parametrize("ortho", [True, False])
@pytest.mark.parametrize("prefix", ["unet.", ""])
def test_official_sdxl_matches_official_formula(pack, tmp_path, ortho, prefix):
    import comfy.model_patcher
    from safetensors.torch import load_file

    from tlora_core import load_tlora

    model, unet = tm.build_comfy_unet_small("sdxl", seed=13)
    path = tmp_path / "official.safetensors"
    tm.write_official_sdxl(unet, path, R, ortho=ortho, prefix=prefix, seed=7)
    sd = load_file(str(path))
    tl = load_tlora(path)
    assert tl.format == ("official_ortho" if ortho else "official_vanilla")
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    clone, app = pack.nodes.apply.apply_tlora(patcher, tl, 1.0, R, MIN_RANK, ALPHA)
    assert len(app.bindings) == len(tl.modules) > 0
    x, conds, dkw = unet_conds(model, "sdxl")
    # group the file's tensors per processor LoRA, keyed by the diffusers module they patch
    groups: dict[str, dict] = {}
    roles = {"q_layer.weight": "q", "p_layer.weight": "p", "lambda_layer": "lam", "base_q.weight": "q0",
             "base_p.weight": "p0", "base_lambda": "lam0", "down.weight": "down", "up.weight": "up"}
    procs = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
    for k, v in sd.items():
        stem, role = next((k[: -len(s) - 1], roles[s]) for s in roles if k.endswith("." + s))
        block, proc = stem.removeprefix(prefix).rsplit(".processor.", 1)
        groups.setdefault(f"{block}.{procs[proc]}", {})[role] = v.float()
    originals = {n: unet.get_submodule(n).weight.detach().clone() for n in groups}
    for t in TIMESTEPS:
        sigma = sigma_for(model, t, flow=False)
        (xin, ts, ctx, *_), out = run_comfy(clone, x, sigma, **conds)
        r = app.state.ranks_for(sigma, model.model_sampling)[1][0]
        with torch.no_grad():
            for n, tensors in groups.items():
                unet.get_submodule(n).weight.copy_(originals[n] + official_delta(tensors, r, ortho))
            ref = unet(xin, ts, encoder_hidden_states=ctx, **dkw).sample
        err = rel_err(out, ref)
        assert err < TOL, f"t={t} (rank {r}): relative error {err:.2e} against the official formula"


def test_two_tloras_on_one_model_each_follow_their_schedule(pack, tmp_path):
    """Stacked T-LoRAs: each injects into the same layers and keeps its own rank state."""
    import comfy.model_patcher

    from tlora_core import load_tlora

    model, unet = tm.build_comfy_unet_small("sd15", seed=14)
    paths = []
    for i in range(2):
        p = tmp_path / f"t{i}.safetensors"
        tm.write_lycoris_tlora(copy.deepcopy(unet), p, R, LINEAR_ALPHA, seed=20 + i, strength=0.5).restore()
        paths.append(p)
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    a, app_a = pack.nodes.apply.apply_tlora(patcher, load_tlora(paths[0]), 1.0, R, 1, 1.0)
    ab, app_b = pack.nodes.apply.apply_tlora(a, load_tlora(paths[1]), 0.7, R, 4, 2.0)
    x, conds, _ = unet_conds(model, "sd15")
    sigma = sigma_for(model, 600, flow=False)
    _, out_ab = run_comfy(ab, x, sigma, **conds)
    assert app_a.state.ranks_for(sigma, model.model_sampling)[1] != app_b.state.ranks_for(sigma,
                                                                                          model.model_sampling)[1]
    # reference: both deltas at their own ranks merged into the weights
    import comfy.model_management
    import comfy.utils

    comfy.model_management.load_models_gpu([patcher])
    saved = {}
    for app, strength in ((app_a, 1.0), (app_b, 0.7)):
        r = app.state.ranks_for(sigma, model.model_sampling)[1][0]
        for path, slot in app.bindings:
            w = comfy.utils.get_attr(model, path + ".weight")
            saved.setdefault(path, w.detach().clone())
            w.data += strength * slot.adapter.delta_weight(r).reshape(w.shape)
    _, ref = run_comfy(patcher, x, sigma, **conds)
    for path, w in saved.items():
        comfy.utils.get_attr(model, path + ".weight").data.copy_(w)
    assert rel_err(out_ab, ref) < TOL


def test_different_sigmas_in_one_batch_each_get_their_own_rank(pack, tmp_path):
    """The API only promises a [B] sigma tensor: items at different noise levels get their own ranks."""
    import comfy.model_patcher

    from tlora_core import load_tlora

    model, unet = tm.build_comfy_unet_small("sd15", seed=16)
    path = tmp_path / "t.safetensors"
    tm.write_lycoris_tlora(unet, path, R, LINEAR_ALPHA, seed=9, strength=0.5).restore()
    patcher = comfy.model_patcher.ModelPatcher(model, torch.device("cpu"), torch.device("cpu"))
    clone, app = pack.nodes.apply.apply_tlora(patcher, load_tlora(path), 1.0, R, MIN_RANK, ALPHA)
    x, conds, _ = unet_conds(model, "sd15", batch=2)
    sigma = torch.cat([sigma_for(model, 999, flow=False), sigma_for(model, 250, flow=False)])
    ranks = app.state.ranks_for(sigma, model.model_sampling)[1]
    assert ranks[0] < ranks[1]
    _, together = run_comfy(clone, x, sigma, **conds)
    for i in range(2):
        _, alone = run_comfy(clone, x[i:i + 1], sigma[i:i + 1], c_crossattn=conds["c_crossattn"][i:i + 1])
        assert rel_err(together[i:i + 1], alone) < TOL
