"""Check tiny twins quickly: `python -m tools.families.check [name ...]` builds each family's twin through ComfyUI's
detection and prints the class detected and how far ComfyUI's forward is from the diffusers one (no T-LoRA)."""

from __future__ import annotations

import sys
import time

import torch

from . import FAMILIES
from .base import capture, rel_max, sigma_for


def check(name: str) -> float:
    fam = FAMILIES[name]
    t0 = time.perf_counter()
    twin = fam.build(0)
    cls = type(twin.patcher.model).__name__
    assert cls == fam.comfy_class, f"{name}: detected {cls}, expected {fam.comfy_class}"
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(1))
    call = capture(twin.patcher, x, sigma_for(twin.patcher, 600, fam.flow), conds)
    with torch.no_grad():
        err = rel_max(call.out, fam.reference(twin, call))
    print(f"{name:<12} {cls:<14} base forward rel err {err:.1e}  ({time.perf_counter() - t0:.1f} s)")
    return err


if __name__ == "__main__":
    names = sys.argv[1:] or [n for n, f in FAMILIES.items() if f.available()]
    bad = [n for n in names if check(n) > 1e-4]
    sys.exit(1 if bad else 0)
