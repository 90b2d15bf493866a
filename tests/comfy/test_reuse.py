"""What a load costs, counted (not timed): a re-execution with other sliders or strength does no hashing and no SVD;
an edited sidecar changes the schedule; a weight rewritten in place is noticed and only its layer is decomposed
again; the first load holds one layer's working set at a time, whatever the number of layers (peak RSS)."""

from __future__ import annotations

import json
import os
import subprocess
import time

import pytest
import torch

from tools import tiny_models as tm
from tools.families import FAMILIES
from tools.harness.server import ROOT, comfy_path, venv_python

R = 8


@pytest.fixture
def setup(pack, tmp_path, monkeypatch):
    monkeypatch.setenv("TLORA_CACHE_DIR", str(tmp_path / "svd_cache"))
    twin = FAMILIES["sdxl"].build(41)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    tm.write_lycoris_tlora(twin.diffusers, path, R, R, seed=3, strength=0.5).restore()
    return twin.patcher, path


def _apply(pack, patcher, path, strength=1.0, min_rank=1, alpha=1.0):
    apply = pack.engine.apply
    tl = pack.engine.files.read_file(str(path), False)
    r, mr, al, _ = pack.engine.apply.resolve_schedule(tl, "file", 0, min_rank, alpha)
    return apply.apply_tlora(patcher, tl, apply.Settings(strength, r, mr, al))[1]


def test_rerun_with_other_sliders_does_no_hashing_and_no_svd(pack, setup):
    patcher, path = setup
    stats = pack.engine.bases.stats
    _apply(pack, patcher, path)
    first = stats.snapshot()
    assert first["svd"] > 0
    for strength, min_rank, alpha in ((0.5, 1, 1.0), (1.0, 4, 2.0), (-1.0, 2, 0.5)):
        app = _apply(pack, patcher, path, strength, min_rank, alpha)
        assert (app.state.min_rank, app.state.alpha) == (min_rank, alpha)
    assert stats["svd"] == first["svd"] and stats["digests"] == first["digests"]
    assert stats["reused"] == first["reused"] + 3


def test_edited_sidecar_changes_the_schedule_at_the_next_run(pack, setup):
    patcher, path = setup
    sidecar = path.parent / "lycoris_config.json"
    sidecar.write_text(json.dumps({"algo": "tlora", "tlora_min_rank": 2, "tlora_alpha": 1.5}))
    assert (_apply(pack, patcher, path).state.min_rank, _apply(pack, patcher, path).state.alpha) == (2, 1.5)
    before = pack.engine.bases.stats.snapshot()
    time.sleep(0.01)  # a new mtime
    sidecar.write_text(json.dumps({"algo": "tlora", "tlora_min_rank": 5, "tlora_alpha": 0.5}))
    app = _apply(pack, patcher, path)
    assert (app.state.min_rank, app.state.alpha) == (5, 0.5)
    # the file is read again, but the weights are the same: no hashing, no SVD
    stats = pack.engine.bases.stats
    assert stats["svd"] == before["svd"] and stats["digests"] == before["digests"]
    key = pack.engine.files.file_key(str(path))
    assert any(str(sidecar) in str(part) for part in key)  # what fingerprint_inputs hands ComfyUI's cache too


def test_weight_rewritten_in_place_is_noticed(pack, setup):
    """ComfyUI copies weights with `param.data.copy_` (identity and version unchanged): the sampled content key
    still sees the change, and only that layer is hashed and decomposed again."""
    patcher, path = setup
    stats = pack.engine.bases.stats
    _apply(pack, patcher, path)
    before = stats.snapshot()
    tl = pack.engine.files.read_file(str(path), False)
    target = pack.engine.plan.plan(patcher, tl).targets[5]
    import comfy.utils

    w = comfy.utils.get_attr(patcher.model, target.key)
    with torch.no_grad():
        w.data.copy_(w.data * 1.01)
    _apply(pack, patcher, path)
    assert stats["digests"] == before["digests"] + 1 and stats["svd"] == before["svd"] + 1


def _first_load(layers: int) -> dict:
    """tools.loadprobe in a fresh process: nothing else ever allocated there, so its RSS growth is the load's."""
    env = {**os.environ, "COMFYUI_PATH": str(comfy_path())}
    res = subprocess.run([venv_python(), "-m", "tools.loadprobe", "--layers", str(layers)], cwd=ROOT, env=env,
                         capture_output=True, text=True, timeout=900)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def test_first_load_memory_does_not_grow_with_the_number_of_layers():
    """A rank-64 LyCORIS T-LoRA on SDXL-shaped Linears (1280x1280 ... 10240x1280), empty SVD cache: the first load
    holds the working set of the layers decomposed at once (one per worker: a core each) plus the small factors it
    keeps, for 8 layers as for 32."""
    runs = [_first_load(n) for n in (8, 32)]
    for r in runs:
        print(f"{r['layers']} layers, {r['workers']} at once: peak RSS growth {r['peak_rss_growth'] / 2**20:.0f} "
              f"MiB (factors {r['factors'] / 2**20:.0f} MiB, one layer's fp64 working set "
              f"{r['working_set'] / 2**20:.0f} MiB)")
        assert r["ready"] == r["layers"]
        assert r["peak_rss_growth"] <= (r["workers"] + 1) * r["working_set"] + r["factors"], r
    small, big = (r["peak_rss_growth"] - r["factors"] for r in runs)
    assert big <= small + runs[0]["working_set"], "the working set grows with the number of layers"


def _export_file(twin, path) -> None:
    """A rank-2R export with no metadata (as LyCORIS' convert_tlora.py writes it) of every Linear of the model."""
    from tools import writer_files as wf

    layers = [wf.Layer("lora_unet_" + p.removeprefix("diffusion_model.").replace(".", "_"), m.weight.shape[0],
                       m.weight.shape[1]) for p, m in twin.patcher.model.named_modules()
              if p.startswith("diffusion_model.") and isinstance(m, torch.nn.Linear)]
    wf.write_export(path, layers, R, 4.0, None, seed=8)


def _reading(pack, patcher, path, layout: str):
    """Load T-LoRA's reading of `path` with vanilla_tlora on and `standard_layout`: its prepared adapters, by name."""
    apply = pack.engine.apply
    tl = pack.engine.files.read_file(str(path), True, layout)
    app = apply.apply_tlora(patcher, tl, apply.Settings(1.0, tl.rank, 1, 1.0))[1]
    return {slot.factors.adapter.name: slot.factors.adapter for _, slot in app.bindings}


@pytest.mark.parametrize("order", [("ranks", "pairs"), ("pairs", "ranks")])
def test_one_file_read_two_ways_gets_each_readings_own_adapters(pack, tmp_path, monkeypatch, order):
    """A rank-2R export read as ranks then as pairs (and the other way) on one model gets, for the second reading, the
    adapters that reading gives on a cleared cache: the prepared-adapter cache tells the readings apart."""
    monkeypatch.setenv("TLORA_CACHE_DIR", str(tmp_path / "svd_cache"))
    twin = FAMILIES["sdxl"].build(43)
    path = tmp_path / "export.safetensors"
    _export_file(twin, path)
    first, second = order
    _reading(pack, twin.patcher, path, first)
    got = _reading(pack, twin.patcher, path, second)
    pack.engine.bases._memo(twin.patcher.model).prepared.clear()
    want = _reading(pack, twin.patcher, path, second)
    assert got.keys() == want.keys() and got
    for name, a in want.items():
        b = got[name]
        assert a.kind == b.kind and a.rank == b.rank, (name, first, second, (a.kind, a.rank), (b.kind, b.rank))
        for r in (1, a.rank // 2, a.rank):
            assert torch.equal(a.delta_weight(r), b.delta_weight(r)), (name, r)
