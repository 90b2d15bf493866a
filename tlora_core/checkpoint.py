"""Base weights from a diffusers-format checkpoint, for building a self-contained T-LoRA without ComfyUI.

SimpleTuner trains on diffusers models, and a LyCORIS module name is `lycoris_` + the diffusers module path with
'.' -> '_'. A checkpoint here is one `.safetensors` file, or a folder holding them (a diffusers model folder,
sharded or not, or a pipeline folder with `unet/` or `transformer/`). Tensors are read one at a time.
"""

from __future__ import annotations

import glob
import os
from contextlib import ExitStack

import torch
from safetensors import safe_open

from .errors import TLoRAError

_SUBFOLDERS = ("", "unet", "transformer")


def _files(path: str) -> list[str]:
    if os.path.isfile(path):
        return [path]
    for sub in _SUBFOLDERS:
        found = sorted(glob.glob(os.path.join(path, sub, "*.safetensors")))
        if found:
            return found
    raise TLoRAError(path, "no .safetensors checkpoint found (give a file, a diffusers model folder or a "
                           "pipeline folder with unet/ or transformer/)")


class Checkpoint:
    """The weights of a diffusers-format checkpoint by LyCORIS module name, read lazily."""

    def __init__(self, path: str):
        self.path = path
        self._stack = ExitStack()
        self._where: dict[str, tuple[object, str]] = {}  # lycoris name -> (open file, tensor key)
        try:
            for f in _files(path):
                handle = self._stack.enter_context(safe_open(f, framework="pt"))
                for key in handle.keys():
                    if key.endswith(".weight"):
                        self._where["lycoris_" + key[: -len(".weight")].replace(".", "_")] = (handle, key)
        except TLoRAError:
            raise
        except Exception as e:
            self._stack.close()
            raise TLoRAError(path, f"not a readable safetensors checkpoint: {e}") from None

    def __enter__(self) -> Checkpoint:
        return self

    def __exit__(self, *exc: object) -> None:
        self._stack.close()

    def __contains__(self, name: str) -> bool:
        return name in self._where

    def weight(self, name: str) -> torch.Tensor:
        handle, key = self._where[name]
        return handle.get_tensor(key)  # type: ignore[attr-defined, no-any-return]
