"""Load time and memory of a LyCORIS T-LoRA at SDXL shape (all 700 attention + feed-forward linears, rank 64),
measured through the pack's own load path (`nodes/bases.prepare`: storage-aware weights, content keys, exact SVD
base, disk cache, in-process memo), not extrapolated; one JSON on stdout.

  reader         tlora_core.load_tlora of the whole 700-module file
  first          first load ever: empty SVD cache, empty memos (content keys + fp64 Gram eigh + cache write)
  rerun          the same file on the same model again with other sliders / strength (the node re-executes)
  later          the same file on the same model later in the same ComfyUI process, after other files
  restart        the same file and model in a new ComfyUI process (full content keys, cache read)
  peak_rss       peak resident memory growth during the first load, against the largest layer's fp64 working set
Usage: `python benchmarks/bench_load.py` (all 700 layers; ~9 GB of fp32 weights), `--layers 40` for a quick run.
"""

from __future__ import annotations

import argparse
import atexit
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

import psutil
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tools import tiny_models as tm  # noqa: E402
from tools.harness.inproc import import_pack  # noqa: E402
from tools.loadprobe import PeakRSS, lycoris_file, model_and_targets, working_set  # noqa: E402

SDXL_SPEC = tm.UNetSpec((320, 640, 1280), 2, (0, 2, 10), (0, 2, 10), 10, 2048, head_channels=64, linear_proj=True,
                        pooled_dim=1280)


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return torch.cuda.get_device_name(dev)
    for line in open("/proc/cpuinfo"):
        if line.startswith("model name"):
            return f"{line.split(':', 1)[1].strip()} ({psutil.cpu_count()} cpus, {torch.get_num_threads()} threads)"
    return "cpu"


def sdxl_targets() -> list[tuple[str, tuple[int, int]]]:
    """(diffusers module path, (out, in)) of every Linear inside an Attention or FeedForward of SDXL's UNet:
    what SimpleTuner's generic LyCORIS preset targets."""
    from diffusers import UNet2DConditionModel

    with torch.device("meta"):
        unet = UNet2DConditionModel(**SDXL_SPEC.diffusers_config())
    out = []
    for name, mod in unet.named_modules():
        if type(mod).__name__ in ("Attention", "FeedForward"):
            out += [(f"{name}.{c}", (m.out_features, m.in_features)) for c, m in mod.named_modules()
                    if isinstance(m, torch.nn.Linear)]
    return out


def spread(targets, n: int):
    """n layers spread over the network, keeping each shape's share."""
    if n >= len(targets):
        return list(targets)
    return [targets[int(i * len(targets) / n)] for i in range(n)]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, help="layers (default: all 700)")
    ap.add_argument("--rank", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", help="weight dtype (default: float32 on CPU, float16 on CUDA: what ComfyUI holds)")
    ap.add_argument("--threads", type=int, help="torch CPU threads (default: torch's own)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.WARNING)
    if args.threads:
        torch.set_num_threads(args.threads)
    pack = import_pack()
    bases, core = pack.engine.bases, pack.tlora_core
    dev = torch.device(args.device)
    dtype = getattr(torch, args.dtype or ("float16" if dev.type == "cuda" else "float32"))
    targets = sdxl_targets()
    run = spread(targets, args.layers or len(targets))
    tmp = Path(tempfile.mkdtemp(prefix="tlora_load_"))
    atexit.register(shutil.rmtree, tmp, True)
    path = tmp / "tlora_sdxl.safetensors"
    lycoris_file(run, args.rank, path)
    t0 = time.perf_counter()
    tl = core.load_tlora(path)
    reader_s = time.perf_counter() - t0
    patcher, tgts = model_and_targets(pack, run, tl, dtype, dev)
    cache = core.svd.SVDCache(tmp / "svd_cache")
    key = pack.engine.files.file_key(str(path))
    stamps = []

    def progress(done, total):
        stamps.append(time.perf_counter())
        print(f"\r  SVD base {done}/{total}", end="" if done < total else "\n", file=sys.stderr, flush=True)

    def timed():
        t = time.perf_counter()
        prepared = bases.prepare(patcher, tl, tgts, key, cache, dev, progress)
        return prepared, time.perf_counter() - t

    with PeakRSS() as rss:
        prepared, first_s = timed()
    _, rerun_s = timed()  # memo hit
    # other files since: the prepared entry is gone, the weights' content keys are not
    bases._memo(patcher.model).prepared.clear()
    _, later_s = timed()
    bases._memo(patcher.model).prepared.clear()
    bases._memo(patcher.model).digests.clear()  # a new process: nothing in memory, the disk cache full
    _, restart_s = timed()
    largest = working_set({s for _, s in run}, args.rank)
    out = {
        "bench": "load", "device": device_name(dev), "torch": torch.__version__,
        "config": {"layers": len(run), "rank": args.rank, "weight_dtype": str(dtype).removeprefix("torch."),
                   "threads": torch.get_num_threads(),
                   "targeted_weight_bytes": sum(o * n for _, (o, n) in run) * dtype.itemsize},
        "seconds": {"reader": round(reader_s, 2), "first": round(first_s, 2), "rerun": round(rerun_s, 3),
                    "later": round(later_s, 2), "restart": round(restart_s, 2)},
        "first_per_layer_s": round(first_s / len(run), 3),
        "memory": {"peak_rss_growth_bytes": rss.growth, "largest_layer_fp64_working_set_bytes": largest,
                   "svd_factor_bytes": sum((o + n + 1) * args.rank * 4 for _, (o, n) in run),
                   "growth_over_largest_layer": round(rss.growth / largest, 2)},
        "factors_ready": len(prepared.adapters),
    }
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
