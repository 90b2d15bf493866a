"""The rank-2R standard LoRA export of a trained T-LoRA (tlora_core.export), without ComfyUI: its tensors are the
formula of the trained modules, a standard LoRA reading of it adds the T-LoRA's change at every rank, and Load
T-LoRA's reader recognises it as the pack's own export and reads it as pairs with the T-LoRA's schedule, equal to the
T-LoRA file at every rank."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from tlora_core import load_tlora
from tlora_core.export import export_tensors, standard_path, write_export
from tlora_core.svd import top_singular
from tlora_core.training import TrainableTLoRA, lycoris_config, write_trained

R, LINEAR_ALPHA, MIN_RANK, EXPONENT = 6, 3.0, 2, 1.5
NAMES = {"lycoris_attn_to_q": "lora_unet_attn_to_q", "lycoris_proj_in": "lora_unet_proj_in"}


def _module(name: str, conv: bool, seed: int) -> TrainableTLoRA:
    """A trained module: the principal SVD init of a seeded weight, its factors moved off it by seeded noise."""
    g = torch.Generator().manual_seed(seed)
    w = torch.randn((8, 6) if conv else (10, 12), generator=g)
    u, s, v = top_singular(w, R)
    m = TrainableTLoRA(name, u, s, v, LINEAR_ALPHA / R, conv=conv)
    with torch.no_grad():
        for p in (m.q, m.p, m.lam):
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g))
    return m


@pytest.fixture()
def modules() -> dict[str, TrainableTLoRA]:
    return {"lycoris_attn_to_q": _module("lycoris_attn_to_q", False, 1),
            "lycoris_proj_in": _module("lycoris_proj_in", True, 2)}


def test_tensors_are_the_formula_of_the_trained_modules(modules):
    """lora_up = [P diag(l), -P0 diag(l0)], lora_down = [Q; Q0], alpha = 2a (a = linear_alpha); 1x1 convs 4-D; and
    (alpha / 2R) up @ down is the trained module's full-rank change as training computes it (`factors`)."""
    sd = export_tensors(modules, NAMES)
    assert set(sd) == {f"{n}.{s}" for n in NAMES.values() for s in ("lora_down.weight", "lora_up.weight", "alpha")}
    for name, m in modules.items():
        key = NAMES[name]
        down, up, alpha = sd[f"{key}.lora_down.weight"], sd[f"{key}.lora_up.weight"], sd[f"{key}.alpha"]
        out, inp = m.p.shape[0], m.q.shape[1]
        assert down.shape == ((2 * R, inp, 1, 1) if m.conv else (2 * R, inp))
        assert up.shape == ((out, 2 * R, 1, 1) if m.conv else (out, 2 * R))
        assert down.dtype == up.dtype == torch.float32 and float(alpha) == pytest.approx(2 * LINEAR_ALPHA)
        down, up = down.reshape(2 * R, inp), up.reshape(out, 2 * R)
        assert torch.equal(down[:R], m.q.detach()) and torch.equal(down[R:], m.q0)
        assert torch.equal(up[:, :R], m.p.detach() * m.lam.detach()[None, :])
        assert torch.equal(up[:, R:], -(m.p0 * m.lam0[None, :]))
        f_down, f_up_t = (f.detach().double() for f in m.factors())
        trained = f_up_t.T @ f_down
        assert trained.norm() > 1e-3  # the module moved off its (zero-change) init
        merged = float(alpha) / (2 * R) * up.double() @ down.double()
        assert (merged - trained).norm() < 1e-6 * trained.norm(), float((merged - trained).norm() / trained.norm())


def test_missing_or_shared_names_are_refused(modules):
    with pytest.raises(ValueError, match="no standard LoRA name"):
        export_tensors(modules, {"lycoris_attn_to_q": "lora_unet_x"})
    with pytest.raises(ValueError, match="share one"):
        export_tensors(modules, dict.fromkeys(NAMES, "lora_unet_x"))


def test_load_tlora_reads_it_as_the_packs_export_equal_to_the_tlora_at_every_rank(modules, tmp_path):
    """Auto settings: the writer is this pack's export, the layout is read as pairs because of its own record, the
    schedule (rank, min_rank, exponent) comes from its metadata, and every rank's change equals the T-LoRA file's;
    read as plain ranks (what a standard loader does), all 2R ranks are the T-LoRA's full change."""
    cfg = lycoris_config(R, LINEAR_ALPHA, MIN_RANK, EXPONENT, ["Attention"])
    tlora = str(tmp_path / "trained.safetensors")
    write_trained(tlora, modules, cfg, {"steps": 3}, {"checkpoint": "unit", "created_by": "Train T-LoRA"})
    path = write_export(standard_path(tlora), modules, NAMES, cfg, {"steps": 3}, "trained.safetensors")
    assert path == str(tmp_path / "trained.standard.safetensors")
    with safe_open(path, "pt") as f:
        record = json.loads(f.metadata()["tlora_export"])
    assert record["creator"] == "ComfyUI-TLoRA Train T-LoRA" and record["rank"] == R and record["tensor_rank"] == 2 * R

    tl, ref = load_tlora(path, sidecar=False), load_tlora(tlora, sidecar=False)
    assert tl.format == "lycoris_export" and tl.writer.id == "tlora_train_export", (tl.format, tl.writer)
    assert tl.writer.title == "ComfyUI-TLoRA Train T-LoRA (rank-2R export)" and not tl.writer.assumed
    assert "ComfyUI-TLoRA" in tl.layout_why and tl.rank == R
    d = tl.schedule_defaults()
    assert (d["max_rank"][0], d["min_rank"][0], d["alpha"][0]) == (R, MIN_RANK, EXPONENT), d
    assert all(d[k][1] != "default" for k in ("min_rank", "alpha")), d
    by_name = {v: k for k, v in NAMES.items()}
    assert set(tl.modules) == set(by_name)
    for key, a in tl.modules.items():
        b = ref.modules[by_name[key]]
        assert a.conv == b.conv
        for r in range(R + 1):
            want, got = b.delta_weight(r).double(), a.delta_weight(r).double()
            assert (got - want).norm() <= 1e-6 * max(float(want.norm()), 1e-12), (key, r)

    plain = load_tlora(path, sidecar=False, standard_layout="ranks")
    assert plain.rank == 2 * R
    for key, a in plain.modules.items():
        want = ref.modules[by_name[key]].delta_weight(R).double()
        assert (a.delta_weight(2 * R).double() - want).norm() <= 1e-6 * float(want.norm()), key
