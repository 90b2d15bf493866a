"""Generate the tiny random-weight models the tests and the demo use (idempotent, seeded, no downloads).

    python scripts/make_tiny_models.py --out .cache/tiny [--which sd15,sdxl,flux,vae] [--seed 0] [--force]

Each model is written twice from the same values: a ComfyUI-format file that ComfyUI's own detection
loads (`<name>_comfy.safetensors`) and the diffusers twin (`<name>_diffusers/`). A `<name>.stamp.json`
records seed and config; a model whose stamp matches and whose files exist is skipped.
See tools/tiny_models.py for what each model is.
"""

from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from tools import tiny_models  # noqa: E402

ALL = ("sd15", "sdxl", "flux", "vae")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default=str(ROOT / ".cache" / "tiny"), help="output folder (default .cache/tiny)")
    ap.add_argument("--which", default=",".join(ALL), help=f"comma-separated subset of {','.join(ALL)}")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--sdxl-variant", default="koala", choices=sorted(tiny_models.SDXL_VARIANTS),
                    help="input transformer layout ComfyUI detection needs (koala is the smallest)")
    ap.add_argument("--flux-single-blocks", type=int, default=0, help="Flux single blocks (~283 MiB each in fp16)")
    ap.add_argument("--fp32", action="store_true", help="store fp32 instead of fp16 (twice the size)")
    ap.add_argument("--force", action="store_true", help="rebuild even when the stamp matches")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    which = [w.strip() for w in args.which.split(",") if w.strip()]
    unknown = sorted(set(which) - set(ALL))
    if unknown:
        ap.error(f"unknown model(s) {unknown}; choose from {','.join(ALL)}")
    common = {"seed": args.seed, "dtype": torch.float32 if args.fp32 else torch.float16, "force": args.force}
    makers = {
        "sd15": lambda: tiny_models.make_sd15(args.out, **common),
        "sdxl": lambda: tiny_models.make_sdxl(args.out, variant=args.sdxl_variant, **common),
        "flux": lambda: tiny_models.make_flux(args.out, single_blocks=args.flux_single_blocks, **common),
        "vae": lambda: tiny_models.make_vae(args.out, **common),
    }
    rows = [makers[w]() for w in which]
    print(f"{'model':<12} {'status':<7} {'seconds':>8} {'MiB':>8}  files")
    for r in rows:
        files = [str(v) for v in r.values() if isinstance(v, Path)]
        print(f"{r['name']:<12} {'cached' if r['cached'] else 'built':<7} {r['seconds']:>8.1f} "
              f"{r['bytes'] / 2**20:>8.1f}  {', '.join(files)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
