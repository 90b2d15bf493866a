"""Save T-LoRA with base node: a self-contained copy of a LyCORIS T-LoRA that stores its SVD base."""

from __future__ import annotations

import os

import folder_paths
from comfy_api.v0_0_2 import io

from ..engine import lora_path, output_name, output_path, save_with_base
from .common import progress_bar


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
        path = lora_path(lora_name)
        out = output_path(output_name(path, filename), os.path.dirname(path), overwrite, subfolders=False,
                          where="the input file's folder")
        out = save_with_base(model, path, out, base_name, overwrite, progress_bar())
        return io.NodeOutput(out, ui={"text": [os.path.basename(out)]})

