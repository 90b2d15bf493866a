"""The optimizer of a run and its learning-rate schedule.

AdamW (the default; the official SDXL recipe), Adam and SGD come with torch. Prodigy (`prodigyopt`, the paper's Flux
choice, learning rate 1) and schedule-free AdamW (`schedulefree`'s `AdamWScheduleFree`) are optional: imported when a
run asks for them, with the package and its install command named when it is missing. Schedule-free AdamW trains at
one point of its averages and is evaluated at another: `evaluating()` switches it to its eval-mode parameters (what
every file stores) and back.

The schedule is a multiplier of the learning rate at each step, from the step's position in the whole run (steps
done by the files it continues included), so a resumed run continues it:

    warm-up (k < W):  (k + 1) / W
    constant:         1
    cosine:           (1 + cos(pi * (k - W) / (T - W))) / 2
    linear:           1 - (k - W) / (T - W)

for the k-th step (from 0) of a run of T steps with W warm-up steps; cosine and linear reach 0 at step T.
"""

from __future__ import annotations

import contextlib
import importlib
import math
from collections.abc import Iterator
from typing import Any

import torch

CONSTANT, COSINE, LINEAR = "constant", "warm-up + cosine", "linear"
SCHEDULES = (CONSTANT, COSINE, LINEAR)
PRODIGY, SCHEDULE_FREE = "Prodigy", "AdamW schedule-free"
OPTIMIZERS = ("AdamW", "Adam", "SGD", PRODIGY, SCHEDULE_FREE)
# optimizer -> (module, class, the package to install)
OPTIONAL = {PRODIGY: ("prodigyopt", "Prodigy", "prodigyopt"),
            SCHEDULE_FREE: ("schedulefree", "AdamWScheduleFree", "schedulefree")}


class MissingOptimizer(ImportError):
    pass


def lr_factor(schedule: str, k: int, total: int, warmup: int) -> float:
    """The learning rate's multiplier at step k (from 0) of a run of `total` steps (see the module's docstring)."""
    if warmup > 0 and k < warmup:
        return (k + 1) / warmup
    if schedule == CONSTANT:
        return 1.0
    span = max(1, total - warmup)
    done = min(1.0, max(0.0, (k - warmup) / span))
    if schedule == COSINE:
        return 0.5 * (1.0 + math.cos(math.pi * done))
    if schedule == LINEAR:
        return 1.0 - done
    raise ValueError(f"lr_schedule must be one of {', '.join(SCHEDULES)}, got {schedule!r}")


def optional_class(name: str) -> Any:
    """The class of an optional optimizer, or MissingOptimizer naming the package and how to install it."""
    module, cls, package = OPTIONAL[name]
    try:
        return getattr(importlib.import_module(module), cls)
    except ImportError:
        raise MissingOptimizer(f"the optimizer {name} needs the Python package '{package}', which is not installed: "
                               f"install it into ComfyUI's Python ('python -m pip install {package}') and restart "
                               "ComfyUI, or choose AdamW") from None


def make_optimizer(s, params: list[torch.nn.Parameter]) -> torch.optim.Optimizer:
    """The run's optimizer (`s`: its TrainSettings). Weight decay applies to AdamW and the optional ones."""
    if s.optimizer == "AdamW":
        return torch.optim.AdamW(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    if s.optimizer == "Adam":
        return torch.optim.Adam(params, lr=s.learning_rate)
    if s.optimizer == "SGD":
        return torch.optim.SGD(params, lr=s.learning_rate)
    cls = optional_class(s.optimizer)
    if s.optimizer == PRODIGY:
        return cls(params, lr=s.learning_rate, weight_decay=s.weight_decay)
    opt = cls(params, lr=s.learning_rate, weight_decay=s.weight_decay, warmup_steps=s.warmup_steps)
    opt.train()
    return opt


def set_lr(opt: torch.optim.Optimizer, s, k: int, total: int) -> float:
    """Set every group's learning rate for step k; returns it. Schedule-free AdamW warms up by itself (its
    `warmup_steps`) and takes no schedule: its rate stays the one given."""
    lr = s.learning_rate if s.optimizer == SCHEDULE_FREE else \
        s.learning_rate * lr_factor(s.lr_schedule, k, total, s.warmup_steps)
    for g in opt.param_groups:
        g["lr"] = lr
    return lr


def _schedule_free(opt: torch.optim.Optimizer) -> bool:
    return "train_mode" in opt.param_groups[0] and hasattr(opt, "eval") and hasattr(opt, "train")


def to_train(opt: torch.optim.Optimizer) -> None:
    """Schedule-free AdamW's training-mode parameters (a no-op for the others and when already there)."""
    if _schedule_free(opt):
        opt.train()


def to_eval(opt: torch.optim.Optimizer) -> None:
    """Schedule-free AdamW's eval-mode parameters, for good (the end of a run)."""
    if _schedule_free(opt):
        opt.eval()


@contextlib.contextmanager
def evaluating(opt: torch.optim.Optimizer) -> Iterator[None]:
    """The parameters an evaluation or a file must see: schedule-free AdamW's eval-mode ones (its docs), then back
    to training; other optimizers are left as they are."""
    switch = _schedule_free(opt) and opt.param_groups[0]["train_mode"]
    if switch:
        opt.eval()
    try:
        yield
    finally:
        if switch:
            opt.train()
