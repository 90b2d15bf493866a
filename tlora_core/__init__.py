"""ComfyUI-free core of ComfyUI-TLoRA: schedule math, file formats, adapters, exact SVD base.

Imports torch, numpy and safetensors only; never ComfyUI.
"""

from .adapter import ORTHO, VANILLA, ModuleAdapter
from .errors import TLoRAError
from .formats import TLoRA, load_tlora
from .schedule import DISCRETE, FLOW, TIMESTEP_MODES, active_rank, discrete_timestep, flow_timestep

__all__ = [
    "DISCRETE", "FLOW", "ORTHO", "TIMESTEP_MODES", "VANILLA", "ModuleAdapter", "TLoRA", "TLoRAError",
    "active_rank", "discrete_timestep", "flow_timestep", "load_tlora",
]
