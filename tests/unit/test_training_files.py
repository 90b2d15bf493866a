"""What Train T-LoRA writes, without ComfyUI: the file and its sidecar replaced together or not at all, and the file
named as Train T-LoRA's by the loader and the command line."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from tests.conftest import ROOT
from tlora_core import load_tlora
from tlora_core.describe import describe
from tlora_core.training import TrainableTLoRA, lycoris_config, write_trained

R = 4


def _modules(seed: int) -> dict[str, TrainableTLoRA]:
    g = torch.Generator().manual_seed(seed)
    u, _ = torch.linalg.qr(torch.randn(10, R, generator=g))
    v, _ = torch.linalg.qr(torch.randn(12, R, generator=g))
    m = TrainableTLoRA("lycoris_layer", u, torch.rand(R, generator=g) + 1, v, 0.5)
    with torch.no_grad():
        m.q.add_(0.1 * torch.randn(m.q.shape, generator=g))
    return {"lycoris_layer": m}


def _write(path, seed: int, min_rank: int, base: bool = True) -> None:
    source = {"checkpoint": "unit", "created_by": "Train T-LoRA"} if base else None
    write_trained(str(path), _modules(seed), lycoris_config(R, 2.0, min_rank, 1.0, ["Attention"]),
                  {"steps": seed, "seed": seed}, source)


@pytest.mark.parametrize("fails", ["tensors", "sidecar"])
def test_a_failed_write_leaves_the_old_file_and_sidecar(tmp_path, monkeypatch, fails):
    """The sidecar is written before the file is replaced, and both are replaced only once both are written: a
    write that fails (disk full, killed) leaves the old file with its own sidecar, and no temporary file."""
    from tlora_core import embed, training

    path = tmp_path / "run.safetensors"
    sidecar = tmp_path / "run.lycoris_config.json"
    _write(path, 1, min_rank=1)
    old_file, old_sidecar = path.read_bytes(), sidecar.read_text()

    def full_disk(*_a, **_k):
        raise OSError(28, "No space left on device")

    if fails == "tensors":
        monkeypatch.setattr(embed, "save_file", full_disk)
    else:
        monkeypatch.setattr(training.json, "dump", full_disk)
    with pytest.raises(OSError, match="No space left"):
        _write(path, 2, min_rank=3)
    monkeypatch.undo()
    assert path.read_bytes() == old_file and sidecar.read_text() == old_sidecar
    assert json.loads(sidecar.read_text())["tlora_min_rank"] == 1
    assert load_tlora(str(path)).schedule_defaults()["min_rank"][0] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["run.lycoris_config.json", "run.safetensors"]
    _write(path, 2, min_rank=3)  # and a write that succeeds replaces both
    assert json.loads(sidecar.read_text())["tlora_min_rank"] == 3 and path.read_bytes() != old_file


@pytest.mark.parametrize("base", [True, False], ids=["stored_base", "no_base"])
def test_trained_files_are_named_as_train_tlora(tmp_path, base):
    path = tmp_path / "trained.safetensors"
    _write(path, 1, min_rank=2, base=base)
    title = "ComfyUI-TLoRA (Train T-LoRA)"
    assert load_tlora(str(path)).writer.title == title
    assert describe(str(path))["writer"]["title"] == title
    out = subprocess.run([sys.executable, "-m", "tlora_core", "info", str(path)], cwd=ROOT, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out)["writer"] == title, out
