"""What the training loop feeds the model, against ComfyUI's own samplings and formulas: EDM models (Playground 2.5,
CosXL, set up with ComfyUI's ModelSamplingContinuousEDM node) trained over their whole sigma range with the loader's
rank at every call; the real sigmas in `transformer_options["sample_sigmas"]`; the loss of each prediction type
(EPS, v-prediction, flow) against the raw model output; and 1x1 factors on a k x k conv run as the loader runs them."""

from __future__ import annotations

import pytest
import torch

from tests.comfy.test_training import ALPHA, MIN_RANK, R, _conditioning
from tools.families import FAMILIES
from tools.families.base import rel_l2

SD_TABLE_TOP = 14.61  # the SD / SDXL DDPM table's largest sigma


@pytest.fixture(scope="module")
def sd15():
    fam = FAMILIES["sd15"]
    twin = fam.build(41)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5
    return fam, twin, latent


def _train(pack, patcher, latent, positive, out, **kw):
    base = {"steps": 1, "learning_rate": 1e-3, "rank": R, "min_rank": MIN_RANK, "alpha": ALPHA, "targets": "attention",
            "seed": 5, "gradient_checkpointing": False}
    s = pack.engine.training.TrainSettings(**{**base, **kw})
    with torch.inference_mode():
        return pack.engine.training.train(patcher, [latent], positive, s, str(out))


@pytest.mark.parametrize(("sampling", "sigma_max"), [("edm_playground_v2.5", 80.0), ("v_prediction", 120.0)],
                         ids=["playground_2_5", "cosxl"])
def test_edm_models_train_over_their_whole_sigma_range(pack, tmp_path, monkeypatch, sampling, sigma_max):
    """Draws span the model's own range (the SD table stops at 14.6), and every call's timestep and rank are those
    Load T-LoRA gives the saved file at that sigma (above the SD table: t = 999, the fewest ranks)."""
    from comfy_extras.nodes_model_advanced import ModelSamplingContinuousEDM

    monkeypatch.setenv("TLORA_CACHE_DIR", str(tmp_path / "svd"))
    fam = FAMILIES["sdxl"]
    twin = fam.build(42)
    (patched,) = ModelSamplingContinuousEDM().patch(twin.patcher, sampling, sigma_max, 0.002)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(4)) * 0.5
    res = _train(pack, patched, latent, [_conditioning(fam, twin)], tmp_path / "edm.safetensors", steps=10,
                 batch_size=8)
    sigmas = [s for c in res.calls for s in c["sigma"]]
    print(f"{sampling}: {len(sigmas)} draws, sigma {min(sigmas):.4f} .. {max(sigmas):.2f} (max {sigma_max})")
    assert max(sigmas) > 0.5 * sigma_max and min(sigmas) < 0.01, (min(sigmas), max(sigmas))
    apply = pack.engine.apply
    tl = pack.tlora_core.load_tlora(res.path)
    _, app = apply.apply_tlora(patched, tl, apply.Settings(1.0, R, MIN_RANK, ALPHA))
    ms = patched.get_model_object("model_sampling")
    high = 0
    for c in res.calls:
        ts, ranks = app.state.ranks_for(torch.tensor(c["sigma"]), ms)
        assert (c["t"], c["rank"]) == (ts, ranks), (c, ts, ranks)
        high += sum(s > SD_TABLE_TOP for s in c["sigma"])
        assert all(t == 999 for s, t in zip(c["sigma"], ts, strict=True) if s > SD_TABLE_TOP)
    assert high > 0 and res.drawn == [t for c in res.calls for t in c["t"]]


def test_each_call_passes_its_real_sigmas_to_transformer_options(pack, sd15, tmp_path):
    """A wrapper of the input model sees `sample_sigmas` = the one-step schedule of the call (its sigma, then 0):
    what hook keyframes, context windows and HunyuanVideo 1.5 read, and never placeholder numbers."""
    import comfy.patcher_extension

    fam, twin, latent = sd15
    seen = []

    def record(executor, x, t, *args, **kwargs):
        opts = kwargs.get("transformer_options", args[3] if len(args) > 3 else {})
        seen.append((t.detach().float().cpu().clone(), opts["sample_sigmas"].detach().float().cpu().clone()))
        return executor(x, t, *args, **kwargs)

    patcher = twin.patcher.clone()
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_record", record)
    res = _train(pack, patcher, latent, [_conditioning(fam, twin)], tmp_path / "sigmas.safetensors", steps=3,
                 batch_size=2)
    assert len(seen) == 4  # the first call checks the model's autograd needs, then one per step
    for (t, sample_sigmas), call in zip(seen[1:], res.calls, strict=True):
        assert torch.equal(t, torch.tensor(call["sigma"]))
        want = torch.tensor(sorted(set(call["sigma"]), reverse=True) + [0.0])
        assert torch.equal(sample_sigmas, want), (sample_sigmas, want)
    assert seen[0][1][0] == seen[0][0].max() and seen[0][1][-1] == 0


def _loss_case(pack, sd15, tmp_path, sampling: str, loss_space: str = "prediction"):
    """One training step under `sampling` with a forward hook on the diffusion model: the loop's loss, the call's
    sigma, the model's raw input and output, and the training latent as the model sees it."""
    from comfy_extras.nodes_model_advanced import ModelSamplingDiscrete, ModelSamplingSD3

    fam, twin, latent = sd15
    patcher = twin.patcher
    if sampling == "v":
        (patcher,) = ModelSamplingDiscrete().patch(patcher, "v_prediction", False)
    elif sampling == "flow":
        (patcher,) = ModelSamplingSD3().patch(patcher, 3.0)
    raw = []
    hook = twin.patcher.model.diffusion_model.register_forward_hook(
        lambda _m, args, _kw, out: raw.append((args[0].detach().double(), out.detach().double())), with_kwargs=True)
    try:
        res = _train(pack, patcher, latent, [_conditioning(fam, twin)], tmp_path / f"{sampling}.safetensors",
                     loss_space=loss_space, seed=11)
    finally:
        hook.remove()
    x_in, out = raw[-1]
    sigma = float(res.calls[-1]["sigma"][0])
    x0 = twin.patcher.model.process_latent_in(latent).double()
    return res.losses[0], sigma, x_in, out, x0


@pytest.mark.parametrize("sampling", ["eps", "v", "flow"])
def test_the_loss_is_the_mse_of_the_models_own_prediction(pack, sd15, tmp_path, sampling):
    """loss_weight (1 / c_out^2) times the x0-space MSE equals the MSE of the raw model output against the target
    of its prediction type, from the closed forms: noise (EPS), v = alpha n - sigma_vp x0 (v-prediction), n - x0
    (flow, ComfyUI's CONST)."""
    loss, sigma, x_in, out, x0 = _loss_case(pack, sd15, tmp_path, sampling)
    if sampling == "flow":
        xt = x_in  # CONST: c_in = 1, x_t = sigma n + (1 - sigma) x0
        noise = (xt - (1 - sigma) * x0) / sigma
        target = noise - x0
    else:
        xt = x_in * (sigma**2 + 1) ** 0.5  # c_in = 1 / sqrt(sigma^2 + 1), x_t = x0 + sigma n
        noise = (xt - x0) / sigma
        target = noise if sampling == "eps" else (noise - sigma * x0) / (sigma**2 + 1) ** 0.5
    want = float((out - target).square().mean())
    print(f"{sampling}: sigma {sigma:.4f}, loop loss {loss:.6g}, prediction MSE {want:.6g}")
    assert abs(loss - want) <= 1e-4 * want, (loss, want)


def test_x0_loss_space_is_the_plain_denoised_mse(pack, sd15, tmp_path):
    loss, sigma, x_in, out, x0 = _loss_case(pack, sd15, tmp_path, "eps", loss_space="x0")
    denoised = x_in * (sigma**2 + 1) ** 0.5 - sigma * out  # EPS: x_t - sigma * eps
    want = float((denoised - x0).square().mean())
    assert abs(loss - want) <= 1e-4 * want, (loss, want)


def test_one_by_one_factors_on_a_kxk_conv_train_at_its_centre_tap(pack, sd15):
    """1x1 factors on a 3x3 conv (padding 1) add, in training, what the loader adds: the factors as the kernel's
    tap of index `padding` (a 3x3 kernel that is zero elsewhere), on the layer's stride."""
    import comfy.utils

    fam, twin, _ = sd15
    tr = pack.engine.training
    path = "diffusion_model.input_blocks.1.0.in_layers.2"  # the first res block's 3x3 conv
    conv = comfy.utils.get_attr(twin.patcher.model, path)
    assert conv.kernel_size == (3, 3) and conv.padding == (1, 1)
    target = pack.engine.train_targets.TrainTarget("lycoris_conv", path, f"{path}.weight", conv.out_channels,
                                                   conv.in_channels, conv=True)
    g = torch.Generator().manual_seed(1)
    u, _ = torch.linalg.qr(torch.randn(conv.out_channels, R, generator=g))
    v, _ = torch.linalg.qr(torch.randn(conv.in_channels, R, generator=g))
    module = pack.tlora_core.training.TrainableTLoRA("lycoris_conv", u, torch.ones(R), v, 1.0, conv=True)
    with torch.no_grad():
        module.q.add_(0.1 * torch.randn(module.q.shape, generator=g))
    patch = tr.TrainingPatch(twin.patcher, [target], {target.name: module}, tr.TrainSettings(rank=R, min_rank=R))
    try:
        slot = next(iter(patch.slots.values()))
        x = torch.randn(1, conv.in_channels, 8, 8, generator=g)
        with torch.no_grad():
            y = conv(x)
            got = slot(x, y) - y
            down, up_t = module.factors()
            kernel = torch.zeros(conv.out_channels, conv.in_channels, 3, 3)
            kernel[:, :, 1, 1] = up_t.T @ down
            want = torch.nn.functional.conv2d(x, kernel, stride=conv.stride, padding=conv.padding)
        assert got.shape == y.shape and rel_l2(got, want) < 1e-5, rel_l2(got, want)
    finally:
        patch.close()
