"""The pack in ComfyUI's memory modes, as far as a CPU reaches them: the memory planner counts the factors, a
partially loaded model (some layers cast from the offload device at every call) gives the same T-LoRA effect as a
fully loaded one, the factors survive a load/unload cycle, and a compiled model gives the same result without a
recompile per rank. Dynamic VRAM (ModelPatcherDynamic) needs CUDA: benchmarks/gpu.sh checks it on a GPU."""

from __future__ import annotations

import logging

import pytest
import torch

from tools import tiny_models as tm
from tools.families import FAMILIES
from tools.families.base import rel_l2, sigma_for

R, MIN_RANK, ALPHA = 8, 1, 1.0
log = logging.getLogger("tlora.tests")


@pytest.fixture(scope="module")
def made(pack, tmp_path_factory):
    fam = FAMILIES["sdxl"]
    twin = fam.build(71)
    path = tmp_path_factory.mktemp("modes") / "pytorch_lora_weights.safetensors"
    tm.write_lycoris_tlora(twin.diffusers, path, R, R, seed=7, strength=1.0).restore()
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(5))
    return {"fam": fam, "twin": twin, "path": path, "x": x, "conds": conds}


def _apply(pack, patcher, path, strength=1.0):
    apply = pack.engine.apply
    return apply.apply_tlora(patcher, pack.engine.files.read_file(str(path)), apply.Settings(strength, R, MIN_RANK,
                                                                                                 ALPHA))


def _call(patcher, x, sigma, conds) -> torch.Tensor:
    """One model call with the patcher's wrappers live, on the model as it is loaded now."""
    import comfy.patcher_extension

    with torch.no_grad():
        return patcher.model.apply_model(x, sigma, transformer_options={
            "wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)}, **conds)


def _loaded_by_sampling(patcher, x, conds) -> list:
    """The models ComfyUI's sampling asks the memory planner to load for `patcher` (its own prepare_sampling)."""
    import comfy.model_management as mm
    import comfy.sampler_helpers

    asked: list = []
    real = mm.load_models_gpu

    def record(models, *args, **kwargs):
        asked.extend(models)
        return real(models, *args, **kwargs)

    mm.load_models_gpu = record
    try:
        comfy.sampler_helpers.prepare_sampling(patcher, x.shape, {"positive": [], "negative": []},
                                               patcher.model_options)
    finally:
        mm.load_models_gpu = real
    return asked


def test_the_memory_planner_counts_the_factors(pack, made):
    """What ComfyUI's sampling asks the planner to load, in its own size measure (`ModelPatcher.model_size`): the
    base model alone, then the model with the T-LoRA, whose factors come as one extra model of their exact size."""
    base = made["twin"].patcher
    clone, app = _apply(pack, base, made["path"])
    without = _loaded_by_sampling(base, made["x"], made["conds"])
    with_tlora = _loaded_by_sampling(clone, made["x"], made["conds"])
    size = sum(m.model_size() for m in without)
    size_t = sum(m.model_size() for m in with_tlora)
    factors = sum(2 * R * (a.in_features + a.out_features) * 4 for a in
                  pack.engine.files.read_file(str(made["path"])).modules.values())  # ortho: 2 rows a rank, fp32
    log.info("planner figure: %.2f MB without the T-LoRA, %.2f MB with it (factors %.2f MB)", size / 2**20,
             size_t / 2**20, factors / 2**20)
    print(f"planner: {size / 2**20:.2f} MB -> {size_t / 2**20:.2f} MB with the T-LoRA "
          f"(factors {factors / 2**20:.2f} MB)")
    assert size_t - size == factors == app.store.nbytes()
    assert any(m.model is app.store for m in with_tlora)
    assert not any(m.model is app.store for m in without)


def test_factors_survive_load_and_unload_cycles(pack, made):
    """ComfyUI ejects and re-injects at every load: the factors are the same tensors after, never rebuilt."""
    import comfy.model_management as mm

    clone, app = _apply(pack, made["twin"].patcher, made["path"])
    sigma = sigma_for(clone, 300, False)
    mm.load_models_gpu([clone])
    first = _call(clone, made["x"], sigma, made["conds"])
    ids = [id(p) for p in app.store.parameters()]
    for _ in range(3):
        clone.unpatch_model()
        mm.load_models_gpu([clone], force_full_load=True)
    assert [id(p) for p in app.store.parameters()] == ids
    assert torch.equal(_call(clone, made["x"], sigma, made["conds"]), first)


def test_partially_loaded_model_gives_the_same_effect(pack, made):
    """A low-VRAM load: ComfyUI leaves part of the layers on the offload device and casts their weights at every
    call (`comfy_cast_weights`); the T-LoRA's slots sit on those layers as on the others."""
    import comfy.model_management as mm

    base = made["twin"].patcher
    clone, app = _apply(pack, base, made["path"])
    sigmas = [sigma_for(clone, t, False) for t in (999, 500, 0)]
    mm.load_models_gpu([base])
    plain = [_call(base, made["x"], s, made["conds"]) for s in sigmas]
    mm.load_models_gpu([clone], force_full_load=True)
    full = [_call(clone, made["x"], s, made["conds"]) for s in sigmas]
    clone.unpatch_model()
    clone.partially_load(torch.device("cpu"), extra_memory=int(clone.model_size() * 0.4))
    try:
        assert clone.model.model_lowvram, "nothing was left on the offload device"
        targets = {path for path, _ in app.bindings}
        import comfy.utils

        cast = [p for p in targets if hasattr(comfy.utils.get_attr(clone.model, p), "prev_comfy_cast_weights")]
        assert cast, "no target layer is cast from the offload device at every call"
        print(f"partial load: {len(cast)} of {len(targets)} target layers cast at every call")
        partial = [_call(clone, made["x"], s, made["conds"]) for s in sigmas]
    finally:
        clone.unpatch_model()
    for p, f, b in zip(partial, full, plain, strict=True):
        assert rel_l2(f, b) > 1e-3, "the T-LoRA has no measurable effect"
        assert rel_l2(p - b, f - b) < 1e-6


def _compiled_calls(patcher, x, sigmas, conds) -> tuple[list[torch.Tensor], list[int]]:
    """Outputs of a model compiled with ComfyUI's helper (inductor on the CPU), and how many graphs each call
    compiled (graph breaks split a compile into several graphs; a later call compiling any is a recompile)."""
    import comfy.model_management as mm
    from comfy_api.torch_helpers import set_torch_compile_wrapper

    graphs: list[int] = []

    def backend(gm, example_inputs):
        from torch._inductor.compile_fx import compile_fx

        graphs.append(len(gm.graph.nodes))
        return compile_fx(gm, example_inputs)

    torch._dynamo.reset()
    compiled = patcher.clone()
    set_torch_compile_wrapper(compiled, backend=backend)
    mm.load_models_gpu([compiled])
    out, per_call = [], []
    for s in sigmas:
        before = len(graphs)
        out.append(_call(compiled, x, s, conds))
        per_call.append(len(graphs) - before)
    torch._dynamo.reset()
    return out, per_call


def test_compiled_model_same_result_without_a_recompile_per_rank(pack, made):
    """ComfyUI's compile helper (what TorchCompileModel uses) on a model with a T-LoRA: the same outputs as eager at
    every rank, and the rank changing at every call recompiles nothing the base model does not recompile itself
    (ComfyUI's own model compiles once more at its second call)."""
    import comfy.model_management as mm

    fam = FAMILIES["sd15"]
    twin = fam.build(72)
    path = made["path"].parent / "sd15.safetensors"
    tm.write_lycoris_tlora(twin.diffusers, path, R, R, seed=8, strength=1.0).restore()
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(6))
    clone, _ = _apply(pack, twin.patcher, path)
    ts = (999, 800, 600, 400, 200, 0)
    sigmas = [sigma_for(clone, t, False) for t in ts]
    ranks = [pack.tlora_core.active_rank(t, R, MIN_RANK, ALPHA) for t in ts]
    assert len(set(ranks)) == len(ts)
    mm.load_models_gpu([clone])
    eager = [_call(clone, x, s, conds) for s in sigmas]
    _, base_calls = _compiled_calls(twin.patcher, x, sigmas, conds)
    out, calls = _compiled_calls(clone, x, sigmas, conds)
    for o, e, t in zip(out, eager, ts, strict=True):
        assert rel_l2(o, e) < 1e-5, f"t={t}: compiled {rel_l2(o, e):.1e} from eager"
    print(f"graphs compiled per call at ranks {ranks}: {calls} (base model: {base_calls})")
    assert calls[0] > 0 and calls[1:] == base_calls[1:], (calls, base_calls)
    assert sum(calls[2:]) == 0, f"recompiles as the rank changes: {calls}"
