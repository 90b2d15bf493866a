"""Continuing a run from a T-LoRA file (`resume_from`): the file checked against the run's settings and targets, its
factors (with its stored base, or the one just rebuilt, signs aligned as the loader aligns them), and the training
state beside it when there is one (optimizer, random generator, loss scaler, the losses so far)."""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field

from ...tlora_core import TLoRA, TLoRAError, load_tlora
from ...tlora_core.random_init import PRINCIPAL
from ...tlora_core.training import METADATA, TrainableTLoRA
from . import state as run_state
from .settings import TrainSettings

log = logging.getLogger("tlora.train")

CHECKED = ("rank", "min_rank", "alpha", "linear_alpha", "targets", "model", "init")


@dataclass
class Resumed:
    path: str
    steps: int  # steps the file records (0 for a file from another trainer)
    state: run_state.RunState | None = None
    losses: list[float] = field(default_factory=list)

    def describe(self) -> str:
        how = "with its training state" if self.state is not None else "factors only"
        return f"{os.path.basename(self.path)} at step {self.steps} ({how})"


def _record(tl: TLoRA) -> dict:
    try:
        rec = json.loads(tl.metadata.get(METADATA, "{}"))
    except ValueError:
        return {}
    return rec if isinstance(rec, dict) else {}


def file_settings(tl: TLoRA) -> dict:
    """The settings a file was trained with, as far as it says: its run record (Train T-LoRA's files), else its
    tensors (rank, LyCORIS alpha) and recorded schedule (min_rank and alpha where recorded). Its init: the
    record's (files written before the choice: principal), else principal for a file that stores no base (its base
    is rebuilt from the weights), else unknown (its stored base continues under either)."""
    rec = _record(tl)
    out = {k: rec[k] for k in CHECKED if k in rec}
    if (rec and "rank" in rec) or tl.needs_svd_base:
        out.setdefault("init", PRINCIPAL)
    out.setdefault("rank", tl.rank)
    scales = {round(a.scale * a.rank, 6) for a in tl.modules.values()}
    if len(scales) == 1 and "linear_alpha" not in out:
        out["linear_alpha"] = scales.pop()
    for name, key in (("min_rank", "min_rank"), ("alpha", "alpha")):
        if name not in out and key in tl.recorded:
            out[name] = tl.recorded[key][0]
    return out


def _mismatches(found: dict, s: TrainSettings, model: str) -> list[str]:
    ours = {**s.record(), "linear_alpha": s.linear_alpha or s.rank, "model": model}
    theirs = {**found}
    if theirs.get("linear_alpha") == 0:
        theirs["linear_alpha"] = theirs.get("rank", s.rank)
    out = []
    for k in CHECKED:
        if k not in theirs:
            continue
        a, b = theirs[k], ours[k]
        same = abs(float(a) - float(b)) <= 1e-6 * max(1.0, abs(float(b))) if k in ("alpha", "linear_alpha") else a == b
        if not same:
            out.append(f"{k} {a!r} (this run: {b!r})")
    return out


def check(tl: TLoRA, names: list[str], s: TrainSettings, model: str) -> None:
    """Refuse a file this run cannot continue, with every reason: other settings, other modules."""
    found = file_settings(tl)
    problems = _mismatches(found, s, model)
    extra = sorted(set(tl.modules) - set(names))
    missing = [n for n in names if n not in tl.modules]
    if extra:
        problems.append(f"{len(extra)} modules outside the '{s.targets}' targets (e.g. {extra[0]}), which this run "
                        "would leave out of its file")
    if missing:
        problems.append(f"no module for {len(missing)} of the {len(names)} targets (e.g. {missing[0]})")
    if problems:
        known = ", ".join(f"{k} {found[k]!r}" for k in CHECKED if k in found)
        raise TLoRAError(tl.path, f"cannot be continued by this run: it was trained with {'; '.join(problems)}. "
                                  f"Set the run as the file was trained ({known}) to continue it")


def resume_modules(modules: dict[str, TrainableTLoRA], path: str, s: TrainSettings, model: str) -> Resumed:
    """Replace `modules` by the file's (checked first) and read the training state beside it, if any."""
    tl = load_tlora(path)
    check(tl, list(modules), s, model)
    for name, m in modules.items():
        a = tl.modules[name]
        if a.needs_svd_base:
            a = a.with_base(m.p0, m.lam0, m.q0.T)
        modules[name] = TrainableTLoRA.from_adapter(a)
    steps = int(_record(tl).get("steps", 0) or 0)
    st = run_state.read(path)
    if st is not None and st.digest != run_state.factors_digest(modules):
        log.warning("Train T-LoRA: %s does not belong to %s (written by another run?): continuing from the file's "
                    "factors only", run_state.state_path(path), os.path.basename(path))
        st = None
    if st is None:
        log.info("Train T-LoRA: resuming from %s without a training state (a file from another trainer, or one "
                 "written before states were saved): its factors only; the optimizer starts afresh and the random "
                 "draws follow a new sequence", os.path.basename(path))
        return Resumed(path, steps)
    changed = [f"{k} {st.settings[k]!r} -> {v!r}" for k, v in s.record().items()
               if k in st.settings and st.settings[k] != v and k not in ("steps", "save_every")]
    if changed:
        log.info("Train T-LoRA: continuing %s with changed settings: %s", os.path.basename(path), ", ".join(changed))
    return Resumed(path, st.steps, st, list(st.losses))
