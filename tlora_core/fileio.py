"""Reading T-LoRA files safely: safetensors, and `.pt` pickles that hold nothing but tensors.

Also names what a file is when it is not a LoRA at all (a checkpoint, a VAE, an embedding, ...), from its
key names alone, without reading its tensors.
"""

from __future__ import annotations

import os
import pickle
import re
from collections.abc import Callable

import torch
from safetensors import safe_open

from .errors import TLoRAError

PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt")

StateDict = dict[str, torch.Tensor]


def is_pickle(path: str) -> bool:
    return path.lower().endswith(PICKLE_SUFFIXES)


def read_state_dict(path: str, recognised: Callable[[str], bool]) -> tuple[StateDict, dict[str, str]]:
    """(tensors, metadata) of a T-LoRA file. `recognised(key)` tells a LoRA tensor name; a safetensors file
    without any is refused from its key names alone (a checkpoint is never read whole)."""
    if not os.path.isfile(path):
        raise TLoRAError(path, "file not found")
    if os.path.getsize(path) == 0:
        raise TLoRAError(path, "the file is empty (0 bytes)")
    if is_pickle(path):
        return read_pickle(path), {}
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            foreign = bool(keys) and not any(recognised(k) for k in keys)
            sd = {} if foreign else {k: f.get_tensor(k) for k in keys}
    except Exception as e:
        raise TLoRAError(path, f"not a readable safetensors file (truncated or corrupt?): {e}") from None
    if foreign:
        raise TLoRAError(path, guess_other(keys))
    return sd, metadata


def read_pickle(path: str) -> StateDict:
    """A `torch.save`d dict of tensors (the official repo's Flux `lora.pt`), loaded with weights_only=True."""
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        # name what torch refused, never pass on its hint to retry with weights_only=False
        found = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"Unsupported operand (\d+)", str(e))
        what = "" if found is None else (f" (it calls {found.group(1)})" if "GLOBAL" in found.group(0)
                                         else f" (unsupported pickle opcode {found.group(1)})")
        raise TLoRAError(path, f"refused: the pickle holds objects other than tensors{what}, which could run "
                               "code when loaded; it was not unpickled") from None
    except Exception as e:
        raise TLoRAError(path, f"not a readable PyTorch file (truncated or corrupt?): {e}") from None
    if isinstance(obj, dict) and isinstance(obj.get("state_dict"), dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise TLoRAError(path, "expected a dict of tensors (the official repo's lora.pt), found "
                               f"{type(obj).__name__}")
    return obj


def guess_other(keys: list[str]) -> str:
    """What a file with these tensor names is, when it is not a LoRA."""
    joined = " ".join(keys[:2000])
    if "model.diffusion_model." in joined or ("double_blocks." in joined and "lora" not in joined):
        return "a model checkpoint, not a LoRA"
    if re.search(r"\b(first_stage_model|encoder\.down|decoder\.up|taesd_(en|de)coder\.|vae_scale\b)", joined):
        return "a VAE, not a LoRA"
    if "string_to_param" in joined or "emb_params" in joined or re.search(r"\bclip_[lg]\b", joined):
        return "a textual-inversion embedding, not a LoRA"
    if "hada_w1" in joined or "lokr_w1" in joined or "oft_" in joined:
        return "a LyCORIS file of another algorithm (LoHa/LoKr/OFT), not a T-LoRA"
    if re.search(r"diffusion_model\.|transformer_blocks\.|\b(input_blocks|output_blocks|middle_block)\.\d", joined):
        return "a diffusion-model weight file, not a LoRA"
    return "no T-LoRA or LoRA tensors were recognised"
