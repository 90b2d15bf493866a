"""Import a real ComfyUI and this pack into the current process (CPU), for in-process tests and tools."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

from .server import ROOT, comfy_path

PACK_MODULE = "comfyui_tlora"


def import_comfy() -> Path:
    """Put ComfyUI on sys.path, configured for CPU, and import its core modules once."""
    path = comfy_path()
    if str(path) not in sys.path:
        sys.path.insert(0, str(path))
    import comfy.options

    comfy.options.enable_args_parsing(False)
    import comfy.cli_args
    import torch

    if not torch.cuda.is_available():
        comfy.cli_args.args.cpu = True  # model_management probes CUDA at import time otherwise
    comfy.cli_args.args.disable_api_nodes = True
    import comfy.model_management  # noqa: F401  (initialises the device)
    import folder_paths  # noqa: F401

    return path


def import_pack():
    """This pack as the package `comfyui_tlora` (ComfyUI's own `nodes` module keeps its name)."""
    import_comfy()
    if PACK_MODULE in sys.modules:
        return sys.modules[PACK_MODULE]
    spec = importlib.util.spec_from_file_location(PACK_MODULE, ROOT / "__init__.py",
                                                  submodule_search_locations=[str(ROOT)])
    pkg = importlib.util.module_from_spec(spec)
    sys.modules[PACK_MODULE] = pkg
    spec.loader.exec_module(pkg)
    return pkg
