"""Save T-LoRA with base: a self-contained copy of a LyCORIS T-LoRA that stores its SVD base.

Run once on the full-precision checkpoint the T-LoRA was trained on; the file it writes then gives the exact
effect on any later storage of that checkpoint (fp8, scaled fp8, GGUF, another dtype).
"""

from __future__ import annotations

import hashlib
import logging
import os

import comfy.model_management
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..tlora_core import TLoRAError
from ..tlora_core.embed import write_self_contained
from ..tlora_core.layouts import LYCORIS
from ..tlora_core.svd import base_triplets, default_workers
from . import bases
from .apply import read_file, svd_cache
from .loader import lora_path
from .plan import plan
from .weights import LOW

log = logging.getLogger("tlora.save")


def output_path(path: str, filename: str) -> str:
    """The output file beside the input one; refuses names with folders in them."""
    name = filename.strip() or os.path.splitext(os.path.basename(path))[0] + ".with_base.safetensors"
    if os.path.basename(name) != name or name in (".", ".."):
        raise TLoRAError(path, f"output name {filename!r} must be a plain file name (it is written beside the input)")
    return os.path.join(os.path.dirname(path), name if name.endswith(".safetensors") else name + ".safetensors")


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
    jobs = bases.jobs(targets, weights, device)
    triplets = base_triplets(jobs, svd_cache(), progress, workers=default_workers(device))
    identity = hashlib.blake2b("".join(j.digest() for j in sorted(jobs, key=lambda j: j.name)).encode(),
                               digest_size=20).hexdigest()
    source = {"checkpoint": base_name.strip() or "unnamed", "checkpoint_digest": identity,
              "storage": ",".join(sorted({w.kind for w in weights.values()})), "created_by": "Save T-LoRA with base"}
    write_self_contained(tl, triplets, out, source)
    log.info("T-LoRA %s: wrote %s with the SVD base of %d layers", os.path.basename(path), out, len(triplets))
    return out


class TLoRASaveWithBase(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="TLoRASaveWithBase",
            display_name="Save T-LoRA with base",
            category="loaders/T-LoRA",
            description=("Writes a self-contained copy of a SimpleTuner/LyCORIS T-LoRA that also stores the SVD base "
                         "it was trained against, built from the model given here. Run it once on the "
                         "full-precision checkpoint the T-LoRA was trained on: the new file then gives the exact "
                         "effect on fp8, scaled-fp8 or GGUF copies of that checkpoint too. LyCORIS still reads it."),
            is_output_node=True,
            inputs=[
                io.Model.Input("model", tooltip="The full-precision checkpoint the T-LoRA was trained on."),
                io.Combo.Input("lora_name", options=folder_paths.get_filename_list("loras"),
                               tooltip="The LyCORIS T-LoRA file (from models/loras)."),
                io.String.Input("filename", default="", tooltip="Output file name, written beside the input; "
                                                                "empty = <name>.with_base.safetensors."),
                io.String.Input("base_name", default="", tooltip="Name of the checkpoint, recorded in the file so "
                                                                 "the loader can say where the base came from."),
                io.Boolean.Input("overwrite", default=False, tooltip="Replace an existing output file."),
            ],
            outputs=[io.String.Output(display_name="FILE", tooltip="Path of the file written.")],
        )

    @classmethod
    def execute(cls, model, lora_name, filename, base_name, overwrite) -> io.NodeOutput:
        pbar = None

        def progress(done, total):
            nonlocal pbar
            pbar = pbar or comfy.utils.ProgressBar(total)
            pbar.update_absolute(done, total)

        path = lora_path(lora_name)
        out = save_with_base(model, path, output_path(path, filename), base_name, overwrite, progress)
        return io.NodeOutput(out, ui={"text": [os.path.basename(out)]})

