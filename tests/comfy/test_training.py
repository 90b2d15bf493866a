"""Train T-LoRA in ComfyUI against LyCORIS on the diffusers twins: one step's gradients per family and timestep, a
mixed batch, checkpointing, the ranks used, the loss falling, the saved file (read back by Load T-LoRA and LyCORIS),
an fp8 copy of the model, interrupts, bad inputs, and the input model left as it was."""

from __future__ import annotations

import json
import os

import pytest
import torch

from tools import tiny_models as tm
from tools.families import FAMILIES
from tools.families.base import Call, capture, rel_l2, sigma_for
from tools.train_memory import modules_for, reruns

R, MIN_RANK, ALPHA, LINEAR_ALPHA = 8, 2, 1.0, 4.0
TIMESTEPS = (999, 750, 500, 250, 0)
GRAD_FAMILIES = ("sd15", "sdxl", "flux", "sd3", "wan21")
GRAD_TOL = 1e-5


def in_double(call: Call) -> Call:
    def d(v):
        return v.double() if torch.is_tensor(v) and v.is_floating_point() else v
    return Call(tuple(d(a) for a in call.args), {k: d(v) for k, v in call.kwargs.items()}, call.out)


def _lycoris(model: torch.nn.Module, targets):
    """LyCORIS' own T-LoRA network on the diffusers twin with the family's class preset (applied, not saved)."""
    return tm.lycoris_network(model, R, LINEAR_ALPHA, targets)


def _modules(pack, patcher, targets, seed: int):
    """Our trainable modules from the exact SVD of each target's weight, moved off their init by seeded noise."""
    return modules_for(pack, patcher, targets, R, LINEAR_ALPHA, seed)


def _into_lycoris(net, modules) -> None:
    with torch.no_grad():
        for lo in net.loras:
            m = modules[lo.lora_name]
            lo.q_layer.weight.copy_(m.q.reshape(lo.q_layer.weight.shape))
            lo.p_layer.weight.copy_(m.p.reshape(lo.p_layer.weight.shape))
            lo.lambda_layer.copy_(m.lam.reshape(1, R))
            lo.base_q.copy_(m.q0.reshape(lo.base_q.shape))
            lo.base_p.copy_(m.p0.reshape(lo.base_p.shape))
            lo.base_lambda.copy_(m.lam0.reshape(1, R))


def _settings(pack, **kw):
    base = {"rank": R, "min_rank": MIN_RANK, "alpha": ALPHA, "linear_alpha": LINEAR_ALPHA, "targets": "all_linears",
            "gradient_checkpointing": False}
    return pack.engine.training.TrainSettings(**{**base, **kw})


def comfy_step(pack, patcher, targets, modules, x, sigma, conds, G=None, checkpointing=False):
    """One training forward and backward of ComfyUI's model with the trainable modules: the diffusion model's call
    (inputs and output), the loss <G, output>, and the ranks the wrapper set."""
    import comfy.patcher_extension

    tr = pack.engine.training
    patch = tr.TrainingPatch(patcher, targets, modules, _settings(pack, gradient_checkpointing=checkpointing))
    calls = []
    try:
        with torch.inference_mode(False):
            patch.load()
            hook = patch.clone.model.diffusion_model.register_forward_hook(
                lambda _m, a, k, out: calls.append(Call(a, dict(k), out)), with_kwargs=True)
            try:
                with torch.enable_grad(), tr.saved_copies():
                    patch.clone.model.apply_model(x, sigma, transformer_options={
                        "wrappers": comfy.patcher_extension.copy_nested_dicts(patch.clone.wrappers)}, **conds)
                    out = calls[0].out
                    if G is None:
                        G = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
                    (out.float() * G).sum().backward()
            finally:
                hook.remove()
    finally:
        patch.close()
    c = calls[0]
    return Call(tuple(a.detach() if torch.is_tensor(a) else a for a in c.args),
                {k: v.detach() if torch.is_tensor(v) else v for k, v in c.kwargs.items()}, c.out.detach()), G, \
        patch.state.calls


def _grads(modules) -> dict[str, torch.Tensor]:
    return {f"{n}.{k}": getattr(m, k).grad.detach().clone() for n, m in modules.items() for k in ("q", "p", "lam")}


def _zero(modules) -> None:
    for m in modules.values():
        for p in m.parameters():
            p.grad = None


@pytest.mark.parametrize("name", GRAD_FAMILIES)
def test_one_step_gradients_equal_lycoris_at_every_timestep(pack, name):
    """Every module LyCORIS puts on the diffusers twin has a training target under the same name (the reverse key
    maps, fused q/k/v slices and reordered rows included), and one step's gradients of q, p and lambda equal
    LyCORIS' own backward with `set_timestep_mask` (float64) at t = 999 ... 0, for the rank of the call's sigma."""
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    fam = FAMILIES[name]
    twin = fam.build(23)
    net = _lycoris(twin.diffusers, fam.targets)
    try:
        lyco = {lo.lora_name: lo for lo in net.loras}
        every = pack.engine.train_targets.trainable_targets(twin.patcher.model, "all_linears")
        targets = [t for t in every if t.name in lyco]
        assert {t.name for t in targets} == set(lyco), sorted(set(lyco) - {t.name for t in targets})[:5]
        modules = _modules(pack, twin.patcher, targets, 3)
        _into_lycoris(net, modules)
        twin.diffusers.double()
        net.double()
        x, conds = fam.inputs(twin, torch.Generator().manual_seed(4))
        worst = {}
        for t in TIMESTEPS:
            _zero(modules)
            for p in net.parameters():
                p.grad = None
            sigma = sigma_for(twin.patcher, t, fam.flow)
            call, G, calls = comfy_step(pack, twin.patcher, targets, modules, x, sigma, conds)
            want = int(compute_timestep_mask(t, 1000, R, MIN_RANK, ALPHA).sum())
            assert calls[-1]["t"] == [t] and calls[-1]["rank"] == [want], calls[-1]
            ours = _grads(modules)
            set_timestep_mask(compute_timestep_mask(t, 1000, R, MIN_RANK, ALPHA).double())
            ref = fam.reference(twin, in_double(call))
            (ref * G.double()).sum().backward()
            theirs = {}
            for n, lo in lyco.items():
                theirs[f"{n}.q"] = lo.q_layer.weight.grad.reshape(modules[n].q.shape)
                theirs[f"{n}.p"] = lo.p_layer.weight.grad.reshape(modules[n].p.shape)
                theirs[f"{n}.lam"] = lo.lambda_layer.grad.reshape(-1)
            a = torch.cat([ours[k].double().reshape(-1) for k in sorted(ours)])
            b = torch.cat([theirs[k].reshape(-1) for k in sorted(ours)])
            assert b.norm() > 0
            worst[t] = rel_l2(a, b)
            masked = [k for k in ours if k.endswith(".q") and torch.count_nonzero(ours[k][want:]) > 0]
            assert not masked, f"t={t}: ranks above {want} got gradient in {masked[:3]}"
        print(name, {t: f"{e:.1e}" for t, e in worst.items()})
        assert max(worst.values()) < GRAD_TOL, worst
    finally:
        clear_timestep_mask()
        net.restore()


@pytest.mark.parametrize("name", ["sd15", "sdxl", "flux"])
def test_mixed_batch_and_checkpointing_give_the_per_item_gradients(pack, name):
    """Items at different sigmas in one batch each train their own ranks: the batch's gradients are the sum of the
    items' (each alone), and gradient checkpointing, which recomputes the model's layers in the backward pass (UNet
    and DiT), gives the same gradients (1e-6)."""
    fam = FAMILIES[name]
    twin = fam.build(24)
    targets = pack.engine.train_targets.trainable_targets(twin.patcher.model, "all_linears")
    modules = _modules(pack, twin.patcher, targets, 5)
    ts = (999, 500, 0)
    xs, conds = zip(*(fam.inputs(twin, torch.Generator().manual_seed(10 + i)) for i in range(3)), strict=True)
    sig = [sigma_for(twin.patcher, t, fam.flow) for t in ts]
    total = None
    for i in range(3):
        _zero(modules)
        call, G, _ = comfy_step(pack, twin.patcher, targets, modules, xs[i], sig[i], conds[i],
                                G=torch.randn(xs[i].shape, generator=torch.Generator().manual_seed(30 + i)))
        g = _grads(modules)
        total = g if total is None else {k: total[k] + g[k] for k in g}
    batch_x = torch.cat(xs)
    batch_conds = {k: torch.cat([c[k] for c in conds]) if torch.is_tensor(conds[0][k]) else conds[0][k]
                   for k in conds[0]}
    G = torch.cat([torch.randn(xs[i].shape, generator=torch.Generator().manual_seed(30 + i)) for i in range(3)])
    flat = {}
    for checkpointing in (False, True):
        _zero(modules)
        with reruns(twin.patcher.model.diffusion_model) as counts:
            _, _, calls = comfy_step(pack, twin.patcher, targets, modules, batch_x, torch.cat(sig), batch_conds, G=G,
                                     checkpointing=checkpointing)
        recomputed = sum(1 for c in counts.values() if c[1])
        assert (recomputed > len(counts) // 2) if checkpointing else recomputed == 0, (recomputed, len(counts))
        assert len(set(calls[-1]["rank"])) == 3, calls[-1]
        g = _grads(modules)
        flat[checkpointing] = a = torch.cat([g[k].reshape(-1) for k in sorted(g)])
        b = torch.cat([total[k].reshape(-1) for k in sorted(g)])
        assert rel_l2(a, b) < 1e-5, (checkpointing, rel_l2(a, b))
    assert rel_l2(flat[True], flat[False]) < 1e-6, rel_l2(flat[True], flat[False])


# ------------------------------------------------------------------------------------------- the whole loop
def _conditioning(fam, twin, seed=0):
    """ComfyUI CONDITIONING for a tiny family: the token tensor its inputs use, a pooled vector where it needs one."""
    _, conds = fam.inputs(twin, torch.Generator().manual_seed(seed))
    ctx = conds["c_crossattn"]
    extra = {}
    if fam.name == "sdxl":
        extra["pooled_output"] = torch.randn(1, 1280, generator=torch.Generator().manual_seed(seed + 1))
    elif "y" in conds:
        extra["pooled_output"] = conds["y"]
    return [[ctx, extra]]


@pytest.fixture(scope="module")
def trained(pack, tmp_path_factory):
    """Tiny SD1.5 trained 60 steps on one latent (lr 1e-2), with a checkpoint at step 30."""
    import comfy.model_management as mm

    fam = FAMILIES["sd15"]
    twin = fam.build(31)
    d = tmp_path_factory.mktemp("trained")
    os.environ["TLORA_CACHE_DIR"] = str(d / "svd")
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(2))
    latent = torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(3)) * 0.5
    positive = [_conditioning(fam, twin)]
    s = pack.engine.training.TrainSettings(steps=60, learning_rate=1e-2, rank=R, min_rank=MIN_RANK, alpha=ALPHA,
                                           targets="attention+feed_forward", seed=7, save_every=30, batch_size=2)
    probe = [sigma_for(twin.patcher, t, False) for t in (900, 500, 100)]
    mm.load_models_gpu([twin.patcher])
    before = [capture(twin.patcher, x, sg, conds).out for sg in probe]
    flags = [(p.requires_grad, p.grad is None) for p in twin.patcher.model.parameters()]
    with torch.inference_mode():
        res = pack.engine.training.train(twin.patcher, [latent], positive, s, str(d / "trained.safetensors"))
    after = [capture(twin.patcher, x, sg, conds).out for sg in probe]
    return {"fam": fam, "twin": twin, "dir": d, "latent": latent, "positive": positive, "settings": s, "res": res,
            "x": x, "conds": conds, "probe": probe, "before": before, "after": after, "flags": flags}


def _heldout_loss(pack, made, modules) -> float:
    """The prediction loss on fixed (noise, sigma) pairs of the training latent, with `modules` trained in."""
    import comfy.model_management as mm
    import comfy.patcher_extension

    twin, latent = made["twin"], made["latent"]
    ms = twin.patcher.model.model_sampling
    targets = pack.engine.train_targets.trainable_targets(twin.patcher.model, made["settings"].targets)
    patch = pack.engine.training.TrainingPatch(twin.patcher, targets, modules, made["settings"])
    losses = []
    try:
        mm.load_models_gpu([patch.clone])
        for i, t in enumerate((950, 800, 600, 400, 200, 50)):
            sigma = ms.sigmas[t:t + 1].float()
            noise = torch.randn(latent.shape, generator=torch.Generator().manual_seed(100 + i))
            xt = ms.noise_scaling(sigma, noise, latent)
            with torch.no_grad():
                out = patch.clone.model.apply_model(xt, sigma, transformer_options={
                    "wrappers": comfy.patcher_extension.copy_nested_dicts(patch.clone.wrappers)},
                    c_crossattn=made["conds"]["c_crossattn"])
            losses.append(float(((out - latent) ** 2).mean() / sigma.square()))
    finally:
        patch.close()
    return sum(losses) / len(losses)


def test_the_loss_falls_on_held_out_noise(pack, trained):
    res = trained["res"]
    fresh = {n: pack.tlora_core.training.TrainableTLoRA(n, m.p0, m.lam0, m.q0.T, m.scale, m.conv)
             for n, m in res.modules.items()}
    start, end = _heldout_loss(pack, trained, fresh), _heldout_loss(pack, trained, res.modules)
    print(f"held-out loss {start:.4f} -> {end:.4f} ({(1 - end / start):.0%} lower)")
    assert end < 0.8 * start, (start, end)
    assert len(res.losses) == 60 and all(map(lambda v: v == v, res.losses))


def test_each_sample_trains_the_ranks_of_its_own_timestep(pack, trained):
    res = trained["res"]
    assert len(res.calls) == 60 and len(res.drawn) == 120
    res_calls = [dict(sigma=[s], t=[t], rank=[r]) for c in res.calls for s, t, r in zip(c["sigma"], c["t"], c["rank"],
                                                                                          strict=True)]
    for call, t in zip(res_calls, res.drawn, strict=True):
        assert call["t"] == [t], (call, t)  # the loader's sigma -> t rule gives back the drawn timestep
        assert call["rank"] == [pack.tlora_core.active_rank(t, R, MIN_RANK, ALPHA)]
    assert len({c["rank"][0] for c in res_calls}) > 3


def test_the_input_model_is_untouched(pack, trained):
    twin = trained["twin"]
    for b, a in zip(trained["before"], trained["after"], strict=True):
        assert torch.equal(b, a), "sampling with the input model changed after training"
    dm = twin.patcher.model.diffusion_model
    assert not [n for n, m in dm.named_modules() if m.__dict__.get("_tlora_slots")]
    assert not [n for n, m in dm.named_modules() if "forward" in m.__dict__]
    flags = [(p.requires_grad, p.grad is None) for p in twin.patcher.model.parameters()]
    assert flags == trained["flags"] and all(none for _, none in flags), "the base model's parameters changed state"
    assert not twin.patcher.injections and "tlora_train" not in repr(twin.patcher.wrappers)


def test_the_file_reproduces_the_trainers_effect_in_load_tlora_and_lycoris(pack, trained):
    """Load T-LoRA of the saved file adds to every layer what the trainer's module adds there, at every rank (1e-6),
    and to the whole model's output (1e-5, fp32 round-off through the network); LyCORIS reads the file on the
    diffusers twin with every module matched and, with the stored base, gives the same effect (1e-4)."""
    from lycoris import create_lycoris_from_weights
    from lycoris.modules.tlora import clear_timestep_mask, compute_timestep_mask, set_timestep_mask

    res, twin, fam = trained["res"], trained["twin"], trained["fam"]
    tl = pack.tlora_core.load_tlora(res.path)
    assert not tl.needs_svd_base and set(tl.modules) == set(res.modules)
    d = tl.schedule_defaults()
    assert (d["max_rank"][0], d["min_rank"][0], d["alpha"][0]) == (R, MIN_RANK, ALPHA)
    for name, m in res.modules.items():
        down, up_t = (f.detach().double() for f in m.factors())
        for r in range(R + 1):
            want = up_t[: 2 * r].T @ down[: 2 * r]
            got = tl.modules[name].delta_weight(r).double().reshape(want.shape)
            assert (got - want).norm() <= 1e-6 * max(float(want.norm()), 1e-12), (name, r)
    record = json.loads(tl.metadata["tlora_training"])
    assert record["steps"] == 60 and record["seed"] == 7 and record["targets"] == "attention+feed_forward"
    apply = pack.engine.apply
    clone, _ = apply.apply_tlora(twin.patcher, tl, apply.Settings(1.0, R, MIN_RANK, ALPHA))
    targets = pack.engine.train_targets.trainable_targets(twin.patcher.model, trained["settings"].targets)
    patch = pack.engine.training.TrainingPatch(twin.patcher, targets, res.modules, trained["settings"])
    x, conds = trained["x"], trained["conds"]
    net, weights = None, None
    try:
        with tm.fast_lycoris():
            net, weights = create_lycoris_from_weights(1.0, res.path, twin.diffusers)
        assert len(net.loras) == len(tl.modules)
        net.apply_to()
        net.load_state_dict(weights, strict=False)  # LyCORIS' load_weights: the stored base fills its buffers
        for t in TIMESTEPS:
            sigma = sigma_for(twin.patcher, t, False)
            base = capture(twin.patcher, x, sigma, conds)
            loaded = capture(clone, x, sigma, conds).out - base.out
            mine = capture(patch.clone, x, sigma, conds).out - base.out
            patch.close()
            assert rel_l2(loaded, mine) < 1e-5, (t, rel_l2(loaded, mine))
            with torch.no_grad():
                set_timestep_mask(torch.zeros(1, R))
                ref_base = fam.reference(twin, base)
                set_timestep_mask(compute_timestep_mask(t, 1000, R, MIN_RANK, ALPHA))
                ref = fam.reference(twin, base)
            assert rel_l2(loaded, ref - ref_base) < 1e-4, (t, rel_l2(loaded, ref - ref_base))
    finally:
        clear_timestep_mask()
        if net is not None:
            net.restore()


def test_same_seed_same_training(pack, trained, tmp_path):
    s = trained["settings"]
    short = pack.engine.training.TrainSettings(**{**s.record(), "steps": 3, "save_every": 0})
    runs = []
    for i in range(2):
        with torch.inference_mode():
            runs.append(pack.engine.training.train(trained["twin"].patcher, [trained["latent"]],
                                                   trained["positive"], short, str(tmp_path / f"r{i}.safetensors")))
    assert runs[0].losses == runs[1].losses
    from safetensors.torch import load_file

    a, b = load_file(runs[0].path), load_file(runs[1].path)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_checkpoints_are_written_and_an_interrupt_leaves_no_partial_file(pack, trained, tmp_path):
    import comfy.model_management as mm

    res = trained["res"]
    step30 = res.path.replace(".safetensors", "_step30.safetensors")
    assert res.checkpoints == [step30] and pack.tlora_core.load_tlora(step30).rank == R
    s = pack.engine.training.TrainSettings(**{**trained["settings"].record(), "steps": 10, "save_every": 3})
    out = tmp_path / "interrupted.safetensors"

    def stop_at_five(step, total, loss):
        if step == 5:
            mm.interrupt_current_processing(True)

    try:
        with pytest.raises(mm.InterruptProcessingException), torch.inference_mode():
            pack.engine.training.train(trained["twin"].patcher, [trained["latent"]], trained["positive"], s,
                                       str(out), progress=stop_at_five)
    finally:
        mm.interrupt_current_processing(False)
    assert not out.exists()  # no partial final file; the last finished step (5) is kept, with its state
    assert sorted(p.name for p in tmp_path.glob("interrupted*")) == [
        f"interrupted_step{n}.{ext}" for n in (3, 5) for ext in ("lycoris_config.json", "safetensors", "train_state")]
    assert json.loads(pack.tlora_core.load_tlora(tmp_path / "interrupted_step5.safetensors")
                      .metadata["tlora_training"])["steps"] == 5
    assert not list(tmp_path.glob("*.tmp"))
    dm = trained["twin"].patcher.model.diffusion_model
    assert not [n for n, m in dm.named_modules() if m.__dict__.get("_tlora_slots") or "forward" in m.__dict__]


def test_resume_continues_from_a_file(pack, trained, tmp_path):
    res = trained["res"]
    s = pack.engine.training.TrainSettings(**{**trained["settings"].record(), "steps": 2, "save_every": 0})
    with torch.inference_mode():
        more = pack.engine.training.train(trained["twin"].patcher, [trained["latent"]], trained["positive"], s,
                                          str(tmp_path / "resumed.safetensors"), resume=res.path)
    tl = pack.tlora_core.load_tlora(more.path)
    assert json.loads(tl.metadata["tlora_training"])["steps"] == 62
    first = next(iter(res.modules))
    assert not torch.equal(tl.modules[first].down, res.modules[first].q.detach().cpu())  # it trained on
    assert rel_l2(tl.modules[first].down, res.modules[first].q.detach().cpu()) < 0.2  # from where it stopped


@pytest.mark.parametrize(("case", "says"), [
    ("no_latents", "no latents"), ("kinds", "different kinds"), ("conds", "conditionings for"),
    ("rank", "min_rank"), ("steps", "steps"), ("targets", "targets must be one of"),
    ("sampling", "this model samples with"),
])
def test_bad_inputs_are_refused_before_any_work(pack, trained, tmp_path, case, says):
    import comfy.model_management as mm

    tr = pack.engine.training
    twin, latent, positive = trained["twin"], trained["latent"], trained["positive"]
    s = trained["settings"].record()
    latents, conds, patcher = [latent], positive, twin.patcher
    if case == "no_latents":
        latents = []
    elif case == "kinds":  # sizes may differ (size buckets), channels may not
        latents = [latent, torch.zeros(1, latent.shape[1] + 1, 4, 4)]
    elif case == "conds":
        latents, conds = [latent, latent, latent], positive * 2
    elif case == "rank":
        s["min_rank"] = R + 1
    elif case == "steps":
        s["steps"] = 0
    elif case == "targets":
        s["targets"] = "everything"
    elif case == "sampling":
        import comfy.model_sampling as ms

        class Cascade(ms.StableCascadeSampling, ms.EPS):
            pass

        patcher = twin.patcher.clone()
        patcher.add_object_patch("model_sampling", Cascade(twin.patcher.model.model_config))
    stats = pack.engine.bases.stats.snapshot()
    injections = dict(twin.patcher.injections)
    out = tmp_path / "never.safetensors"
    mm.unload_all_models()
    with pytest.raises(pack.tlora_core.TLoRAError) as e, torch.inference_mode():
        tr.train(patcher, latents, conds, tr.TrainSettings(**{**s, "steps": s["steps"]}), str(out))
    assert out.name in str(e.value) and says in str(e.value), str(e.value)
    assert pack.engine.bases.stats["svd"] == stats["svd"] and pack.engine.bases.stats["digests"] == stats["digests"]
    assert dict(twin.patcher.injections) == injections and not out.exists()


def test_training_on_an_fp8_copy_gives_a_file_exact_on_that_copy(pack, tmp_path, monkeypatch):
    """The base is read through the layer (fp8 dequantized) and stored: Load T-LoRA of the file on the same fp8 model
    adds exactly what the trainer's modules add there."""

    monkeypatch.setenv("TLORA_CACHE_DIR", str(tmp_path / "svd"))
    fam = FAMILIES["sd15"]
    twin = fam.build(33)
    for m in twin.patcher.model.diffusion_model.modules():
        if isinstance(m, torch.nn.Linear) and getattr(m, "comfy_cast_weights", None) is not None:
            m.weight = torch.nn.Parameter(m.weight.detach().to(torch.float8_e4m3fn), requires_grad=False)
            m.comfy_cast_weights = True
    twin.patcher.model.manual_cast_dtype = torch.float32
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(2))
    latent = torch.randn(1, *x.shape[1:], generator=torch.Generator().manual_seed(3)) * 0.5
    s = pack.engine.training.TrainSettings(steps=4, learning_rate=1e-2, rank=R, min_rank=MIN_RANK, alpha=ALPHA,
                                           targets="attention", seed=1)
    with torch.inference_mode():
        res = pack.engine.training.train(twin.patcher, [latent], [_conditioning(fam, twin)], s,
                                         str(tmp_path / "fp8.safetensors"))
    tl = pack.tlora_core.load_tlora(res.path)
    assert "fp8" in tl.stored_base["storage"] and not tl.needs_svd_base
    apply = pack.engine.apply
    clone, _ = apply.apply_tlora(twin.patcher, tl, apply.Settings(1.0, R, MIN_RANK, ALPHA))
    targets = pack.engine.train_targets.trainable_targets(twin.patcher.model, "attention")
    patch = pack.engine.training.TrainingPatch(twin.patcher, targets, res.modules, s)
    for t in (900, 300):
        sigma = sigma_for(twin.patcher, t, False)
        base = capture(twin.patcher, x, sigma, conds).out
        loaded = capture(clone, x, sigma, conds).out - base
        mine = capture(patch.clone, x, sigma, conds).out - base
        patch.close()
        assert rel_l2(mine, torch.zeros_like(mine) + 1) > 0 and mine.abs().max() > 0
        assert rel_l2(loaded, mine) < 1e-5, (t, rel_l2(loaded, mine))
