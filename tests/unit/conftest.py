"""Tier-1 tests: `tlora_core` alone (torch, safetensors, LyCORIS as the reference), never ComfyUI."""

from __future__ import annotations

import os
import sys

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
if ROOT not in sys.path:
    sys.path.insert(0, ROOT)

# LyCORIS keeps its targeting rules in class attributes of LycorisNetwork (set by every preset).
_LYCORIS_PRESET_ATTRS = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "LORA_PREFIX",
                         "MODULE_ALGO_MAP", "NAME_ALGO_MAP", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")


@pytest.fixture(scope="module")
def lycoris_preset(tmp_path_factory):
    """A LyCORIS preset file that targets every plain nn.Linear / nn.Conv2d; LyCORIS' global state is restored."""
    from lycoris import LycorisNetwork
    from lycoris.modules.tlora import clear_timestep_mask

    saved = {a: getattr(LycorisNetwork, a) for a in _LYCORIS_PRESET_ATTRS}
    path = tmp_path_factory.mktemp("lycoris_preset") / "preset.toml"
    path.write_text('target_module = ["Linear", "Conv2d"]\ntarget_name = []\n', encoding="utf-8")
    try:
        yield str(path)
    finally:
        for a, v in saved.items():
            setattr(LycorisNetwork, a, v)
        clear_timestep_mask()
