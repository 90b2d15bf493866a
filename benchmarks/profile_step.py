"""Where the time of the pack's per-call T-LoRA goes, and what alternative slot designs would save; one JSON.

Same models as bench_step (`--tiny` on CPU by default). Parts:
  rank_cost    one model call at ranks 1, R/2, R vs the base call: fixed per-layer cost vs rank-proportional cost
  slot_overhead  one layer on a 1-row input: alone and with the pack's slot (per-slot host cost)
  delta_precision  per layer: the adapter's own output in bf16 vs fp64
  cprofile     time in the pack's frames (forward wrapper, LayerSlot) per slot call vs torch calls
  ops          torch.profiler op counts and self time added by the T-LoRA at rank R
  designs      whole-schedule ms/step of the shipped slot design (`current`: a fused down-projection + in-place
               addmm per layer, factors written so bf16 never subtracts two large terms) and of `remerge`, the
               alternative for GPUs where per-layer launches dominate (before each call, add the newly active ranks
               into the weights, fused rows and 1x1 convs included; no per-layer work in the forward; undone
               exactly after), each with its max relative error against the fp32 reference.
"""

from __future__ import annotations

import argparse
import contextlib
import cProfile
import json
import logging
import pstats
import statistics
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_step import MODES, Capture, delta_errors, device_name, euler, now, rel_err, runner, setup  # noqa: E402


def one_call(s, variant, sigma, reps=5):
    """Min wall time of `reps` single model calls at `sigma` (after one untimed call)."""
    denoise = runner(s, variant)
    sb = sigma.expand(s.x0.shape[0])
    x = s.x0 * (sigma / s.sigmas[0])
    with torch.no_grad():
        denoise(x, sb)
        times = []
        for _ in range(reps):
            t0 = now(s.dev)
            denoise(x, sb)
            times.append(now(s.dev) - t0)
    return min(times)


def sigma_for_rank(s, rank):
    """The schedule's first sigma whose active rank is >= rank."""
    for sg in s.sigmas[:-1]:
        if s.app.state.ranks_for(sg.expand(1), s.ms)[1][0] >= rank:
            return sg
    return s.sigmas[-2]


# ------------------------------------------------------------------------------------------------ designs
def _add_ranks(model, slot, path, r0, r1, sign):
    """The layer's weight (its fused rows, a 1x1 conv's as a matrix) += sign * strength * delta of ranks r0..r1:
    one in-place addmm in the weight's dtype."""
    if r1 <= r0:
        return
    w = model.get_parameter(path + ".weight").data
    rows = w.view(w.shape[0], -1)
    if slot.out_slice is not None:
        rows = rows.narrow(0, *slot.out_slice)
    down, up_t, k = slot.factors.get(w.dtype, w.device)
    rows.addmm_(up_t[k * r0: k * r1].T, down[k * r0: k * r1], alpha=sign * slot.strength)


class Remerge:
    """Before each model call, add (or remove) the ranks that changed since the last call into the weights;
    the forward then runs the base model's own layers only."""

    def __init__(self, app, model):
        self.app, self.model, self.rank = app, model, 0

    def set_rank(self, r):
        if r == self.rank:
            return
        for p, slot in self.app.bindings:
            lo, hi = sorted((min(self.rank, slot.rank), min(r, slot.rank)))
            _add_ranks(self.model, slot, p, lo, hi, 1 if r > self.rank else -1)
        self.rank = r

    def undo(self):
        self.set_rank(0)


@contextlib.contextmanager
def design(s, name, prec=None):
    """Monkeypatch the pack's LayerSlot / application for the duration of one design (benchmark only)."""
    prec = prec or s.timed_name
    app, model, clone = s.apps[prec], s.patchers[prec].model, s.clones[prec]
    slot_cls = type(app.bindings[0][1])
    real_call = slot_cls.__call__
    wrappers = clone.wrappers[s.comfy.patcher_extension.WrappersMP.APPLY_MODEL][app.key]
    real_wrappers = list(wrappers)
    impl = None
    if name == "remerge":
        impl = Remerge(app, model)

        def wrap(executor, x, t, *args, **kwargs):  # replaces the pack's APPLY_MODEL wrapper
            with torch.no_grad():
                impl.set_rank(max(app.state.ranks_for(t, executor.class_obj.model_sampling)[1]))
            return executor(x, t, *args, **kwargs)

        wrappers[:] = [wrap]
        slot_cls.__call__ = lambda slot, x, y: y
    try:
        yield
    finally:
        if impl is not None:
            with torch.no_grad():
                impl.undo()
        slot_cls.__call__, wrappers[:] = real_call, real_wrappers


def designs(s, repeats):
    """Whole-schedule ms/step (min over rounds per step, averaged) and final-step error vs the fp32 reference."""
    names = ("current", "remerge")
    per = {n: [] for n in ("base", *names)}
    steps = len(s.sigmas) - 1
    for _ in range(repeats):
        for n in per:
            v = "base" if n == "base" else "tlora"
            with design(s, n) if n != "base" else contextlib.nullcontext():
                denoise = runner(s, v)
                per[n].append(euler(denoise, s.x0, s.sigmas, s.dev)[1])
            print(f"design {n}: {1000 * sum(per[n][-1]) / steps:.1f} ms/step", file=sys.stderr, flush=True)
    ms = {n: 1000 * statistics.fmean(map(min, zip(*ts, strict=True))) for n, ts in per.items()}
    # error at the last step after walking the whole schedule (remerge rounds once per rank change)
    last = s.sigmas[-2].expand(s.x0.shape[0])
    x = s.x0 * (s.sigmas[-2] / s.sigmas[0])
    ref = reference(s, x, last)
    errs = {}
    for prec in ("f32", "lo"):
        for n in names:
            with design(s, n, prec), torch.no_grad():
                cap = Capture()
                den = runner(s, "tlora", cap, prec)
                for i in range(steps - 1):
                    den(x, s.sigmas[i].expand(s.x0.shape[0]))
                den(x, last)
                errs.setdefault(n, {})[prec] = rel_err(cap.out.float(), ref)
    cap = Capture()
    with torch.no_grad():
        runner(s, "base", cap, "lo")(x, last)
    floor = rel_err(cap.out.float(), reference(s, x, last, base=True))
    out = {n: {"ms_per_step": round(ms[n], 2), "ratio_to_base": round(ms[n] / ms["base"], 3)} for n in per}
    for n in names:
        out[n]["last_step_rel_err_fp32"] = errs[n]["f32"]
        out[n][f"last_step_rel_err_{str(s.lo_dtype).removeprefix('torch.')}"] = errs[n]["lo"]
    out["base"]["last_step_noise_floor_lo_vs_fp32"] = floor
    return out


@torch.no_grad()
def reference(s, x, sb, base=False):
    """fp32 ComfyUI model with LyCORIS' own masked delta merged (as bench_step.accuracy); base: without it."""
    t = int(s.ms.timestep(sb)[0])
    s.mask(t)
    s.comfy.model_management.load_models_gpu([s.patchers["f32"]], force_full_load=True)
    saved = {}
    for lora in [] if base else s.net.loras:
        key = s.m.ptr_key[lora.org_module[0].weight.data_ptr()]
        w = s.comfy.utils.get_attr(s.m.f32, key)
        saved[key] = w.detach().clone()
        w.data += lora.get_diff_weight(device=s.dev)[0].to(w.dtype).reshape(w.shape)
    cap = Capture()
    runner(s, "base", cap, "f32")(x, sb)
    for key, w in saved.items():
        s.comfy.utils.get_attr(s.m.f32, key).data.copy_(w)
    return cap.out.float()


# ------------------------------------------------------------------------------------------------ profiles
def cprofile_call(s, sigma):
    denoise = runner(s, "tlora")
    sb = sigma.expand(s.x0.shape[0])
    x = s.x0 * (sigma / s.sigmas[0])
    prof = cProfile.Profile()
    with torch.no_grad():
        denoise(x, sb)
        prof.enable()
        denoise(x, sb)
        prof.disable()
    st = pstats.Stats(prof)
    rows = {}
    for (file, _, fn), (_, ncalls, tottime, cumtime, _) in st.stats.items():
        if file.endswith(("nodes/patcher.py", "tlora_core/adapter.py")) or fn.startswith("<built-in method"):
            rows[f"{Path(file).name}:{fn}"] = (ncalls, tottime, cumtime)
    slot_calls = next((v[0] for k, v in rows.items() if k.endswith(":__call__") and "patcher" in k), 0)
    py = sum(v[1] for k, v in rows.items() if "patcher.py" in k or "adapter.py" in k)
    top = sorted(rows.items(), key=lambda kv: -kv[1][1])[:10]
    # tottime of the pack's frames includes the tensor operators they run (`y + d`, `h @ up`): cProfile cannot
    # split those off; slot_overhead measures the pure per-slot cost.
    return {"slot_calls": slot_calls, "pack_frames_tottime_s": round(py, 4),
            "pack_frames_us_per_slot": round(1e6 * py / max(slot_calls, 1), 1),
            "top_tottime": [{"fn": k, "calls": v[0], "tottime_s": round(v[1], 4), "cumtime_s": round(v[2], 4)}
                            for k, v in top]}


def ops_profile(s, sigma):
    from torch.profiler import ProfilerActivity, profile

    out = {}
    sb = sigma.expand(s.x0.shape[0])
    x = s.x0 * (sigma / s.sigmas[0])
    for v in ("base", "tlora"):
        denoise = runner(s, v)
        with torch.no_grad():
            denoise(x, sb)
            acts = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if s.dev.type == "cuda" else [])
            with profile(activities=acts) as prof:
                denoise(x, sb)
        out[v] = {e.key: (e.count, e.self_cpu_time_total / 1e3) for e in prof.key_averages()}
    added = []
    for k, (n, ms) in out["tlora"].items():
        n0, ms0 = out["base"].get(k, (0, 0.0))
        if n > n0:
            added.append({"op": k, "extra_calls": n - n0, "extra_self_cpu_ms": round(ms - ms0, 2)})
    total = {v: round(sum(ms for _, ms in d.values()), 1) for v, d in out.items()}
    return {"self_cpu_ms_total": total, "added_ops": sorted(added, key=lambda a: -a["extra_self_cpu_ms"])[:12]}


def slot_overhead(s, n=2000):
    """CPU time of one layer call on a 1-row input (so FLOPs vanish): the ComfyUI layer alone and with the pack's
    slot (rank R). The difference is the Python + dispatch cost per slot that every step pays 700 times at SDXL (on
    a GPU this is host time per layer, on top of the extra kernel launches)."""
    path, slot = min(s.app.bindings,
                     key=lambda b: b[1].factors.adapter.in_features * b[1].factors.adapter.out_features)
    x = torch.randn(1, slot.factors.adapter.in_features, device=s.dev, dtype=s.timed_dtype)

    def per_call(layer):
        with torch.no_grad():
            for _ in range(50):
                layer(x)
            best = float("inf")
            for _ in range(5):
                t0 = now(s.dev)
                for _ in range(n):
                    layer(x)
                best = min(best, (now(s.dev) - t0) / n)
        return 1e6 * best

    out = {}
    runner(s, "base")  # loads the base patcher: slots ejected
    out["layer_alone_us"] = per_call(s.comfy.utils.get_attr(s.m.timed, path))
    runner(s, "tlora")
    layer = s.comfy.utils.get_attr(s.m.timed, path)
    s.app.state.rank = slot.rank
    try:
        out["with_slot_us"] = per_call(layer)
    finally:
        s.app.state.rank = None
    out["slot_overhead_us"] = out["with_slot_us"] - out["layer_alone_us"]
    return {k: round(v, 2) for k, v in out.items()}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sdxl", dest="mode", action="store_const", const="sdxl", default="tiny")
    ap.add_argument("--tiny-shape", action="store_true")
    ap.add_argument("--device")
    ap.add_argument("--threads", type=int)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--steps", type=int)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--latent", type=int)
    ap.add_argument("--dtype", help="dtype of the timed model (default: the mode's)")
    ap.add_argument("--strength", type=float, help="how far the trained factors moved from their init")
    ap.add_argument("--parts", default="rank_cost,slot_overhead,delta_precision,cprofile,ops,designs")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads or (args.device or MODES[args.mode]["device"]) == "cpu":
        torch.set_num_threads(args.threads or 1)
    s = setup(args)
    rank, n, parts = s.cfg["rank"], len(s.app.bindings), args.parts.split(",")
    t0 = time.perf_counter()
    out = {"bench": "profile", "mode": args.mode, "device": device_name(s.dev), "torch": torch.__version__,
           "config": {"rank": rank, "layers": n, "steps": len(s.sigmas) - 1, "latent": s.cfg["latent"],
                      "dtype": str(s.timed_dtype).removeprefix("torch."), "threads": torch.get_num_threads()}}
    if "rank_cost" in parts:
        cost, base = {}, []
        for r in sorted({1, rank // 2, rank}):  # base measured next to each rank, min of all
            base.append(one_call(s, "base", s.sigmas[0]))
            cost[f"rank_{r}_ms"] = round(1000 * one_call(s, "tlora", sigma_for_rank(s, r)), 2)
        cost["base_ms"] = round(1000 * min(base), 2)
        for r in sorted({1, rank // 2, rank}):
            cost[f"rank_{r}_ratio"] = round(cost[f"rank_{r}_ms"] / cost["base_ms"], 3)
        cost["fixed_us_per_slot"] = round(1e3 * (cost["rank_1_ms"] - cost["base_ms"]) / n, 1)
        out["rank_cost"] = cost
    if "slot_overhead" in parts:
        out["slot_overhead"] = slot_overhead(s)
    if "delta_precision" in parts:
        out["delta_precision"] = delta_errors(s)
    if "cprofile" in parts:
        out["cprofile_rank_R"] = cprofile_call(s, sigma_for_rank(s, rank))
    if "ops" in parts:
        out["ops_rank_R"] = ops_profile(s, sigma_for_rank(s, rank))
    if "designs" in parts:
        out["designs"] = designs(s, args.repeats)
    out["seconds"] = round(time.perf_counter() - t0, 1)
    print(json.dumps(out))


if __name__ == "__main__":
    main()
