"""Train T-LoRA's previews on the tiny SD1.5 with the tiny VAE: the previews of steps k, 2k, 3k are what Load T-LoRA
renders with that step's file through ComfyUI's sampler (latents and decoded images); training with previews trains
exactly what training without them trains; an interrupt during a preview keeps the last checkpoint and leaves the
model as it was; the grid and the files beside the checkpoints; the loss per noise band."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from tests.comfy.test_training import ALPHA, MIN_RANK, R, _conditioning
from tools.families import FAMILIES
from tools.families.base import rel_l2

K = 2  # preview every K steps
PREVIEW = {"seed": 5, "steps": 3, "cfg": 3.0, "sampler": "euler", "scheduler": "normal"}


@pytest.fixture(scope="module")
def sd15(tiny):
    import comfy.sd
    import comfy.utils

    fam = FAMILIES["sd15"]
    twin = fam.build(61)
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5
    vae = comfy.sd.VAE(sd=comfy.utils.load_torch_file(str(tiny["vae"]["vae_4ch"])))
    prompts = [_conditioning(fam, twin, 0), _conditioning(fam, twin, 7)]  # the caption, and another prompt
    return fam, twin, latent, vae, prompts


def _settings(pack, **kw):
    base = {"steps": 3 * K, "learning_rate": 2e-2, "rank": R, "min_rank": MIN_RANK, "alpha": ALPHA,
            "targets": "attention", "seed": 9, "gradient_checkpointing": True, "batch_size": 2}
    return pack.engine.training.TrainSettings(**{**base, **kw})


def _previewer(pack, sd15, **kw):
    _, _, _, vae, prompts = sd15
    tr = pack.engine.training
    return tr.Previewer(tr.PreviewSettings(vae, prompts, every=K, **{**PREVIEW, **kw}))


def _train(pack, sd15, out, s, preview=None, progress=None, patcher=None):
    fam, twin, latent, _, prompts = sd15
    with torch.inference_mode():
        return pack.engine.training.train(patcher or twin.patcher, [latent], [prompts[0]], s, str(out),
                                          preview=preview, progress=progress)


@pytest.fixture(scope="module")
def previewed(pack, sd15, tmp_path_factory):
    d = tmp_path_factory.mktemp("preview")
    pv = _previewer(pack, sd15)
    res = _train(pack, sd15, d / "run.safetensors", _settings(pack), pv)
    return {"dir": d, "res": res, "pv": pv}


def test_previews_equal_load_tlora_on_each_steps_file(pack, sd15, previewed):
    """At steps k, 2k, 3k the preview latents are Load T-LoRA's on the checkpoint of that step (KSampler's noise,
    sampler, steps and CFG; zeroed-out negative) within fp32 round-off, and so are the decoded images; the previews
    change as the T-LoRA trains and differ from the base model's."""
    import comfy.sample

    _, twin, latent, vae, prompts = sd15
    res, pv, d = previewed["res"], previewed["pv"], previewed["dir"]
    assert [s for s, _ in pv.latents] == [K, 2 * K, 3 * K]
    files = [d / f"run_step{K}.safetensors", d / f"run_step{2 * K}.safetensors", d / "run.safetensors"]
    assert res.checkpoints == [str(f) for f in files[:2]]
    apply, zero = pack.engine.apply, pack.engine.training.preview.zeroed(prompts[0])
    noise = comfy.sample.prepare_noise(latent, PREVIEW["seed"])
    worst_latent = worst_image = 0.0
    base = []
    for (step, ours), (_, images), path in zip(pv.latents, pv.rows, files, strict=True):
        clone, _ = apply.apply_tlora(twin.patcher, pack.tlora_core.load_tlora(str(path)),
                                     apply.Settings(1.0, R, MIN_RANK, ALPHA))
        for i, prompt in enumerate(prompts):
            with torch.no_grad():
                want = comfy.sample.sample(clone, noise, PREVIEW["steps"], PREVIEW["cfg"], PREVIEW["sampler"],
                                           PREVIEW["scheduler"], prompt, zero, torch.zeros_like(latent),
                                           seed=PREVIEW["seed"], disable_pbar=True)
                image = vae.decode(want)
                if step == K:
                    base.append(comfy.sample.sample(twin.patcher, noise, PREVIEW["steps"], PREVIEW["cfg"],
                                                    PREVIEW["sampler"], PREVIEW["scheduler"], prompt, zero,
                                                    torch.zeros_like(latent), seed=PREVIEW["seed"],
                                                    disable_pbar=True))
            worst_latent = max(worst_latent, rel_l2(ours[i:i + 1], want))
            worst_image = max(worst_image, float((images[i] - image[0].clamp(0, 1)).abs().max()))
    print(f"preview vs Load T-LoRA: latents rel {worst_latent:.1e}, images max abs {worst_image:.1e}")
    assert worst_latent < 1e-5 and worst_image < 1e-4, (worst_latent, worst_image)
    first, last = pv.latents[0][1], pv.latents[-1][1]
    assert rel_l2(first, last) > 1e-3, "the previews did not change as the T-LoRA trained"
    assert min(rel_l2(first[i:i + 1], base[i]) for i in range(2)) > 1e-4, "the previews show the base model"


def test_training_with_previews_equals_training_without(pack, sd15, previewed, tmp_path):
    """Same losses, same draws and the same factors (1e-6) as a run without previews, and no preview call recorded
    as a training call."""
    res = previewed["res"]
    plain = _train(pack, sd15, tmp_path / "plain.safetensors", _settings(pack))
    assert plain.losses == res.losses and plain.drawn == res.drawn and plain.sample_losses == res.sample_losses
    worst = 0.0
    for name, m in plain.modules.items():
        for a, b in zip((f.detach() for f in m.factors()), (f.detach() for f in res.modules[name].factors()),
                        strict=True):
            worst = max(worst, float((a - b).abs().max() / b.abs().max()))
    print(f"factors with vs without previews: {worst:.1e}")
    assert worst <= 1e-6, worst
    assert len(res.calls) == len(plain.calls)  # the preview's model calls are not recorded as training calls


def test_the_grid_and_the_images_beside_the_checkpoints(pack, previewed):
    """One row per preview step (its step written above it), one column per prompt; each step's row saved as
    `<file>.preview.png` beside its checkpoint and the final file."""
    from PIL import Image

    pv, d, res = previewed["pv"], previewed["dir"], previewed["res"]
    label = pack.engine.training.preview.LABEL_H
    _, h, w, _ = pv.rows[0][1].shape
    grid = pv.grid()
    assert grid.shape == (1, 3 * (h + label), 2 * w, 3), grid.shape
    names = [f"run_step{K}.preview.png", f"run_step{2 * K}.preview.png", "run.preview.png"]
    assert res.previews == [str(d / n) for n in names]
    for n, (_, images) in zip(names, pv.rows, strict=True):
        saved = torch.from_numpy(np.asarray(Image.open(d / n), dtype="float32") / 255)
        assert saved.shape == (h + label, 2 * w, 3)
        assert (saved[label:] - torch.cat(list(images), dim=1)).abs().max() <= 1 / 255 + 1e-6
        assert saved[:label].max() > 0.5  # the step's label is drawn
    row = grid[0, : h + label]
    assert torch.allclose(row[label:, :w], pv.rows[0][1][0])


def test_an_interrupt_during_a_preview_stops_cleanly(pack, sd15, tmp_path):
    """Interrupted in the previews of step 2k: the checkpoints of k and 2k are kept with their states (the preview of
    k beside its own), no final file, and the model is as it was (no slots, flags and ComfyUI's training flag)."""
    import comfy.model_management as mm
    import comfy.patcher_extension

    _, twin, *_ = sd15
    armed, seen = [False], []

    def interrupt_in_preview(executor, x, t, *args, **kwargs):
        if armed[0] and not torch.is_grad_enabled():
            seen.append(float(t.reshape(-1)[0]))
            mm.interrupt_current_processing(True)
        return executor(x, t, *args, **kwargs)

    def arm(step, total, loss):
        armed[0] = step == 2 * K

    patcher = twin.patcher.clone()
    patcher.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test_interrupt",
                                 interrupt_in_preview)
    flags = [p.requires_grad for p in twin.patcher.model.parameters()]
    in_training = getattr(mm, "in_training", None)
    out = tmp_path / "stopped.safetensors"
    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(pack, sd15, out, _settings(pack, batch_size=1), _previewer(pack, sd15, steps=2), progress=arm,
                   patcher=patcher)
    finally:
        mm.interrupt_current_processing(False)
    assert len(seen) == 1  # stopped in the first model call of the preview
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"stopped_step{n}.{ext}" for n in (K, 2 * K) for ext in ("lycoris_config.json", "safetensors", "train_state")]
        + [f"stopped_step{K}.preview.png"])
    dm = twin.patcher.model.diffusion_model
    assert not [n for n, m in dm.named_modules() if m.__dict__.get("_tlora_slots") or "forward" in m.__dict__]
    assert [p.requires_grad for p in twin.patcher.model.parameters()] == flags
    assert getattr(mm, "in_training", None) == in_training


def test_the_loss_per_noise_band(pack, previewed):
    """Each sample's loss (their mean per step is the step's loss) lands in the band of its own timestep; the band
    plot is an IMAGE."""
    bands = pack.engine.training.bands
    res = previewed["res"]
    s = _settings(pack)
    assert len(res.sample_losses) == len(res.drawn) == s.steps * s.batch_size
    for i, loss in enumerate(res.losses):
        mine = res.sample_losses[i * s.batch_size:(i + 1) * s.batch_size]
        assert abs(sum(mine) / len(mine) - loss) <= 1e-6 * abs(loss), (i, mine, loss)
    split = bands.split(res.drawn, res.sample_losses, s.batch_size)
    want: dict[int, list] = {}
    for i, (t, loss) in enumerate(zip(res.drawn, res.sample_losses, strict=True)):
        want.setdefault(int(t) // 200, []).append((i // s.batch_size + 1, loss))
    assert list(split) == ["t 0-199", "t 200-399", "t 400-599", "t 600-799", "t 800-999"]
    assert {b: v for b, v in enumerate(split.values()) if v} == want
    image = bands.plot(split, s.steps)
    assert image.ndim == 4 and image.shape[0] == 1 and image.shape[-1] == 3 and float(image.std()) > 0.01


def test_the_node_shows_previews_while_it_trains_and_outputs_the_grid_and_bands(pack, sd15, tmp_path, monkeypatch):
    """The node with previews every k of 2k steps: the grid so far reaches ComfyUI's progress hook (the node's live
    preview image) at steps k and 2k and stays on the node (its UI image); PREVIEWS is the grid (2 rows x 2 prompts,
    at the size asked) and LOSS_BANDS the band plot."""
    import comfy.utils
    import folder_paths

    _, twin, latent, vae, prompts = sd15
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(tmp_path)], folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    shown = []

    def hook(value, total, preview, node_id=None):
        if preview is not None:
            shown.append((value, total, preview))

    monkeypatch.setattr(comfy.utils, "PROGRESS_BAR_HOOK", hook)
    s = _settings(pack, steps=2 * K, gradient_checkpointing=False, batch_size=1)
    widgets = {k: [v] for k, v in s.record().items() if k != "weight_decay"}
    widgets.update(preset=["custom"], filename=["tlora/node"], overwrite=[False], resume_from=["none"],
                   vae=[vae], preview_prompts=prompts, preview_every=[K], preview_seed=[PREVIEW["seed"]],
                   preview_steps=[2], preview_cfg=[PREVIEW["cfg"]], preview_sampler=["euler"],
                   preview_scheduler=["normal"], preview_width=[128], preview_height=[64])
    with torch.inference_mode():
        result = pack.nodes.train.TLoRATrain.execute([twin.patcher], [{"samples": latent}], [prompts[0]], **widgets)
    _, _, name, grid, band_plot = result.args
    assert name == "tlora/node.safetensors" and "previews at 2 steps" in result.ui["text"][0], result.ui["text"]
    label = pack.engine.training.preview.LABEL_H
    assert [(v, t) for v, t, _ in shown] == [(K, 2 * K), (2 * K, 2 * K)]
    kind, image, size = shown[-1][2]
    assert kind == "JPEG" and size == 1024 and image.size == (grid.shape[2], grid.shape[1])
    assert grid.shape == (1, 2 * (64 + label), 2 * 128, 3) and float(grid.std()) > 0.01  # preview_width 128
    assert band_plot.shape[0] == 1 and band_plot.shape[-1] == 3
    assert len(result.ui["images"]) == 1 and result.ui["images"][0]["type"] == "temp"  # the grid stays on the node
    assert (tmp_path / "tlora" / f"node_step{K}.preview.png").is_file() and (tmp_path / "tlora" /
                                                                            "node.preview.png").is_file()


def test_each_sample_loss_is_that_of_its_own_draw_with_a_caption_per_image(pack, sd15, tmp_path):
    """Two images with a caption each, a batch of 4 in which the captions interleave (so the model calls group the
    samples out of draw order): the first step's sample losses, in `drawn` order, are each draw's own loss computed
    apart on the base model (the principal init adds exactly nothing before the first update)."""
    import comfy.model_management as mm

    fam, twin, latent, _, prompts = sd15
    latents = torch.cat([latent, torch.randn(latent.shape, generator=torch.Generator().manual_seed(8)) * 0.5])
    s = _settings(pack, steps=1, batch_size=4, seed=7, gradient_checkpointing=False)
    g = torch.Generator().manual_seed(s.seed)  # the loop's draws: images, noise, timesteps
    idx = torch.randint(0, 2, (4,), generator=g)
    noise = torch.randn((4, *latent.shape[1:]), generator=g)
    t = torch.randint(0, 1000, (4,), generator=g)
    assert idx.tolist() not in ([0, 0, 1, 1], [1, 1, 0, 0]) and len(set(idx.tolist())) == 2, idx
    with torch.inference_mode():
        res = pack.engine.training.train(twin.patcher, [latents], prompts, s, str(tmp_path / "two.safetensors"))
    assert res.drawn == [float(v) for v in t]
    model = twin.patcher.model
    mm.load_models_gpu([twin.patcher])
    want = []
    for j in range(4):
        x0 = model.process_latent_in(latents[idx[j]:idx[j] + 1])
        sigma = model.model_sampling.sigmas[t[j]:t[j] + 1].float()
        xt = model.model_sampling.noise_scaling(sigma, noise[j:j + 1], x0)
        with torch.no_grad():
            denoised = model.apply_model(xt, sigma, c_crossattn=prompts[int(idx[j])][0][0])
        want.append(float((denoised - x0).square().mean() / sigma.square()))
    worst = max(abs(a - b) / b for a, b in zip(res.sample_losses, want, strict=True))
    assert worst < 1e-4, (res.sample_losses, want)
