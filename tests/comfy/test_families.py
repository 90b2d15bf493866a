"""Conformance, family by family: ComfyUI + this pack equals the trainer's own forward at every timestep.

For each model family this ComfyUI host runs (tools/families): a tiny diffusers twin with seeded weights, loaded
into ComfyUI through its own detection; a LyCORIS `tlora` file written by LyCORIS on the twin (what SimpleTuner
saves); the pack applied through `apply_tlora`, called through ComfyUI's `apply_model` (so the APPLY_MODEL wrapper
turns sigma into the rank). The oracle is LyCORIS `apply_to` + `set_timestep_mask(compute_timestep_mask(t, ...))`
on the twin (run in float64, so the comparison measures the pack's fp32 forward, not the reference's round-off),
at t = 999, 750, 500, 250, 0, compared on the T-LoRA's effect (output with it minus output without
it), and on the whole output. Inside the model, target layers (a plain one, a row slice of a fused weight, a
reordered one, where the family has them) must add exactly LyCORIS' delta for the call's rank r, and the check must
tell r from r - 1 and r + 1. Results go to test_artifacts/<host>/families.json; scripts/families_table.py writes
the README's table from them.
"""

from __future__ import annotations

import json

import pytest
import torch
from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

from tests.conftest import save_results
from tools import families
from tools import tiny_models as tm
from tools.families.base import Call, capture, exact_bases, lycoris_delta, rel_l2, rel_max, set_bases, sigma_for
from tools.harness.server import host_version

R, LINEAR_ALPHA, MIN_RANK, ALPHA = 8, 8, 3, 1.7
TIMESTEPS = (999, 750, 500, 250, 0)
TOL = 1e-4  # relative (L2) error of the effect and of the output against LyCORIS, in fp32
PEAK_TOL = 5e-4  # the effect's max |error| / max |reference|: fp32 round-off of single elements
# LyCORIS builds its SVD base in float32 (terms off by ~3e-5); against LyCORIS with the exact base, what is left
# is fp32 round-off: this pack's (each probed layer's addition: ~3e-7) and the twins' (Wan's timestep sinusoids
# differ by up to ~1e-5 between ComfyUI and diffusers)
EXACT_TOL = 3e-5
LAYER_TOL = 1e-5
# families ComfyUI 0.3.75 lacks: they run on the newer hosts only
NOT_IN_0_3_75 = {"longcat_image", "kandinsky5_image", "kandinsky5_video", "ltx2"}
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    save_results("families.json", RESULTS)


def _params():
    families.base.import_comfy()
    return [pytest.param(f, id=f.name) for f in families.available()]


def test_families_this_host_lacks_are_the_documented_ones():
    """Families are parametrized by what the host has: none may disappear silently."""
    missing = {f.name for f in families.FAMILIES.values() if not f.available()}
    assert missing == (NOT_IN_0_3_75 if host_version().startswith("0.3.") else set())


def in_double(call: Call) -> Call:
    """The call's floating-point inputs in float64, for the float64 reference."""
    def d(v):
        return v.double() if torch.is_tensor(v) and v.is_floating_point() else v
    return Call(tuple(d(a) for a in call.args), {k: d(v) for k, v in call.kwargs.items()}, call.out)


class LayerProbe:
    """Records what one ComfyUI layer adds on top of its own forward, and checks it against LyCORIS' delta."""

    def __init__(self, pack, patcher, target, lora):
        self.target, self.lora = target, lora
        import comfy.utils

        self.module = comfy.utils.get_attr(patcher.model, target.path)
        self.records: list[tuple[torch.Tensor, torch.Tensor]] = []
        self.on = False
        self.handle = self.module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if self.on:
            self.records.append((args[0].detach(), out.detach()))

    def error(self, rank: int) -> float:
        """max relative error of the layer's addition against x @ delta(rank)^T (LyCORIS' own masked delta)."""
        (x, y), = self.records
        with torch.no_grad():
            added = y - type(self.module).forward(self.module, x)  # the layer without its slots
        if self.target.out_slice is not None:
            added = added.narrow(-1, *self.target.out_slice)
        delta = lycoris_delta(self.lora, rank)
        if self.target.reorder is not None:
            delta = self.target.reorder(delta)
        expected = x.reshape(-1, x.shape[-1]).double() @ delta.double().T
        return rel_l2(added.reshape(-1, added.shape[-1]), expected)


def _probes(pack, patcher, targets, net) -> list[LayerProbe]:
    """A plain target, a fused-slice target and a reordered target, where the family has them."""
    loras = {lo.lora_name: lo for lo in net.loras}
    picks = {}
    for t in targets:
        kind = "reorder" if t.reorder is not None else "slice" if t.out_slice is not None else "plain"
        picks.setdefault(kind, t)
    return [LayerProbe(pack, patcher, t, loras[t.adapter.name]) for t in picks.values()]


@pytest.mark.parametrize("family", _params())
def test_family_matches_lycoris_at_every_timestep(pack, family, tmp_path):
    twin = family.build(15)
    assert type(twin.patcher.model).__name__ == family.comfy_class
    path = tmp_path / "pytorch_lora_weights.safetensors"
    net = tm.write_lycoris_tlora(twin.diffusers, path, R, LINEAR_ALPHA, targets=family.targets, seed=8, strength=1.0)
    probes = []
    try:
        tl = pack.tlora_core.load_tlora(path)
        assert tl.format == "lycoris_tlora" and len(tl.modules) == len(net.loras) > 0
        plan = pack.engine.plan.plan(twin.patcher, tl)
        assert not plan.unmatched and not plan.skipped, f"unmatched {plan.unmatched[:5]}, skipped {plan.skipped}"
        apply = pack.engine.apply
        clone, app = apply.apply_tlora(twin.patcher, tl, apply.Settings(1.0, R, MIN_RANK, ALPHA))
        probes = _probes(pack, twin.patcher, plan.targets, net)
        twin.diffusers.double()
        net.double()
        lyco_base = {lo.lora_name: (lo.base_q.clone(), lo.base_p.clone(), lo.base_lambda.clone()) for lo in net.loras}
        exact = exact_bases(net)
        x, conds = family.inputs(twin, torch.Generator().manual_seed(4))
        result = {"effect": {}, "effect_peak": {}, "effect_exact": {}, "output": {}, "layers": {}}
        for t in TIMESTEPS:
            sigma = sigma_for(twin.patcher, t, family.flow)
            ts, ranks = app.state.ranks_for(sigma, twin.patcher.model.model_sampling)
            assert ts == [t] and ranks == [int(compute_timestep_mask(t, 1000, R, MIN_RANK, ALPHA).sum())]
            base = capture(twin.patcher, x, sigma, conds)
            for p in probes:
                p.records.clear()
                p.on = True
            out = capture(clone, x, sigma, conds)
            for p in probes:
                p.on = False
            with torch.no_grad():
                set_timestep_mask(torch.zeros(1, R))
                ref_base = family.reference(twin, in_double(out))
                set_timestep_mask(compute_timestep_mask(t, 1000, R, MIN_RANK, ALPHA))
                ref = family.reference(twin, in_double(out))
                set_bases(net, exact)
                ref_exact = family.reference(twin, in_double(out))
            result["effect_exact"][t] = rel_l2(out.out - base.out, ref_exact - ref_base)
            assert rel_max(ref, ref_base) > 1e-3, f"t={t}: the T-LoRA has no measurable effect"
            result["effect"][t] = rel_l2(out.out - base.out, ref - ref_base)
            result["effect_peak"][t] = rel_max(out.out - base.out, ref - ref_base)
            result["output"][t] = rel_l2(out.out, ref)
            result["layers"][t] = max(p.error(ranks[0]) for p in probes)  # (with the exact base)
            for p in probes:  # the probe can tell the call's rank from its neighbours
                for r in {ranks[0] - 1, ranks[0] + 1} & set(range(R + 1)):
                    assert p.error(r) > 100 * TOL, f"t={t} {p.target.path}: rank {r} looks like rank {ranks[0]}"
            set_bases(net, lyco_base)
    finally:
        for p in probes:
            p.handle.remove()
        clear_timestep_mask()
        net.restore()
    RESULTS[family.name] = {
        "title": family.title, "comfy_class": family.comfy_class, "host": host_version(),
        "timesteps": "int(sigma * 1000)" if family.flow else "model's discrete timestep",
        "modules": len(tl.modules), "fused": sum(t.out_slice is not None for t in plan.targets),
        "reordered": sum(t.reorder is not None for t in plan.targets),
        "max_effect_error": max(result["effect"].values()), "max_effect_peak": max(result["effect_peak"].values()),
        "max_effect_error_exact_base": max(result["effect_exact"].values()),
        "max_output_error": max(result["output"].values()),
        "max_layer_error": max(result["layers"].values()), "per_timestep": result}
    print(family.name, json.dumps(RESULTS[family.name]["per_timestep"]))
    for what, tol in (("effect", TOL), ("output", TOL), ("effect_exact", EXACT_TOL), ("layers", LAYER_TOL)):
        assert max(result[what].values()) < tol, f"{family.name}: {what} errors {result[what]}"
    assert max(result["effect_peak"].values()) < PEAK_TOL, result["effect_peak"]
