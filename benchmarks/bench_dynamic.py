"""ComfyUI's Dynamic VRAM with a T-LoRA, end to end on a GPU: the same T-LoRA sampling run through a real ComfyUI
server with Dynamic VRAM on (the default on NVIDIA GPUs since 0.16: ModelPatcherDynamic streams weights at forward
time) and off (`--disable-dynamic-vram`). Prints one JSON: for each mode the latent with and without the T-LoRA,
the T-LoRA's effect, the base model's latent before and after the T-LoRA run (the model must be untouched), and
the peak VRAM the server reported while sampling; across modes, how far apart the results are.

The same for a scheduled standard LoRA: Load LoRA (timestep schedule) on from 50 % of the sampling, and the same
schedule by ComfyUI's hook keyframes (weights re-patched at the keyframe), each run's seconds, their effect and how
far apart the two routes' latents are in each mode.

    python benchmarks/bench_dynamic.py [--comfy .host/ComfyUI-0.33.0] [--size tiny|sdxl] [--cpu]

`--cpu` runs the same code without a GPU (Dynamic VRAM then falls back to the plain patcher): a smoke test.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import tempfile
import threading
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from tests.reliability import helpers as h  # noqa: E402
from tools import tiny_models as tm  # noqa: E402
from tools import writer_files  # noqa: E402
from tools.harness.server import ComfyServer  # noqa: E402

RANK = 8
STYLE = "style_lora_sdxl.safetensors"


def _peak_vram(srv: ComfyServer, stop: threading.Event, out: list) -> None:
    """The most VRAM the server's device used while sampling (polled from /system_stats)."""
    peak = 0
    while not stop.is_set():
        try:
            dev = srv.get("/system_stats", timeout=2)["devices"][0]
            peak = max(peak, int(dev.get("vram_total", 0)) - int(dev.get("vram_free", 0)))
        except Exception:  # the server is busy: try again
            pass
        time.sleep(0.05)
    out.append(peak)


def run_mode(dynamic: bool, comfy: Path, tiny: dict, loras: Path, cpu: bool) -> dict:
    args = [] if dynamic else ["--disable-dynamic-vram"]
    with tempfile.TemporaryDirectory(prefix="tlora-dyn-") as base:
        files = {"diffusion_models": [tiny["sdxl"]["comfy_file"]], "loras": [loras / "tlora_sdxl", loras / STYLE]}
        os.environ["COMFYUI_PATH"] = str(comfy)
        with ComfyServer(Path(base), models=files, extra_args=args, gpu=not cpu) as srv:
            plain = h.graph(tiny, "sdxl", steps=8)
            with_tlora = h.graph(tiny, "sdxl", [[h.tlora(h.SDXL_LORA, min_rank=2, alpha=1.5)]], steps=8)
            before = h.sample(srv, plain)
            stop, peak = threading.Event(), []
            poller = threading.Thread(target=_peak_vram, args=(srv, stop, peak))
            poller.start()
            try:
                t0 = time.perf_counter()
                tl = h.sample(srv, with_tlora)
                seconds = time.perf_counter() - t0
            finally:
                stop.set()
                poller.join()
            after = h.sample(srv, plain)
            # a scheduled standard LoRA (strength 8 from 50 %) by this pack's node and by ComfyUI's hook keyframes
            node = h.graph(tiny, "sdxl", [[h.scheduled_lora(STYLE, strength_model=8.0, start_percent=0.5)]], steps=8)
            hooks = h.with_hook_keyframes(plain, STYLE, 8.0, [(0.0, 0.0), (0.5, 1.0)])
            sched = {}
            for name, prompt in (("node", node), ("hooks", hooks)):
                h.sample(srv, prompt)  # warm: the LoRA read, the model loaded
                t0 = time.perf_counter()
                sched[name] = (h.sample(srv, h.graph_nonce(prompt)), time.perf_counter() - t0)
            log = srv.log_text()
    return {"dynamic_requested": dynamic, "dynamic_enabled": "DynamicVRAM support detected and enabled" in log,
            "latent": tl, "base": before, "base_unchanged": bool(torch.equal(before, after)),
            "effect_norm": float((tl - before).norm()), "seconds": round(seconds, 2), "peak_vram_bytes": peak[0],
            "scheduled": {"node_seconds": round(sched["node"][1], 2), "hooks_seconds": round(sched["hooks"][1], 2),
                          "node_effect_norm": float((sched["node"][0] - before).norm()),
                          "node_vs_hooks": float((sched["node"][0] - sched["hooks"][0]).norm()
                                                 / (sched["hooks"][0] - before).norm())}}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--comfy", default=str(REPO / ".host" / "ComfyUI-0.33.0"))
    ap.add_argument("--cpu", action="store_true")
    args = ap.parse_args(argv)
    models = REPO / ".cache" / "tiny"
    tiny = {"sdxl": tm.make_sdxl(models)}
    with tempfile.TemporaryDirectory(prefix="tlora-dyn-loras-") as d:
        from diffusers import UNet2DConditionModel

        folder = Path(d) / "tlora_sdxl"
        folder.mkdir()
        unet = UNet2DConditionModel.from_pretrained(str(tiny["sdxl"]["diffusers_dir"]), torch_dtype=torch.float32)
        with contextlib.redirect_stdout(sys.stderr):  # LyCORIS logs to stdout; stdout is the JSON
            tm.write_lycoris_tlora(unet, folder / "pytorch_lora_weights.safetensors", RANK, 4, seed=1,
                                   strength=0.5).restore()
        writer_files.write_style_lora(tiny["sdxl"]["comfy_file"], Path(d) / STYLE)
        rows = {mode: run_mode(mode == "dynamic", Path(args.comfy), tiny, Path(d), args.cpu)
                for mode in ("dynamic", "static")}
    a, b = rows["dynamic"], rows["static"]
    effect = (a["latent"] - a["base"]) - (b["latent"] - b["base"])
    out = {"bench": "dynamic_vram", "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
           "comfyui": Path(args.comfy).name,
           "rel_diff_latent": float((a["latent"] - b["latent"]).norm() / b["latent"].norm()),
           "rel_diff_effect": float(effect.norm() / (b["latent"] - b["base"]).norm()),
           "rows": {k: {kk: vv for kk, vv in v.items() if kk not in ("latent", "base")} for k, v in rows.items()}}
    print(json.dumps(out, indent=1))
    ok = all(r["base_unchanged"] for r in rows.values()) and out["rel_diff_effect"] < 0.05
    ok = ok and all(r["scheduled"]["node_vs_hooks"] < 0.05 for r in rows.values())
    if not args.cpu:  # on a GPU the two modes must really differ
        ok = ok and rows["dynamic"]["dynamic_enabled"] and not rows["static"]["dynamic_enabled"]
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
