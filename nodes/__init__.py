"""ComfyUI glue for ComfyUI-TLoRA: thin nodes over tlora_core."""

from comfy_api.v0_0_2 import ComfyExtension, io

from .loader import TLoRALoader
from .preview import TLoRASchedulePreview
from .routes import register
from .save import TLoRASaveWithBase
from .scheduled import TLoRAScheduledLoRA
from .train import TLoRATrain

NODES: list[type[io.ComfyNode]] = [TLoRALoader, TLoRASchedulePreview, TLoRASaveWithBase, TLoRATrain,
                                   TLoRAScheduledLoRA]


register()


class TLoRAExtension(ComfyExtension):
    async def get_node_list(self) -> list[type[io.ComfyNode]]:
        return NODES


async def comfy_entrypoint() -> TLoRAExtension:
    return TLoRAExtension()
