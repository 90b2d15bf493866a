"""Which timestep the trainer fed its rank mask, for a ComfyUI model's sampler sigma.

  discrete models (SD1.5, SDXL, ...):  the model's own integer timestep for sigma: the nearest entry of its
                                       discrete sigma table (what `ModelSamplingDiscrete.timestep` computes)
  flow models (SD3, Flux, Wan, ...):   int(sigma * 1000), sigma after shift (SimpleTuner, every flow family)
  continuous EDM (CosXL, Playground):  trained as DDPM models: the SD/SDXL DDPM timestep of the same noise level
Samplings whose trainer timestep is unknown (Stable Cascade, Cosmos) are refused in `auto`: never all ranks silently.
"""

from __future__ import annotations

from collections.abc import Callable

import comfy.model_sampling as ms_mod
import torch

from ..tlora_core import schedule

AUTO = "auto"
MODES = (AUTO, *schedule.TIMESTEP_MODES)

Rule = Callable[[torch.Tensor], list[float]]


class UnknownSampling(ValueError):
    pass


def _table_timestep(sigmas: torch.Tensor, sigma: torch.Tensor) -> list[float]:
    """Nearest entry of a discrete sigma table, in log space (ComfyUI's `ModelSamplingDiscrete.timestep`)."""
    log_sigmas = sigmas.float().log()
    dists = sigma.detach().float().reshape(-1).log().to(log_sigmas.device)[None, :] - log_sigmas[:, None]
    return [float(i) for i in dists.abs().argmin(dim=0).tolist()]


_SD_TABLE: list[torch.Tensor] = []


def sd_sigmas() -> torch.Tensor:
    """The SD / SDXL DDPM sigma table (scaled-linear betas 0.00085..0.012, 1000 steps)."""
    if not _SD_TABLE:
        _SD_TABLE.append(ms_mod.ModelSamplingDiscrete().sigmas.detach().float().cpu())
    return _SD_TABLE[0]


def kind_of(model_sampling) -> str:
    """'flow', 'discrete', 'edm' or 'unknown' for a ComfyUI model_sampling object."""
    if isinstance(model_sampling, (ms_mod.CONST, ms_mod.ModelSamplingDiscreteFlow, ms_mod.ModelSamplingFlux)):
        return "flow"
    if isinstance(model_sampling, ms_mod.StableCascadeSampling):
        return "unknown"
    if isinstance(model_sampling, ms_mod.ModelSamplingDiscrete):
        return "discrete"
    cosmos = getattr(ms_mod, "ModelSamplingCosmosRFlow", None)
    if isinstance(model_sampling, ms_mod.ModelSamplingContinuousEDM) and not (cosmos and isinstance(model_sampling,
                                                                                                      cosmos)):
        return "edm"
    return "unknown"


def sampling_name(model_sampling) -> str:
    """ComfyUI's sampling class behind a model's (composed) model_sampling, e.g. 'ModelSamplingContinuousEDM'."""
    names = [c.__name__ for c in type(model_sampling).__mro__
             if c.__module__ == ms_mod.__name__ and "Sampling" in c.__name__]
    return names[0] if names else type(model_sampling).__name__


# Model classes whose known T-LoRA trainer feeds its mask something the flow rule would not reproduce: SimpleTuner
# trains MiniMax H3 / Music 3 with t = 1 - sigma (in [0, 1]) against T = 1000, so int(t) is 0 and every rank is on at
# every step. Refused in `auto` like an unknown sampling, with what to do.
UNLIKE_FLOW = {"MiniMaxH3": "MiniMax H3", "MiniMaxMusic3": "MiniMax Music 3"}


def check_model(mode: str, model) -> None:
    """Refuse `auto` on model classes whose trainers do not follow the rule their sampling suggests."""
    if mode != AUTO or model is None:
        return
    names = {c.__name__ for c in type(model).__mro__}
    for cls, title in UNLIKE_FLOW.items():
        if cls in names:
            raise UnknownSampling(f"{title}: its T-LoRA trainer (SimpleTuner) feeds the rank mask t = 1 - sigma "
                                  "against T = 1000, so every rank is active at every step: set schedule_source to "
                                  "'all_ranks' to run such a file as it was trained, or timestep_mode to 'flow' for a "
                                  "file trained with int(sigma * 1000)")


def resolve(mode: str, model_sampling, model=None) -> tuple[str, str]:
    """(concrete mode DISCRETE / FLOW, description) for a node's timestep_mode on this model (`model`: the BaseModel,
    for the classes whose trainers are known not to follow their sampling)."""
    if mode not in MODES:
        raise ValueError(f"timestep_mode must be one of {', '.join(MODES)}, got {mode!r}")
    check_model(mode, model)
    kind = kind_of(model_sampling)
    name = sampling_name(model_sampling)
    if mode == schedule.FLOW:
        return schedule.FLOW, "flow: int(sigma * 1000)"
    if mode == schedule.DISCRETE or kind == "discrete":
        if kind in ("discrete", "edm"):
            return schedule.DISCRETE, ("the model's discrete timestep" if kind == "discrete"
                                       else "the SD/SDXL DDPM timestep of the same noise level (EDM sampling)")
        raise UnknownSampling(f"timestep_mode 'discrete' needs a discrete-time or EDM model; this one samples "
                              f"with {name}")
    if kind == "flow":
        return schedule.FLOW, "flow: int(sigma * 1000)"
    if kind == "edm":
        return schedule.DISCRETE, "the SD/SDXL DDPM timestep of the same noise level (EDM sampling)"
    raise UnknownSampling(f"this model samples with {name}, for which the trainer's timestep is not known: set "
                          "timestep_mode to 'discrete' (DDPM timestep of the noise level) or 'flow' "
                          "(int(sigma * 1000)) to say how the T-LoRA was trained")


def rule(mode: str, model_sampling, integer: bool = True) -> Rule:
    """sigma tensor [B] -> the trainer's timestep per item, for a resolved mode."""
    concrete, _ = resolve(mode, model_sampling)
    if concrete == schedule.FLOW:
        def flow(sigma: torch.Tensor) -> list[float]:
            return [schedule.flow_timestep(s, integer)
                    for s in sigma.detach().float().reshape(-1).tolist()]
        return flow
    if kind_of(model_sampling) == "discrete" and not isinstance(model_sampling, ms_mod.ModelSamplingDiscreteEDM):
        def own(sigma: torch.Tensor) -> list[float]:  # distilled samplings (LCM) map to their original timesteps
            ts = model_sampling.timestep(sigma.detach()).float().reshape(-1).tolist()
            return [schedule.discrete_timestep(t) for t in ts]
        return own
    # discrete EDM timesteps (0.25 log sigma) and continuous EDM: the DDPM table the noise level falls on
    table = model_sampling.sigmas if kind_of(model_sampling) == "discrete" else sd_sigmas()

    def from_table(sigma: torch.Tensor) -> list[float]:
        return [schedule.discrete_timestep(t) for t in _table_timestep(table, sigma)]
    return from_table
