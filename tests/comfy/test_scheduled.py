"""Load LoRA (timestep schedule): a standard LoRA at each model call's strength, against ComfyUI's own LoraLoader.

For SD 1.5 and SDXL (kohya names, every conv as a LoCon with 3x3 down kernels), Flux.1 (diffusers names: row slices
of the fused qkv) and Wan 2.1 (ComfyUI's `diffusion_model.` names, PEFT lora_A / lora_B): a seeded LoRA of every
weight ComfyUI's key map knows (`tools.standard_lora`); the stock route is `comfy.sd.load_lora_for_models` (weights
patched) at the strength the curve gives, the pack's the per-call slots. At constant strength over the whole range
the two outputs agree to fp32 round-off; on a curve, every call agrees with stock at that call's strength, and
outside the range the output is the base model's exactly.
"""

from __future__ import annotations

import pytest
import torch

from tools import families
from tools.families.base import capture, rel_l2
from tools.standard_lora import standard_lora

R, ALPHA, STRENGTH = 4, 2.0, 0.8
TOL = 1e-4  # relative L2 of the effect: patched weights against activation-space slots, both fp32
FAMILIES = ("sd15", "sdxl", "flux", "wan21")


def _lora(patcher, family: str) -> dict[str, torch.Tensor]:
    return standard_lora(patcher, family, R, ALPHA)


@pytest.fixture(scope="module", params=FAMILIES)
def setup(request, tmp_path_factory):
    families.base.import_comfy()
    fam = families.FAMILIES[request.param]
    twin = fam.build(21)
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(5))
    from safetensors.torch import save_file

    sd = _lora(twin.patcher, request.param)
    path = tmp_path_factory.mktemp("loras") / f"{request.param}_lora.safetensors"
    save_file(sd, str(path))
    return request.param, twin.patcher, x, conds, sd, path


def _stock(patcher, sd, strength):
    import comfy.sd

    model, _ = comfy.sd.load_lora_for_models(patcher, None, sd, strength, 0)
    return model


def test_constant_strength_equals_stock_lora_loader(pack, setup):
    family, patcher, x, conds, sd, path = setup
    tl = pack.engine.scheduled.read_lora(str(path))
    plan = pack.engine.plan.plan(patcher, tl)
    assert not plan.unmatched and len(plan.targets) == len(sd) // 3
    curve = pack.tlora_core.strength.StrengthCurve(0.0, 1.0, 1.0, 1.0, "constant")
    ours, app = pack.engine.scheduled.apply_scheduled_lora(patcher, tl, STRENGTH, curve)
    stock = _stock(patcher, sd, STRENGTH)
    ms = patcher.get_model_object("model_sampling")
    for pct in (0.02, 0.5, 0.97):
        sigma = torch.tensor([float(ms.percent_to_sigma(pct))])
        base = capture(patcher, x, sigma, conds).out
        want = capture(stock, x, sigma, conds).out
        got = capture(ours, x, sigma, conds).out
        assert rel_l2(want, base) > 1e-3, f"{family}: the LoRA has no measurable effect"
        assert rel_l2(got - base, want - base) < TOL, (family, pct, rel_l2(got - base, want - base))


def test_every_call_gets_the_curves_strength(pack, setup):
    """A linear fade from 0.2 to 0.9 between 30 % and 80 % of the sampling: each call equals stock LoraLoader at
    strength_model times the curve at that call; before 30 % and from 80 % on, the base model exactly."""
    family, patcher, x, conds, sd, path = setup
    strength = pack.tlora_core.strength
    curve = strength.StrengthCurve(0.3, 0.8, 0.2, 0.9, "linear")
    ours, app = pack.engine.scheduled.apply_scheduled_lora(patcher, pack.engine.scheduled.read_lora(str(path)),
                                                           STRENGTH, curve)
    ms = patcher.get_model_object("model_sampling")
    for pct in (0.1, 0.3, 0.45, 0.62, 0.79, 0.8, 0.9):
        sigma = torch.tensor([float(ms.percent_to_sigma(pct))])
        s = app.state.scales_for(sigma, ms)[0]
        want_s = strength.strength_at(curve, pct) if 0.3 <= pct < 0.8 else 0.0
        assert s == pytest.approx(want_s, abs=1e-6), (family, pct, s)
        base = capture(patcher, x, sigma, conds).out
        got = capture(ours, x, sigma, conds).out
        if want_s == 0.0:
            assert torch.equal(got, base), (family, pct)
            continue
        want = capture(_stock(patcher, sd, STRENGTH * want_s), x, sigma, conds).out
        assert rel_l2(got - base, want - base) < TOL, (family, pct, rel_l2(got - base, want - base))


def test_per_item_strengths_in_one_batch(pack, setup):
    """Two items at two sigmas in one call: each gets its own strength."""
    family, patcher, x, conds, sd, path = setup
    curve = pack.tlora_core.strength.StrengthCurve(0.0, 1.0, 0.0, 1.0, "linear")
    ours, app = pack.engine.scheduled.apply_scheduled_lora(patcher, pack.engine.scheduled.read_lora(str(path)),
                                                           1.0, curve)
    ms = patcher.get_model_object("model_sampling")
    sigmas = torch.tensor([float(ms.percent_to_sigma(0.25)), float(ms.percent_to_sigma(0.75))])
    scales = app.state.scales_for(sigmas, ms)
    assert scales == pytest.approx([0.25, 0.75], abs=1e-6)
    xb = torch.cat([x, x])
    cb = {k: torch.cat([v, v]) if torch.is_tensor(v) and v.shape[:1] == x.shape[:1] else v for k, v in conds.items()}
    got = capture(ours, xb, sigmas, cb).out
    for i, (sig, s) in enumerate(zip(sigmas, scales, strict=True)):
        want = capture(_stock(patcher, sd, s), x, sig[None], conds).out
        base = capture(patcher, x, sig[None], conds).out
        assert rel_l2(got[i:i + 1] - base, want - base) < TOL, (family, i)


@pytest.mark.parametrize("kind", ["fp8", "scaled_fp8", "mixed_fp8"])
def test_on_quantized_storage_the_lora_adds_to_the_stored_base_exactly(pack, tmp_path, kind):
    """SDXL stored as fp8 (weight_dtype), ComfyUI scaled fp8, or mixed-precision QuantizedTensor: the node's effect
    equals an exact LoRA on the same base values (fp32), where stock LoraLoader, which re-quantizes W + dW, is off
    by the storage's own precision."""
    from tools import storage

    fam = families.FAMILIES["sdxl"]
    twin = fam.build(21)
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(5))
    sd = {k.removeprefix("diffusion_model."): v.clone() for k, v in twin.patcher.model.state_dict().items()
          if k.startswith("diffusion_model.")}
    loaded = storage.load(storage.write(sd, kind, tmp_path / f"{kind}.safetensors"), kind)
    values = storage.values(pack, loaded)
    deq = {k.removeprefix("diffusion_model."): v for k, v in values.items() if k.startswith("diffusion_model.")}
    exact_base = storage.load(storage.write(deq, "float32", tmp_path / "deq.safetensors"), "float32")
    lora = _lora(loaded, "sdxl")
    path = tmp_path / "lora.safetensors"
    from safetensors.torch import save_file

    save_file(lora, str(path))
    curve = pack.tlora_core.strength.StrengthCurve(0.0, 1.0, 1.0, 1.0, "constant")
    ours, _ = pack.engine.scheduled.apply_scheduled_lora(loaded, pack.engine.scheduled.read_lora(str(path)),
                                                         STRENGTH, curve)
    sigma = torch.tensor([float(loaded.get_model_object("model_sampling").percent_to_sigma(0.5))])
    base = capture(loaded, x, sigma, conds).out
    exact_b = capture(exact_base, x, sigma, conds).out
    assert rel_l2(base, exact_b) < 1e-5, "the fp32 copy does not hold the stored values"
    exact = capture(_stock(exact_base, lora, STRENGTH), x, sigma, conds).out - exact_b
    got = capture(ours, x, sigma, conds).out - base
    with torch.no_grad():  # as ComfyUI patches weights: its fp8 rounding writes in place
        stock = capture(_stock(loaded, lora, STRENGTH), x, sigma, conds).out - base
    print(kind, f"node {rel_l2(got, exact):.1e}, stock LoraLoader {rel_l2(stock, exact):.1e}")
    assert rel_l2(got, exact) < TOL
    assert rel_l2(stock, exact) < 1.0  # stock: the same LoRA, within the storage's own precision


def test_it_stacks_with_a_stock_lora_and_another_scheduled_lora(pack, tmp_path):
    """Stock LoraLoader A, then this node with B (constant 0.6), then this node with A again (constant 0.3): equal to
    stock LoraLoader applying A at 1.3 and B at 0.6; the model given to each node is never modified."""
    from safetensors.torch import save_file

    fam = families.FAMILIES["sdxl"]
    twin = fam.build(21)
    patcher = twin.patcher
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(5))
    sd = _lora(patcher, "sdxl")
    g = torch.Generator().manual_seed(9)
    other = {k: (v + 0.5 * torch.randn(v.shape, generator=g) * v.std() if v.ndim == 2 else v) for k, v in sd.items()}
    paths = {"a": tmp_path / "a.safetensors", "b": tmp_path / "b.safetensors"}
    save_file(sd, str(paths["a"]))
    save_file(other, str(paths["b"]))
    sched = pack.engine.scheduled
    const = pack.tlora_core.strength.StrengthCurve(0.0, 1.0, 1.0, 1.0, "constant")
    stock_a = _stock(patcher, sd, 1.0)
    ours, _ = sched.apply_scheduled_lora(stock_a, sched.read_lora(str(paths["b"])), 0.6, const)
    ours, _ = sched.apply_scheduled_lora(ours, sched.read_lora(str(paths["a"])), 0.3, const)
    ref = _stock(_stock(patcher, sd, 1.3), other, 0.6)
    sigma = torch.tensor([float(patcher.get_model_object("model_sampling").percent_to_sigma(0.4))])
    base = capture(patcher, x, sigma, conds).out
    want = capture(ref, x, sigma, conds).out
    got = capture(ours, x, sigma, conds).out
    assert rel_l2(want, base) > 1e-3 and rel_l2(got - base, want - base) < TOL
    assert torch.equal(capture(patcher, x, sigma, conds).out, base)  # the input model is untouched
    assert torch.equal(capture(stock_a, x, sigma, conds).out, capture(_stock(patcher, sd, 1.0), x, sigma, conds).out)


def test_it_stacks_with_a_tlora(pack, tmp_path):
    """Load T-LoRA (a vanilla T-LoRA A in kohya layout, rank 4, min_rank 1) then this node with B (constant 0.6): at
    every call, equal to stock LoraLoader applying A's first r(t) ranks (alpha scaled to keep A's alpha / R) and B at
    0.6; the model given to each node is never modified."""
    from safetensors.torch import save_file

    fam = families.FAMILIES["sdxl"]
    twin = fam.build(21)
    patcher = twin.patcher
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(5))
    a, b = standard_lora(patcher, "sdxl", R, ALPHA, seed=3), standard_lora(patcher, "sdxl", R, ALPHA, seed=9)
    paths = {"a": tmp_path / "a_vanilla_tlora.safetensors", "b": tmp_path / "b.safetensors"}
    save_file(a, str(paths["a"]))
    save_file(b, str(paths["b"]))
    before = {k: v.clone() for k, v in patcher.model.state_dict().items()}
    engine = pack.engine
    tl = engine.files.read_file(str(paths["a"]), assume_vanilla=True)
    with_tlora, app = engine.apply.apply_tlora(patcher, tl, engine.apply.Settings(1.0, R, 1, 1.0))
    const = pack.tlora_core.strength.StrengthCurve(0.0, 1.0, 1.0, 1.0, "constant")
    ours, _ = engine.scheduled.apply_scheduled_lora(with_tlora, engine.scheduled.read_lora(str(paths["b"])), 0.6,
                                                    const)
    ms = patcher.get_model_object("model_sampling")
    seen = set()
    for pct in (0.05, 0.4, 0.7, 0.98):
        sigma = torch.tensor([float(ms.percent_to_sigma(pct))])
        r = app.state.ranks_for(sigma, ms)[1][0]
        seen.add(r)
        first_r = {}
        for k, v in a.items():
            if k.endswith("lora_down.weight"):
                first_r[k] = v[:r]
            elif k.endswith("lora_up.weight"):
                first_r[k] = v[:, :r]
            else:
                first_r[k] = v * r / R
        ref = _stock(_stock(patcher, first_r, 1.0), b, 0.6)
        base = capture(patcher, x, sigma, conds).out
        want = capture(ref, x, sigma, conds).out
        got = capture(ours, x, sigma, conds).out
        assert rel_l2(got - base, want - base) < TOL, (pct, r, rel_l2(got - base, want - base))
    assert len(seen) >= 3, seen  # the T-LoRA's rank really changed between the calls
    assert all(torch.equal(v, before[k]) for k, v in patcher.model.state_dict().items())
