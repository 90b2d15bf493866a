"""HTTP routes the nodes' frontend uses: a file's rank, recorded schedule and errors (Load T-LoRA), the training
presets (Train T-LoRA)."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..engine import describe_lora
from ..tlora_core import TLoRAError

log = logging.getLogger("tlora.routes")


async def tlora_info(request: web.Request) -> web.Response:
    """JSON about one file in the loras folders, from its header alone; every error is a JSON `{"error": ...}`."""
    name = request.query.get("lora_name", "")
    vanilla = request.query.get("vanilla_tlora", "false").lower() == "true"
    layout = request.query.get("standard_layout", "auto")
    try:
        # a .pt pickle is loaded to be described, and stat calls can block: off the server's event loop
        body = await asyncio.get_running_loop().run_in_executor(None, describe_lora, name, vanilla, layout)
    except (TLoRAError, OSError) as e:
        return web.json_response({"error": str(e)}, status=400)
    except Exception as e:  # never an HTML 500: the node shows what went wrong
        log.exception("T-LoRA info for %r failed", name)
        return web.json_response({"error": f"T-LoRA file '{name}': {type(e).__name__}: {e}"}, status=500)
    return web.json_response(body)


async def train_presets(request: web.Request) -> web.Response:
    """The Train T-LoRA presets (the node's frontend fills the widgets from them)."""
    from .train import PRESET_VALUES

    return web.json_response(PRESET_VALUES)


def register() -> None:
    try:
        from server import PromptServer
    except ImportError:  # not inside a ComfyUI server (tools, in-process tests)
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return
    instance.routes.get("/tlora/info")(tlora_info)
    instance.routes.get("/tlora/train_presets")(train_presets)
