"""The paper's recipe in Train T-LoRA: its init (the last SVD components of a random N(0, std 1/r) matrix, as the
official repository builds it, seeded per module) in the modules trained and the file's stored base; the file
reloads exactly in Load T-LoRA; resume records and checks the init; the node says where the settings depart from
the preset's source recipe, and why."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.comfy.test_training import _conditioning
from tests.comfy.test_training_resume import _assert_same_factors
from tests.unit.test_random_init import official_last
from tools.families import FAMILIES
from tools.families.base import capture, rel_l2, sigma_for

R, MIN_RANK = 4, 2


def _settings(pack, **kw):
    base = {"steps": 3, "learning_rate": 1e-2, "rank": R, "min_rank": MIN_RANK, "linear_alpha": 0.0, "seed": 5,
            "targets": "attention", "batch_size": 2, "gradient_checkpointing": False,
            "init": pack.engine.training.PAPER}
    return pack.engine.training.TrainSettings(**{**base, **kw})


def _train(pack, sd15, s, out, resume=None):
    fam, twin, latent, positive = sd15
    with torch.inference_mode():
        return pack.engine.training.train(twin.patcher, [latent], positive, s, str(out), resume=resume)


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    fam = FAMILIES["sd15"]
    twin = fam.build(61)
    os.environ["TLORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("svd"))
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5
    return fam, twin, latent, [_conditioning(fam, twin)]


@pytest.fixture(scope="module")
def paper(pack, sd15, tmp_path_factory):
    """4 steps from the paper's init, asked with store_base off, with a checkpoint at step 2 to resume from."""
    d = tmp_path_factory.mktemp("paper")
    logs = []
    handler = logging.Handler()
    handler.emit = lambda r: logs.append(r.getMessage())  # type: ignore[method-assign]
    logging.getLogger("tlora.train").addHandler(handler)
    try:
        res = _train(pack, sd15, _settings(pack, store_base=False, steps=4, save_every=2), d / "paper.safetensors")
    finally:
        logging.getLogger("tlora.train").removeHandler(handler)
    return res, logs


def test_the_paper_init_is_the_official_construction_and_the_file_stores_it(pack, sd15, paper):
    """Every module's frozen base (the init: the trained factors leave it) is the official `sig_type="last"` init
    of the layer's shape from the module's seed, bit for bit; the file stores it although store_base was off (and
    the log says so), and records the init."""
    res, logs = paper
    ri = pack.tlora_core.random_init
    stored = load_file(res.path)
    for name, m in res.modules.items():
        q, p, lam = official_last(m.q.shape[1], m.p.shape[0], R, ri.module_seed(5, name))
        assert torch.equal(m.q0.cpu(), q) and torch.equal(m.p0.cpu(), p) and torch.equal(m.lam0.cpu(), lam[0]), name
        assert torch.equal(stored[f"{name}.base_q"], q) and torch.equal(stored[f"{name}.base_p"], p), name
        assert torch.equal(stored[f"{name}.base_lambda"], lam), name
        assert not torch.equal(m.q.detach().cpu(), q), f"{name} did not train"
    assert any("store_base switched on" in line for line in logs), logs
    with safe_open(res.path, "pt") as f:
        meta = f.metadata()
    record, base = json.loads(meta["tlora_training"]), json.loads(meta["tlora_base"])
    assert record["init"] == ri.PAPER and record["store_base"] is True, record
    assert base["base_init"] == ri.RANDOM_BASE, base


def test_the_file_reloads_exactly(pack, sd15, paper, caplog):
    """Load T-LoRA of the file adds to every layer what the trainer's module adds, at every rank (1e-6), and to the
    model's output (1e-5); it says the stored base is the random init and gives no base-fit warning."""
    fam, twin, latent, _ = sd15
    res, _ = paper
    with caplog.at_level(logging.INFO):
        tl = pack.engine.read_file(res.path, False)
        apply = pack.engine.apply
        clone, _ = apply.apply_tlora(twin.patcher, tl, apply.Settings(1.0, R, MIN_RANK, 1.0))
    assert not tl.needs_svd_base
    for name, m in res.modules.items():
        down, up_t = (f.detach().double().cpu() for f in m.factors())
        for r in range(R + 1):
            want = up_t[: 2 * r].T @ down[: 2 * r]
            got = tl.modules[name].delta_weight(r).double().reshape(want.shape)
            assert (got - want).norm() <= 1e-6 * max(float(want.norm()), 1e-12), (name, r)
    said = caplog.text
    assert "stored base (random, the paper's init" in said and "not this checkpoint's" not in said, said
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(2))
    targets = pack.engine.train_targets.trainable_targets(twin.patcher.model, "attention")
    patch = pack.engine.training.TrainingPatch(twin.patcher, targets, res.modules, _settings(pack))
    try:
        for t in (999, 500, 0):
            sigma = sigma_for(twin.patcher, t, False)
            base = capture(twin.patcher, x, sigma, conds).out
            loaded = capture(clone, x, sigma, conds).out - base
            mine = capture(patch.clone, x, sigma, conds).out - base
            assert float(loaded.abs().max()) > 0 and rel_l2(loaded, mine) < 1e-5, (t, rel_l2(loaded, mine))
    finally:
        patch.close()


def test_resume_records_and_checks_the_init(pack, sd15, paper, tmp_path):
    """The paper-init checkpoint at step 2 continued 2 steps equals the 4 steps straight (1e-6); continued with the
    principal init it is refused, naming the init; a file with no stored base cannot be continued under the paper's
    init (its base is the weights' principal components)."""
    res, _ = paper
    ckpt = res.path.replace(".safetensors", "_step2.safetensors")
    more = _train(pack, sd15, _settings(pack, steps=2), tmp_path / "more.safetensors", resume=ckpt)
    _assert_same_factors(more.path, res.path)
    principal = pack.engine.training.PRINCIPAL
    with pytest.raises(pack.tlora_core.TLoRAError) as e:
        _train(pack, sd15, _settings(pack, steps=1, init=principal), tmp_path / "never.safetensors", resume=ckpt)
    assert f"init '{pack.engine.training.PAPER}' (this run: '{principal}')" in str(e.value), str(e.value)
    plain = _train(pack, sd15, _settings(pack, steps=1, init=principal, store_base=False),
                   tmp_path / "plain.safetensors")
    assert pack.tlora_core.load_tlora(plain.path).needs_svd_base
    with pytest.raises(pack.tlora_core.TLoRAError) as e:
        _train(pack, sd15, _settings(pack, steps=1), tmp_path / "never.safetensors", resume=plain.path)
    assert f"init '{principal}' (this run: '{pack.engine.training.PAPER}')" in str(e.value), str(e.value)
    assert not (tmp_path / "never.safetensors").exists()


def test_departures_from_the_recipe_each_say_why(pack):
    """Under the paper's preset: a min_rank below half the rank (even at the preset's value, with a larger rank),
    the principal init and another optimizer are departures with their reason; SimpleTuner's preset keeps the
    principal init; 'custom' departs from nothing."""
    train = pack.nodes.train
    paper = dict(train.PRESET_VALUES["paper, single image"])
    assert paper["init"] == pack.engine.training.PAPER and paper["optimizer"] == "AdamW"
    got = train.preset_departures("paper, single image", {**paper, "rank": 128})
    assert set(got) == {"rank", "min_rank"} and got["min_rank"]["trained"] == 32
    assert "min_rank 32 is below half the rank 128 (the paper found 25 % often too small)" == got["min_rank"]["why"]
    got = train.preset_departures("paper, single image", {**paper, "init": pack.engine.training.PRINCIPAL,
                                                          "optimizer": "Prodigy"})
    assert set(got) == {"init", "optimizer"}
    assert "principal components a worse init" in got["init"]["why"] and "AdamW" in got["optimizer"]["why"]
    simple = train.PRESET_VALUES["SimpleTuner"]
    assert simple["init"] == pack.engine.training.PRINCIPAL and train.preset_departures("SimpleTuner", simple) == {}
    assert train.preset_departures("custom", {**paper, "min_rank": 1}) == {}
