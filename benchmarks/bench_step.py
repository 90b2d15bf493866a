"""Per-step cost of a T-LoRA in ComfyUI next to the base model, a static merge and LyCORIS: one process, one JSON.

Variants, all sampled with the same Euler loop over ComfyUI's "normal" schedule (one batched CFG call per step):
  base          (a) the ComfyUI model, no adapter
  static_merge  (b) the same LoRA at all ranks as a ComfyUI weight patch (what LoraLoader builds), merged at load
  tlora         (c) this pack: apply_tlora + its APPLY_MODEL wrapper, called through BaseModel.apply_model
  lycoris       (d) LyCORIS `tlora` apply_to + set_timestep_mask on the diffusers twin (the trainer's forward)
  diffusers_base    that twin without LyCORIS (d's own floor)
Usage: `python benchmarks/bench_step.py --tiny` (CPU) or `python benchmarks/bench_step.py --sdxl` (CUDA, bf16).
See benchmarks/README.md for the columns.
"""

from __future__ import annotations

import argparse
import atexit
import contextlib
import ctypes
import dataclasses
import gc
import json
import logging
import os
import platform
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tools import tiny_models as tm  # noqa: E402
from tools.harness.inproc import import_pack  # noqa: E402

SDXL_SPEC = tm.UNetSpec((320, 640, 1280), 2, (0, 2, 10), (0, 2, 10), 10, 2048, head_channels=64, linear_proj=True,
                        pooled_dim=1280)
# CPU: SDXL layout (plain level, then attention levels with linear proj, middle block), 1/2.5 the width.
TINY_SPEC = tm.UNetSpec((128, 256, 512), 2, (0, 1, 2), (0, 1, 2), 2, 512, head_channels=64, linear_proj=True,
                        pooled_dim=256)
MODES = {
    "tiny": dict(spec=TINY_SPEC, device="cpu", dtype="float32", latent=32, batch=2, steps=25, rank=16, repeats=5),
    "sdxl": dict(spec=SDXL_SPEC, device="cuda", dtype="bfloat16", latent=128, batch=2, steps=25, rank=64, repeats=2),
}
# --sdxl --tiny-shape: the --sdxl code path at a size that runs in seconds on a CPU (smoke test)
SMOKE_SPEC = tm.UNetSpec((32, 64), 2, (0, 2), (0, 2), 2, 32, head_channels=16, linear_proj=True, pooled_dim=32)
TINY_SHAPE = dict(spec=SMOKE_SPEC, latent=16, steps=6, rank=8, repeats=1)
CTX_LEN, MIN_RANK, ALPHA, STRENGTH, WARMUP = 77, 1, 1.0, 0.3, 2
VARIANTS = ("base", "static_merge", "tlora", "diffusers_base", "lycoris")


def now(dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def mem_now(dev: torch.device) -> tuple[int, int]:
    """(bytes in use, peak since reset_peak): CUDA allocator stats, or the process' RSS / VmHWM on CPU."""
    if dev.type == "cuda":
        return torch.cuda.memory_allocated(dev), torch.cuda.max_memory_allocated(dev)
    with open("/proc/self/status") as f:
        v = {ln.split(":")[0]: int(ln.split()[1]) * 1024 for ln in f if ln.startswith(("VmRSS", "VmHWM"))}
    return v["VmRSS"], v["VmHWM"]


def reset_peak(dev: torch.device) -> None:
    """Collect garbage, give freed heap back to the OS (glibc), and restart the peak counter."""
    gc.collect()
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
        torch.cuda.reset_peak_memory_stats(dev)
    else:
        with contextlib.suppress(OSError), open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # VmHWM := VmRSS


def mmap_threshold(nbytes: int) -> None:
    """glibc: serve allocations >= nbytes by mmap, so freed tensors leave the RSS at once (CPU memory deltas)."""
    with contextlib.suppress(OSError, AttributeError):
        ctypes.CDLL("libc.so.6").mallopt(-3, nbytes)  # M_MMAP_THRESHOLD


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                return f"{line.split(':', 1)[1].strip()} ({os.cpu_count()} cpus, {torch.get_num_threads()} threads)"
    return platform.processor() or "cpu"


def comfy_version() -> str | None:
    with contextlib.suppress(ImportError):
        import comfyui_version

        return comfyui_version.__version__
    return None


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    return float((a - b).abs().max() / b.abs().max())


# ------------------------------------------------------------------------------------------------ models
def build_models(comfy, spec, full_sdxl: bool, dev, lo_dtype, timed_dtype, seed=0):
    """ComfyUI SDXL models in lo_dtype and float32 with identical values, and the diffusers twin sharing the
    timed model's tensors (no copy). Weights N(0, 1/fan_in), norms 1 + N(0, 0.1^2), biases N(0, 0.02^2)."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        twin = UNet2DConditionModel(**spec.diffusers_config())
    if full_sdxl:  # ComfyUI's own detection turns the diffusers layout into the real SDXL unet_config
        unet_config = comfy.model_detection.unet_config_from_diffusers_unet(twin.state_dict(), lo_dtype)
        assert type(comfy.model_detection.model_config_from_unet_config(unet_config)) is comfy.supported_models.SDXL
    else:
        unet_config = spec.comfy_unet_config()

    def make(dtype):
        mc = comfy.supported_models.SDXL(dict(unet_config))
        mc.unet_config.update(num_heads=spec.num_heads, num_head_channels=spec.head_channels)
        mc.set_inference_dtype(dtype, None)
        with torch.device(dev):
            return mc.get_model({}, "", device=dev).eval()

    lo, f32 = make(lo_dtype), make(torch.float32)
    g = torch.Generator(dev).manual_seed(seed)
    with torch.no_grad(), torch.device(dev):
        for name, p in lo.diffusion_model.named_parameters():
            if p.ndim >= 2:
                v = torch.randn(p.shape, generator=g) / p[0].numel() ** 0.5
            elif name.endswith("bias"):
                v = 0.02 * torch.randn(p.shape, generator=g)
            else:
                v = 1.0 + 0.1 * torch.randn(p.shape, generator=g)
            p.copy_(v)
        f32.diffusion_model.load_state_dict(lo.diffusion_model.state_dict())
    timed = f32 if timed_dtype == torch.float32 else lo
    sd = timed.diffusion_model.state_dict()
    key_map = comfy.utils.unet_to_diffusers(unet_config)
    want = set(twin.state_dict())
    dsd = {dk: sd[ck] for dk, ck in key_map.items() if dk in want}
    assert set(dsd) == want, f"diffusers keys without a ComfyUI weight: {sorted(want - set(dsd))[:5]}"
    twin.load_state_dict(dsd, strict=True, assign=True)  # shares storage with `timed`
    assert not any(t.is_meta for t in twin.state_dict().values())
    ptr_key = {t.data_ptr(): "diffusion_model." + k for k, t in sd.items()}
    return SimpleNamespace(lo=lo, f32=f32, timed=timed, twin=twin.eval(), unet_config=unet_config, ptr_key=ptr_key)


def make_lycoris(twin, rank: int, dev, path, pack_svd: bool, strength=STRENGTH, seed=0):
    """SimpleTuner's recipe (generic Attention/FeedForward preset, create_lycoris algo=tlora), factors moved
    off their SVD init by seeded noise of relative size `strength` (standing in for training), saved in fp32.
    pack_svd: take the SVD init from tlora_core.svd (exact, eigh in fp64; on the GPU much faster than LyCORIS'
    full SVD) instead of LyCORIS' own, and fill the pack's SVD cache with it (the pack's load is then cached)."""
    import lycoris.modules.tlora as ly
    from lycoris import LycorisNetwork, create_lycoris

    from tlora_core.digest import cache_key
    from tlora_core.svd import BaseJob, SVDCache, compute_base_triplets

    cache = SVDCache(os.environ.get("TLORA_CACHE_DIR"))

    def init_from_pack(self, org_module, in_dim, out_dim, flat_in_dim):  # fills the pack's cache on the way
        w = org_module.weight.detach()
        job = BaseJob("w", self.lora_dim, (w.shape[0], w[0].numel()), lambda: cache_key(w), lambda: w)
        u, s, v = compute_base_triplets([job], cache)["w"]
        self.q_layer.weight.data, self.p_layer.weight.data = v.T.contiguous(), u.contiguous()
        self.lambda_layer.data = s[None].contiguous()

    keys = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
            "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {k: getattr(LycorisNetwork, k) for k in keys}
    real_init = ly.TLoraModule._initialize_from_svd
    try:
        LycorisNetwork.apply_preset({"target_module": list(tm.UNET_TARGETS)})
        if pack_svd:
            ly.TLoraModule._initialize_from_svd = init_from_pack
        with tm.fast_lycoris(), torch.device(dev):
            net = create_lycoris(twin, 1.0, linear_dim=rank, linear_alpha=rank / 2, algo="tlora")
    finally:
        ly.TLoraModule._initialize_from_svd = real_init
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)
    net.to(dev)
    net.apply_to()
    g = torch.Generator(dev).manual_seed(seed)
    with torch.no_grad(), torch.device(dev):
        for lora in net.loras:
            for w in (lora.q_layer.weight, lora.p_layer.weight):
                w.add_(strength * w.std() * torch.randn(w.shape, generator=g))
            lora.lambda_layer.mul_(1 + strength * torch.randn(lora.lambda_layer.shape, generator=g))
    net.save_weights(str(path), torch.float32, None)
    net.restore()
    return net


def static_lora_patches(comfy, app):
    """The whole T-LoRA (all ranks) as a plain LoRA state dict, loaded with comfy.lora.load_lora like LoraLoader."""
    sd, key_map = {}, {}
    for path, slot in app.bindings:
        down, up_t, k = slot.factors.adapter.prefix_factors(strength=slot.strength)  # delta = up_t.T @ down
        name = path.replace(".", "_")
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up_t.T.contiguous(), down
        sd[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))  # alpha / rank = 1
        key_map[name] = path + ".weight"
    return comfy.lora.load_lora(sd, key_map)


# ------------------------------------------------------------------------------------------------ calls
class Capture:
    """DIFFUSION_MODEL wrapper keeping the network's raw output (eps) of the last call."""

    out = None

    def __call__(self, executor, *args, **kwargs):
        self.out = executor(*args, **kwargs)
        return self.out


def comfy_runner(comfy, patcher, conds, sigmas, capture=None):
    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    wrappers = comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)
    if capture is not None:
        wrappers.setdefault(comfy.patcher_extension.WrappersMP.DIFFUSION_MODEL, {}).setdefault("bench", []).append(
            capture)

    def denoise(x, sb):
        opts = {"wrappers": wrappers, "sample_sigmas": sigmas, "sigmas": sb}
        return patcher.model.apply_model(x, sb, transformer_options=opts, **conds)

    return denoise


def diffusers_runner(twin, ms, dkw, mask=None):
    def eps(x, sb):
        if mask is not None:
            mask(int(ms.timestep(sb)[0]))
        return twin(ms.calculate_input(sb, x).to(twin.dtype), ms.timestep(sb).float(), **dkw).sample.float()

    def denoise(x, sb):
        return ms.calculate_denoised(sb, eps(x, sb), x)

    denoise.eps = eps
    return denoise


@torch.no_grad()
def euler(denoise, x0, sigmas, dev, first=0, last=None):
    """KSampler-like Euler steps first..last-1; returns the final latent and the wall time of each step."""
    x, times = x0.clone(), []
    for i in range(first, last if last is not None else len(sigmas) - 1):
        s = sigmas[i]
        t0 = now(dev)
        den = denoise(x, s.expand(x.shape[0]))
        x = x + (x - den) / s * (sigmas[i + 1] - s)
        times.append(now(dev) - t0)
    return x, times


# ------------------------------------------------------------------------------------------------ main
def setup(args):
    """Everything both timing and experiments need: models, LyCORIS network, T-LoRA file, pack application."""
    pack = import_pack()
    import comfy.lora
    import comfy.model_management
    import comfy.model_patcher
    import comfy.patcher_extension
    import comfy.samplers

    load_tlora = pack.tlora_core.load_tlora

    cfg = dict(MODES[args.mode])
    if args.tiny_shape:
        cfg.update(TINY_SHAPE)
    for k in ("device", "steps", "rank", "repeats", "latent", "dtype"):
        if getattr(args, k, None) is not None:
            cfg[k] = getattr(args, k)
    dev = torch.device(cfg["device"])
    timed_dtype = getattr(torch, cfg["dtype"])
    lo_dtype = torch.bfloat16
    spec, rank, b, lat = cfg["spec"], cfg["rank"], cfg["batch"], cfg["latent"]
    tmp = Path(tempfile.mkdtemp(prefix="tlora_bench_"))
    atexit.register(shutil.rmtree, tmp, True)
    os.environ["TLORA_CACHE_DIR"] = str(tmp / "svd_cache")
    comfy = sys.modules["comfy"]
    import lycoris  # noqa: F401  (creates its logger)

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # it logs to stdout; stdout is for the JSON only

    t0 = time.perf_counter()
    m = build_models(comfy, spec, args.mode == "sdxl" and not args.tiny_shape, dev, lo_dtype, timed_dtype)
    build_s = time.perf_counter() - t0
    t0 = time.perf_counter()
    pack_svd = {"auto": dev.type == "cuda", "pack": True, "own": False}[getattr(args, "lycoris_init", "auto")]
    net = make_lycoris(m.twin, rank, dev, tmp / "tlora.safetensors", pack_svd=pack_svd,
                       strength=getattr(args, "strength", None) or STRENGTH)
    lycoris_s = time.perf_counter() - t0

    patchers = {n: comfy.model_patcher.ModelPatcher(getattr(m, n), dev, dev) for n in ("lo", "f32")}
    timed_name = "f32" if m.timed is m.f32 else "lo"
    tl = load_tlora(tmp / "tlora.safetensors")
    load = {}
    settings = pack.engine.apply.Settings(1.0, rank, MIN_RANK, ALPHA)

    def apply(patcher, t):
        return pack.engine.apply.apply_tlora(patcher, t, settings)

    t0 = time.perf_counter()
    clone_c, app = apply(patchers[timed_name], tl)
    load["tlora_apply_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    apply(patchers[timed_name], tl)
    load["tlora_apply_again_s"] = time.perf_counter() - t0  # the same file on the same model: in-process memo
    # the same adapters with their base, on the other model (its weights are the same values in another dtype)
    based = dataclasses.replace(tl, modules={s.factors.adapter.name: s.factors.adapter for _, s in app.bindings})
    other = "lo" if timed_name == "f32" else "f32"
    clone_o, app_o = apply(patchers[other], based)
    clones, apps = {timed_name: clone_c, other: clone_o}, {timed_name: app, other: app_o}
    clone_b = patchers[timed_name].clone()
    clone_b.add_patches(static_lora_patches(comfy, app), 1.0)

    g = torch.Generator().manual_seed(1)
    ms = m.timed.model_sampling
    sigmas = comfy.samplers.calculate_sigmas(ms, "normal", cfg["steps"]).to(dev)
    x0 = (torch.randn(b, 4, lat, lat, generator=g) * float(ms.sigma_max)).to(dev)
    ctx, pooled, px = torch.randn(b, CTX_LEN, spec.context_dim, generator=g), torch.randn(b, spec.pooled_dim,
                                                                                         generator=g), lat * 8
    y = m.timed.encode_adm(pooled_output=pooled, width=px, height=px, crop_w=0, crop_h=0, target_width=px,
                           target_height=px)
    conds = {"c_crossattn": ctx.to(dev), "y": y.to(dev)}
    time_ids = torch.tensor([[px, px, 0, 0, px, px]] * b, dtype=torch.float32)
    dkw = {"encoder_hidden_states": ctx.to(dev, timed_dtype),
           "added_cond_kwargs": {"text_embeds": pooled.to(dev, timed_dtype), "time_ids": time_ids.to(dev, timed_dtype)}}
    from lycoris.modules.tlora import compute_timestep_mask, set_timestep_mask

    def mask(t):
        set_timestep_mask(compute_timestep_mask(t, 1000, rank, MIN_RANK, ALPHA).to(dev))

    return SimpleNamespace(comfy=comfy, pack=pack, cfg=cfg, dev=dev, timed_dtype=timed_dtype, lo_dtype=lo_dtype,
                           m=m, net=net, tl=tl, app=app, apps=apps, patchers=patchers, timed_name=timed_name,
                           clones=clones, clone_b=clone_b, sigmas=sigmas, x0=x0, conds=conds, dkw=dkw, ms=ms, mask=mask,
                           tmp=tmp,
                           seconds={"build_models": build_s, "lycoris_create_and_save": lycoris_s, **load},
                           svd_cache_prefilled=pack_svd)


def runner(s, variant, capture=None, precision=None):
    """The denoise function of one variant (precision: 'lo' or 'f32' ComfyUI model; default the timed one)."""
    name = precision or s.timed_name
    if variant == "base":
        return comfy_runner(s.comfy, s.patchers[name], s.conds, s.sigmas, capture)
    if variant == "tlora":
        return comfy_runner(s.comfy, s.clones[name], s.conds, s.sigmas, capture)
    if variant == "static_merge":
        return comfy_runner(s.comfy, s.clone_b, s.conds, s.sigmas, capture)
    return diffusers_runner(s.m.twin, s.ms, s.dkw, s.mask if variant == "lycoris" else None)


@contextlib.contextmanager
def lycoris_applied(s, on: bool):
    from lycoris.modules.tlora import clear_timestep_mask

    if on:
        s.net.apply_to()
    try:
        yield
    finally:
        if on:
            s.net.restore()
            clear_timestep_mask()


def time_variants(s):
    """Interleaved rounds of every variant. Estimator: per step the minimum over rounds (interference on a shared
    machine only adds time), averaged over the schedule; the per-round means are reported too."""
    dev, steps = s.dev, len(s.sigmas) - 1
    per_step = {v: [] for v in VARIANTS}
    mem = {}
    mmap_threshold(1 << 16)
    order = ("base", "base", "tlora", *(v for v in VARIANTS if v not in ("base", "tlora")))
    for v in order:  # untimed first calls; memory of base (its 2nd use), then tlora right after it
        with lycoris_applied(s, v == "lycoris"):
            reset_peak(dev)
            start, t0 = mem_now(dev)[0], time.perf_counter()
            denoise = runner(s, v)
            load_s = time.perf_counter() - t0
            euler(denoise, s.x0, s.sigmas, dev, 0, min(WARMUP, steps))
            peak = mem_now(dev)[1]
            gc.collect()
            used = mem_now(dev)[0]
            mem[v] = {"load_s": round(load_s, 3), "delta": used - start, "peak_over_start": peak - start}
    mmap_threshold(32 << 20)
    for rnd in range(s.cfg["repeats"]):
        for v in VARIANTS:
            with lycoris_applied(s, v == "lycoris"):
                denoise = runner(s, v)
                euler(denoise, s.x0, s.sigmas, dev, 0, 1)
                per_step[v].append(euler(denoise, s.x0, s.sigmas, dev)[1])
            print(f"round {rnd} {v}: {1000 * sum(per_step[v][-1]) / steps:.1f} ms/step", file=sys.stderr, flush=True)
    best = {v: 1000 * statistics.fmean(map(min, zip(*ts, strict=True))) for v, ts in per_step.items()}
    rounds = {v: [1000 * sum(t) / steps for t in ts] for v, ts in per_step.items()}
    return best, rounds, mem


@torch.no_grad()
def accuracy(s):
    """Max relative error of the network output (eps) against an fp32 reference at the first, middle and last step.

    reference: the fp32 ComfyUI model with LyCORIS' own get_diff_weight (masked for t) added to each target weight;
    floor: the base model in bf16 vs the same base model in fp32."""
    steps = len(s.sigmas) - 1
    points, dev = [], s.dev
    for i in sorted({0, steps // 2, steps - 1}):
        sb = s.sigmas[i].expand(s.x0.shape[0])
        x = s.x0 * (s.sigmas[i] / s.sigmas[0])
        t = int(s.ms.timestep(sb)[0])
        rank = s.app.state.ranks_for(sb, s.ms)[1][0]

        def eps(variant, precision=None, x=x, sb=sb):
            cap = Capture()
            runner(s, variant, cap, precision)(x, sb)
            return cap.out.float()

        base_lo, base_32 = eps("base", "lo"), eps("base", "f32")
        c_lo, c_32 = eps("tlora", "lo"), eps("tlora", "f32")
        s.mask(t)
        s.comfy.model_management.load_models_gpu([s.patchers["f32"]], force_full_load=True)
        saved = {}
        for lora in s.net.loras:
            key = s.m.ptr_key[lora.org_module[0].weight.data_ptr()]
            w = s.comfy.utils.get_attr(s.m.f32, key)
            saved[key] = w.detach().clone()
            w.data += lora.get_diff_weight(device=dev)[0].to(w.dtype).reshape(w.shape)
        ref = eps("base", "f32")
        for key, w in saved.items():
            s.comfy.utils.get_attr(s.m.f32, key).data.copy_(w)
        with lycoris_applied(s, True):
            d = runner(s, "lycoris").eps(x, sb)
        points.append({"step": i, "sigma": round(float(s.sigmas[i]), 4), "t": t, "rank": rank,
                       "base_bf16_vs_fp32": rel_err(base_lo, base_32), "tlora_bf16_vs_ref": rel_err(c_lo, ref),
                       "tlora_fp32_vs_ref": rel_err(c_32, ref), "lycoris_vs_ref": rel_err(d, ref),
                       "tlora_vs_base_fp32": rel_err(c_32, base_32)})
    worst = {k: max(p[k] for p in points) for k in points[0] if k.endswith(("ref", "fp32"))}
    return {"points": points, "max": worst, "lycoris_dtype": str(s.timed_dtype).removeprefix("torch.")}


@torch.no_grad()
def delta_errors(s, factor_fns=None, dtype=torch.bfloat16, rows=64):
    """Per layer, the adapter's own output d = x @ delta(r)^T computed the pack's way in `dtype` (down-projection,
    then up-projection, from `slot.factors` or another factor function) vs in fp64, as max |error| / max |d|, at
    r = 1, R/2, R: the low-precision error of the adapter's contribution itself, which the whole-model error hides
    under the base model's noise floor. Median / p90 / max over layers and ranks."""
    g = torch.Generator().manual_seed(7)
    factor_fns = factor_fns or {"current": None}
    errs = {n: [] for n in factor_fns}
    for _, slot in s.app.bindings:
        x = torch.randn(rows, slot.factors.adapter.in_features, generator=g).to(s.dev, dtype)
        d64, u64, k64 = slot.factors.adapter.prefix_factors(torch.float64, s.dev, slot.strength)  # uncached
        for r in sorted({1, slot.rank // 2, slot.rank}):
            ref = (x.double() @ d64[: k64 * r].T) @ u64[: k64 * r]
            for name, fn in factor_fns.items():
                down, up_t, k = fn(slot, dtype, s.dev) if fn else slot.factors.get(dtype, torch.device(s.dev))
                errs[name].append(rel_err((x @ down[: k * r].T) @ up_t[: k * r], ref))
    out = {n: {"median": e[len(e) // 2], "p90": e[int(0.9 * len(e))], "max": e[-1]}
           for n, e in ((n, sorted(e)) for n, e in errs.items())}
    return out | {"dtype": str(dtype).removeprefix("torch."), "layers": len(s.app.bindings)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--tiny", dest="mode", action="store_const", const="tiny", help="CPU, small SDXL-shaped UNet")
    mode.add_argument("--sdxl", dest="mode", action="store_const", const="sdxl", help="SDXL-shaped, cuda, bf16")
    ap.add_argument("--tiny-shape", action="store_true", help="with --sdxl: same code path at a tiny size")
    ap.add_argument("--device")
    ap.add_argument("--steps", type=int)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--repeats", type=int)
    ap.add_argument("--latent", type=int, help="latent side (pixels / 8)")
    ap.add_argument("--dtype", help="dtype of the timed model: float32 or bfloat16 (default: the mode's)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default on CPU: 1, stable on shared machines)")
    ap.add_argument("--lycoris-init", choices=("auto", "own", "pack"), default="auto",
                    help="SVD init of the LyCORIS modules: LyCORIS' own full SVD or tlora_core's (auto: pack on CUDA)")
    ap.add_argument("--strength", type=float, help=f"how far the trained factors moved from their init ({STRENGTH})")
    ap.add_argument("--no-accuracy", action="store_true")
    args = ap.parse_args(argv)
    args.mode = args.mode or ("sdxl" if torch.cuda.is_available() else "tiny")
    logging.basicConfig(level=logging.WARNING)
    logging.getLogger().setLevel(logging.WARNING)

    if args.threads or (args.device or MODES[args.mode]["device"]) == "cpu":
        torch.set_num_threads(args.threads or 1)
    s = setup(args)
    ms, rounds, mem = time_variants(s)
    acc = None if args.no_accuracy else accuracy(s) | {"adapter_delta_rel_err": delta_errors(s)["current"]}
    base = ms["base"]
    def nbytes(ts):
        return sum(t.numel() * t.element_size() for t in ts)

    adapters = [sl.factors.adapter for _, sl in s.app.bindings]
    memory = {
        "adapter_factor_bytes": nbytes(t for _, sl in s.app.bindings
                                       for t in sl.factors.get(s.timed_dtype, torch.device(s.dev))[:2]),
        "adapter_source_bytes_host": nbytes({id(t): t for a in adapters for t in (
            a.up, a.down, a.lam, a.base_up, a.base_down, a.base_lam) if t is not None}.values()),
        "model_weight_bytes": nbytes(s.m.timed.diffusion_model.state_dict().values()),
        "targeted_weight_bytes": sum(a.out_features * a.in_features for a in adapters) * s.timed_dtype.itemsize,
        "per_variant": mem}
    memory["tlora_extra_persistent_bytes"] = mem["tlora"]["delta"]
    memory["tlora_extra_peak_bytes"] = mem["tlora"]["peak_over_start"] - mem["base"]["peak_over_start"]
    cfg = s.cfg
    out = {
        "bench": "step", "mode": args.mode + ("+tiny-shape" if args.tiny_shape else ""),
        "device": device_name(s.dev), "torch": torch.__version__,
        "comfyui": comfy_version(),
        "config": {"channels": list(cfg["spec"].channels), "depth": list(cfg["spec"].depth),
                   "context_dim": cfg["spec"].context_dim, "latent": cfg["latent"], "batch": cfg["batch"],
                   "steps": len(s.sigmas) - 1, "dtype": str(s.timed_dtype).removeprefix("torch."),
                   "rank": cfg["rank"], "strength": args.strength or STRENGTH, "min_rank": MIN_RANK, "alpha": ALPHA,
                   "layers": len(s.app.bindings),
                   "repeats": cfg["repeats"], "torch_threads": torch.get_num_threads()},
        "ms_per_step": {v: round(t, 3) for v, t in ms.items()},
        "ratio_to_base": {v: round(t / base, 3) for v, t in ms.items()},
        "lycoris_ratio_to_diffusers_base": round(ms["lycoris"] / ms["diffusers_base"], 3),
        "ms_per_step_rounds": {v: [round(t, 2) for t in ts] for v, ts in rounds.items()},
        "ratio_to_base_median_of_rounds": {v: round(statistics.median(ts) / statistics.median(rounds["base"]), 3)
                                           for v, ts in rounds.items()},
        "seconds": {k: round(v, 3) for k, v in s.seconds.items()},
        "tlora_apply_svd_cache": "prefilled by the LyCORIS init" if s.svd_cache_prefilled else "empty (first load)",
        "memory": memory,
        "accuracy": acc,
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
