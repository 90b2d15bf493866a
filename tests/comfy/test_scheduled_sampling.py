"""Load LoRA (timestep schedule) on the sampling the model has when it samples.

ComfyUI's own ModelSampling nodes (`comfy_extras.nodes_model_advanced`) placed after the scheduled LoRA (and one
before it) change how percents map to sigmas. A window [30 %, 70 %) at constant strength is sampled by ComfyUI's
`comfy.sample.sample` (euler, normal, CFG 1; 10 steps on Flux, 4 on SDXL) on tiny Flux.1 (ModelSamplingSD3 shift 8,
ModelSamplingFlux at 2048², ModelSamplingAuraFlow) and tiny SDXL (ModelSamplingDiscrete v-prediction with zero
terminal SNR). Every call's strength (the per-call trace) must equal
  * what ComfyUI's hook keyframes (0 from 0 %, 1 from 30 %, 0 from 70 %) apply on the same model at that call,
    measured from the weight the hooks patched (W - W0 projected on the LoRA's delta), and
  * an independent computation: the call's float32 sigma against the model's own percent_to_sigma of 30 % and
    70 % (a call belongs to the first keyframe whose start sigma it has reached, as hooks decide).
Each case also checks that the sampling the node saw when it ran would have given other strengths.
"""

from __future__ import annotations

import json

import pytest
import torch

from tools import families
from tools.standard_lora import standard_lora

START, END = 0.3, 0.7
CASES = {  # family, ModelSampling nodes before the scheduled LoRA, after it, sampling steps
    "flux, ModelSamplingSD3 shift 8": ("flux", [], [("ModelSamplingSD3", {"shift": 8.0})], 10),
    "flux, ModelSamplingFlux 2048x2048": ("flux", [], [("ModelSamplingFlux", {"max_shift": 1.15, "base_shift": 0.5,
                                                                              "width": 2048, "height": 2048})], 10),
    "flux, AuraFlow 1.73 before, SD3 shift 3 after": ("flux", [("ModelSamplingAuraFlow", {"shift": 1.73})],
                                                      [("ModelSamplingSD3", {"shift": 3.0})], 10),
    "sdxl, v-prediction zsnr": ("sdxl", [], [("ModelSamplingDiscrete", {"sampling": "v_prediction", "zsnr": True})],
                                4),
}


def _f32(x) -> float:
    return float(torch.tensor(float(x), dtype=torch.float32))


@pytest.fixture(scope="module")
def setups(tmp_path_factory):
    """family -> (patcher, latent, (positive, negative), LoRA state dict, LoRA file), built once per module."""
    families.base.import_comfy()
    made: dict = {}

    def get(family: str):
        if family not in made:
            made[family] = _setup(family, tmp_path_factory.mktemp("loras"))
        return made[family]
    return get


def _setup(family: str, folder):
    from safetensors.torch import save_file

    fam = families.FAMILIES[family]
    twin = fam.build(21)
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(5))
    sd = standard_lora(twin.patcher, family, 4, 4.0)
    linear = {k.rsplit(".", 2)[0] for k, v in sd.items() if k.endswith(("lora_down.weight", "lora_A.weight"))
              and v.ndim == 2}
    sd = {k: v for k, v in sd.items() if k.rsplit(".", 2)[0] in linear or k.rsplit(".", 1)[0] in linear}
    path = folder / f"{family}_lora.safetensors"
    save_file(sd, str(path))
    g = torch.Generator().manual_seed(7)
    # the conditioning's pooled vector (and Flux's guidance), as a text encoder node hands them to the sampler
    extra = {"pooled_output": torch.randn(1, 16, generator=g), "guidance": 3.5} if family == "flux" else \
        {"pooled_output": torch.randn(1, twin.info["spec"].pooled_dim, generator=g)}
    pos, neg = ([[torch.randn(conds["c_crossattn"].shape, generator=g), dict(extra)]] for _ in range(2))
    return twin.patcher, x, (pos, neg), sd, path


def model_sampling_node(model, node: str, inputs: dict):
    """`model` through one of ComfyUI's own ModelSampling nodes."""
    import comfy_extras.nodes_model_advanced as adv

    obj = getattr(adv, node)()
    return getattr(obj, obj.FUNCTION)(model, **inputs)[0]


def sample(model, x, conds, steps: int, sampler: str = "euler", scheduler: str = "normal"):
    import comfy.sample

    noise = torch.randn(x.shape, generator=torch.Generator().manual_seed(0))
    return comfy.sample.sample(model, noise, steps, 1.0, sampler, scheduler, conds[0], conds[1], torch.zeros_like(x),
                               denoise=1.0, disable_pbar=True, seed=0)


def _probe(patcher, sd) -> tuple[str, torch.Tensor]:
    """(ComfyUI weight key, the LoRA's delta at strength 1) of one LoRA'd Linear that is a whole weight."""
    import comfy.lora

    for name, key in comfy.lora.model_lora_keys_unet(patcher.model, {}).items():
        for a, b in (("lora_down", "lora_up"), ("lora_A", "lora_B")):
            down = sd.get(f"{name}.{a}.weight")
            if isinstance(key, str) and down is not None and down.ndim == 2:
                return key, sd[f"{name}.{b}.weight"] @ down * (float(sd[f"{name}.alpha"]) / down.shape[0])
    raise AssertionError("no Linear LoRA module to probe")


def hook_keyframe_strengths(model, x, conds, sd, steps: int) -> list[tuple[float, float]]:
    """(sigma, strength) of every call of a sampling with the LoRA on ComfyUI's hook keyframes (0 from 0 %, 1 from
    START, 0 from END): the strength is read from the weight the hooks patched for the call."""
    import comfy.hooks
    import comfy.patcher_extension
    import comfy.utils

    key, delta = _probe(model, sd)
    w0 = comfy.utils.get_attr(model.model, key).detach().float().clone()
    hooks = comfy.hooks.create_hook_lora(sd, 1.0, 0.0)
    kf = comfy.hooks.HookKeyframeGroup()
    for strength, pct in ((0.0, 0.0), (1.0, START), (0.0, END)):
        kf.add(comfy.hooks.HookKeyframe(strength, pct))
    hooks.set_keyframes_on_hooks(kf)
    hooked = tuple(comfy.hooks.set_conds_props(conds=[c], strength=1.0, set_cond_area="default", hooks=hooks)[0]
                   for c in conds)
    seen = []

    def probe(executor, xx, t, *args, **kwargs):
        w = comfy.utils.get_attr(executor.class_obj, key).detach().float()
        seen.append((float(t.reshape(-1)[0]), float(((w - w0) * delta).sum() / (delta * delta).sum())))
        return executor(xx, t, *args, **kwargs)

    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_probe", probe)
    sample(m, x, hooked, steps)
    return seen


def traced(path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def window(ms, sigma: float) -> float:
    """The hook keyframe rule for the window, from the model's own percent_to_sigma (float32, as the sampler's
    sigmas are): 1 from the call that reaches START's sigma until the call that reaches END's."""
    return 1.0 if _f32(ms.percent_to_sigma(END)) < sigma <= _f32(ms.percent_to_sigma(START)) else 0.0


@pytest.mark.parametrize("case", list(CASES))
def test_every_call_gets_the_strength_hook_keyframes_give_on_the_sampling_that_runs(pack, setups, case, tmp_path,
                                                                                     monkeypatch):
    family, before, after, steps = CASES[case]
    patcher, x, conds, sd, path = setups(family)
    model = patcher
    for node, inputs in before:
        model = model_sampling_node(model, node, inputs)
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("TLORA_TRACE", str(trace))
    curve = pack.tlora_core.strength.StrengthCurve(START, END, 1.0, 1.0, "constant")
    ours, _ = pack.engine.scheduled.apply_scheduled_lora(model, pack.engine.scheduled.read_lora(str(path)), 1.0,
                                                         curve)
    seen_by_node = model.get_model_object("model_sampling")
    hooked_model = model
    for node, inputs in after:
        ours = model_sampling_node(ours, node, inputs)
        hooked_model = model_sampling_node(hooked_model, node, inputs)
    ms = ours.get_model_object("model_sampling")
    sample(ours, x, conds, steps)
    calls = traced(trace)
    hooks = hook_keyframe_strengths(hooked_model, x, conds, sd, steps)
    assert len(calls) == len(hooks) == steps, (len(calls), len(hooks))
    got = [(c["sigma"][0], c["strength"]) for c in calls]
    for (sigma, strengths), (hook_sigma, hook_s) in zip(got, hooks, strict=True):
        assert sigma == hook_sigma and len(set(strengths)) == 1, (sigma, hook_sigma, strengths)
        assert strengths[0] == pytest.approx(hook_s, abs=1e-4), (case, sigma, strengths[0], hook_s)
        assert strengths[0] == window(ms, sigma), (case, sigma, strengths[0])
    on = [s[0] for _, s in got]
    assert 0.0 in on and 1.0 in on, on  # the window is inside the sampling
    stale = [window(seen_by_node, s) for s, _ in got]
    assert stale != on, f"{case}: the node's own sampling gives the same strengths; the case proves nothing"


def shift8_percent(sigma: float) -> float:
    """The percent of a sigma under ModelSamplingSD3 shift 8 (sigma = 8 t / (1 + 7 t), t = 1 - percent)."""
    return 1.0 - sigma / (8.0 - 7.0 * sigma)


def test_a_fade_follows_the_shift_and_the_preview_shows_the_calls_strengths(pack, setups, tmp_path, monkeypatch):
    """A linear fade 0 -> 1 from 20 % to the end, ModelSamplingSD3 shift 8 after the node: each call's strength is
    (p - 0.2) / 0.8 at the call's percent under shift 8 (inverted in closed form here), and the schedule preview
    given that model shows the same strength for each call and shift 8's sigmas on its axis."""
    patcher, x, conds, sd, path = setups("flux")
    trace = tmp_path / "trace.jsonl"
    monkeypatch.setenv("TLORA_TRACE", str(trace))
    curve = pack.tlora_core.strength.StrengthCurve(0.2, 1.0, 0.0, 1.0, "linear")
    ours, _ = pack.engine.scheduled.apply_scheduled_lora(patcher, pack.engine.scheduled.read_lora(str(path)), 0.8,
                                                         curve)
    ours = model_sampling_node(ours, "ModelSamplingSD3", {"shift": 8.0})
    sample(ours, x, conds, 6, "heun", "simple")
    calls = traced(trace)
    assert len(calls) == 2 * 6 - 1
    sigmas = [c["sigma"][0] for c in calls]
    for sigma, s in zip(sigmas, (c["strength"][0] for c in calls), strict=True):
        p = shift8_percent(sigma)
        assert s == pytest.approx(max(0.0, (p - 0.2) / 0.8), abs=1e-6), (sigma, p, s)
    assert sum(c["strength"][0] > 0 for c in calls) >= 4 and calls[0]["strength"][0] == 0.0
    [series] = pack.nodes.preview.strength_series(ours, sigmas)
    assert [r["sigma"] for r in series["calls"]] == sigmas
    for row, c in zip(series["calls"], calls, strict=True):
        assert row["strength"] == pytest.approx(0.8 * c["strength"][0], abs=1e-9), (row, c)
        assert row["percent"] == pytest.approx(shift8_percent(row["sigma"]), abs=1e-6), row
    ticks = dict(series["sigma_ticks"])
    for p in (0.25, 0.5, 0.75):
        assert ticks[p] == pytest.approx(8 * (1 - p) / (1 + 7 * (1 - p)), rel=1e-6), ticks


def test_the_sampling_that_runs_is_announced_once_per_run(pack, setups):
    """`on_sampling` (the node sends its curve's sigma labels from it) gets, once per sampling run, the very
    model_sampling object each model call of that run uses, also when the same cached objects sample again."""
    import comfy.patcher_extension

    patcher, x, conds, sd, path = setups("flux")
    curve = pack.tlora_core.strength.StrengthCurve(0.5, 1.0, 1.0, 1.0, "constant")
    announced = []
    ours, _ = pack.engine.scheduled.apply_scheduled_lora(patcher, pack.engine.scheduled.read_lora(str(path)), 1.0,
                                                         curve, on_sampling=announced.append)
    used = []
    ours = model_sampling_node(ours, "ModelSamplingSD3", {"shift": 8.0})
    ours.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_probe",
                              lambda ex, *a, **k: used.append(ex.class_obj.model_sampling) or ex(*a, **k))
    for _ in range(2):
        sample(ours, x, conds, 2)
    ms = ours.get_model_object("model_sampling")
    assert announced == [ms, ms] and all(u is ms for u in announced)
    assert len(used) == 4 and all(u is ms for u in used)
    assert ms is not patcher.get_model_object("model_sampling")
