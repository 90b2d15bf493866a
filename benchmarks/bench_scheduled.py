"""Per-step cost of a scheduled LoRA next to the base model, a static LoRA and ComfyUI's hook keyframes: one process,
one JSON, every variant sampled by ComfyUI's own `comfy.sample.sample` (euler, normal, CFG 4) on one model.

  base        the model, no LoRA
  static      the LoRA at constant strength by ComfyUI's LoraLoader route (weights patched once at load)
  node_const  Load LoRA (timestep schedule) at constant strength over the whole range
  node_fade   the node fading the LoRA in over the last half (linear 0 -> 1 from 50 %)
  hooks_fade  the same fade by ComfyUI's hook keyframes (strength 0 from 0 %, 1 from 50 %: weights re-patched at the
              keyframe; its schedule is a step, the node's a ramp, which costs the node nothing more)
Usage: `python benchmarks/bench_scheduled.py` (CPU, one torch thread, the tiny SDXL layout of bench_step.py, rank 16),
`--sdxl` (CUDA, SDXL's full shape in bf16, 1024², rank 64), `--tiny-shape` (smoke test); `--steps`, `--repeats`,
`--rank`, `--threads`, `--every-linear`.
"""

from __future__ import annotations

import argparse
import itertools
import json
import math
import platform
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
sys.path.insert(0, str(REPO / "benchmarks"))

from bench_step import SDXL_SPEC, SMOKE_SPEC, TINY_SPEC, build_models, comfy_version  # noqa: E402

from tools.harness.inproc import import_pack  # noqa: E402


def lora_for(comfy, model, rank: int, seed: int = 0, every_linear: bool = False) -> dict[str, torch.Tensor]:
    """A kohya LoRA of the Linears kohya's sd-scripts targets by default (every Linear inside the transformer
    blocks: attention, feed-forward, proj_in / proj_out), or of every Linear ComfyUI's key map names."""
    key_map = comfy.lora.model_lora_keys_unet(model, {})
    weights = model.state_dict()
    g = torch.Generator().manual_seed(seed)
    sd, seen = {}, set()
    for name, key in key_map.items():
        if not name.startswith("lora_unet_") or not isinstance(key, str) or key in seen:
            continue
        if not every_linear and ".transformer_blocks." not in key and not key.endswith(("proj_in.weight",
                                                                                         "proj_out.weight")):
            continue
        w = weights.get(key)
        if w is None or w.ndim != 2:
            continue
        seen.add(key)
        sd[f"{name}.lora_down.weight"] = torch.randn(rank, w.shape[1], generator=g) / math.sqrt(w.shape[1])
        sd[f"{name}.lora_up.weight"] = 0.3 * torch.randn(w.shape[0], rank, generator=g) / math.sqrt(rank)
        sd[f"{name}.alpha"] = torch.tensor(float(rank))
    return sd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--rank", type=int)
    ap.add_argument("--sdxl", action="store_true", help="SDXL's full shape on CUDA in bf16, 1024², rank 64")
    ap.add_argument("--tiny-shape", action="store_true", help="a tiny UNet on the CPU (a smoke test of the code)")
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads (1: stable on a shared machine)")
    ap.add_argument("--every-linear", action="store_true",
                    help="the LoRA on every Linear (time and class embeddings, resblocks' embedding projections)")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pack = import_pack()
    import comfy.hooks
    import comfy.lora
    import comfy.model_detection
    import comfy.model_patcher
    import comfy.sample
    import comfy.sd
    import comfy.supported_models
    import comfy.utils
    from safetensors.torch import save_file

    spec, dev, dtype, lat, rank = TINY_SPEC, torch.device("cpu"), torch.float32, 32, 16
    if args.sdxl:
        spec, dev, dtype, lat, rank = SDXL_SPEC, torch.device("cuda"), torch.bfloat16, 128, 64
    elif args.tiny_shape:
        spec, lat, rank = SMOKE_SPEC, 16, 8
    rank = args.rank or rank
    models = build_models(comfy, spec, args.sdxl, dev, dtype, dtype)
    timed = models.lo if args.sdxl else models.f32
    del models
    patcher = comfy.model_patcher.ModelPatcher(timed, load_device=dev, offload_device=dev)
    sd = lora_for(comfy, timed, rank, every_linear=args.every_linear)
    path = Path(tempfile.mkdtemp(prefix="tlora_bench_")) / f"lora_{rank}.safetensors"
    save_file(sd, str(path))
    tl = pack.engine.scheduled.read_lora(str(path))
    curve = pack.tlora_core.strength
    g = torch.Generator().manual_seed(1)
    ctx, pooled = spec.context_dim, spec.pooled_dim
    pos = [[torch.randn(1, 77, ctx, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g)}]]
    neg = [[torch.randn(1, 77, ctx, generator=g), {"pooled_output": torch.randn(1, pooled, generator=g)}]]
    latent = torch.zeros(1, 4, lat, lat)
    noise = torch.randn(latent.shape, generator=g)
    hooks = comfy.hooks.create_hook_lora(sd, 1.0, 0.0)
    kf = comfy.hooks.HookKeyframeGroup()
    kf.add(comfy.hooks.HookKeyframe(0.0, 0.0))
    kf.add(comfy.hooks.HookKeyframe(1.0, 0.5))
    hooks.set_keyframes_on_hooks(kf)
    hooked = [comfy.hooks.set_conds_props(conds=[c], strength=1.0, set_cond_area="default", hooks=hooks)[0]
              for c in (pos, neg)]
    variants = {
        "base": (patcher, pos, neg),
        "static": (comfy.sd.load_lora_for_models(patcher, None, sd, 1.0, 0)[0], pos, neg),
        "node_const": (pack.engine.scheduled.apply_scheduled_lora(
            patcher, tl, 1.0, curve.StrengthCurve(0.0, 1.0, 1.0, 1.0, "constant"))[0], pos, neg),
        "node_fade": (pack.engine.scheduled.apply_scheduled_lora(
            patcher, tl, 1.0, curve.StrengthCurve(0.5, 1.0, 0.0, 1.0, "linear"))[0], pos, neg),
        "hooks_fade": (patcher, hooked[0], hooked[1]),
    }
    times: dict[str, list[list[float]]] = {k: [] for k in variants}
    # rounds interleave the variants; the first warms up (and loads the LoRA once); each step's figure is its
    # fastest round (interference on a shared machine only adds time), the median of the rounds' means beside it
    for _ in range(args.repeats + 1):
        for name, (model, p, n) in variants.items():
            # timed between the sampler's step callbacks: the steps themselves (a hook keyframe's re-patching
            # included), not loading the variant's model (switching variants re-patches the shared weights)
            stamps: list[float] = []

            def stamp(*_, into=stamps):
                if dev.type == "cuda":
                    torch.cuda.synchronize(dev)
                into.append(time.perf_counter())

            comfy.sample.sample(model, noise, args.steps, 4.0, "euler", "normal", p, n, latent, denoise=1.0,
                                disable_pbar=True, seed=0, callback=stamp)
            times[name].append([b - a for a, b in itertools.pairwise(stamps)])
    # each step's fastest round, then the mean over the steps (a fade's steps differ: each is compared with itself)
    per_step = {k: statistics.fmean(min(r[i] for r in v[1:]) for i in range(len(v[1]))) for k, v in times.items()}
    median = {k: statistics.median(statistics.fmean(r) for r in v[1:]) for k, v in times.items()}
    steps = {k: [round(min(r[i] for r in v[1:]), 4) for i in range(len(v[1]))] for k, v in times.items()}
    out = {"machine": torch.cuda.get_device_name(dev) if dev.type == "cuda" else platform.processor()
           or platform.machine(), "torch": torch.__version__, "comfyui": comfy_version(),
           "shape": "sdxl" if args.sdxl else "smoke" if args.tiny_shape else "tiny", "dtype": str(dtype),
           "latent": lat, "threads": torch.get_num_threads(), "steps": args.steps, "rank": rank,
           "modules": len(tl.modules), "targets": "every Linear" if args.every_linear else "kohya's default",
           "seconds_per_step": per_step, "median_of_rounds": median, "each_step": steps,
           "ratios": {"node_const / base": per_step["node_const"] / per_step["base"],
                      "node_fade / base": per_step["node_fade"] / per_step["base"],
                      "static / base": per_step["static"] / per_step["base"],
                      "hooks_fade / base": per_step["hooks_fade"] / per_step["base"],
                      "node_fade / hooks_fade": per_step["node_fade"] / per_step["hooks_fade"]},
           "ratios_median_of_rounds": {"node_const / base": median["node_const"] / median["base"],
                                       "node_fade / base": median["node_fade"] / median["base"],
                                       "static / base": median["static"] / median["base"]}}
    print(json.dumps(out, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
