"""HTTP route the Load T-LoRA node's frontend uses to show a file's rank and recorded schedule."""

from __future__ import annotations

import logging

from aiohttp import web

from tlora_core import TLoRAError

from .apply import read_file
from .loader import lora_path

log = logging.getLogger("tlora.routes")


async def tlora_info(request: web.Request) -> web.Response:
    name = request.query.get("lora_name", "")
    vanilla = request.query.get("vanilla_tlora", "false").lower() == "true"
    try:
        tl = read_file(lora_path(name), vanilla)
    except (TLoRAError, OSError) as e:
        return web.json_response({"error": str(e)}, status=400)
    rec = tl.schedule_defaults()
    return web.json_response({
        "lora_name": name, "format": tl.format, "rank": tl.rank, "modules": len(tl.modules),
        "recorded": {k: {"value": v, "source": src} for k, (v, src) in rec.items()},
    })


def register() -> None:
    try:
        from server import PromptServer
    except ImportError:  # not inside a ComfyUI server (tools, in-process tests)
        return
    instance = getattr(PromptServer, "instance", None)
    if instance is None:
        return
    instance.routes.get("/tlora/info")(tlora_info)
