"""ComfyUI-TLoRA: run T-LoRA (timestep-dependent LoRA) in ComfyUI with its per-step rank schedule.

Outside ComfyUI (tools, tests) importing this package must not fail: the node modules import
ComfyUI, so they are loaded only when ComfyUI's `comfy_api` is importable. Everything inside the pack
imports relatively (`from ..tlora_core import ...`), so no top-level module name is claimed in ComfyUI.
"""

import importlib.util

WEB_DIRECTORY = "./js"

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

__all__ = ["WEB_DIRECTORY"]
