"""Train T-LoRA's rank-2R standard LoRA export (`export_standard`), with the real training loop on tiny SD 1.5 (1x1
convs) and Flux (fused q/k/v and proj_mlp slices, norm_out's reordered rows), every linear trained.

ComfyUI's own LoraLoader is the oracle: on the export it must add what Load T-LoRA adds with every rank of the T-LoRA
(`schedule_source = all_ranks`), every module matched, no 'lora key not loaded'. Load T-LoRA with its default settings
must recognise the export as the pack's own, read it as pairs with the T-LoRA's schedule, and run it as it runs the
T-LoRA at every call. The export is written beside each checkpoint, never when the option is off, and a family whose
fused slices no stock loader reads is refused before any work.
"""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch

from tests.comfy.test_training import _conditioning
from tools.families import FAMILIES
from tools.families.base import capture, rel_l2, sigma_for

R, MIN_RANK, EXPONENT, LINEAR_ALPHA = 8, 2, 1.5, 4.0
TIMESTEPS = (999, 750, 500, 250, 0)
TOL = 1e-5  # relative L2 of the effect on the model output, fp32
NOT_LOADED = "lora key not loaded"


def _sigmas(patcher, flow: bool) -> list[tuple[str, torch.Tensor]]:
    """(label, sigma) of every checked call: the sigma of each trainer timestep, and sigma 1e-5 (the last step)."""
    return [(f"t={t}", sigma_for(patcher, t, flow)) for t in TIMESTEPS] + [("sigma=1e-5", torch.tensor([1e-5]))]


@pytest.fixture(scope="module")
def loras(tmp_path_factory):
    """A loras folder the nodes read (and Train T-LoRA writes into), and a private SVD cache."""
    import folder_paths

    folder = tmp_path_factory.mktemp("loras")
    old_cache = os.environ.get("TLORA_CACHE_DIR")
    os.environ["TLORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("svd"))
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    try:
        yield folder
    finally:
        folder_paths.get_folder_paths("loras").remove(str(folder))
        if old_cache is None:
            os.environ.pop("TLORA_CACHE_DIR", None)
        else:
            os.environ["TLORA_CACHE_DIR"] = old_cache


def _settings(pack, **kw):
    base = {"steps": 6, "learning_rate": 1e-2, "rank": R, "min_rank": MIN_RANK, "alpha": EXPONENT,
            "linear_alpha": LINEAR_ALPHA, "targets": "all_linears", "seed": 3, "save_every": 3,
            "export_standard": True}
    return pack.engine.training.TrainSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def twins():
    """Each family's tiny twin, built once for the module (training never changes the input model)."""
    built: dict = {}

    def get(name: str):
        if name not in built:
            fam = FAMILIES[name]
            twin = fam.build(41)
            x, conds = fam.inputs(twin, torch.Generator().manual_seed(2))
            latent = torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(3)) * 0.5
            built[name] = fam, twin, x, conds, latent
        return built[name]
    return get


@pytest.fixture(scope="module", params=["sd15", "flux"])
def run(request, pack, loras, twins):
    """A T-LoRA trained 6 steps with the export on (a checkpoint at step 3)."""
    fam, twin, x, conds, latent = twins(request.param)
    out = loras / request.param / "trained.safetensors"
    with torch.inference_mode():
        res = pack.engine.training.train(twin.patcher, [latent], [_conditioning(fam, twin)], _settings(pack),
                                         str(out))
    targets = pack.engine.train_targets.trainable_targets(twin.patcher.model, "all_linears")
    names, missing = pack.engine.training.export.find_names(twin.patcher.model, targets)
    assert not missing and set(names) == set(res.modules)
    for t in targets:  # kohya names for whole layers; ComfyUI's diffusers names for slices and reordered rows
        path = t.path.removeprefix("diffusion_model.").replace(".", "_")
        diffusers = "transformer." + t.name.removeprefix("lycoris_")
        if t.out_slice is None and t.reorder is None:
            assert names[t.name] == "lora_unet_" + path, (t.name, names[t.name])
        else:
            assert names[t.name].replace(".", "_") == diffusers.replace(".", "_"), (t.name, names[t.name])
    return {"fam": fam, "patcher": twin.patcher, "x": x, "conds": conds, "res": res, "names": names,
            "tlora": f"{request.param}/trained.safetensors", "export": f"{request.param}/trained.standard.safetensors",
            "dir": out.parent}


def _load_tlora(pack, patcher, lora_name: str, schedule_source: str = "file"):
    """ComfyUI's view of Load T-LoRA: the node with its default widgets."""
    out = pack.nodes.loader.TLoRALoader.execute(
        model=patcher, lora_name=lora_name, strength_model=1.0, strength_clip=1.0, schedule_source=schedule_source,
        min_rank=1, alpha=1.0, max_rank=0, timestep_mode="auto", vanilla_tlora=False)
    return out.result[0]


def _stock(patcher, lora_name: str):
    import nodes

    model, _ = nodes.LoraLoader().load_lora(patcher, None, lora_name, 1.0, 0.0)
    return model


def _patch_count(patcher) -> int:
    return sum(len(v) for v in patcher.patches.values())


def test_stock_lora_loader_on_the_export_equals_every_rank_of_the_tlora(pack, run, caplog):
    """Stock LoraLoader on the export: every module patched, no 'lora key not loaded' (that same capture sees
    ComfyUI's lines for the T-LoRA file itself), and its effect equals Load T-LoRA's with every rank of the T-LoRA."""
    patcher, x, conds, res = run["patcher"], run["x"], run["conds"], run["res"]
    with caplog.at_level(logging.WARNING):
        caplog.clear()
        stock_on_tlora = _stock(patcher, run["tlora"])
        unreadable = [r for r in caplog.records if NOT_LOADED in r.getMessage()]
        caplog.clear()
        stock = _stock(patcher, run["export"])
        said = [r.getMessage() for r in caplog.records if NOT_LOADED in r.getMessage()]
    assert len(unreadable) >= len(res.modules) and _patch_count(stock_on_tlora) == _patch_count(patcher)
    assert not said, said[:5]
    assert _patch_count(stock) - _patch_count(patcher) == len(res.modules)
    every_rank = _load_tlora(pack, patcher, run["tlora"], "all_ranks")
    errors, effects = {}, {}
    for label, sigma in _sigmas(patcher, run["fam"].flow):
        base = capture(patcher, x, sigma, conds).out
        want = capture(stock, x, sigma, conds).out - base
        got = capture(every_rank, x, sigma, conds).out - base
        effects[label] = rel_l2(want + base, base)
        assert effects[label] > 1e-3, f"{label}: the trained T-LoRA has no measurable effect"
        errors[label] = rel_l2(got, want)
    print(run["fam"].name, "stock LoraLoader on the export vs every rank:", {k: f"{v:.1e}" for k, v in errors.items()},
          "effect / output:", {k: f"{v:.1e}" for k, v in effects.items()})
    assert max(errors.values()) < TOL, errors


def test_load_tlora_runs_the_export_with_the_tlora_schedule(pack, run, caplog):
    """Default widgets: the export is the pack's own (writer, pairs, schedule from its metadata, not the sliders'
    min_rank 1 / alpha 1), each call's rank is the trained schedule's, and each call equals Load T-LoRA on the
    T-LoRA; at high noise it is far from the every-rank effect (the schedule is really running)."""
    patcher, x, conds = run["patcher"], run["x"], run["conds"]
    tl = pack.engine.read_file(os.path.join(run["dir"], "trained.standard.safetensors"))
    assert tl.format == "lycoris_export" and tl.writer.id == "tlora_train_export", (tl.format, tl.writer)
    assert tl.layout_why.startswith("ComfyUI-TLoRA Train T-LoRA's rank-2R export"), tl.layout_why
    r, mr, al, why = pack.engine.resolve_schedule(tl, "file", 0, 1, 1.0)
    assert (r, mr, al) == (R, MIN_RANK, EXPONENT), why
    with caplog.at_level(logging.INFO, logger="tlora"):
        ours = _load_tlora(pack, patcher, run["export"])
    said = " ".join(rec.getMessage() for rec in caplog.records if rec.name.startswith("tlora"))
    assert "written by ComfyUI-TLoRA Train T-LoRA (rank-2R export)" in said, said
    ref = _load_tlora(pack, patcher, run["tlora"])
    stock = _stock(patcher, run["export"])
    _, app = pack.engine.apply.apply_tlora(patcher, tl, pack.engine.apply.Settings(1.0, r, mr, al))
    ms = patcher.model.model_sampling
    errors = {}
    for label, sigma in _sigmas(patcher, run["fam"].flow):
        t = 0 if label.startswith("sigma") else int(label[2:])
        assert app.state.ranks_for(sigma, ms)[1] == [pack.tlora_core.active_rank(t, R, MIN_RANK, EXPONENT)], label
        base = capture(patcher, x, sigma, conds).out
        got = capture(ours, x, sigma, conds).out - base
        want = capture(ref, x, sigma, conds).out - base
        assert want.abs().max() > 0, label
        errors[label] = rel_l2(got, want)
        if t == 999:
            assert rel_l2(got, capture(stock, x, sigma, conds).out - base) > 1e-2, "rank 2 of 8 looks like every rank"
    print(run["fam"].name, "Load T-LoRA on the export vs on the T-LoRA:", {k: f"{v:.1e}" for k, v in errors.items()})
    assert max(errors.values()) < TOL, errors


def test_the_export_is_written_beside_each_checkpoint(pack, run):
    """Beside the step-3 checkpoint: the export of that checkpoint (each module's rank-prefix factors, so its change
    at every rank, equal to the checkpoint T-LoRA's; its step count recorded), not of the final file."""
    res, folder, names = run["res"], run["dir"], run["names"]
    step3 = str(folder / "trained_step3.safetensors")
    assert res.checkpoints == [step3]
    assert sorted(p.name for p in folder.iterdir()) == sorted([
        "trained.safetensors", "trained.standard.safetensors", "trained.lycoris_config.json", "trained.train_state",
        "trained_step3.safetensors", "trained_step3.standard.safetensors", "trained_step3.lycoris_config.json",
        "trained_step3.train_state"])
    load = pack.tlora_core.load_tlora
    for tlora, steps in ((step3, 3), (res.path, 6)):
        tl, ex = load(tlora), load(pack.tlora_core.export.standard_path(tlora))
        assert ex.writer.id == "tlora_train_export" and json.loads(ex.metadata["tlora_training"])["steps"] == steps
        assert set(ex.modules) == set(names.values())
        for name, key in names.items():  # the rank-prefix factors: delta(r) = up_t[:2r].T @ down[:2r] at every r
            (down, up_t, k), (e_down, e_up_t, e_k) = tl.modules[name].prefix_factors(), \
                ex.modules[key].prefix_factors()
            assert k == e_k == 2 and e_down.shape == down.shape and e_up_t.shape == up_t.shape, (tlora, name)
            for want, got in ((down, e_down), (up_t, e_up_t)):
                assert rel_l2(got, want) <= 1e-6, (tlora, name, rel_l2(got, want))
    first = next(iter(names.values()))
    a, b = load(pack.tlora_core.export.standard_path(step3)), load(os.path.join(folder, "trained.standard.safetensors"))
    assert not torch.equal(a.modules[first].down, b.modules[first].down)  # training went on after the checkpoint


def test_nothing_is_exported_when_the_option_is_off(pack, loras, twins, tmp_path):
    fam, twin, _, _, latent = twins("sd15")
    s = _settings(pack, steps=2, save_every=1, targets="attention", export_standard=False)
    with torch.inference_mode():
        res = pack.engine.training.train(twin.patcher, [latent], [_conditioning(fam, twin)], s,
                                         str(tmp_path / "off.safetensors"))
    assert res.checkpoints == [str(tmp_path / "off_step1.safetensors")] and os.path.isfile(res.path)
    assert not list(tmp_path.glob("*.standard.safetensors"))


def test_a_family_no_stock_loader_can_hold_is_refused_before_any_work(pack, tmp_path):
    """HunyuanVideo's fused q/k/v slices have no name in ComfyUI's own key map: with the export asked for, the run
    is refused before the SVD init, naming a layer and the fix; nothing is written."""
    fam = FAMILIES["hunyuan_video"]
    twin = fam.build(43)
    x, _ = fam.inputs(twin, torch.Generator().manual_seed(2))
    stats = pack.engine.bases.stats.snapshot()
    out = tmp_path / "refused.safetensors"
    with pytest.raises(pack.tlora_core.TLoRAError) as e, torch.inference_mode():
        pack.engine.training.train(twin.patcher, [torch.zeros(1, *x.shape[1:])], [_conditioning(fam, twin)],
                                   _settings(pack, targets="attention"), str(out))
    msg = str(e.value)
    assert out.name in msg and "export_standard" in msg and "switch export_standard off" in msg, msg
    assert "qkv" in msg, msg
    assert pack.engine.bases.stats["svd"] == stats["svd"] and not list(tmp_path.iterdir())


def test_the_node_writes_the_export_and_says_so(pack, loras, twins):
    """Train T-LoRA (the node) with export_standard on: both files in models/loras, the export named in its text."""
    fam, twin, _, _, latent = twins("sd15")
    widgets = {"filename": "node/export", "preset": "custom", "steps": 2, "learning_rate": 1e-2, "rank": 4,
               "min_rank": 2, "alpha": 1.0, "linear_alpha": 0.0, "targets": "attention", "batch_size": 1,
               "grad_accumulation": 1, "optimizer": "AdamW", "max_grad_norm": 1.0, "gradient_checkpointing": False,
               "training_dtype": "auto", "timestep_sampling": "auto", "timestep_mode": "auto",
               "loss_space": "prediction", "guidance": 1.0, "seed": 0, "store_base": True, "save_every": 0,
               "resume_from": "none", "overwrite": True, "export_standard": True}
    node = pack.nodes.train.TLoRATrain
    schema = node.define_schema()
    spec = next(i for i in schema.inputs if i.id == "export_standard")
    assert spec.tooltip and spec.optional and spec.default is False
    with torch.inference_mode():
        out = node.execute([twin.patcher], [{"samples": latent}], [_conditioning(fam, twin)],
                           **{k: [v] for k, v in widgets.items()})
    text = out.ui["text"][0]
    assert text.startswith("node/export.safetensors: 2 steps") and \
        text.endswith("standard LoRA (every rank): node/export.standard.safetensors"), text
    assert sorted(p.name for p in (loras / "node").iterdir()) == [
        "export.lycoris_config.json", "export.safetensors", "export.standard.safetensors", "export.train_state"]
