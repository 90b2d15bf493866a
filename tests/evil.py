"""An object whose unpickling would run code, for the tests that prove the loader never unpickles one."""

from __future__ import annotations

import os
from pathlib import Path


class RunsCode:
    """Unpickling this runs a shell command (it creates `marker`)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)
