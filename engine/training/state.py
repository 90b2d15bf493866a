"""What a run needs to continue exactly where it stopped, written beside every file it writes.

`<stem>.train_state` (a safetensors file; not `.safetensors`, so ComfyUI's model lists never offer it as a LoRA)
holds the optimizer's state (AdamW / Adam moments and step counts, Prodigy's and schedule-free AdamW's, per parameter
by name) and the loop's random generator as tensors, and as JSON metadata: the steps done, the optimizer's
hyper-parameters (Prodigy's adapted step size, schedule-free AdamW's averaging weights; the learning-rate schedule's
position is the step), the per-parameter entries that are not tensors (Prodigy's step counts), the loss scaler, the
loss of every step, the run's settings, and a digest of the trained factors that ties the state to its T-LoRA file.
No pickles.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import torch
from safetensors import safe_open

from ...tlora_core import TLoRAError
from ...tlora_core.embed import write_atomically
from ...tlora_core.training import TrainableTLoRA

SUFFIX = ".train_state"
METADATA = "tlora_train_state"
VERSION = 1
PARAMS = ("q", "p", "lam")


def state_path(path: str) -> str:
    stem = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
    return stem + SUFFIX


def param_names(modules: Mapping[str, TrainableTLoRA]) -> list[str]:
    """The trained parameters' names, in the order the optimizer holds them."""
    return [f"{name}.{p}" for name in modules for p in PARAMS]


def factors_digest(modules: Mapping[str, TrainableTLoRA]) -> str:
    """A digest of every module's trained lambda (float32 bytes, by name): what a file's factors must give back."""
    h = hashlib.sha256()
    for name in sorted(modules):
        h.update(name.encode())
        h.update(modules[name].lam.detach().float().cpu().contiguous().numpy().tobytes())
    return h.hexdigest()


@dataclass
class RunState:
    steps: int  # steps done, counting those of the files it continues
    optimizer: str
    groups: list[dict[str, Any]]  # the optimizer's hyper-parameters (param_groups without the parameters)
    moments: dict[str, dict[str, torch.Tensor]]  # parameter name -> its optimizer state
    generator: torch.Tensor  # the loop's CPU generator state (uint8)
    scaler: dict[str, Any]
    losses: list[float]
    settings: dict[str, Any]
    digest: str
    extras: dict[str, dict[str, Any]] = field(default_factory=dict)  # parameter name -> its non-tensor state


def capture(optimizer: torch.optim.Optimizer, names: list[str], generator_state: torch.Tensor,
            scaler: dict[str, Any], steps: int, losses: list[float], settings: dict[str, Any],
            digest: str) -> RunState:
    sd = optimizer.state_dict()
    moments = {names[i]: {k: v.detach().cpu().clone() for k, v in st.items() if torch.is_tensor(v)}
               for i, st in sd["state"].items()}
    extras = {names[i]: {k: v for k, v in st.items() if not torch.is_tensor(v)} for i, st in sd["state"].items()}
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items() if k != "params"}
              for g in sd["param_groups"]]
    return RunState(steps, type(optimizer).__name__, groups, moments, generator_state.clone(), dict(scaler),
                    list(losses), dict(settings), digest, {k: v for k, v in extras.items() if v})


def write(path: str, st: RunState) -> str:
    tensors = {f"optimizer.{name}.{k}": v.contiguous() for name, d in st.moments.items() for k, v in d.items()}
    tensors["generator"] = st.generator.contiguous()
    meta = {"version": VERSION, "steps": st.steps, "optimizer": st.optimizer, "groups": st.groups,
            "scaler": st.scaler, "losses": st.losses, "settings": st.settings, "digest": st.digest, "extras": st.extras}
    return write_atomically(tensors, state_path(path), {METADATA: json.dumps(meta, sort_keys=True)})


def read(path: str) -> RunState | None:
    """The state beside the T-LoRA file `path`, or None when there is none."""
    sp = state_path(path)
    if not os.path.isfile(sp):
        return None
    try:
        with safe_open(sp, framework="pt") as f:
            meta = json.loads((f.metadata() or {})[METADATA])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
        if int(meta["version"]) > VERSION:
            raise ValueError(f"state version {meta['version']} is newer than this pack's {VERSION}")
        moments: dict[str, dict[str, torch.Tensor]] = {}
        for k, v in tensors.items():
            if k.startswith("optimizer."):
                name, _, key = k[len("optimizer."):].rpartition(".")
                moments.setdefault(name, {})[key] = v
        return RunState(int(meta["steps"]), str(meta["optimizer"]), list(meta["groups"]), moments,
                        tensors["generator"], dict(meta["scaler"]), [float(x) for x in meta["losses"]],
                        dict(meta["settings"]), str(meta["digest"]), dict(meta.get("extras", {})))
    except (OSError, KeyError, ValueError, TypeError) as e:
        raise TLoRAError(sp, f"unreadable training state ({e}): delete it to resume from the T-LoRA file's factors "
                             "alone") from None


def restore_optimizer(optimizer: torch.optim.Optimizer, names: list[str], st: RunState) -> None:
    """Load the state's moments into `optimizer` (its parameters named by `names`, as `capture` saw them)."""
    index = {n: i for i, n in enumerate(names)}
    with torch.inference_mode(False):  # normal tensors (read where ComfyUI runs nodes): the optimizer updates them
        state = {index[n]: {k: v.clone() for k, v in d.items()} for n, d in st.moments.items()}
    for n, d in st.extras.items():
        state.setdefault(index[n], {}).update(d)
    groups = []
    for saved, now in zip(st.groups, optimizer.state_dict()["param_groups"], strict=True):
        g = {**saved, "params": now["params"]}
        if "betas" in g:
            g["betas"] = tuple(g["betas"])
        groups.append(g)
    optimizer.load_state_dict({"state": state, "param_groups": groups})
