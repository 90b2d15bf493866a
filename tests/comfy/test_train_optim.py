"""Train T-LoRA's learning-rate schedules and optional optimizers: the rate at each step is the formula, and a resumed
run continues it (N + N steps equal 2N straight); Prodigy and schedule-free AdamW train and resume exactly (their
state, non-tensor entries included, fits the training state), schedule-free AdamW's files hold its eval-mode
parameters (the running average of its z iterates); a missing package is refused before any work, naming it and
how to install it."""

from __future__ import annotations

import json
import math
import os
import sys

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from tests.comfy.test_training import _conditioning
from tests.comfy.test_training_resume import _assert_same_factors
from tools.families import FAMILIES

COSINE, LINEAR = "warm-up + cosine", "linear"


def _settings(pack, **kw):
    base = {"steps": 4, "learning_rate": 1e-2, "rank": 4, "min_rank": 2, "seed": 3, "targets": "attention",
            "batch_size": 1, "gradient_checkpointing": False}
    return pack.engine.training.TrainSettings(**{**base, **kw})


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    fam = FAMILIES["sd15"]
    twin = fam.build(71)
    os.environ["TLORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("svd"))
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5
    return twin, latent, [_conditioning(fam, twin)]


def _train(pack, sd15, s, out, resume=None):
    twin, latent, positive = sd15
    with torch.inference_mode():
        return pack.engine.training.train(twin.patcher, [latent], positive, s, str(out), resume=resume)


def expected_lr(schedule: str, lr: float, k: int, total: int, warmup: int) -> float:
    """The rate at step k (from 0) of `total`: a linear warm-up to lr over `warmup` steps, then constant, half a
    cosine to 0 at step `total`, or a line to 0 at step `total`."""
    if k < warmup:
        return lr * (k + 1) / warmup
    x = (k - warmup) / (total - warmup)
    return {"constant": lr, COSINE: lr * (1 + math.cos(math.pi * x)) / 2, LINEAR: lr * (1 - x)}[schedule]


@pytest.mark.parametrize("schedule", ["constant", COSINE, LINEAR])
@pytest.mark.parametrize("warmup", [0, 3])
def test_the_schedules_are_their_formulas(pack, schedule, warmup):
    optim, s = pack.engine.training.optim, _settings(pack, lr_schedule=schedule, warmup_steps=warmup, steps=10)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    got = [optim.set_lr(opt, s, k, 10) for k in range(10)]
    assert got == pytest.approx([expected_lr(schedule, 1e-2, k, 10, warmup) for k in range(10)], rel=1e-12, abs=0)
    assert opt.param_groups[0]["lr"] == got[-1]


def test_resume_continues_the_schedule(pack, sd15, tmp_path):
    """Warm-up 2 + cosine over 6 steps: each step's rate is the formula; 3 steps, then 3 more from the checkpoint,
    take the same rates and give the same factors as 6 straight (1e-6)."""
    s = _settings(pack, lr_schedule=COSINE, warmup_steps=2)
    straight = _train(pack, sd15, s.__class__(**{**s.record(), "steps": 6, "save_every": 3}),
                      tmp_path / "straight.safetensors")
    assert straight.lrs == pytest.approx([expected_lr(COSINE, 1e-2, k, 6, 2) for k in range(6)], rel=1e-12, abs=0)
    more = _train(pack, sd15, s.__class__(**{**s.record(), "steps": 3}), tmp_path / "more.safetensors",
                  resume=str(tmp_path / "straight_step3.safetensors"))
    assert more.lrs == pytest.approx(straight.lrs[3:], rel=1e-12, abs=0)
    _assert_same_factors(more.path, straight.path)


def _state_meta(path) -> dict:
    with safe_open(str(path).replace(".safetensors", ".train_state"), "pt") as f:
        return json.loads(f.metadata()["tlora_train_state"])


def test_prodigy_trains_and_resumes_exactly(pack, sd15, tmp_path):
    """Prodigy at lr 1 (the paper's Flux setting): its adapted step size d, its per-parameter step counts (not
    tensors) and its moments go into the state; 2 + 2 steps equal 4 straight (1e-6)."""
    s = _settings(pack, optimizer="Prodigy", learning_rate=1.0)
    straight = _train(pack, sd15, s.__class__(**{**s.record(), "save_every": 2}), tmp_path / "straight.safetensors")
    meta = _state_meta(straight.path)
    assert meta["optimizer"] == "Prodigy" and meta["groups"][0]["d"] > meta["groups"][0]["d0"], meta["groups"]
    assert {d["step"] for d in meta["extras"].values()} == {4}, meta["extras"]
    more = _train(pack, sd15, s.__class__(**{**s.record(), "steps": 2}), tmp_path / "more.safetensors",
                  resume=str(tmp_path / "straight_step2.safetensors"))
    _assert_same_factors(more.path, straight.path)


def test_schedule_free_files_hold_its_eval_parameters_and_resume_exactly(pack, sd15, tmp_path):
    """Schedule-free AdamW (constant rate, no warm-up) evaluates at x, the uniform running average of its z iterates:
    the file of step k holds (z_1 + ... + z_k) / k, with each z_k from the state beside step k's file (1e-6), not
    the point it trains at; 2 + 2 steps equal 4 straight (1e-6)."""
    s = _settings(pack, optimizer="AdamW schedule-free", save_every=1)
    straight = _train(pack, sd15, s, tmp_path / "straight.safetensors")
    paths = [tmp_path / f"straight_step{k}.safetensors" for k in (1, 2, 3)] + [tmp_path / "straight.safetensors"]
    zs: list[dict] = []
    parts = {".q_layer.weight": "q", ".p_layer.weight": "p", ".lambda_layer": "lam"}
    for k, path in enumerate(paths, start=1):
        zs.append(load_file(str(path).replace(".safetensors", ".train_state")))
        for key, v in load_file(str(path)).items():
            suffix = next((sfx for sfx in parts if key.endswith(sfx)), None)
            if suffix is None:
                continue
            z = f"optimizer.{key[: -len(suffix)]}.{parts[suffix]}.z"
            mean = sum(st[z] for st in zs) / k
            err = float((v.reshape(mean.shape) - mean).abs().max() / mean.abs().max())
            assert err <= 1e-6, (k, key, err)
    assert _state_meta(paths[-1])["groups"][0]["train_mode"] is False
    more = _train(pack, sd15, s.__class__(**{**s.record(), "steps": 2, "save_every": 0}),
                  tmp_path / "more.safetensors", resume=str(paths[1]))
    _assert_same_factors(more.path, straight.path)


@pytest.mark.parametrize(("optimizer", "package"), [("Prodigy", "prodigyopt"), ("AdamW schedule-free", "schedulefree")])
def test_a_missing_optimizer_package_is_refused_before_any_work(pack, sd15, tmp_path, monkeypatch, optimizer, package):
    monkeypatch.setitem(sys.modules, package, None)  # as if not installed: importing it raises ImportError
    out = tmp_path / "never.safetensors"
    with pytest.raises(pack.tlora_core.TLoRAError) as e:
        _train(pack, sd15, _settings(pack, optimizer=optimizer), out)
    msg = str(e.value)
    assert out.name in msg and f"needs the Python package '{package}'" in msg, msg
    assert f"python -m pip install {package}" in msg and "or choose AdamW" in msg, msg
    assert not list(tmp_path.iterdir())


def test_schedule_free_with_a_decay_schedule_is_refused(pack, sd15, tmp_path):
    with pytest.raises(pack.tlora_core.TLoRAError, match="set lr_schedule to constant"):
        _train(pack, sd15, _settings(pack, optimizer="AdamW schedule-free", lr_schedule=COSINE),
               tmp_path / "never.safetensors")
