"""Self-contained copies of LyCORIS T-LoRAs: the SVD base built from a loaded model, stored in the file.

Run once on the full-precision checkpoint the T-LoRA was trained on; the file written then gives the exact
effect on any later storage of that checkpoint (fp8, scaled fp8, GGUF, another dtype).
"""

from __future__ import annotations

import logging
import os

import comfy.model_management

from ..tlora_core import TLoRAError
from ..tlora_core.digest import weight_digest
from ..tlora_core.embed import source_record, write_self_contained
from ..tlora_core.layouts import LYCORIS
from ..tlora_core.svd import compute_base_triplets, default_workers
from . import bases
from .files import read_file, svd_cache
from .plan import plan
from .weights import LOW

log = logging.getLogger("tlora.save")

CREATED_BY = "Save T-LoRA with base"


def output_name(path: str, filename: str) -> str:
    """The output's name: `filename`, or `<input stem>.with_base.safetensors` (written beside the input through
    `files.output_path`)."""
    return filename.strip() or os.path.splitext(os.path.basename(path))[0] + ".with_base.safetensors"


def save_with_base(patcher, path: str, out: str, base_name: str = "", overwrite: bool = False, progress=None) -> str:
    """Write a self-contained copy of the LyCORIS T-LoRA at `path` to `out`, its SVD base built from `patcher`'s
    model (which must hold the full-precision weights it was trained on)."""
    tl = read_file(path, False)
    if tl.format != LYCORIS or not tl.needs_svd_base:
        why = "already stores its SVD base" if tl.format == LYCORIS else f"is {tl.format}, which stores its base"
        raise TLoRAError(path, f"{why}: there is nothing to add (only LyCORIS files need a stored base)")
    if os.path.exists(out) and not overwrite:
        raise TLoRAError(path, f"{os.path.basename(out)} exists: choose another name or switch on 'overwrite'")
    targets = plan(patcher, tl).targets
    weights = bases.layer_weights(patcher, tl, targets)
    low = sorted({w.kind for w in weights.values() if w.precision == LOW})
    if low:
        raise TLoRAError(path, f"the loaded model stores {'/'.join(low)} weights: build the base from the "
                               "full-precision checkpoint the T-LoRA was trained on (load it with weight_dtype "
                               "'default', not an fp8/GGUF copy)")
    device = comfy.model_management.get_torch_device()
    triplets = compute_base_triplets(bases.jobs(patcher.model, targets, weights, device), svd_cache(), progress,
                                     workers=default_workers(device))
    # the checkpoint digest of the rows each module patches, in the trainer's order: what the CLI records from the
    # diffusers checkpoint for the same weights
    digests = {t.adapter.name: weight_digest(bases.with_rows(t, weights[t.key].dequantized("cpu"))) for t in targets}
    source = source_record(base_name, digests, {w.kind for w in weights.values()}, CREATED_BY)
    write_self_contained(tl, triplets, out, source)
    log.info("T-LoRA %s: wrote %s with the SVD base of %d layers", os.path.basename(path), out, len(triplets))
    return out
