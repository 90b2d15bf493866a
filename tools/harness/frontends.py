"""The frontends the browser tier serves from each ComfyUI host, and the Nodes 2.0 modes each one runs in.

A host serves its own pinned frontend; the newest host also serves the newest `comfyui-frontend-package` installable
here (ComfyUI's newest releases pin newer ones still), given to it with `--front-end-root`. Nodes 2.0 (the setting
`Comfy.VueNodes.Enabled`, frontend >= 1.27.1) is run off and on where the frontend is one users run it on.
`TLORA_UI=1.58.1:on,1.49.6:off` narrows a run to some combinations (while working on one).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from tools.harness.server import frontend_static, host_version, pinned_frontend

OLDEST = "1.32.9"  # ComfyUI 0.3.75's, the oldest host: pyproject.toml declares it as the lowest supported
NEWEST = "1.58.1"  # scripts/setup_host.sh installs it into .host/frontend/1.58.1
NEWEST_SERVED_BY = "0.33.0"  # the host that serves it (0.3.75 lacks the routes it reads: see the README)
# Nodes 2.0 is run on from this frontend: 1.32.9 (ComfyUI 0.3.75's) has it as an early experiment whose legacy
# widgets get no height of their own (WidgetLegacy.vue: an absolute canvas over the next widget), and ComfyUI 0.3.75
# ships with it off.
NODES2_FROM = (1, 41, 0)


def version_key(v: str) -> tuple[int, ...]:
    return tuple(int(p) for p in v.split("."))


@dataclass(frozen=True)
class UiMode:
    frontend: str  # the version served
    nodes2: bool  # Comfy.VueNodes.Enabled
    pinned: bool  # the host's own frontend (the session's main server serves it)

    def __str__(self) -> str:
        return f"fe{self.frontend}-{'nodes2' if self.nodes2 else 'classic'}"


def matrix(comfy: Path) -> list[UiMode]:
    """Every (frontend, Nodes 2.0) combination the browser tier runs on the host at `comfy`, pinned first."""
    own = pinned_frontend(comfy)
    versions = [own] if own else []
    if host_version(comfy) == NEWEST_SERVED_BY and NEWEST not in versions:
        versions.append(NEWEST)
    out = []
    for v in versions:
        for on in (False, True):
            if on and version_key(v) < NODES2_FROM:
                continue
            out.append(UiMode(v, on, v == own))
    wanted = os.environ.get("TLORA_UI", "").strip()
    if wanted:
        keys = {tuple(w.strip().split(":")) for w in wanted.split(",") if w.strip()}
        out = [m for m in out if (m.frontend, "on" if m.nodes2 else "off") in keys]
        if not out:
            raise RuntimeError(f"TLORA_UI={wanted} names no combination this host runs")
    for m in out:
        if not m.pinned and not frontend_static(m.frontend).is_dir():
            raise RuntimeError(f"frontend {m.frontend} is not installed at {frontend_static(m.frontend)}: run "
                               "`bash scripts/setup_host.sh`")
    return out
