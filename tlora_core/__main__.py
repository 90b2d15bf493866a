"""Command line of tlora_core (no ComfyUI needed).

  python -m tlora_core info FILE
      what a T-LoRA file is: format, rank, modules, recorded schedule, stored base
  python -m tlora_core embed-base FILE --base CHECKPOINT [--out OUT] [--cache DIR]
      write a self-contained copy of a LyCORIS T-LoRA that also stores its SVD base, built from the diffusers-format
      checkpoint it was trained on (a .safetensors file or a diffusers model / pipeline folder)
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from functools import partial

import torch

from . import TLoRAError, load_tlora
from .checkpoint import Checkpoint
from .digest import cache_key, weight_digest
from .embed import source_record, write_self_contained
from .svd import BaseJob, SVDCache, compute_base_triplets, default_workers

log = logging.getLogger("tlora.cli")


def _info(path: str) -> dict[str, object]:
    tl = load_tlora(path)
    return {"file": path, "format": tl.format, "writer": tl.writer.title, "assumed": tl.writer.assumed,
            "curve": tl.curve, "rank": tl.rank, "modules": len(tl.modules),
            "text_encoder_modules": len(tl.text_encoder_modules), "skipped": len(tl.skipped),
            "schedule": {k: {"value": v, "source": src} for k, (v, src) in tl.schedule_defaults().items()},
            "stored_base": tl.stored_base}


def _float_weight(ckpt: Checkpoint, name: str) -> torch.Tensor:
    return ckpt.weight(name).float()


class _Digests:
    """Per module, from one read of its weight: the SVD cache key, the digest recorded in the file, the storage."""

    def __init__(self, ckpt: Checkpoint):
        self.ckpt = ckpt
        self.weights: dict[str, str] = {}
        self.storage: set[str] = set()

    def __call__(self, name: str) -> str:
        w = self.ckpt.weight(name)
        self.weights[name] = weight_digest(w)
        self.storage.add(str(w.dtype).removeprefix("torch."))
        return cache_key(w)


def embed_base(path: str, base: str, out: str | None = None, cache_dir: str | None = None) -> str:
    """Write `<name>.with_base.safetensors` (or `out`) for a LyCORIS T-LoRA and the checkpoint it was trained on."""
    tl = load_tlora(path)
    out = out or os.path.splitext(path)[0] + ".with_base.safetensors"
    with Checkpoint(base) as ckpt:
        missing = [n for n in tl.modules if n not in ckpt]
        if missing:
            raise TLoRAError(path, f"{len(missing)} of {len(tl.modules)} modules have no weight in {base} (e.g. "
                                   f"{missing[0]}): give the diffusers-format checkpoint the T-LoRA was trained on")
        digests = _Digests(ckpt)
        # no cache: the digest callable still runs (it records what the file needs), the key is just unused
        jobs = [BaseJob(n, a.rank, (a.out_features, a.in_features), partial(digests, n),
                        partial(_float_weight, ckpt, n)) for n, a in tl.modules.items()]

        def progress(done: int, total: int) -> None:
            if done == total or done % 25 == 0:
                log.info("SVD base: %d / %d layers", done, total)

        triplets = compute_base_triplets(jobs, SVDCache(cache_dir), progress, workers=default_workers("cpu"))
    source = source_record(os.path.basename(os.path.normpath(base)), digests.weights, digests.storage,
                           "tlora_core embed-base")
    return write_self_contained(tl, triplets, out, source)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m tlora_core", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="command", required=True)
    p_info = sub.add_parser("info", help="describe a T-LoRA file")
    p_info.add_argument("file")
    p_embed = sub.add_parser("embed-base", help="write a self-contained LyCORIS T-LoRA that stores its SVD base")
    p_embed.add_argument("file", help="the LyCORIS T-LoRA (.safetensors)")
    p_embed.add_argument("--base", required=True, help="the diffusers-format checkpoint it was trained on")
    p_embed.add_argument("--out", help="output file (default: <file>.with_base.safetensors)")
    p_embed.add_argument("--cache", help="SVD cache folder (optional)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    try:
        if args.command == "info":
            print(json.dumps(_info(args.file), indent=1))
        else:
            print(embed_base(args.file, args.base, args.out, args.cache))
    except TLoRAError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
