"""Base-mismatch detection: a LyCORIS T-LoRA applied to a checkpoint other than the one it was trained on.

In-process: the figure of `tlora_core.diagnostics.alignment` measured on the right base, the right base in
bf16, a lightly fine-tuned copy, heavier changes and another seed (numbers in the module doc of
tlora_core/diagnostics.py). Over the real server: one warning line for a mismatched file, none for the right one.
"""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from tests.reliability import helpers as h
from tlora_core import diagnostics, load_tlora
from tlora_core.svd import top_singular
from tools import tiny_models as tm

RANK, LINEAR_ALPHA = 8, 4


def _diffusers_unet(tiny, seed: int | None = None):
    from diffusers import UNet2DConditionModel

    if seed is None:
        return UNet2DConditionModel.from_pretrained(str(tiny["sdxl"]["diffusers_dir"]), torch_dtype=torch.float32)
    spec, _ = tm.SDXL_VARIANTS["koala"]
    with torch.device("meta"):
        unet = UNet2DConditionModel(**spec.diffusers_config())
    return tm.fill_random_(unet, seed, torch.float16)


def _linears(unet) -> dict[str, torch.Tensor]:
    """LyCORIS module name -> weight of every Linear of a diffusers UNet."""
    return {"lycoris_" + n.replace(".", "_"): m.weight.detach().clone() for n, m in unet.named_modules()
            if isinstance(m, torch.nn.Linear)}


def _noisy(weights: dict, rel: float, seed: int = 9) -> dict:
    """A 'fine-tuned' copy: each weight plus Gaussian noise of `rel` times its own std."""
    g = torch.Generator().manual_seed(seed)
    return {n: w + rel * w.std() * torch.randn(w.shape, generator=g) for n, w in weights.items()}


def _merged(weights: dict, rel: float, seed: int = 5, r: int = 4) -> dict:
    """A 'merge': each weight plus a random rank-r update of `rel` times its norm."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for n, w in weights.items():
        d = torch.randn(w.shape[0], r, generator=g) @ torch.randn(r, w.shape[1], generator=g)
        out[n] = w + rel * w.norm() / d.norm() * d
    return out


def _triplets(tl, weights: dict) -> dict:
    return {n: top_singular(weights[n], a.rank) for n, a in tl.modules.items()}


def _figure(tl, weights: dict) -> diagnostics.Alignment:
    return diagnostics.alignment(tl.modules, _triplets(tl, weights))


def _delta_error(tl, right: dict, other: dict) -> float:
    """Relative change of the full-rank delta when the SVD base (triplets) comes from `other`, not `right`."""
    num = den = 0.0
    for n, a in tl.modules.items():
        ref = a.with_base(*right[n]).delta_weight(a.rank)
        got = a.with_base(*other[n]).delta_weight(a.rank)
        num += float((got - ref).square().sum())
        den += float(ref.square().sum())
    return (num / den) ** 0.5


@pytest.fixture(scope="module")
def measured(tiny, sdxl_tlora_file):
    """Figures for the session's SDXL T-LoRA (LyCORIS on the tiny SDXL's weights, factors perturbed 0.5)."""
    tl = load_tlora(sdxl_tlora_file)
    right = _linears(_diffusers_unet(tiny))
    assert set(tl.modules) <= set(right)
    right = {n: right[n] for n in tl.modules}
    other = {n: w for n, w in _linears(_diffusers_unet(tiny, seed=123)).items() if n in tl.modules}
    bases = {"right": right, "right_bf16": {n: w.bfloat16().float() for n, w in right.items()},
             "noise_1pct": _noisy(right, 0.01), "noise_10pct": _noisy(right, 0.10),
             "merge_10pct": _merged(right, 0.10), "other_seed": other}
    trip = {k: _triplets(tl, w) for k, w in bases.items()}
    figs = {k: diagnostics.alignment(tl.modules, t) for k, t in trip.items()}
    errs = {k: _delta_error(tl, trip["right"], trip[k]) for k in ("noise_1pct", "noise_10pct", "other_seed")}
    print({k: round(f.figure, 3) for k, f in figs.items()}, {k: round(e, 3) for k, e in errs.items()})
    return figs, errs


def test_right_base_is_aligned_with_margin(measured):
    figs, _ = measured
    for k in ("right", "right_bf16"):
        assert figs[k].layers == 110
        assert figs[k].figure > diagnostics.RELATED_BELOW + 0.05, (k, figs[k].figure)
        assert figs[k].verdict == "ok"
        # not just the median: nearly every layer is aligned
        assert sum(v < diagnostics.RELATED_BELOW for v in figs[k].per_layer.values()) <= 2


def test_other_checkpoint_is_detected_with_margin(measured):
    figs, errs = measured
    for k in ("other_seed", "merge_10pct"):
        assert figs[k].figure < diagnostics.DIFFERENT_BELOW - 0.3, (k, figs[k].figure)
        assert figs[k].verdict == "different"
    assert errs["other_seed"] > 1.0  # the delta is a different one altogether


def test_lightly_fine_tuned_checkpoint(measured):
    """A 1% fine-tune is indistinguishable from the right base (and changes the delta by only a few %);
    a 10% one is flagged as a changed relative of the checkpoint."""
    figs, errs = measured
    assert abs(figs["noise_1pct"].figure - figs["right"].figure) < 0.01
    assert figs["noise_1pct"].verdict == "ok" and errs["noise_1pct"] < 0.12
    assert figs["noise_10pct"].verdict == "related", figs["noise_10pct"].figure
    assert errs["noise_10pct"] > 0.2


def test_alignment_ignores_training_drift(tiny, tmp_path):
    """Factors trained far from their init (cos(q_i, v_i) ~ 0.7) still read as the right base."""
    unet = _diffusers_unet(tiny)
    right = _linears(unet)
    path = tmp_path / "drifted.safetensors"
    tm.write_lycoris_tlora(unet, path, RANK, LINEAR_ALPHA, seed=3, strength=1.0).restore()
    tl = load_tlora(path)
    n = sorted(tl.modules)[0]
    u, s, v = top_singular(right[n], RANK)
    a = tl.modules[n]
    cos = torch.nn.functional.cosine_similarity(a.down.float(), v.T, dim=1).abs()
    assert float(cos.median()) < 0.8  # really drifted
    assert _figure(tl, {k: right[k] for k in tl.modules}).verdict == "ok"


def test_alignment_of_official_or_untrained_modules():
    """Untrained factors (exactly the init) give 1; no triplets -> 1 over 0 layers, verdict ok."""
    g = torch.Generator().manual_seed(0)
    w = torch.randn(24, 16, generator=g)
    u, s, v = top_singular(w, 4)
    from tlora_core.adapter import ORTHO, ModuleAdapter

    a = ModuleAdapter(name="m", kind=ORTHO, up=u.clone(), down=v.T.clone(), lam=s.clone(), svd_base=True)
    al = diagnostics.alignment({"m": a}, {"m": (u, s, v)})
    assert al.figure == pytest.approx(1.0) and al.verdict == "ok"
    assert diagnostics.mismatch_message("x", al) is None
    empty = diagnostics.alignment({}, {})
    assert empty.layers == 0 and empty.verdict == "ok"
    # rotated factors: the same span, wrong partners -> not aligned
    perm = torch.tensor([1, 2, 3, 0])
    b = ModuleAdapter(name="m", kind=ORTHO, up=u[:, perm].clone(), down=v.T[perm].clone(), lam=s.clone(),
                      svd_base=True)
    assert diagnostics.alignment({"m": b}, {"m": (u, s, v)}).verdict == "different"


# --- over the real server ------------------------------------------------------------------------

def _warnings(log: str) -> list[str]:
    return [ln for ln in log.splitlines() if "trained on a different" in ln]


def _figure_logged(log: str, name: str) -> float:
    m = re.findall(rf"T-LoRA {re.escape(name)}: SVD base .* alignment with the trained factors ([0-9.]+)", log)
    assert m, log[-3000:]
    return float(m[-1])


@pytest.fixture(scope="module")
def mismatched_files(tiny, tmp_path_factory) -> dict[str, Path]:
    """T-LoRAs trained (LyCORIS) on another seed's SDXL and on the SDXL + 10% noise, same architecture."""
    d = tmp_path_factory.mktemp("mismatch")
    out = {}
    other = _diffusers_unet(tiny, seed=123)
    out["other_seed"] = d / "tlora_other_seed.safetensors"
    tm.write_lycoris_tlora(other, out["other_seed"], RANK, LINEAR_ALPHA, seed=1, strength=0.5).restore()
    tuned = _diffusers_unet(tiny)
    with torch.no_grad():
        g = torch.Generator().manual_seed(9)
        for m in tuned.modules():
            if isinstance(m, torch.nn.Linear):
                m.weight.add_(0.10 * m.weight.std() * torch.randn(m.weight.shape, generator=g))
    out["noise_10pct"] = d / "tlora_finetuned.safetensors"
    tm.write_lycoris_tlora(tuned, out["noise_10pct"], RANK, LINEAR_ALPHA, seed=1, strength=0.5).restore()
    return out


def test_server_warns_once_for_a_tlora_of_another_checkpoint(server, tiny, base_latent, mismatched_files):
    name = "tlora_other_seed.safetensors"
    with h.in_loras(server, {name: mismatched_files["other_seed"]}):
        start = h.log_len(server)
        out = h.sample(server, h.graph(tiny, chains=[[h.tlora(name)]]))  # a warning, not an error
        log = h.log_since(server, start)
    warns = _warnings(log)
    assert len(warns) == 1, warns
    (w,) = warns
    assert name in w and "different base checkpoint" in w and "load the checkpoint it was trained on" in w, w
    fig = float(re.search(r"alignment ([0-9.]+) < ", w).group(1))
    assert fig < diagnostics.DIFFERENT_BELOW and fig == pytest.approx(_figure_logged(log, name), abs=0.006)
    assert not h.same(out, base_latent["sdxl"])


def test_server_warns_for_a_heavily_fine_tuned_checkpoint(server, tiny, mismatched_files):
    name = "tlora_finetuned.safetensors"
    with h.in_loras(server, {name: mismatched_files["noise_10pct"]}):
        start = h.log_len(server)
        h.sample(server, h.graph(tiny, chains=[[h.tlora(name)]]))
        log = h.log_since(server, start)
    warns = _warnings(log)
    assert len(warns) == 1 and "different version of this checkpoint" in warns[0], warns
    fig = _figure_logged(log, name)
    assert diagnostics.DIFFERENT_BELOW <= fig < diagnostics.RELATED_BELOW, fig


def test_server_is_silent_for_the_right_checkpoint(server, tiny, tlora_latent):
    name = Path(h.SDXL_LORA).name
    start = h.log_len(server)
    # sliders: another schedule than the cached reference, so the loader really runs again
    h.sample(server, h.graph(tiny, chains=[[h.tlora(h.SDXL_LORA, schedule_source="sliders")]]))
    log = h.log_since(server, start)
    assert not _warnings(log), _warnings(log)
    assert _figure_logged(log, name) > diagnostics.RELATED_BELOW


# --- the thresholds on models they were not calibrated on -----------------------------------------------------

@pytest.mark.parametrize("family", ["sd15", "flux", "wan21", "qwen_image", "hunyuan_video15"])
def test_thresholds_hold_on_other_families(tmp_path, family):
    """The thresholds were calibrated on the tiny SDXL (module doc of tlora_core/diagnostics.py). On other families
    and seeds, with LyCORIS files written on them: the right checkpoint and its fp8-rounded copy read as the right
    one, another seed of the same architecture as another checkpoint."""
    from tools.families import FAMILIES

    fam = FAMILIES[family]
    right_twin, other_twin = fam.build(5), fam.build(6)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    tm.write_lycoris_tlora(right_twin.diffusers, path, RANK, LINEAR_ALPHA, targets=fam.targets, seed=3,
                           strength=0.5).restore()
    tl = load_tlora(path)
    right = {n: w for n, w in _linears(right_twin.diffusers).items() if n in tl.modules}
    other = {n: w for n, w in _linears(other_twin.diffusers).items() if n in tl.modules}
    assert set(right) == set(tl.modules) == set(other)
    figs = {"right": _figure(tl, right), "other_seed": _figure(tl, other),
            "right_fp8": _figure(tl, {n: w.to(torch.float8_e4m3fn).float() for n, w in right.items()})}
    print(family, {k: round(f.figure, 3) for k, f in figs.items()})
    assert figs["right"].verdict == figs["right_fp8"].verdict == "ok", figs
    assert figs["other_seed"].verdict == "different", figs
    assert figs["right_fp8"].figure > diagnostics.RELATED_BELOW + 0.03 and figs["other_seed"].figure < 0.3
