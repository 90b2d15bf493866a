"""ComfyUI-TLoRA: run T-LoRA (timestep-dependent LoRA) in ComfyUI with its per-step rank schedule.

Outside ComfyUI (tools, tests) importing this package must not fail: the node modules import
ComfyUI, so they are loaded only when ComfyUI's `comfy_api` is importable.
"""

import importlib.util
import os
import sys

WEB_DIRECTORY = "./js"

_here = os.path.dirname(os.path.abspath(__file__))
if _here not in sys.path:
    sys.path.append(_here)  # lets `import tlora_core` work however ComfyUI loads this folder

if importlib.util.find_spec("comfy_api") is not None:
    from .nodes import comfy_entrypoint  # noqa: F401

__all__ = ["WEB_DIRECTORY"]
