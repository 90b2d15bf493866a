"""Shared pieces of the per-family key maps: the spellings one diffusers module name gets in a key map."""

from __future__ import annotations

from typing import Any

KeyMapTarget = Any  # "diffusion_model.<key>.weight" | (key, (0, start, size)) | (key, None, row_fn)


def put(key_map: dict, diffusers_name: str, target: KeyMapTarget) -> None:
    """Map one diffusers module (dotted path, no `.weight`) to a ComfyUI weight target, in every spelling trainers
    use: SimpleTuner/LyCORIS `lycoris_<flat>`, diffusers/PEFT `transformer.<name>`, OneTrainer
    `lora_transformer_<flat>` and the bare name."""
    flat = diffusers_name.replace(".", "_")
    for k in (f"lycoris_{flat}", f"transformer.{diffusers_name}", f"lora_transformer_{flat}", diffusers_name):
        key_map[k] = target


def put_diffusers_map(key_map: dict, diffusers: dict[str, KeyMapTarget]) -> None:
    """Every weight of one of ComfyUI's `*_to_diffusers` maps (`<diffusers name>.weight` -> target), in every
    spelling (`put`)."""
    for name, target in diffusers.items():
        if name.endswith(".weight"):
            put(key_map, name[: -len(".weight")], target)


def weight(comfy_module: str) -> str:
    """The BaseModel weight key of a diffusion-model module path."""
    return f"diffusion_model.{comfy_module}.weight"


def rows(comfy_module: str, start: int, size: int) -> tuple[str, tuple[int, int, int]]:
    """A row slice of a fused weight."""
    return weight(comfy_module), (0, start, size)
