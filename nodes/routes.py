"""HTTP route the Load T-LoRA node's frontend uses to show a file's rank, recorded schedule and errors."""

from __future__ import annotations

import asyncio
import logging

from aiohttp import web

from ..tlora_core import TLoRAError
from .apply import read_file
from .loader import lora_path

log = logging.getLogger("tlora.routes")


def _info(name: str, vanilla: bool) -> dict:
    tl = read_file(lora_path(name), vanilla)
    return {"lora_name": name, "format": tl.format, "rank": tl.rank, "modules": len(tl.modules),
            "stored_base": tl.stored_base is not None,
            "recorded": {k: {"value": v, "source": src} for k, (v, src) in tl.schedule_defaults().items()}}


async def tlora_info(request: web.Request) -> web.Response:
    name = request.query.get("lora_name", "")
    vanilla = request.query.get("vanilla_tlora", "false").lower() == "true"
    try:
        # reading a file (hundreds of MB for a rank-64 SDXL T-LoRA) runs off the server's event loop
        body = await asyncio.get_running_loop().run_in_executor(None, _info, name, vanilla)
    except (TLoRAError, OSError) as e:
        return web.json_response({"error": str(e)}, status=400)
    return web.json_response(body)


def register() -> None:
    try:
        from server import PromptServer
    except ImportError:  # not inside a ComfyUI server (tools, in-process tests)
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return
    instance.routes.get("/tlora/info")(tlora_info)
