"""Errors that name the file and the cause."""

from __future__ import annotations

import os


class TLoRAError(ValueError):
    """A T-LoRA file cannot be used. The message names the file, the cause and, where known, the fix."""

    def __init__(self, path: str | os.PathLike[str] | None, cause: str):
        self.path = None if path is None else os.fspath(path)
        self.cause = cause
        where = f"T-LoRA file '{os.path.basename(self.path)}'" if self.path else "T-LoRA"
        super().__init__(f"{where}: {cause}")
