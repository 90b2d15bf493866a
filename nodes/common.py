"""Small pieces the nodes share."""

from __future__ import annotations

from collections.abc import Callable

import comfy.utils


def progress_bar() -> Callable[[int, int], None]:
    """A progress callback (done, total) that drives ComfyUI's progress bar, created on the first report."""
    pbar = None

    def progress(done: int, total: int) -> None:
        nonlocal pbar
        pbar = pbar or comfy.utils.ProgressBar(total)
        pbar.update_absolute(done, total)

    return progress
