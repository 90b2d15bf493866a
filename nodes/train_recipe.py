"""Train T-LoRA's presets and where a run departs from the recipe a preset comes from, with the reason each time.

A preset only fills widgets: what trains is always the widgets' values. `departures` says which of them differ from
the preset's source recipe (the paper's single-image SDXL recipe, or SimpleTuner's LyCORIS defaults) and why that
matters, including rules a single value cannot show (a min_rank below half the rank under the paper's recipe)."""

from __future__ import annotations

import math

from ..engine.train_targets import ATTENTION, ATTENTION_FF
from ..engine.training import PAPER, PRINCIPAL, TrainSettings

CUSTOM = "custom"
PAPER_PRESET = "paper, single image"
# Recipes a user picks from: choosing one in the editor writes its values into these widgets; what trains is always
# the widgets' values (a value edited after choosing turns the preset to "custom" there)
PRESET_VALUES = {
    # ControlGenAI/T-LoRA's single-image SDXL recipe (the paper, appendix B): rank 64, min_rank 32, scale 1,
    # attention, AdamW at a constant 1e-4, 800 steps, the last components of a random matrix as init
    PAPER_PRESET: {"rank": 64, "min_rank": 32, "alpha": 1.0, "linear_alpha": 0.0, "learning_rate": 1e-4,
                   "steps": 800, "targets": ATTENTION, "init": PAPER, "optimizer": "AdamW", "lr_schedule": "constant"},
    # SimpleTuner's LyCORIS defaults with T-LoRA: linear_dim 64, linear_alpha 32, tlora_min_rank 1, attention + FF,
    # LyCORIS' principal init
    "SimpleTuner": {"rank": 64, "min_rank": 1, "alpha": 1.0, "linear_alpha": 32.0, "learning_rate": 1e-4,
                    "steps": 800, "targets": ATTENTION_FF, "init": PRINCIPAL, "optimizer": "AdamW",
                    "lr_schedule": "constant"},
}
PRESET_NAMES = [*PRESET_VALUES, CUSTOM]

_PAPER_WHY = {
    "rank": "the paper's SDXL rank is 64",
    "min_rank": "the paper's min_rank is half the rank",
    "alpha": "the paper's schedule exponent is 1 (the rank grows linearly as noise falls)",
    "linear_alpha": "the paper's updates are at scale 1 (linear_alpha 0 = the rank)",
    "learning_rate": "the paper trains SDXL at 1e-4 (Prodigy at 1 for Flux)",
    "steps": "the paper trains T-LoRA 800 steps on one image",
    "targets": "the paper trains attention q/k/v/out only",
    "init": "the paper found the weights' principal components a worse init than a random matrix's last components",
    "optimizer": "the paper trains SDXL with AdamW (Flux with Prodigy)",
    "lr_schedule": "the paper's learning rate is constant",
}
_SIMPLETUNER_WHY = {
    "rank": "SimpleTuner's LyCORIS linear_dim is 64",
    "min_rank": "SimpleTuner's tlora_min_rank is 1",
    "alpha": "SimpleTuner's tlora_alpha is 1",
    "linear_alpha": "SimpleTuner's LyCORIS linear_alpha is 32",
    "learning_rate": "SimpleTuner's LyCORIS example trains at 1e-4",
    "steps": "the preset trains 800 steps",
    "targets": "SimpleTuner's T-LoRA preset trains attention and feed-forward",
    "init": "LyCORIS' tlora (SimpleTuner's) starts from the weights' principal components",
    "optimizer": "SimpleTuner's LyCORIS example uses AdamW",
    "lr_schedule": "the preset's learning rate is constant",
}
WHY = {PAPER_PRESET: _PAPER_WHY, "SimpleTuner": _SIMPLETUNER_WHY}
_DEFAULTS = TrainSettings()


def _same(a, b) -> bool:
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-12)
    return a == b


def departures(preset: str, values: dict) -> dict[str, dict]:
    """Where `values` depart from the named preset's source recipe: {name: {"preset": its value, "trained": the value
    given, "why": the reason it matters}}; none for "custom". A value missing from `values` is TrainSettings'
    default."""
    named = PRESET_VALUES.get(preset, {})
    got = {k: values.get(k, getattr(_DEFAULTS, k)) for k in named}
    out = {k: {"preset": v, "trained": got[k], "why": WHY[preset][k]} for k, v in named.items()
           if not _same(got[k], v)}
    if preset == PAPER_PRESET and "min_rank" in out:
        out["min_rank"]["why"] = f"the paper's min_rank is half the rank; this is {got['min_rank'] / got['rank']:.0%}"
    if preset == PAPER_PRESET and 2 * got["min_rank"] < got["rank"]:
        out["min_rank"] = {"preset": named["min_rank"], "trained": got["min_rank"],
                           "why": f"min_rank {got['min_rank']} is below half the rank {got['rank']} (the paper found "
                                  "25 % often too small)"}
    return out


def describe(departs: dict[str, dict]) -> str:
    """One line: each departure with its reason."""
    return "; ".join(f"{k} {d['trained']} (preset {d['preset']}: {d['why']})" for k, d in departs.items())
