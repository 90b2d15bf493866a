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


def test_loss_scaling_follows_torch_gradscaler():
    """The trainer's loss scaler against torch.amp.GradScaler on the same fp32 parameters and gradients: the same
    scale after every step, the same steps skipped (an inf or a nan gradient), the same parameters."""
    from tlora_core.loss_scale import LossScaler

    g = torch.Generator().manual_seed(0)
    start = [torch.randn(5, 3, generator=g), torch.randn(7, generator=g)]
    ours_p = [torch.nn.Parameter(t.clone()) for t in start]
    ref_p = [torch.nn.Parameter(t.clone()) for t in start]
    ours_opt, ref_opt = torch.optim.AdamW(ours_p, lr=1e-2), torch.optim.AdamW(ref_p, lr=1e-2)
    ours = LossScaler(True, init_scale=2.0**10, growth_interval=3)
    ref = torch.amp.GradScaler("cpu", init_scale=2.0**10, growth_interval=3)
    bad = {2: float("inf"), 3: float("nan"), 9: float("inf")}
    skipped = 0
    for step in range(14):
        x = torch.randn(3, generator=g)
        for params, scaler_loss in ((ours_p, ours.scale_loss), (ref_p, ref.scale)):
            loss = (params[0] @ x).square().sum() + params[1].square().sum() * bad.get(step, 1.0)
            scaler_loss(loss).backward()
        finite = ours.unscale(ours_p)
        if finite:
            torch.nn.utils.clip_grad_norm_(ours_p, 1.0)
            ours_opt.step()
        ours.update(finite)
        ref.unscale_(ref_opt)
        torch.nn.utils.clip_grad_norm_(ref_p, 1.0)
        before = ref.get_scale()
        ref.step(ref_opt)
        ref.update()
        skipped += ref.get_scale() < before
        assert ours.scale == ref.get_scale(), step
        assert all(torch.equal(a, b) for a, b in zip(ours_p, ref_p, strict=True)), step
        ours_opt.zero_grad(set_to_none=True)
        ref_opt.zero_grad(set_to_none=True)
    assert ours.skipped == skipped == len(bad) and ours.scale != 2.0**10
    off = LossScaler(False)
    assert off.scale_loss(torch.tensor(3.0)) == 3.0 and off.unscale(ours_p) and off.skipped == 0
