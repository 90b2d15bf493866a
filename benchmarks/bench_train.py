"""Time per training step and peak memory: Train T-LoRA against ComfyUI's own TrainLoraNode (LoRA, same rank),
side by side in one run, on the same model, data and conditioning; with previews; with size buckets. Prints one JSON.

  python benchmarks/bench_train.py --tiny             CPU: an SDXL-layout UNet at 1/2.5 width (fp32, 32x32 latent)
  python benchmarks/bench_train.py --tiny --layout flux   CPU: a Flux.1-layout transformer, 256 wide, 2 + 4 blocks
  python benchmarks/bench_train.py --sdxl             CUDA: the SDXL UNet (bf16, 1024x1024: 128x128 latent), rank 64
  python benchmarks/bench_train.py --flux             CUDA: Flux.1 dev's shape (19 + 38 blocks, bf16, 1024x1024)
  python benchmarks/bench_train.py --sdxl --tiny-shape --device cpu   the --sdxl code path in seconds (smoke test)
  --previews K: a row with previews every K steps; --buckets: rows on 4 images at two sizes and at one size.

Each trainer runs in its own process (peak memory is the process's), `2 * steps` optimizer steps, each step timed
at its end (Train T-LoRA's progress callback, ComfyUI's progress bar hook for TrainLoraNode): `step_s` is the median
of steps 2 to n (set-up, SVD init and model loading left out; robust to a shared machine's stalls), with the range;
`step_s_mean` is the mean over the same steps (previews and their checkpoints inside them included).
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

from benchmarks import train_setup as ts  # noqa: E402

TRAINERS = ("tlora_all_linears", "tlora_attention", "comfy_lora")


def _peak(dev) -> int:
    if dev.type == "cuda":
        return int(torch.cuda.max_memory_allocated(dev))
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM"))


def row_name(trainer: str, data: str, checkpointing: bool, previews: int) -> str:
    return (trainer + ("" if checkpointing else "_no_checkpointing") + ("_previews" if previews else "")
            + ("" if data == "single" else f"_{data}"))


def worker(args) -> dict:
    from tools.harness.inproc import import_comfy, import_pack

    import_comfy()
    pack = import_pack()
    import comfy
    import comfy.utils

    mode = ts.MODES[(args.layout, args.size)]
    dev = torch.device(args.device or mode["device"])
    dtype = getattr(torch, args.dtype or mode["dtype"])
    patcher = ts.model(args.layout, mode["spec"], dev, dtype)
    lat = ts.latents(args.layout, mode["latent"], args.data)
    cond = ts.conditioning(args.layout, mode)
    rank, steps = args.rank or mode["rank"], 2 * (args.steps or mode["steps"])
    stamps: list[float] = []
    pv = None
    if args.preview_every:
        pv = pack.engine.training.preview.Previewer(pack.engine.training.preview.PreviewSettings(
            ts.vae(comfy, args.layout), [cond], every=args.preview_every, steps=args.preview_steps,
            **ts.PREVIEW[args.layout]))
    preview_s: list[float] = []  # the previews' seconds so far, at each stamp

    def stamp(*_args, **_kwargs):  # at the end of every optimizer step
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
        stamps.append(time.perf_counter())
        preview_s.append(pv.seconds if pv is not None else 0.0)

    with tempfile.TemporaryDirectory() as d:
        os.environ["TLORA_CACHE_DIR"] = os.path.join(d, "svd")
        t0 = time.perf_counter()
        if args.trainer.startswith("tlora"):
            targets = "all_linears" if args.trainer == "tlora_all_linears" else "attention"
            s = pack.engine.training.TrainSettings(steps=steps, rank=rank, min_rank=1, targets=targets,
                                                   gradient_checkpointing=args.checkpointing == "on", seed=0)
            with torch.inference_mode():
                res = pack.engine.training.train(patcher, lat, [cond], s, os.path.join(d, "t.safetensors"),
                                                 progress=stamp, preview=pv)
            modules, how = len(res.modules), {"targets": targets}
        else:
            comfy.utils.set_progress_bar_global_hook(stamp)
            modules, how = _comfy_lora(comfy, patcher, lat, cond, steps, rank, dev, dtype, args.data == "buckets")
        run_s = time.perf_counter() - t0
    each = [b - a for a, b in itertools.pairwise(stamps)]  # steps 2..n: set-up, SVD init and loading left out
    span = stamps[-1] - stamps[0]
    out = {"trainer": args.trainer, "data": args.data, "shapes": sorted({"x".join(map(str, t.shape[1:]))
                                                                           for t in lat}),
           "images": sum(t.shape[0] for t in lat), "settings": how, "checkpointing": args.checkpointing == "on",
           "step_s": statistics.median(each), "step_s_range": [min(each), max(each)],
           "step_s_mean": span / len(each), "steps_timed": len(each), "peak_bytes": _peak(dev),
           "adapted_modules": modules, "rank": rank, "run_s": run_s}
    if pv is not None:  # the previews rendered between the first and the last stamp are inside step_s_mean
        inside = preview_s[-1] - preview_s[0]
        out.update(preview_every=args.preview_every, preview_steps=args.preview_steps,
                   previews=len(pv.rows), preview_s=pv.seconds / len(pv.rows), preview_size=list(lat[0].shape[2:]),
                   previews_timed=sum(b > a for a, b in itertools.pairwise(preview_s)),
                   preview_share=inside / span, step_s_mean_without_previews=(span - inside) / len(each))
    return out


def _comfy_lora(comfy, patcher, lat, cond, steps, rank, dev, dtype, buckets: bool) -> tuple[int, dict]:
    """ComfyUI's TrainLoraNode with its own defaults, but LoRA at `rank`, fp32 LoRA, no autocast on the CPU. Several
    images: a caption per image; two sizes: its bucket mode where it has one (0.33: one LATENT per size), else its
    multi-resolution path (0.3.75: every image at its own size)."""
    from comfy_extras.nodes_train import TrainLoraNode

    schema = TrainLoraNode.define_schema()
    ids = {inp.id for inp in schema.inputs}
    kwargs = {inp.id: [getattr(inp, "default", None)] for inp in schema.inputs}
    options = {inp.id: getattr(inp, "options", None) for inp in schema.inputs}
    have = options.get("training_dtype") or []
    if dev.type == "cpu":
        compute = "fp32" if "fp32" in have else "none"
    else:  # fp16: 'none' keeps the model's fp16 (0.33, with its GradScaler); 0.3.75 can only train it in bf16
        compute = "bf16" if dtype != torch.float16 else ("none" if "none" in have else "bf16")
    n = sum(t.shape[0] for t in lat)
    bucket_mode = buckets and "bucket_mode" in ids
    if n == 1:  # two copies of it (0.3.75's TrainLoraNode fails on a single LATENT: its multi_res flag is unset then)
        latents = [{"samples": lat[0]}, {"samples": lat[0]}]
    else:  # bucket mode: one LATENT per size; else one LATENT per image (a batch of several also hits that flag)
        latents = [{"samples": t} for t in lat] if bucket_mode else [{"samples": t[i:i + 1]} for t in lat
                                                                       for i in range(t.shape[0])]
    kwargs.update(model=[patcher], latents=latents, positive=[cond] * n if n > 1 else [cond],
                  steps=[steps], rank=[rank], algorithm=["LoRA"], batch_size=[1], seed=[0],
                  training_dtype=[compute], lora_dtype=["fp32" if dev.type == "cpu" else "bf16"],
                  gradient_checkpointing=[True])
    if bucket_mode:
        kwargs["bucket_mode"] = [True]
    kwargs = {k: v for k, v in kwargs.items() if k in ids}
    with torch.inference_mode():
        out = TrainLoraNode.execute(**kwargs)
    lora = out.result[0] if isinstance(out.result[0], dict) else out.result[1]
    return (len({k.rsplit(".", 2)[0] for k in lora if "lora_up" in k or "diff" in k}),
            {"training_dtype": compute, "bucket_mode": bucket_mode})


def plan(args) -> list[tuple[str, str, str, int]]:
    """(trainer, data, checkpointing, preview_every) of every row."""
    rows = [(t, "single", "on", 0) for t in TRAINERS]
    if args.off_row:
        rows.append(("tlora_attention", "single", "off", 0))
    if args.previews:
        rows.append(("tlora_attention", "single", "on", args.previews))
    if args.buckets:
        rows += [(t, d, "on", 0) for t in ("tlora_attention", "comfy_lora") for d in ("one_size", "buckets")]
    return rows


def compare(rows: dict) -> None:
    """Each row against TrainLoraNode on the same data; previews against the same run without them."""
    for name, r in rows.items():
        lora = rows.get("comfy_lora" + ("" if r.get("data", "single") == "single" else f"_{r.get('data')}"), {})
        if "step_s" in r and "step_s" in lora:
            r["step_vs_comfy_lora"] = round(r["step_s"] / lora["step_s"], 3)
            r["peak_vs_comfy_lora"] = round(r["peak_bytes"] / lora["peak_bytes"], 3)
        plain = rows.get(name.replace("_previews", ""), {})
        if "preview_s" in r and "step_s_mean" in plain:
            r["step_mean_vs_without_previews"] = round(r["step_s_mean"] / plain["step_s_mean"], 3)
        one = rows.get(name.replace("_buckets", "_one_size"), {})
        if name.endswith("_buckets") and "step_s" in r and "step_s" in one:
            r["step_vs_one_size"] = round(r["step_s"] / one["step_s"], 3)
            r["peak_vs_one_size"] = round(r["peak_bytes"] / one["peak_bytes"], 3)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--tiny", action="store_true")
    ap.add_argument("--sdxl", action="store_true")
    ap.add_argument("--flux", action="store_true", help="CUDA, Flux.1 dev's shape (same as --layout flux, full size)")
    ap.add_argument("--layout", choices=("sdxl", "flux"), help="the model's layout (default sdxl)")
    ap.add_argument("--tiny-shape", action="store_true")
    ap.add_argument("--device")
    ap.add_argument("--rank", type=int, help="override the mode's rank")
    ap.add_argument("--steps", type=int, help="override the mode's steps (each run takes twice as many)")
    ap.add_argument("--dtype", choices=("float16", "bfloat16", "float32"), help="override the mode's model dtype")
    ap.add_argument("--off-row", action="store_true", help="also Train T-LoRA (attention) with checkpointing off")
    ap.add_argument("--previews", type=int, default=0, metavar="K", help="also a row with previews every K steps")
    ap.add_argument("--preview-steps", type=int, default=20, help="sampling steps of each preview (node default)")
    ap.add_argument("--buckets", action="store_true", help="also rows on 4 images at two sizes and at one size")
    ap.add_argument("--trainer", choices=TRAINERS, help=argparse.SUPPRESS)  # a worker process: one row
    ap.add_argument("--data", default="single", choices=("single", "one_size", "buckets"), help=argparse.SUPPRESS)
    ap.add_argument("--checkpointing", default="on", choices=("on", "off"), help=argparse.SUPPRESS)
    ap.add_argument("--preview-every", type=int, default=0, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    args.layout = "flux" if args.flux else (args.layout or "sdxl")
    args.size = "smoke" if args.tiny_shape else ("full" if args.sdxl or args.flux else "tiny")
    from tools.harness.server import host_version

    if args.trainer:
        print(json.dumps(worker(args)))
        return 0
    rows = {}
    common = ["--layout", args.layout, *(["--sdxl"] if args.size == "full" else ["--tiny"]),
              *(["--tiny-shape"] if args.tiny_shape else []), *(["--device", args.device] if args.device else []),
              *(["--rank", str(args.rank)] if args.rank else []), *(["--dtype", args.dtype] if args.dtype else []),
              *(["--steps", str(args.steps)] if args.steps else []),
              "--preview-steps", str(args.preview_steps)]
    for trainer, data, ckpt, every in plan(args):
        name = row_name(trainer, data, ckpt == "on", every)
        cmd = [sys.executable, __file__, "--trainer", trainer, "--data", data, "--checkpointing", ckpt,
               "--preview-every", str(every), *common]
        print(f"bench_train: {name}", file=sys.stderr, flush=True)
        res = subprocess.run(cmd, capture_output=True, text=True)
        if res.returncode != 0:
            rows[name] = {"error": res.stderr[-1500:]}
            continue
        rows[name] = json.loads(res.stdout.strip().splitlines()[-1])
        print(f"bench_train: {name}: {json.dumps(rows[name])}", file=sys.stderr, flush=True)
    compare(rows)
    out = {"bench": "train", "layout": args.layout, "mode": args.size, "machine": platform.processor() or
           platform.machine(), "cuda": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "torch": torch.__version__, "dtype": args.dtype or ts.MODES[(args.layout, args.size)]["dtype"],
           "comfyui": host_version(), "load_average": os.getloadavg(),
           "vae": "TAESD-shaped, seeded, built in-process (tools.tiny_models.make_vae)" if args.previews else None,
           "rows": rows}
    print(json.dumps(out, indent=1))
    return 0 if all("error" not in r for r in rows.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
