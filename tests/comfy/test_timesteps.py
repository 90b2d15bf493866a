"""Which trainer timestep each ComfyUI sampling gives, beyond the plain discrete and flow models of the families
tier: EDM samplings (CosXL, Playground 2.5), discrete EDM, distilled (LCM) timesteps, and samplings whose trainer
timestep is unknown (never all ranks silently: a clear error at load, before the model is touched)."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from tools.families import FAMILIES

R, MIN_RANK, ALPHA = 16, 2, 1.0


@pytest.fixture(scope="module")
def sdxl():
    return FAMILIES["sdxl"].build(0).patcher


@pytest.fixture(scope="module")
def tlora(pack, tmp_path_factory):
    """A small official-vanilla SDXL file (no SVD base needed: these tests are about timesteps)."""
    from tools import tiny_models as tm

    twin = FAMILIES["sdxl"].build(0)
    path = tmp_path_factory.mktemp("ts") / "official.safetensors"
    tm.write_official_sdxl(twin.diffusers, path, R, ortho=False, seed=1)
    return pack.tlora_core.load_tlora(path)


def sd_ddpm_sigmas() -> np.ndarray:
    """The SD/SDXL training sigmas (scaled-linear betas 0.00085..0.012), computed without ComfyUI."""
    betas = np.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=np.float64) ** 2
    acp = np.cumprod(1 - betas)
    return np.sqrt((1 - acp) / acp)


def with_sampling(patcher, base_name: str, kind_name: str, **params):
    """A clone whose model_sampling is ComfyUI's `base_name` x `kind_name` class (what the ModelSampling* nodes do)."""
    import comfy.model_sampling as ms

    class Sampling(getattr(ms, base_name), getattr(ms, kind_name)):
        pass

    sampling = Sampling(patcher.model.model_config)
    if params:
        sampling.set_parameters(**params)
    clone = patcher.clone()
    clone.add_object_patch("model_sampling", sampling)
    return clone


def ranks(pack, patcher, tl, sigmas, mode="auto"):
    apply = pack.engine.apply
    clone, app = apply.apply_tlora(patcher, tl, apply.Settings(1.0, R, MIN_RANK, ALPHA, mode))
    ms = clone.get_model_object("model_sampling")
    return [app.state.ranks_for(torch.tensor([s]), ms) for s in sigmas]


@pytest.mark.parametrize(("kind", "params"), [
    ("V_PREDICTION", {"sigma_min": 0.002, "sigma_max": 120.0, "sigma_data": 1.0}),  # CosXL
    ("EDM", {"sigma_min": 0.002, "sigma_max": 80.0, "sigma_data": 0.5}),  # Playground 2.5
])
def test_continuous_edm_uses_the_ddpm_timestep_of_the_same_noise_level(pack, sdxl, tlora, kind, params):
    """SimpleTuner trains these SDXL-architecture models as DDPM models: t is the SD/SDXL DDPM timestep whose
    noise level (sigma) is nearest, in log space; beyond the table's ends, 999 and 0."""
    model = with_sampling(sdxl, "ModelSamplingContinuousEDM", kind, **params)
    table = sd_ddpm_sigmas()
    sigmas = [100.0, 14.0, 3.0, 1.0, 0.3, 0.05, 0.003]
    got = ranks(pack, model, tlora, sigmas)
    for s, (ts, rs) in zip(sigmas, got, strict=True):
        t = int(np.abs(np.log(table) - math.log(s)).argmin())
        assert ts == [t] and rs == [pack.tlora_core.active_rank(t, R, MIN_RANK, ALPHA)], (s, ts, t)
    assert got[0][1] == [MIN_RANK] and got[-1][1] == [R]  # noise: few ranks; clean: all


def test_discrete_edm_timesteps_come_from_the_sigma_table(pack, sdxl, tlora):
    """ModelSamplingDiscreteEDM's timestep() is 0.25 log(sigma); the trainer's t is still the table index."""
    model = with_sampling(sdxl, "ModelSamplingDiscreteEDM", "EPS")
    ms = model.get_model_object("model_sampling")
    for t in (999, 600, 250, 1):
        sigma = float(ms.sigmas[t])
        (ts, rs), = ranks(pack, model, tlora, [sigma])
        assert ts == [t] and rs == [pack.tlora_core.active_rank(t, R, MIN_RANK, ALPHA)]


def test_distilled_lcm_timesteps_are_the_models_own(pack, sdxl, tlora):
    """LCM's distilled sampling keeps 50 of the 1000 DDPM timesteps, every 20th ending at 999 (LCMScheduler's
    `original_inference_steps=50`: t_i = 20 (i + 1) - 1): its i-th sigma is the trainer's timestep t_i."""
    from comfy_extras.nodes_model_advanced import LCM, ModelSamplingDiscreteDistilled

    class Distilled(ModelSamplingDiscreteDistilled, LCM):  # what ComfyUI's ModelSamplingDiscrete node builds for lcm
        pass

    sampling = Distilled(sdxl.model.model_config)
    model = sdxl.clone()
    model.add_object_patch("model_sampling", sampling)
    for i in (0, 10, 49):
        sigma = sampling.sigmas[i:i + 1]
        (ts, _), = ranks(pack, model, tlora, [float(sigma)])
        assert ts == [20 * (i + 1) - 1], (i, ts)  # original timesteps, not 0..49


@pytest.mark.parametrize(("base", "kind"), [("StableCascadeSampling", "EPS"),
                                            ("ModelSamplingCosmosRFlow", "COSMOS_RFLOW")])
def test_unknown_sampling_is_a_clear_error_before_anything_changes(pack, sdxl, tlora, base, kind):
    import comfy.model_sampling as ms

    if not hasattr(ms, base) or not hasattr(ms, kind):
        pytest.fail(f"this ComfyUI lacks {base}/{kind}")
    model = with_sampling(sdxl, base, kind)
    injections = dict(model.injections)
    with pytest.raises(pack.tlora_core.TLoRAError) as e:
        ranks(pack, model, tlora, [1.0])
    msg = str(e.value)
    assert "official.safetensors" in msg and base in msg and "timestep_mode" in msg, msg
    assert dict(model.injections) == injections
    (ts, _), = ranks(pack, model, tlora, [0.5], mode="flow")  # said explicitly: the user's choice is used
    assert ts == [500]


def test_discrete_mode_on_a_flow_model_is_a_clear_error(pack, tlora):
    flux = FAMILIES["flux"].build(0).patcher
    with pytest.raises(pack.tlora_core.TLoRAError, match="discrete"):
        ranks(pack, flux, tlora, [0.5], mode="discrete")


def test_minimax_t_loras_are_refused_in_auto_with_what_to_do(pack, sdxl, tlora):
    """SimpleTuner trains MiniMax H3 / Music 3 T-LoRAs with t = 1 - sigma against T = 1000 (every rank at every
    step): `auto` refuses them, naming the fix; `all_ranks` (min_rank = max_rank) runs them as trained."""
    original = type(sdxl.model)

    class MiniMaxH3(original):  # stands for ComfyUI 0.33's MiniMaxH3 model class, matched by name
        pass

    model = sdxl.clone()
    model.model.__class__ = MiniMaxH3
    try:
        with pytest.raises(pack.tlora_core.TLoRAError, match="t = 1 - sigma.*all_ranks"):
            ranks(pack, model, tlora, [0.5])
        apply = pack.engine.apply
        clone, app = apply.apply_tlora(model, tlora, apply.Settings(1.0, R, R, 1.0))
        assert app.state.ranks_for(torch.tensor([14.6, 0.03]), model.model.model_sampling)[1] == [R, R]
    finally:
        model.model.__class__ = original
