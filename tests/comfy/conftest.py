"""Fixtures of the in-process ComfyUI tier."""

from __future__ import annotations

import pytest

from tools.harness.inproc import import_pack


@pytest.fixture(scope="session")
def pack():
    """This pack imported beside the host's ComfyUI, once per session."""
    return import_pack()
