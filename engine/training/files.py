"""What a run writes: the trained file, its checkpoints on the way, the `tlora_training` record in them, and beside
each the training state that lets `resume_from` continue the run exactly."""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Mapping
from typing import Any

from ...tlora_core.export import standard_path, write_export
from ...tlora_core.training import TrainableTLoRA, write_trained
from . import state as run_state
from .settings import TrainSettings

log = logging.getLogger("tlora.train")


def comfy_version() -> str:
    try:
        import comfyui_version

        return str(comfyui_version.__version__)
    except ImportError:
        return "unknown"


class RunFiles:
    """The files of one run at `out`: checkpoints `<stem>_step<N>.safetensors` and the final file, each with the
    run's settings and the steps done (counting those of the file it resumed from), and its `.train_state`. With
    `export_names` (module -> the name stock LoRA loaders read), each also gets its rank-2R standard LoRA
    `<stem>.standard.safetensors`. `live()`: facts that change while the run goes (steps skipped by fp16 loss
    scaling)."""

    def __init__(self, out: str, modules: Mapping[str, TrainableTLoRA], s: TrainSettings, config: dict[str, Any],
                 base_source: dict[str, Any] | None, facts: dict[str, Any], steps_before: int = 0,
                 resume: str | None = None, export_names: Mapping[str, str] | None = None,
                 live: Callable[[], dict[str, Any]] | None = None):
        self.out, self.modules, self.s, self.config = out, modules, s, config
        self.base_source = base_source if s.store_base else None
        self.facts, self.steps_before, self.resume = facts, steps_before, resume
        self.export_names = export_names
        self.live = live or dict

    def record(self, steps_done: int) -> dict[str, Any]:
        return {**self.s.record(), **self.facts, **self.live(), "steps": self.steps_before + steps_done,
                "comfyui": comfy_version(), "resumed_from": os.path.basename(self.resume) if self.resume else None}

    def checkpoint_path(self, steps_done: int) -> str:
        return f"{self.out[: -len('.safetensors')]}_step{self.steps_before + steps_done}.safetensors"

    def write(self, path: str, steps_done: int, st: run_state.RunState) -> str:
        """The T-LoRA file, then its state (a state always describes the file beside it: its digest says which)."""
        write_trained(path, self.modules, self.config, self.record(steps_done), self.base_source)
        run_state.write(path, st)
        self.export(path, steps_done)
        return path

    def checkpoint(self, steps_done: int, st: run_state.RunState) -> str:
        path = self.write(self.checkpoint_path(steps_done), steps_done, st)
        log.info("Train T-LoRA: checkpoint %s", path)
        return path

    def final(self, steps_done: int, st: run_state.RunState) -> str:
        return self.write(self.out, steps_done, st)

    def export(self, path: str, steps_done: int) -> str | None:
        """The rank-2R standard LoRA beside the T-LoRA at `path` (when the run asks for it)."""
        if self.export_names is None:
            return None
        return write_export(standard_path(path), self.modules, self.export_names, self.config,
                            self.record(steps_done), os.path.basename(path))
