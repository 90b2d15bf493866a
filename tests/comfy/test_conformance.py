"""In-process conformance beyond one LyCORIS file per family (see test_families.py for that):

- the official repo's SDXL files (Ortho and vanilla) against the official layer formula;
- two T-LoRAs stacked on one model, against both LyCORIS networks' own masked deltas merged into the weights;
- items at different noise levels in one batch, each at its own rank;
- the model handed in is never changed, and the schedule matters.

Models are the tiny SD1.5 / SDXL twins built through ComfyUI's own detection (tools/families). Comparisons are on
the T-LoRA's effect (output with it minus output without it) as well as on the whole output.
"""

from __future__ import annotations

import copy

import pytest
import torch
from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask
from safetensors.torch import load_file

from tools import tiny_models as tm
from tools.families import FAMILIES
from tools.families.base import capture, rel_l2, sigma_for

R, LINEAR_ALPHA, MIN_RANK, ALPHA = 8, 8, 3, 1.7
TIMESTEPS = (999, 750, 500, 250, 0)
TOL = 1e-4


def attach(pack, patcher, tl, strength=1.0, max_rank=R, min_rank=MIN_RANK, alpha=ALPHA, mode="auto"):
    """The pack's apply_tlora on `patcher`: (clone, application)."""
    apply = pack.engine.apply
    return apply.apply_tlora(patcher, tl, apply.Settings(strength, max_rank, min_rank, alpha, mode))


def twin_and_inputs(name: str, seed: int):
    fam = FAMILIES[name]
    twin = fam.build(seed)
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(3))
    return fam, twin, x, conds


def official_delta(tensors: dict, r: int, ortho: bool) -> torch.Tensor:
    """The official repo's layer as a weight: P(Q x * lambda * m) - P0(Q0 x * lambda0 * m), or up(down x * m)."""
    m = torch.zeros(tensors["q" if ortho else "down"].shape[0], dtype=torch.float64)
    m[:r] = 1
    if not ortho:
        return tensors["up"] @ torch.diag(m) @ tensors["down"]
    return (tensors["p"] @ torch.diag(tensors["lam"].reshape(-1) * m) @ tensors["q"]
            - tensors["p0"] @ torch.diag(tensors["lam0"].reshape(-1) * m) @ tensors["q0"])


def _official_groups(sd: dict, prefix: str) -> dict[str, dict]:
    """The file's tensors per processor LoRA, keyed by the diffusers module they patch."""
    roles = {"q_layer.weight": "q", "p_layer.weight": "p", "lambda_layer": "lam", "base_q.weight": "q0",
             "base_p.weight": "p0", "base_lambda": "lam0", "down.weight": "down", "up.weight": "up"}
    procs = {"to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0"}
    groups: dict[str, dict] = {}
    for k, v in sd.items():
        stem, role = next((k[: -len(s) - 1], roles[s]) for s in roles if k.endswith("." + s))
        block, proc = stem.removeprefix(prefix).rsplit(".processor.", 1)
        groups.setdefault(f"{block}.{procs[proc]}", {})[role] = v.double()
    return groups


@pytest.mark.parametrize("ortho", [True, False])
@pytest.mark.parametrize("prefix", ["unet.", ""])
def test_official_sdxl_matches_official_formula(pack, tmp_path, ortho, prefix):
    fam, twin, x, conds = twin_and_inputs("sdxl", 13)
    path = tmp_path / "official.safetensors"
    tm.write_official_sdxl(twin.diffusers, path, R, ortho=ortho, prefix=prefix, seed=7)
    tl = pack.tlora_core.load_tlora(path)
    assert tl.format == ("official_ortho" if ortho else "official_vanilla")
    clone, app = attach(pack, twin.patcher, tl)
    assert len(app.bindings) == len(tl.modules) > 0
    groups = _official_groups(load_file(str(path)), prefix)
    unet = twin.diffusers.double()
    originals = {n: unet.get_submodule(n).weight.detach().clone() for n in groups}
    for t in TIMESTEPS:
        sigma = sigma_for(twin.patcher, t, flow=False)
        base, out = capture(twin.patcher, x, sigma, conds), capture(clone, x, sigma, conds)
        r = app.state.ranks_for(sigma, twin.patcher.model.model_sampling)[1][0]
        call = type(out)(tuple(a.double() if torch.is_tensor(a) else a for a in out.args),
                         {k: v.double() if torch.is_tensor(v) else v for k, v in out.kwargs.items()}, out.out)
        twin.info["added"] = {k: {n: v.double() for n, v in d.items()} for k, d in twin.info["added"].items()}
        with torch.no_grad():
            ref_base = fam.reference(twin, call)
            for n, tensors in groups.items():
                unet.get_submodule(n).weight.copy_(originals[n] + official_delta(tensors, r, ortho))
            ref = fam.reference(twin, call)
            for n in groups:
                unet.get_submodule(n).weight.copy_(originals[n])
        assert rel_l2(out.out - base.out, ref - ref_base) < TOL, f"t={t} (rank {r}): effect off"
        assert rel_l2(out.out, ref) < TOL, f"t={t} (rank {r}): output off"


def test_two_tloras_on_one_model_each_follow_their_schedule(pack, tmp_path):
    """Stacked T-LoRAs: each injects into the same layers and keeps its own rank. The reference merges each
    LyCORIS network's own masked delta (`get_diff_weight` at that network's rank) into the twin's weights."""
    fam, twin, x, conds = twin_and_inputs("sd15", 14)
    nets, paths = [], []
    for i in range(2):
        p = tmp_path / f"t{i}.safetensors"
        nets.append(tm.write_lycoris_tlora(copy.deepcopy(twin.diffusers), p, R, LINEAR_ALPHA, seed=20 + i,
                                           strength=0.5))
        paths.append(p)
    a, app_a = attach(pack, twin.patcher, pack.tlora_core.load_tlora(paths[0]), 1.0, R, 1, 1.0)
    ab, app_b = attach(pack, a, pack.tlora_core.load_tlora(paths[1]), 0.7, R, 4, 2.0)
    sigma = sigma_for(twin.patcher, 600, flow=False)
    ms = twin.patcher.model.model_sampling
    ranks = [app.state.ranks_for(sigma, ms)[1][0] for app in (app_a, app_b)]
    assert ranks[0] != ranks[1]
    base, out = capture(twin.patcher, x, sigma, conds), capture(ab, x, sigma, conds)
    layers = {"lycoris_" + n.replace(".", "_"): m for n, m in twin.diffusers.named_modules()}
    saved = {n: m.weight.detach().clone() for n, m in layers.items() if isinstance(m, torch.nn.Linear)}
    try:
        with torch.no_grad():
            for net, strength, r in zip(nets, (1.0, 0.7), ranks, strict=True):
                mask = torch.zeros(1, R)
                mask[:, :r] = 1
                set_timestep_mask(mask)
                for lora in net.loras:
                    w = layers[lora.lora_name].weight
                    w.add_(strength * lora.get_diff_weight()[0].reshape(w.shape))
            ref = fam.reference(twin, out)
            for n, w in saved.items():
                layers[n].weight.copy_(w)
            ref_base = fam.reference(twin, out)
    finally:
        clear_timestep_mask()
        for net in nets:
            net.restore()
    assert rel_l2(out.out - base.out, ref - ref_base) < TOL
    assert rel_l2(out.out, ref) < TOL


def test_different_sigmas_in_one_batch_each_get_their_own_rank(pack, tmp_path):
    """The API only promises a [B] sigma tensor: items at different noise levels get their own ranks."""
    fam, twin, _, _ = twin_and_inputs("sd15", 16)
    path = tmp_path / "t.safetensors"
    tm.write_lycoris_tlora(twin.diffusers, path, R, LINEAR_ALPHA, seed=9, strength=0.5).restore()
    clone, app = attach(pack, twin.patcher, pack.tlora_core.load_tlora(path))
    g = torch.Generator().manual_seed(5)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 6, 768, generator=g)
    sigma = torch.cat([sigma_for(twin.patcher, 999, False), sigma_for(twin.patcher, 250, False)])
    ranks = app.state.ranks_for(sigma, twin.patcher.model.model_sampling)[1]
    assert ranks[0] < ranks[1]
    together = capture(clone, x, sigma, {"c_crossattn": ctx}).out
    for i in range(2):
        alone = capture(clone, x[i:i + 1], sigma[i:i + 1], {"c_crossattn": ctx[i:i + 1]}).out
        assert rel_l2(together[i:i + 1], alone) < TOL


def test_model_handed_in_is_never_changed_and_the_schedule_matters(pack, tmp_path):
    fam, twin, x, conds = twin_and_inputs("sd15", 11)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    tm.write_lycoris_tlora(twin.diffusers, path, R, LINEAR_ALPHA, seed=5, strength=0.5).restore()
    tl = pack.tlora_core.load_tlora(path)
    model = twin.patcher.model
    before = {k: v.clone() for k, v in model.state_dict().items()}
    sigma = sigma_for(twin.patcher, 999, flow=False)
    base = capture(twin.patcher, x, sigma, conds).out
    clone, _ = attach(pack, twin.patcher, tl)
    scheduled = capture(clone, x, sigma, conds).out
    clone_all, _ = attach(pack, twin.patcher, tl, min_rank=R, alpha=1.0)
    all_ranks = capture(clone_all, x, sigma, conds).out
    # at the noisiest step the schedule keeps most ranks off: its effect is not all ranks' effect
    assert rel_l2(scheduled - base, all_ranks - base) > 0.1
    again = capture(twin.patcher, x, sigma, conds).out
    assert torch.equal(again, base), "the base model's output changed after T-LoRA runs"
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any("_tlora_slots" in m.__dict__ for m in model.modules()), "a slot is left in the model"
