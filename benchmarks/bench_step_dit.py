"""Per-step cost of a T-LoRA on a Flux-layout transformer next to the base model and a static merge; one JSON.

A Flux.1 transformer (double and single blocks, fused qkv / linear1 weights) built by diffusers, loaded through
ComfyUI's own detection, a rank-R LyCORIS `tlora` file written by LyCORIS on every Linear of its blocks, and the
same Euler loop over ComfyUI's flow schedule for: the base model, the pack (apply_tlora + its APPLY_MODEL
wrapper), and the T-LoRA at all ranks merged into the weights as a plain LoRA (what a stock loader costs: nothing
per step). CPU by default at a small width; `--hidden 3072 --double 19 --single 38` is Flux.1's own shape.
Usage: `python benchmarks/bench_step_dit.py` (CPU, ~3 min) or with `--device cuda --dtype bfloat16`.
"""

from __future__ import annotations

import argparse
import json
import logging
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.bench_load import device_name  # noqa: E402
from tools import tiny_models as tm  # noqa: E402
from tools.families.base import load_detected, seeded  # noqa: E402
from tools.harness.inproc import import_pack  # noqa: E402


def now(dev: torch.device) -> float:
    if dev.type == "cuda":
        torch.cuda.synchronize(dev)
    return time.perf_counter()


def once(patcher, x, sigma, conds) -> torch.Tensor:
    """One model call of `patcher` (loaded alone, so a merged patch is in the weights only while it runs)."""
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    opts = {"wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)}
    with torch.no_grad():
        return patcher.model.apply_model(x, sigma.expand(x.shape[0]), transformer_options=opts, **conds).float()


def euler_ms(patcher, x0, conds, sigmas, dev, rounds: int) -> tuple[float, list[float]]:
    """Per-step time (min over rounds per step, mean over steps) of ComfyUI apply_model in an Euler loop."""
    import comfy.model_management
    import comfy.patcher_extension

    comfy.model_management.load_models_gpu([patcher], force_full_load=True)
    opts = {"wrappers": comfy.patcher_extension.copy_nested_dicts(patcher.wrappers)}
    per_round = []
    for _ in range(rounds + 1):  # the first round warms up
        x, times = x0.clone(), []
        for i in range(len(sigmas) - 1):
            s = sigmas[i].expand(x.shape[0])
            t0 = now(dev)
            with torch.no_grad():
                den = patcher.model.apply_model(x, s, transformer_options=opts, **conds)
            x = x + (x - den) / sigmas[i] * (sigmas[i + 1] - sigmas[i])
            times.append(now(dev) - t0)
        per_round.append(times)
    per_round = per_round[1:]
    return 1000 * statistics.fmean(map(min, zip(*per_round, strict=True))), [1000 * statistics.fmean(r)
                                                                               for r in per_round]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--hidden", type=int, default=512, help="model width (heads of 128)")
    ap.add_argument("--double", type=int, default=2)
    ap.add_argument("--single", type=int, default=4)
    ap.add_argument("--latent", type=int, default=32, help="latent side (16 channels; 2x2 patches)")
    ap.add_argument("--rank", type=int, default=16)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    torch.set_num_threads(args.threads)
    pack = import_pack()
    import comfy.lora
    import comfy.samplers
    import lycoris  # noqa: F401  (creates its logger)
    from diffusers import FluxTransformer2DModel

    logging.getLogger("LyCORIS").setLevel(logging.WARNING)  # it logs to stdout; stdout is for the JSON only

    dev, dtype = torch.device(args.device), getattr(torch, args.dtype)
    heads = args.hidden // 128
    with torch.device(dev):  # on a GPU the fp32 twin (48 GB at Flux.1's shape) and LyCORIS' SVD init stay there
        twin = seeded(FluxTransformer2DModel(patch_size=1, in_channels=64, num_layers=args.double,
                                             num_single_layers=args.single, attention_head_dim=128,
                                             num_attention_heads=heads, joint_attention_dim=256,
                                             pooled_projection_dim=64, guidance_embeds=True,
                                             axes_dims_rope=(16, 56, 56)), 0)
    base = load_detected({k: v.to(dtype, copy=True) for k, v in twin.state_dict().items()}, {"num_heads": heads},
                         dtype=dtype)
    tmp = Path(tempfile.mkdtemp(prefix="tlora_dit_"))
    tm.write_lycoris_tlora(twin, tmp / "tlora.safetensors", args.rank, args.rank, targets=tm.FLUX_TARGETS, seed=1,
                           strength=0.3).restore()
    del twin
    if dev.type == "cuda":
        torch.cuda.empty_cache()
    tl = pack.tlora_core.load_tlora(tmp / "tlora.safetensors")
    apply = pack.engine.apply
    t0 = time.perf_counter()
    clone, app = apply.apply_tlora(base, tl, apply.Settings(1.0, args.rank, 1, 1.0))
    apply_s = time.perf_counter() - t0
    merged = base.clone()  # the whole T-LoRA (all ranks) as a plain LoRA patch, merged at load
    sd, key_map = {}, {}
    for path, slot in app.bindings:
        down, up_t, _ = slot.factors.adapter.prefix_factors()
        name = f"{path.replace('.', '_')}_{len(sd)}"
        sd[f"{name}.lora_up.weight"], sd[f"{name}.lora_down.weight"] = up_t.T.contiguous(), down
        sd[f"{name}.alpha"] = torch.tensor(float(down.shape[0]))
        key_map[name] = (path + ".weight", (0, *slot.out_slice)) if slot.out_slice else path + ".weight"
    merged.add_patches(comfy.lora.load_lora(sd, key_map), 1.0)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(1, 16, args.latent, args.latent, generator=g).to(dev, dtype)
    conds = {"c_crossattn": torch.randn(1, 64, 256, generator=g).to(dev, dtype),
             "y": torch.randn(1, 64, generator=g).to(dev, dtype), "guidance": torch.tensor([3.5], device=dev)}
    sigmas = comfy.samplers.calculate_sigmas(base.model.model_sampling, "simple", args.steps).to(dev)
    s_end = torch.tensor([1e-4], device=dev)  # t = 0: every rank active, the T-LoRA equals the merged LoRA
    base_before = once(base, x0, s_end, conds)
    ms = {}
    for name, p in (("base", base), ("tlora", clone), ("static_merge", merged)):
        ms[name] = euler_ms(p, x0, conds, sigmas, dev, args.rounds)
    tl, mg, b = (once(p, x0, s_end, conds) for p in (clone, merged, base))
    checks = {"base_untouched_max_abs": float((b - base_before).abs().max()),
              "tlora_vs_static_merge_at_t0": float((tl - mg).norm() / (mg - b).norm().clamp_min(1e-30))}
    out = {"bench": "step_dit", "layout": "Flux.1", "device": device_name(dev), "torch": torch.__version__,
           "config": {"hidden": args.hidden, "double": args.double, "single": args.single, "latent": args.latent,
                      "tokens": (args.latent // 2) ** 2 + 64, "rank": args.rank, "layers": len(app.bindings),
                      "fused_slices": sum(s.out_slice is not None for _, s in app.bindings), "steps": args.steps,
                      "dtype": args.dtype, "threads": torch.get_num_threads()},
           "ms_per_step": {k: round(v[0], 2) for k, v in ms.items()},
           "ratio_to_base": {k: round(v[0] / ms["base"][0], 3) for k, v in ms.items()},
           "ratio_to_base_median_of_rounds": {k: round(statistics.median(a / b for a, b in zip(
               v[1], ms["base"][1], strict=True)), 3) for k, v in ms.items()},
           "tlora_apply_s": round(apply_s, 2), "checks": checks}
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
