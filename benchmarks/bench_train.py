"""Time per training step and peak memory: Train T-LoRA against ComfyUI's own TrainLoraNode (LoRA, same rank),
side by side in one run, on the same model, latent and conditioning. Prints one JSON.

  python benchmarks/bench_train.py --tiny             CPU: an SDXL-layout UNet at 1/2.5 width (fp32, 32x32 latent)
  python benchmarks/bench_train.py --sdxl             CUDA: the SDXL UNet (bf16, 1024x1024: 128x128 latent), rank 64
  python benchmarks/bench_train.py --sdxl --tiny-shape --device cpu   the --sdxl code path in seconds (smoke test)

Each trainer runs in its own process (peak memory is the process's), `2 * steps` optimizer steps, each step timed
at its end (Train T-LoRA's progress callback, ComfyUI's progress bar hook for TrainLoraNode): `step_s` is the median
of steps 2 to n (set-up, SVD init and model loading left out; robust to a shared machine's stalls), with the range.
Targets: TrainLoraNode cannot choose, it adapts every weight of the model (linears, convolutions, norms, biases);
Train T-LoRA runs with `all_linears` (every linear the pack maps), its closest setting, and with its default
`attention`. Every trainer checkpoints (TrainLoraNode's `gradient_checkpointing` input on); `--off-row` adds Train
T-LoRA `attention` without it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))


from benchmarks.bench_step import SDXL_SPEC, SMOKE_SPEC, TINY_SPEC  # noqa: E402  (the step benchmark's shapes)

MODES = {"tiny": dict(spec=TINY_SPEC, device="cpu", dtype="float32", latent=32, rank=16, steps=8),
         "sdxl": dict(spec=SDXL_SPEC, device="cuda", dtype="bfloat16", latent=128, rank=64, steps=10)}
TRAINERS = ("tlora_all_linears", "tlora_attention", "comfy_lora")
OFF_ROW = "tlora_attention_no_checkpointing"


def _model(comfy, spec, dev, dtype):
    """A ComfyUI SDXL-class model from the spec, seeded N(0, 1/fan_in) weights, in a ModelPatcher."""
    import comfy.model_patcher
    import comfy.supported_models

    mc = comfy.supported_models.SDXL(dict(spec.comfy_unet_config()))
    mc.unet_config.update(num_heads=spec.num_heads, num_head_channels=spec.head_channels)
    mc.set_inference_dtype(dtype, None)
    with torch.device(dev):
        model = mc.get_model({}, "", device=dev).eval()
    g = torch.Generator(dev).manual_seed(0)
    with torch.no_grad():
        for name, p in model.diffusion_model.named_parameters():
            v = torch.randn(p.shape, generator=g, device=dev) / p[0].numel() ** 0.5 if p.ndim >= 2 else (
                0.02 * torch.randn(p.shape, generator=g, device=dev) if name.endswith("bias") else
                1 + 0.1 * torch.randn(p.shape, generator=g, device=dev))
            p.copy_(v.to(p.dtype))
    return comfy.model_patcher.ModelPatcher(model, load_device=dev, offload_device=torch.device("cpu"))


def _peak(dev) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def worker(args) -> dict:
    from tools.harness.inproc import import_comfy, import_pack

    import_comfy()
    pack = import_pack()
    import comfy

    mode = dict(MODES[args.mode], **({"spec": SMOKE_SPEC, "latent": 16, "rank": 8, "steps": 2} if args.tiny_shape
                                     else {}))
    dev = torch.device(args.device or mode["device"])
    dtype = getattr(torch, mode["dtype"])
    patcher = _model(comfy, mode["spec"], dev, dtype)
    g = torch.Generator().manual_seed(1)
    latent = torch.randn(1, 4, mode["latent"], mode["latent"], generator=g)
    spec = mode["spec"]
    cond = [[torch.randn(1, 77, spec.context_dim, generator=g), {"pooled_output": torch.randn(1, spec.pooled_dim,
                                                                                                generator=g)}]]
    rank, steps = args.rank or mode["rank"], 2 * mode["steps"]
    stamps: list[float] = []

    def stamp(*_args, **_kwargs):  # at the end of every optimizer step
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stamps.append(time.perf_counter())

    with tempfile.TemporaryDirectory() as d:
        os.environ["TLORA_CACHE_DIR"] = os.path.join(d, "svd")
        t0 = time.perf_counter()
        if args.trainer.startswith("tlora"):
            targets = "all_linears" if args.trainer == "tlora_all_linears" else "attention"
            s = pack.engine.training.TrainSettings(steps=steps, rank=rank, min_rank=1, targets=targets,
                                                   gradient_checkpointing=args.trainer != OFF_ROW, seed=0)
            with torch.inference_mode():
                res = pack.engine.training.train(patcher, [latent], [cond], s, os.path.join(d, "t.safetensors"),
                                                 progress=stamp)
            modules = len(res.modules)
        else:
            comfy.utils.set_progress_bar_global_hook(stamp)
            modules = _comfy_lora(comfy, patcher, latent, cond, steps, rank, dev)
        run_s = time.perf_counter() - t0
    each = [b - a for a, b in itertools.pairwise(stamps)]  # steps 2..n: set-up, SVD init and loading left out
    return {"trainer": args.trainer, "step_s": statistics.median(each), "step_s_range": [min(each), max(each)],
            "steps_timed": len(each), "peak_bytes": _peak(dev), "adapted_modules": modules, "rank": rank,
            "run_s": run_s}


def _comfy_lora(comfy, patcher, latent, cond, steps, rank, dev) -> int:
    """ComfyUI's TrainLoraNode with its own defaults, but LoRA at `rank`, fp32 LoRA, no autocast on the CPU."""
    from comfy_extras.nodes_train import TrainLoraNode

    schema = TrainLoraNode.define_schema()
    kwargs = {}
    for inp in schema.inputs:
        default = getattr(inp, "default", None)
        kwargs[inp.id] = [default]
    options = {inp.id: getattr(inp, "options", None) for inp in schema.inputs}
    dtype = "fp32" if "fp32" in (options.get("training_dtype") or []) else "none"
    # two copies of the latent: 0.3.75's TrainLoraNode fails on a single LATENT (its multi_res flag is unset then)
    kwargs.update(model=[patcher], latents=[{"samples": latent}, {"samples": latent}], positive=[cond],
                  steps=[steps], rank=[rank],
                  algorithm=["LoRA"], batch_size=[1], seed=[0], training_dtype=[dtype if dev.type == "cpu" else
                                                                                  "bf16"],
                  lora_dtype=["fp32" if dev.type == "cpu" else "bf16"], gradient_checkpointing=[True])
    kwargs = {k: v for k, v in kwargs.items() if k in {i.id for i in schema.inputs}}
    with torch.inference_mode():
        out = TrainLoraNode.execute(**kwargs)
    lora = out.result[0] if isinstance(out.result[0], dict) else out.result[1]
    return len({k.rsplit(".", 2)[0] for k in lora if "lora_up" in k or "diff" in k})


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sdxl", action="store_true")
    ap.add_argument("--tiny-shape", action="store_true")
    ap.add_argument("--device")
    ap.add_argument("--rank", type=int, help="override the mode's rank")
    ap.add_argument("--trainer", choices=(*TRAINERS, OFF_ROW))
    ap.add_argument("--off-row", action="store_true", help="also Train T-LoRA (attention) with checkpointing off")
    args = ap.parse_args(argv)
    args.mode = "sdxl" if args.sdxl else "tiny"
    from tools.harness.server import host_version

    if args.trainer:
        print(json.dumps(worker(args)))
        return 0
    rows = {}
    for trainer in (*TRAINERS, *([OFF_ROW] if args.off_row else [])):
        cmd = [sys.executable, __file__, "--trainer", trainer, *(["--sdxl"] if args.sdxl else ["--tiny"]),
               *(["--tiny-shape"] if args.tiny_shape else []), *(["--device", args.device] if args.device else []),
               *(["--rank", str(args.rank)] if args.rank else [])]
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows[trainer] = {"error": res.stderr[-1500:]}
            continue
        rows[trainer] = json.loads(res.stdout.strip().splitlines()[-1])
    lora = rows.get("comfy_lora", {})
    out = {"bench": "train", "mode": args.mode, "tiny_shape": args.tiny_shape, "machine": platform.processor() or
           platform.machine(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "torch": torch.__version__, "comfyui": host_version(), "rows": rows}
    if "step_s" in lora:
        for r in rows.values():
            if "step_s" in r:
                r["step_vs_comfy_lora"] = round(r["step_s"] / lora["step_s"], 3)
                r["peak_vs_comfy_lora"] = round(r["peak_bytes"] / lora["peak_bytes"], 3)
    print(json.dumps(out, indent=1))
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
