"""LyCORIS `algo=tlora` files written by LyCORIS itself, read back by `tlora_core`.

The oracle is the LyCORIS module's own `get_diff_weight()` under `set_timestep_mask`. LyCORIS builds
its SVD base with a float32 `torch.linalg.svd`, whose rank-one terms are only accurate to
~eps * |W| / gap; the layer weights get well-separated singular values so that the comparison
measures the file format and the rank-prefix math, not LyCORIS' SVD round-off.
"""

from __future__ import annotations

import json

import pytest
import torch
from lycoris import create_lycoris
from lycoris.modules.tlora import set_timestep_mask
from safetensors import safe_open

from tlora_core import ORTHO, TLoRA, load_tlora
from tlora_core.digest import cache_key
from tlora_core.formats import LYCORIS
from tlora_core.svd import BaseJob, SVDCache, compute_base_triplets, top_singular

RANK, ALPHA = 8, 4


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q = torch.nn.Linear(16, 16)
        self.proj_in = torch.nn.Linear(16, 24)  # in != out
        self.proj_out = torch.nn.Linear(32, 12)  # in != out, wide
        self.narrow = torch.nn.Linear(16, 4, bias=False)  # out < rank: LyCORIS pads the SVD base
        self.conv1 = torch.nn.Conv2d(8, 12, 1)
        self.conv3 = torch.nn.Conv2d(8, 12, 3, padding=1)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()


TESTED = ("to_q", "proj_in", "proj_out", "narrow", "conv1")


def _spread_weight(shape, g):
    """A weight with singular values 2, 1, 1/2, ... and random singular vectors."""
    out_dim, in_dim = shape[0], int(torch.tensor(shape[1:]).prod())
    k = min(out_dim, in_dim)
    u = torch.linalg.qr(torch.randn(out_dim, k, generator=g, dtype=torch.float64))[0]
    v = torch.linalg.qr(torch.randn(in_dim, k, generator=g, dtype=torch.float64))[0]
    s = 2.0 * 0.5 ** torch.arange(k, dtype=torch.float64)
    return ((u * s) @ v.T).float().reshape(shape)


def _train(preset):
    """A LyCORIS tlora network after "training": (network, {short name: original layer weight})."""
    g = torch.Generator().manual_seed(0)
    model = Model()
    with torch.no_grad():
        for layer in model.block.children():
            layer.weight.copy_(_spread_weight(layer.weight.shape, g))
    originals = {n: layer.weight.detach().clone() for n, layer in model.block.named_children()}
    net = create_lycoris(model, 1.0, linear_dim=RANK, linear_alpha=ALPHA, algo="tlora", preset=preset)
    net.apply_to()
    with torch.no_grad():  # "training": move every trainable factor well away from its SVD init
        for lora in net.loras:
            for p in (lora.q_layer.weight, lora.p_layer.weight, lora.lambda_layer):
                p.add_(torch.randn(p.shape, generator=g) * p.abs().mean())
    return net, originals


def _save(net, folder, metadata=None, name="pytorch_lora_weights.safetensors"):
    path = folder / name
    net.save_weights(str(path), torch.float32, metadata)
    return path


def _lycoris_name(short):
    return f"lycoris_block_{short}"


@pytest.fixture(scope="module")
def trained(lycoris_preset):
    return _train(lycoris_preset)


@pytest.fixture
def written(trained, tmp_path):
    net, originals = trained
    return _save(net, tmp_path), net, originals


def test_file_has_the_documented_keys(written):
    path, net, _ = written
    with safe_open(str(path), "pt") as f:
        keys = set(f.keys())
    for short in (*TESTED, "conv3"):
        for suffix in ("q_layer.weight", "p_layer.weight", "lambda_layer", "alpha"):
            assert f"{_lycoris_name(short)}.{suffix}" in keys
    assert not any("base_" in k for k in keys), "LyCORIS does not store the SVD base"


def test_load_names_rank_scale(written):
    path, net, _ = written
    tl = load_tlora(path)
    assert isinstance(tl, TLoRA)
    assert tl.format == LYCORIS
    assert tl.naming == "lycoris"
    assert tl.rank == RANK
    assert tl.needs_svd_base
    lycoris_names = {lora.lora_name for lora in net.loras}
    assert set(tl.modules) | set(tl.skipped) == lycoris_names
    for short in TESTED:
        m = tl.modules[_lycoris_name(short)]
        assert m.kind == ORTHO
        assert m.rank == RANK
        assert m.scale == pytest.approx(ALPHA / RANK)
        assert m.needs_svd_base and not m.has_base
    assert tl.modules[_lycoris_name("conv1")].conv
    assert tl.modules[_lycoris_name("conv1")].weight_shape == (12, 8, 1, 1)
    assert not tl.modules[_lycoris_name("to_q")].conv


def _reference_deltas(lora):
    out = []
    for r in range(1, RANK + 1):
        mask = torch.zeros(1, RANK)
        mask[:, :r] = 1.0
        set_timestep_mask(mask)
        ref, _ = lora.get_diff_weight()
        out.append(ref.detach().clone())
    return out


def _rel(a, b):
    return ((a.double() - b.double()).norm() / b.double().norm()).item()


@pytest.mark.parametrize("short", TESTED)
def test_masked_delta_matches_lycoris_for_every_rank(written, short):
    path, net, originals = written
    lora = next(lo for lo in net.loras if lo.lora_name == _lycoris_name(short))
    module = _with_rebuilt_base(load_tlora(path).modules[_lycoris_name(short)], originals[short])
    refs = _reference_deltas(lora)
    for r, ref in enumerate(refs, start=1):
        ours = module.delta_weight(r)
        assert ours.dtype == torch.float32
        assert ours.shape == ref.shape == originals[short].shape
        assert _rel(ours, ref) < 1e-6, (short, r, _rel(ours, ref))
    assert torch.count_nonzero(module.delta_weight(0)) == 0


def _with_rebuilt_base(module, weight):
    return module.with_base(*top_singular(weight.reshape(weight.shape[0], -1), module.rank))


def test_svd_base_from_the_cache_gives_the_same_deltas(written, tmp_path):
    path, net, originals = written
    tl = load_tlora(path)
    jobs = [BaseJob(_lycoris_name(s), RANK, tuple(originals[s].reshape(originals[s].shape[0], -1).shape),
                    lambda w=originals[s]: cache_key(w), lambda w=originals[s]: w.reshape(w.shape[0], -1))
            for s in TESTED]
    for run in ("computed", "cached"):
        stats = {}
        triplets = compute_base_triplets(jobs, SVDCache(tmp_path / "svd"), stats=stats)
        assert stats[run] == len(TESTED)
        for short in TESTED:
            name = _lycoris_name(short)
            module = tl.modules[name].with_base(*triplets[name])
            lora = next(lo for lo in net.loras if lo.lora_name == name)
            for r, ref in enumerate(_reference_deltas(lora), start=1):
                assert _rel(module.delta_weight(r), ref) < 1e-6, (run, short, r)
    assert all(m.needs_svd_base for m in tl.modules.values()), "the loaded file's adapters are never changed"


@pytest.mark.parametrize("short", ["proj_in", "conv1"])
def test_prefix_factors_as_a_forward_equal_lycoris_masked_delta(written, short):
    """y += (x @ down[:k*r].T) @ up_t[:k*r], what an injected layer computes per call, equals x @ delta(r)^T with
    LyCORIS' own masked delta (`get_diff_weight`) as the oracle, for every rank."""
    path, net, originals = written
    name = _lycoris_name(short)
    module = _with_rebuilt_base(load_tlora(path).modules[name], originals[short])
    lora = next(lo for lo in net.loras if lo.lora_name == name)
    down, up_t, k = module.prefix_factors()
    assert k == 2 and down.shape == (2 * RANK, module.in_features) and up_t.shape == (2 * RANK, module.out_features)
    x = torch.randn(5, module.in_features, generator=torch.Generator().manual_seed(3))
    for r, ref in enumerate(_reference_deltas(lora), start=1):
        expected = x.double() @ ref.reshape(ref.shape[0], -1).double().T
        got = (x @ down[: k * r].T) @ up_t[: k * r]
        assert _rel(got, expected) < 1e-5, (short, r)


def test_3x3_conv_gets_a_defined_behaviour(written):
    """LyCORIS writes 1x1 factors for a 3x3 conv (its file cannot be told from a 1x1 conv's) and cannot run
    it itself. Once the layer's weight shape is known the module must be refused with a reason, never patched."""
    path, net, originals = written
    x = torch.randn(1, 8, 5, 5)
    with pytest.raises(RuntimeError):  # what LyCORIS itself does with it
        net.loras[[lo.lora_name for lo in net.loras].index(_lycoris_name("conv3"))](x)
    module = load_tlora(path).modules[_lycoris_name("conv3")]
    why = module.fit_error(originals["conv3"].shape)
    assert why is not None and "kernel" in why and "3x3" in why
    for short in TESTED:
        assert module.fit_error(originals[short].shape) is not None or short == "conv1"
    with pytest.raises(ValueError, match="does not fit"):
        _with_rebuilt_base(module, originals["conv3"])


# --- schedule values recorded with the file -------------------------------------------------------

def test_schedule_from_lycoris_config_metadata(tmp_path, trained):
    config = {"algo": "tlora", "linear_dim": RANK, "linear_alpha": ALPHA, "tlora_min_rank": 3, "tlora_alpha": 1.5}
    path = _save(trained[0], tmp_path, metadata={"lycoris_config": json.dumps(config)})
    d = load_tlora(path).schedule_defaults()
    assert d["max_rank"][0] == RANK
    assert d["min_rank"][0] == 3 and d["alpha"][0] == pytest.approx(1.5)
    for field in ("max_rank", "min_rank", "alpha"):
        assert "lycoris_config" in d[field][1] and "metadata" in d[field][1]


def test_schedule_from_sidecar_lycoris_config_json(tmp_path, trained):
    # SimpleTuner's final save strips linear_dim / tlora_* from the metadata and copies the config beside it.
    stripped = {"algo": "tlora", "linear_alpha": ALPHA}
    path = _save(trained[0], tmp_path, metadata={"lycoris_config": json.dumps(stripped)})
    (tmp_path / "lycoris_config.json").write_text(json.dumps(
        {"algo": "tlora", "linear_dim": RANK, "linear_alpha": ALPHA, "tlora_min_rank": 2, "tlora_alpha": 0.5}))
    d = load_tlora(path).schedule_defaults()
    assert d["min_rank"][0] == 2 and d["alpha"][0] == pytest.approx(0.5)
    assert "sidecar" in d["min_rank"][1] and "lycoris_config.json" in d["min_rank"][1]
    assert "lycoris_config.json" in d["alpha"][1]
    # switched off, the sidecar is not read
    d_off = load_tlora(path, sidecar=False).schedule_defaults()
    assert d_off["min_rank"] == (1, "default") and d_off["alpha"] == (1.0, "default")


def test_schedule_defaults_when_nothing_is_recorded(written):
    path, _, _ = written
    d = load_tlora(path).schedule_defaults()
    assert d["min_rank"] == (1, "default")
    assert d["alpha"] == (1.0, "default")
    assert d["max_rank"] == (RANK, "tensor shapes")


def test_unreadable_sidecar_is_ignored(written, tmp_path):
    path = written[0]
    (tmp_path / "lycoris_config.json").write_text("{not json")
    assert load_tlora(path).schedule_defaults()["min_rank"] == (1, "default")


def test_layer_of_another_shape_is_refused(written):
    path, _, originals = written
    tl = load_tlora(path)
    module = tl.modules[_lycoris_name("to_q")]
    assert "does not fit" in module.fit_error((16, 20))
    assert module.fit_error((16, 16)) is None
    with pytest.raises(ValueError, match="does not fit"):
        _with_rebuilt_base(module, torch.randn(16, 20))
    assert tl.modules[_lycoris_name("conv1")].fit_error((12, 8, 1, 1)) is None
