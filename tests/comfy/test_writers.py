"""Every T-LoRA writer in the wild, on the model family it trains, through ComfyUI's own `apply_model`.

For each writer (tlora_core/writers.py): a file in its layout and with its metadata, on a tiny ComfyUI model of a
family it trains, every Linear (and, for the writers that adapt them, every conv) of the model's blocks a module.
Checked: the writer is recognised and every module matched; at t = 999, 750, 500, 250, 0 the pack's per-call rank
is the writer's own rule (tools/writer_files, written the way each trainer computes it); inside two layers, what
the layer adds is the writer's delta at that rank and not at the ranks beside it; and the T-LoRA's effect on the
model output equals the writer's forward formula, applied with hooks to the same ComfyUI model in float64 (none
of these trainers is installable; LyCORIS' export is also checked against LyCORIS in tests/unit). Results go to
test_artifacts/<host>/writers.json for the README's writers table.
"""

from __future__ import annotations

import json
import logging
import math
from collections.abc import Callable
from dataclasses import dataclass

import pytest
import torch
import torch.nn.functional as F

from tests.conftest import save_results
from tools import families
from tools import writer_files as wf
from tools.families import anima
from tools.families.base import capture, rel_l2, sigma_for
from tools.harness.server import host_version

R, ALPHA = 8, 4.0
TIMESTEPS = (999, 750, 500, 250, 0)
TOL = 1e-4
RESULTS: dict[str, dict] = {}


@pytest.fixture(scope="module", autouse=True)
def write_results():
    yield
    save_results("writers.json", RESULTS)


@dataclass(frozen=True)
class Case:
    writer: str  # the writer id tlora_core.writers must name
    family: str  # the family it trains (tools/families, or "anima")
    kind: str  # "ortho", "export" (kohya names), "export_peft" or "vanilla": the file layout (tools/writer_files)
    names: Callable[[str], str]  # ComfyUI module path -> the writer's module name
    metadata: dict[str, str] | None
    rule: Callable[[float, int], int]  # (sigma, the trainer timestep of it) -> the writer's own active rank
    convs: bool = False  # the writer adapts conv layers too
    layout: str = "auto"  # the node's standard_layout
    extra: dict[str, torch.Tensor] | None = None  # per-module extra tensors (vanilla)


def _kohya(path: str) -> str:
    return "lora_unet_" + path.removeprefix("diffusion_model.").replace(".", "_")


def _enferlain(component: str) -> Callable[[str], str]:
    return lambda path: f"tlora_{component}_" + path.removeprefix("diffusion_model.").replace(".", "_")


def _enferlain_sd15(path: str) -> str:
    """Enferlain's SD 1.5 UNet (kohya's original_unet) has diffusers module names: ComfyUI's path mapped back."""
    return "tlora_unet_" + _SD15_NAMES[path.removeprefix("diffusion_model.")].replace(".", "_")


_SD15_NAMES: dict[str, str] = {}  # ComfyUI module path -> diffusers module path (filled for the SD 1.5 model)


CASES = {
    "enferlain_sd15": Case("enferlain", "sd15", "ortho", _enferlain_sd15,
                           {"ss_adapter_module": "library.adapters.tlora"},
                           lambda s, t: wf.rank_lycoris(t, R, 1, 1.0), convs=True),
    "enferlain_sdxl": Case("enferlain", "sdxl", "ortho", _enferlain("unet"),
                           {"ss_adapter_module": "library.adapters.tlora", "ss_adapter_rank": str(R),
                            "ss_adapter_alpha": str(ALPHA)},
                           lambda s, t: wf.rank_lycoris(t, R, 1, 1.0), convs=True),
    "enferlain_sd3": Case("enferlain", "sd3", "ortho", _enferlain("mmdit"),
                          {"ss_adapter_module": "library.adapters.tlora"},
                          lambda s, t: wf.rank_lycoris(t, R, 1, 1.0), convs=True),
    "67372a_flux": Case("sd_scripts_67372a", "flux", "ortho", _kohya,
                        {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(R),
                         "ss_network_args": json.dumps({"algo": "tlora", "tlora_mask_alpha": "1.5"})},
                        lambda s, t: wf.rank_lycoris(t, R, math.ceil(R / 2), 1.5)),
    "67372a_sdxl": Case("sd_scripts_67372a", "sdxl", "ortho", _kohya,
                        {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(R),
                         "ss_network_args": json.dumps({"algo": "tlora", "tlora_min_rank": "2"})},
                        lambda s, t: wf.rank_lycoris(t, R, 2, 1.0), convs=True),
    "export_flux": Case("lycoris_export", "flux", "export", _kohya,
                        {"lycoris_config": json.dumps({"algo": "tlora", "linear_dim": R, "tlora_min_rank": 3,
                                                       "tlora_alpha": 1.7})},
                        lambda s, t: wf.rank_lycoris(t, R, 3, 1.7)),
    "export_sdxl_bare": Case("lycoris_export", "sdxl", "export", _kohya, None,
                             lambda s, t: wf.rank_lycoris(t, R, 1, 1.0), layout="pairs"),
    "anima_lora_studio": Case("anima_lora_studio", "anima", "vanilla", _kohya,
                              {"ss_network_module": "lycoris.kohya", "ss_network_dim": str(R),
                               "ss_network_alpha": str(ALPHA),
                               "ss_network_args": json.dumps({"algo": "lora", "source_algo": "tlora_ortho",
                                                              "model_family": "anima", "preset": "anima_full"})},
                              lambda s, t: wf.rank_anima_lora_studio(s, R)),
    "lora_scripts_next": Case("lora_scripts_next", "anima", "vanilla", _kohya,
                              {"ss_network_module": "networks.tlora_anima", "ss_adapter_algorithm": "timestep_lora",
                               "ss_tlora_min_rank": "3", "ss_tlora_rank_schedule": "cosine",
                               "ss_network_args": json.dumps({"tlora_min_rank": "3"}),
                               "modelspec.architecture": "anima-preview/lora"},
                              lambda s, t: wf.rank_lora_scripts_next(s, R, 3, "cosine")),
    "lora_scripts_next_state": Case("lora_scripts_next", "anima", "vanilla", _kohya,
                                    {"ss_network_module": "networks.tlora_anima"},
                                    lambda s, t: wf.rank_lora_scripts_next(s, R, 2, "linear"),
                                    extra={".tlora_min_rank_state": torch.tensor(2.0, dtype=torch.bfloat16),
                                           ".tlora_rank_schedule_state": torch.tensor(0.0, dtype=torch.bfloat16)}),
}
CASES |= {
    "orangemagic_anima": Case("orangemagic_tlora_anima", "anima", "ortho", _kohya,
                              {"ss_network_module": "networks.lora_tlora_anima", "ss_tlora_min_rank": "2",
                               "ss_tlora_alpha_rank_scale": "1.3", "ss_tlora_max_timestep": "1.0",
                               "ss_tlora_init": "orthogonal", "ss_tlora_sig_type": "last"},
                              lambda s, t: wf.rank_orangemagic(s, R, 2, 1.3)),
    "orangemagic_anima_comfy": Case("orangemagic_tlora_anima", "anima", "export_peft",
                                    lambda path: path, {"ss_network_module": "networks.lora_tlora_anima"},
                                    lambda s, t: wf.rank_orangemagic(s, R, 1, 1.0)),
    "anima_lora": Case("anima_lora", "anima", "vanilla", _kohya,
                       {"ss_network_module": "networks.lora_anima", "ss_network_spec": "ortho",
                        "ss_network_args": json.dumps({"use_timestep_mask": "true", "min_rank": "2",
                                                       "alpha_rank_scale": "1.5"})},
                       lambda s, t: wf.rank_anima_lora_studio(s, R, 2, 1.5)),
}
ANIMA_CASES = {k for k, c in CASES.items() if c.family == "anima"}


def _available() -> list:
    families.base.import_comfy()
    return [pytest.param(k, id=k) for k, c in CASES.items() if c.family != "anima" or anima.available()]


def test_writers_this_host_lacks_are_the_documented_ones():
    """Anima exists from ComfyUI 0.33 on: its writers run there, and none may disappear silently elsewhere."""
    have = {p.values[0] for p in _available()}
    assert set(CASES) - have == (ANIMA_CASES if host_version().startswith("0.3.") else set())


def _build(family: str):
    """(patcher, x, conds) of a tiny model of the family."""
    g = torch.Generator().manual_seed(4)
    if family == "anima":
        return (anima.build(11), *anima.inputs(g))
    fam = families.FAMILIES[family]
    twin = fam.build(11)
    x, conds = fam.inputs(twin, g)
    if family == "sd15":
        import comfy.utils

        names = comfy.utils.unet_to_diffusers(twin.patcher.model.model_config.unet_config)
        _SD15_NAMES.update({v.removesuffix(".weight"): k.removesuffix(".weight") for k, v in names.items()
                            if k.endswith(".weight")})
    return twin.patcher, x, conds


def _layers(patcher, family: str, convs: bool) -> dict[str, torch.nn.Module]:
    """ComfyUI module path -> module: every Linear of the model (Anima: the ten per DiT block its trainers adapt),
    and every 2-D conv where the writer adapts convs."""
    out = {}
    for path, m in patcher.model.named_modules():
        if not path.startswith("diffusion_model."):
            continue
        if family == "anima" and not (path.startswith("diffusion_model.blocks.") and
                                      any(path.endswith(t) for t in anima.TARGETS)):
            continue  # the ten Linears of each DiT block; never the LLM adapter (which its trainers exclude)
        if isinstance(m, torch.nn.Linear) or (convs and isinstance(m, torch.nn.Conv2d)):
            out[path] = m
    return out


def _write(case: Case, layers: dict[str, torch.nn.Module], path) -> dict[str, dict]:
    """The case's file; returns {ComfyUI module path: factors}."""
    spec = [wf.Layer(case.names(p), m.weight.shape[0], m.weight.shape[1], isinstance(m, torch.nn.Conv2d))
            for p, m in layers.items()]
    if case.kind == "ortho":  # the base: the SVD of the layer's weight, as these trainers initialise it
        weights = {case.names(p): m.weight for p, m in layers.items()}
        fac = wf.write_ortho(path, spec, R, ALPHA, case.metadata or {}, seed=5, weights=weights)
    elif case.kind in ("export", "export_peft"):
        fac = wf.write_export(path, spec, R, ALPHA, case.metadata, seed=5, peft=case.kind == "export_peft")
    else:
        fac = wf.write_vanilla(path, spec, R, ALPHA, case.metadata or {}, seed=5, extra=case.extra)
    return {p: fac[case.names(p)] for p in layers}


def _delta(kind: str, f: dict, rank: int) -> torch.Tensor:
    """The writer's weight change (out, in) with its first `rank` ranks, float64: (alpha / R) times
    P diag(l m) Q - P0 diag(l0 m) Q0 (ortho, and the export it came from) or up diag(m) down (vanilla)."""
    m = (torch.arange(R) < rank).double()
    d = {k: v.double() for k, v in f.items()}
    if kind == "vanilla":
        return (ALPHA / R) * d["up"] @ torch.diag(m) @ d["down"]
    return (ALPHA / R) * (d["p"] @ torch.diag(d["lam"] * m) @ d["q"] - d["p0"] @ torch.diag(d["lam0"] * m) @ d["q0"])


def _trainer_conv(module: torch.nn.Conv2d, x: torch.Tensor, f: dict, rank: int) -> torch.Tensor:
    """What a trainer's T-LoRA module adds on a conv layer, computed the way its forward runs it (Enferlain's
    `TloraModule.bypass_forward_diff`, the same in 67372a's fork): two paths, each a 1x1 down projection of x at the
    layer's stride with no padding, no dilation and one group, scaled per rank by lambda times the mask, then a 1x1
    up projection; the base path subtracted, times alpha / R. Nothing of the pack's own "tap" reading is used."""
    m = (torch.arange(R) < rank).double()
    x = x.double()

    def path(q, p, lam):
        h = F.conv2d(x, q.double()[:, :, None, None], None, stride=module.stride, padding=0, dilation=1, groups=1)
        h = h * (lam.double() * m)[None, :, None, None]
        return F.conv2d(h, p.double()[:, :, None, None])

    return (ALPHA / R) * (path(f["q"], f["p"], f["lam"]) - path(f["q0"], f["p0"], f["lam0"]))


def _apply_delta(module: torch.nn.Module, x: torch.Tensor, kind: str, f: dict, rank: int) -> torch.Tensor:
    """What the layer adds for input x at `rank`: a Linear's x delta^T; a conv's by its trainer's own forward."""
    if isinstance(module, torch.nn.Conv2d):
        assert kind == "ortho", kind  # the only layout written with conv modules here
        return _trainer_conv(module, x, f, rank)
    return x.double() @ _delta(kind, f, rank).T


class Hooks:
    """Forward hooks that add the writer's delta at a given rank to each layer (the reference forward)."""

    def __init__(self, layers: dict[str, torch.nn.Module], factors: dict[str, dict], kind: str):
        self.layers, self.factors, self.kind, self.rank, self.handles = layers, factors, kind, None, []

    def __enter__(self):
        for p, m in self.layers.items():
            self.handles.append(m.register_forward_hook(self._hook(p)))
        return self

    def _hook(self, path):
        def add(module, args, out):
            added = _apply_delta(module, args[0], self.kind, self.factors[path], self.rank)
            return (out.double() + added).to(out.dtype)
        return add

    def __exit__(self, *exc):
        for h in self.handles:
            h.remove()


class Probe:
    """Records what one layer of the pack's model receives and returns."""

    def __init__(self, module: torch.nn.Module):
        self.module, self.records, self.on = module, [], False
        self.handle = module.register_forward_hook(self._hook)

    def _hook(self, module, args, out):
        if self.on:
            self.records.append((args[0].detach().clone(), out.detach().clone()))  # later in-place ops

    def error(self, kind: str, factors: dict, rank: int) -> float:
        (x, y), = self.records
        with torch.no_grad():
            added = y.double() - type(self.module).forward(self.module, x).double()  # without the pack's slot
        return rel_l2(added, _apply_delta(self.module, x, kind, factors, rank))


@pytest.mark.parametrize("name", _available())
def test_writer_file_runs_as_its_trainer_ran_it(pack, name, tmp_path, caplog):
    case = CASES[name]
    patcher, x, conds = _build(case.family)
    layers = _layers(patcher, case.family, case.convs)
    assert len(layers) >= 8
    path = tmp_path / f"{name}.safetensors"
    factors = _write(case, layers, path)
    tl = pack.tlora_core.load_tlora(path, standard_layout=case.layout)
    assert tl.writer.id == case.writer, (tl.writer, tl.layout_why)
    plan = pack.engine.plan.plan(patcher, tl)
    assert len(plan.targets) == len(layers) and not plan.unmatched and not plan.skipped, \
        (plan.unmatched[:4], plan.skipped)
    r, mr, al, why = pack.engine.resolve_schedule(tl, "file", 0, 1, 1.0)  # the node's defaults
    apply = pack.engine.apply
    with caplog.at_level(logging.INFO, logger="tlora"):
        clone, app = apply.apply_tlora(patcher, tl, apply.Settings(1.0, r, mr, al))
    warnings = [rec.getMessage() for rec in caplog.records
                if rec.levelno >= logging.WARNING and rec.name.startswith("tlora")]
    assert not warnings, warnings  # a trainer's stored base is its SVD init of this very checkpoint: it fits
    conv = next((p for p, m in layers.items() if isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1)), None)
    probes = {p: Probe(layers[p]) for p in {next(iter(layers)), *([conv] if conv else [])}}
    result: dict[str, dict] = {"rank": {}, "effect": {}, "layers": {}}
    try:
        for t in TIMESTEPS:
            sigma = sigma_for(patcher, t, case.family not in ("sd15", "sdxl"))
            _, ranks = app.state.ranks_for(sigma, patcher.model.model_sampling)
            want = case.rule(float(sigma), t)
            assert ranks == [want], f"t={t} sigma={float(sigma):.4f}: rank {ranks}, {case.writer}'s rule {want}"
            result["rank"][t] = want
            base = capture(patcher, x, sigma, conds)
            for p in probes.values():
                p.records.clear()
                p.on = True
            out = capture(clone, x, sigma, conds)
            for p in probes.values():
                p.on = False
            with Hooks(layers, factors, case.kind.removesuffix("_peft")) as hooks, torch.no_grad():
                effects = {}
                for rr in {want - 1, want, want + 1} & set(range(R + 1)):
                    hooks.rank = rr
                    effects[rr] = capture(patcher, x, sigma, conds).out - base.out
            got = out.out - base.out
            assert effects[want].abs().max() > 1e-4, f"t={t}: the T-LoRA has no measurable effect"
            result["effect"][t] = rel_l2(got, effects[want])
            for rr, eff in effects.items():  # the effect tells the rank from the ranks beside it
                if rr != want:
                    assert rel_l2(got, eff) > 100 * TOL, f"t={t}: rank {rr} looks like rank {want}"
            errs = []
            for path_, p in probes.items():
                kind = case.kind.removesuffix("_peft")
                errs.append(p.error(kind, factors[path_], want))
                for rr in {want - 1, want + 1} & set(range(R + 1)):
                    assert p.error(kind, factors[path_], rr) > 100 * TOL, f"t={t} {path_}: rank {rr}"
            result["layers"][t] = max(errs)
    finally:
        for p in probes.values():
            p.handle.remove()
    RESULTS[name] = {"writer": tl.writer.title, "family": case.family, "comfy_class": type(patcher.model).__name__,
                     "host": host_version(), "modules": len(layers), "convs_kxk": sum(
                         isinstance(m, torch.nn.Conv2d) and m.kernel_size != (1, 1) for m in layers.values()),
                     "curve": tl.curve, "schedule": why, "ranks": result["rank"],
                     "max_effect_error": max(result["effect"].values()),
                     "max_layer_error": max(result["layers"].values())}
    print(name, json.dumps(RESULTS[name]))
    assert max(result["effect"].values()) < TOL, result["effect"]
    assert max(result["layers"].values()) < TOL, result["layers"]
