"""A first load of a LyCORIS T-LoRA through the pack's own load path (`nodes/bases.prepare`) on SDXL-shaped layers,
with its peak resident memory; for the memory test (in a fresh process) and benchmarks/bench_load.py.

    python -m tools.loadprobe --layers 32 [--rank 64]    prints one JSON line
"""

from __future__ import annotations

import argparse
import json
import tempfile
import threading
import time
from pathlib import Path

import psutil
import torch
from safetensors.torch import save_file

# SDXL's attention and feed-forward Linear shapes (out, in) at its 1280-wide level, the largest it has
SDXL_SHAPES = ((1280, 1280), (1280, 2048), (10240, 1280), (1280, 5120))


class PeakRSS:
    """Samples this process' resident memory every few milliseconds while in use; `growth` = peak - start."""

    def __enter__(self) -> PeakRSS:
        self.proc, self.stop, self.peak = psutil.Process(), False, 0
        self.start = self.proc.memory_info().rss
        self.thread = threading.Thread(target=self._run, daemon=True)
        self.thread.start()
        return self

    def _run(self) -> None:
        while not self.stop:
            self.peak = max(self.peak, self.proc.memory_info().rss)
            time.sleep(0.002)

    def __exit__(self, *exc) -> None:
        self.stop = True
        self.thread.join()
        self.growth = max(self.peak, self.proc.memory_info().rss) - self.start


def lycoris_file(layers: list[tuple[str, tuple[int, int]]], rank: int, path: Path, seed: int = 0) -> None:
    """A LyCORIS tlora file (q_layer, p_layer, lambda_layer, alpha) for (module path, (out, in)) layers."""
    g = torch.Generator().manual_seed(seed)
    sd = {}
    for name, (o, i) in layers:
        p = "lycoris_" + name.replace(".", "_")
        sd[f"{p}.q_layer.weight"] = torch.randn(rank, i, generator=g) / i ** 0.5
        sd[f"{p}.p_layer.weight"] = torch.randn(o, rank, generator=g) / rank ** 0.5
        sd[f"{p}.lambda_layer"] = torch.rand(1, rank, generator=g) + 0.5
        sd[f"{p}.alpha"] = torch.tensor(rank / 2)
    save_file(sd, str(path))


def model_and_targets(pack, layers, tl, dtype=torch.float32, device="cpu"):
    """A ModelPatcher over a module holding one Linear per layer (N(0, 1/fan_in) weights) and the plan's Target
    records mapping the file's modules onto it."""
    import comfy.model_patcher

    g = torch.Generator().manual_seed(1)
    model = torch.nn.Module()
    targets = []
    for i, (name, (o, n)) in enumerate(layers):
        lin = torch.nn.Linear(n, o, bias=False, device="meta")
        lin.weight = torch.nn.Parameter((torch.randn(o, n, generator=g) / n ** 0.5).to(device, dtype),
                                        requires_grad=False)
        model.add_module(f"l{i}", lin)
        adapter = tl.modules["lycoris_" + name.replace(".", "_")]
        targets.append(pack.engine.plan.LayerTarget(f"l{i}", f"l{i}.weight", adapter))
    return comfy.model_patcher.ModelPatcher(model, torch.device(device), torch.device(device)), targets


def working_set(shapes, rank: int) -> int:
    """Bytes of one layer's fp64 decomposition: the weight, the Gram matrix and its eigenvectors, the other side."""
    return max(o * n + min(o, n) ** 2 * 2 + max(o, n) * rank for o, n in shapes) * 8


def main(argv: list[str] | None = None) -> None:
    from tools.harness.inproc import import_pack

    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--layers", type=int, default=32)
    ap.add_argument("--rank", type=int, default=64)
    args = ap.parse_args(argv)
    pack = import_pack()
    layers = [(f"m.l{i}", SDXL_SHAPES[i % len(SDXL_SHAPES)]) for i in range(args.layers)]
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "tlora.safetensors"
        lycoris_file(layers, args.rank, path)
        tl = pack.tlora_core.load_tlora(path)
        patcher, targets = model_and_targets(pack, layers, tl)
        cache = pack.tlora_core.svd.SVDCache(Path(d) / "svd_cache")
        with PeakRSS() as rss:
            prepared = pack.engine.bases.prepare(patcher, tl, targets, ("probe",), cache, "cpu")
    shapes = [s for _, s in layers]
    print(json.dumps({"layers": args.layers, "peak_rss_growth": rss.growth,
                      "workers": pack.tlora_core.svd.default_workers("cpu"),
                      "working_set": working_set(shapes, args.rank),
                      "factors": sum((o + n + 1) * args.rank * 4 for o, n in shapes), "ready": len(prepared.adapters)}))


if __name__ == "__main__":
    main()
