"""Train T-LoRA's settings, their checks, and what a run returns."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field, fields
from typing import Any

from ...tlora_core import schedule
from ...tlora_core.random_init import INITS, PRINCIPAL
from ...tlora_core.training import LOGIT_NORMAL, UNIFORM, TrainableTLoRA
from .. import timesteps
from ..train_targets import ATTENTION, PRESETS
from .optim import CONSTANT, OPTIMIZERS, SCHEDULE_FREE, SCHEDULES

SAMPLINGS = ("auto", UNIFORM, LOGIT_NORMAL)
LOSS_SPACES = ("prediction", "x0")
DTYPES = ("auto", "fp32", "bf16", "fp16")
Progress = Callable[[int, int, float], None]


@dataclass(frozen=True)
class TrainSettings:
    steps: int = 800
    learning_rate: float = 1e-4
    rank: int = 64
    min_rank: int = 32
    alpha: float = 1.0  # the schedule exponent (tlora_alpha)
    linear_alpha: float = 0.0  # LyCORIS alpha; 0: the rank (scale 1, the official recipe)
    targets: str = ATTENTION
    batch_size: int = 1
    grad_accumulation: int = 1
    optimizer: str = "AdamW"
    weight_decay: float = 1e-4
    max_grad_norm: float = 1.0
    timestep_sampling: str = "auto"
    timestep_mode: str = timesteps.AUTO
    loss_space: str = "prediction"
    training_dtype: str = "auto"
    gradient_checkpointing: bool = True
    seed: int = 0
    store_base: bool = True
    save_every: int = 0
    guidance: float = 1.0
    export_standard: bool = False  # also write the rank-2R standard LoRA beside the file and each checkpoint
    caption_dropout: float = 0.0  # the probability that a sample trains with the empty caption
    init: str = PRINCIPAL  # or PAPER: the last SVD components of a random matrix (the file then stores its base)
    lr_schedule: str = CONSTANT
    warmup_steps: int = 0

    def problems(self) -> list[str]:
        out = []
        try:
            schedule.validate(self.rank, self.min_rank, self.alpha)
        except ValueError as e:
            out.append(f"bad schedule: {e}")
        for name, ok in (("steps", self.steps >= 1), ("learning_rate", 0 < self.learning_rate < 10),
                         ("batch_size", self.batch_size >= 1), ("grad_accumulation", self.grad_accumulation >= 1),
                         ("linear_alpha", self.linear_alpha >= 0), ("max_grad_norm", self.max_grad_norm >= 0),
                         ("save_every", self.save_every >= 0), ("guidance", math.isfinite(self.guidance)),
                         ("caption_dropout", 0 <= self.caption_dropout <= 1),

                         ("warmup_steps", self.warmup_steps >= 0)):
            if not ok:
                out.append(f"{name} {getattr(self, name)!r} is out of range")
        for name, allowed in (("targets", PRESETS), ("optimizer", OPTIMIZERS), ("timestep_sampling", SAMPLINGS),
                              ("timestep_mode", timesteps.MODES), ("loss_space", LOSS_SPACES),
                              ("training_dtype", DTYPES), ("init", INITS), ("lr_schedule", SCHEDULES)):
            if getattr(self, name) not in allowed:
                out.append(f"{name} must be one of {', '.join(allowed)}, got {getattr(self, name)!r}")
        if self.optimizer == SCHEDULE_FREE and self.lr_schedule != CONSTANT:
            out.append(f"lr_schedule {self.lr_schedule!r} with {SCHEDULE_FREE}: it needs no decay schedule (it "
                       "averages its iterates instead); set lr_schedule to constant (warmup_steps is its warm-up)")
        return out

    @property
    def scale(self) -> float:
        return (self.linear_alpha or self.rank) / self.rank

    def record(self) -> dict[str, Any]:
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass
class TrainResult:
    path: str
    losses: list[float]  # every step's loss, those of the run it continues first
    modules: dict[str, TrainableTLoRA]
    calls: list[dict[str, Any]] = field(default_factory=list)  # per model call: sigma, t, rank (tests, diagnostics)
    checkpoints: list[str] = field(default_factory=list)
    seconds: float = 0.0
    drawn: list[float] = field(default_factory=list)  # the timestep of every sample drawn (flow: sigma * 1000)
    steps: int = 0  # steps done in all, those of the run it continues included
    skipped: int = 0  # steps skipped because fp16 gradients overflowed (loss scaling), in all
    loss_scaling: bool = False  # the model computed in fp16: the loss was scaled dynamically
    resumed: str = ""  # what it continued: "<file> at step N (with its training state | factors only)"
    lrs: list[float] = field(default_factory=list)  # the learning rate of each step this run took
    sample_losses: list[float] = field(default_factory=list)  # every sample's loss of this run, in `drawn` order
    previews: list[str] = field(default_factory=list)  # the preview images saved beside the files (step order)
