"""Resume continues a run: N steps, a checkpoint, N more from it equals 2N steps straight (SD1.5 and Flux, a flow
model); files trained otherwise are refused with the reason; a file from another trainer (LyCORIS, as SimpleTuner
writes it) continues from its factors; an interrupted run leaves its last step, which the node continues."""

from __future__ import annotations

import json
import logging
import os

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tests.comfy.test_training import _conditioning
from tools import tiny_models as tm
from tools.families import FAMILIES

R, MIN_RANK = 4, 2
FACTORS = (".q_layer.weight", ".p_layer.weight", ".lambda_layer")


def _settings(pack, **kw):
    base = {"steps": 3, "learning_rate": 1e-2, "rank": R, "min_rank": MIN_RANK, "alpha": 1.0, "linear_alpha": 2.0,
            "targets": "attention", "seed": 9, "batch_size": 2, "gradient_checkpointing": False}
    return pack.engine.training.TrainSettings(**{**base, **kw})


def _train(pack, patcher, latent, positive, s, out, resume=None, progress=None):
    with torch.inference_mode():
        return pack.engine.training.train(patcher, [latent], positive, s, str(out), resume=resume, progress=progress)


def _factors(path) -> dict[str, torch.Tensor]:
    return {k: v for k, v in load_file(str(path)).items() if k.endswith(FACTORS)}


def _assert_same_factors(a, b) -> None:
    fa, fb = _factors(a), _factors(b)
    assert fa.keys() == fb.keys() and fa
    worst = max(float((fa[k] - fb[k]).abs().max() / fb[k].abs().max().clamp_min(1e-12)) for k in fa)
    assert worst <= 1e-6, worst


@pytest.fixture(scope="module")
def sd15(tmp_path_factory):
    fam = FAMILIES["sd15"]
    twin = fam.build(51)
    os.environ["TLORA_CACHE_DIR"] = str(tmp_path_factory.mktemp("svd"))
    latent = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(3)) * 0.5
    return fam, twin, latent, [_conditioning(fam, twin)]


def _flux(tmp_path):
    fam = FAMILIES["flux"]
    twin = fam.build(52)
    x, _ = fam.inputs(twin, torch.Generator().manual_seed(2))
    latent = torch.randn(x.shape, generator=torch.Generator().manual_seed(3)) * 0.5
    return fam, twin, latent, [_conditioning(fam, twin)]


@pytest.mark.parametrize("name", ["sd15", "flux"])
def test_n_steps_then_n_more_equal_2n_straight(pack, sd15, tmp_path, name):
    """The checkpoint's state (AdamW moments and steps, the random generator, the losses) continues the run: the
    factors equal the straight run's (1e-6) and so does every step's loss."""
    fam, twin, latent, positive = sd15 if name == "sd15" else _flux(tmp_path)
    n = 3
    straight = _train(pack, twin.patcher, latent, positive, _settings(pack, steps=2 * n, save_every=n),
                      tmp_path / "straight.safetensors")
    ckpt = tmp_path / f"straight_step{n}.safetensors"
    assert straight.checkpoints == [str(ckpt)]
    more = _train(pack, twin.patcher, latent, positive, _settings(pack, steps=n), tmp_path / "more.safetensors",
                  resume=str(ckpt))
    print(f"{name}: losses straight {straight.losses}, resumed {more.losses}")
    assert more.losses[-n:] == pytest.approx(straight.losses[-n:], rel=1e-6, abs=0)
    _assert_same_factors(more.path, straight.path)
    assert more.losses == pytest.approx(straight.losses, rel=1e-6, abs=0)  # the whole curve, the first n from the state
    assert (tmp_path / f"straight_step{n}.train_state").is_file()
    assert more.steps == 2 * n and "with its training state" in more.resumed
    with safe_open(more.path, "pt") as f:
        record = json.loads(f.metadata()["tlora_training"])
    assert record["steps"] == 2 * n and record["resumed_from"] == ckpt.name


@pytest.fixture(scope="module")
def made(pack, sd15, tmp_path_factory):
    """A 2-step run (rank 4, min_rank 2, alpha 1, linear_alpha 2, attention) to resume from."""
    fam, twin, latent, positive = sd15
    d = tmp_path_factory.mktemp("made")
    res = _train(pack, twin.patcher, latent, positive, _settings(pack, steps=2), d / "made.safetensors")
    return res.path


@pytest.mark.parametrize(("change", "says"), [
    ({"rank": 6}, "rank 4 (this run: 6)"), ({"min_rank": 3}, "min_rank 2 (this run: 3)"),
    ({"alpha": 1.5}, "alpha 1.0 (this run: 1.5)"), ({"linear_alpha": 3.0}, "linear_alpha 2.0 (this run: 3.0)"),
    ({"targets": "attention+feed_forward"}, "targets 'attention' (this run: 'attention+feed_forward')"),
    ({}, "model 'SDXL' (this run: 'BaseModel')"),
], ids=["rank", "min_rank", "alpha", "linear_alpha", "targets", "model"])
def test_a_file_trained_otherwise_is_refused_with_the_reason(pack, sd15, made, tmp_path, change, says):
    fam, twin, latent, positive = sd15
    path = made
    if not change:  # the same file, recorded as trained on another model class
        with safe_open(made, "pt") as f:
            meta = f.metadata()
        record = json.loads(meta["tlora_training"])
        path = str(tmp_path / "other_model.safetensors")
        save_file(load_file(made), path, {**meta, "tlora_training": json.dumps({**record, "model": "SDXL"})})
    out = tmp_path / "never.safetensors"
    with pytest.raises(pack.tlora_core.TLoRAError) as e:
        _train(pack, twin.patcher, latent, positive, _settings(pack, **change), out, resume=path)
    msg = str(e.value)
    assert os.path.basename(path) in msg and says in msg, msg
    assert not out.exists()


@pytest.fixture(scope="module")
def lycoris_file(sd15, tmp_path_factory):
    """A LyCORIS tlora file written as SimpleTuner writes it (attention + feed-forward, no state, no record)."""
    fam, twin, _, _ = sd15
    path = tmp_path_factory.mktemp("lycoris") / "simpletuner.safetensors"
    net = tm.write_lycoris_tlora(twin.diffusers, path, R, 2.0, fam.targets, seed=4)
    net.restore()
    return str(path)


def test_a_file_with_modules_outside_the_targets_is_refused(pack, sd15, lycoris_file, tmp_path):
    """Never a silent drop: attention + feed-forward modules resumed under the attention targets are refused."""
    fam, twin, latent, positive = sd15
    with pytest.raises(pack.tlora_core.TLoRAError, match="modules outside the 'attention' targets") as e:
        _train(pack, twin.patcher, latent, positive, _settings(pack), tmp_path / "never.safetensors",
               resume=lycoris_file)
    assert "simpletuner.safetensors" in str(e.value)


def test_a_file_from_another_trainer_continues_from_its_factors(pack, sd15, lycoris_file, tmp_path, caplog):
    fam, twin, latent, positive = sd15
    s = _settings(pack, steps=1, learning_rate=1e-7, targets="attention+feed_forward")
    with caplog.at_level(logging.INFO, logger="tlora.train"):
        res = _train(pack, twin.patcher, latent, positive, s, tmp_path / "continued.safetensors", resume=lycoris_file)
    assert "without a training state" in caplog.text and "optimizer starts afresh" in caplog.text
    assert res.resumed.endswith("(factors only)") and res.steps == 1
    theirs, ours = load_file(lycoris_file), _factors(res.path)
    assert set(ours) == {k for k in theirs if k.endswith(FACTORS)}
    worst = max(float((ours[k] - theirs[k].reshape(ours[k].shape)).abs().max() / theirs[k].abs().max())
                for k in ours)
    assert 0 < worst < 1e-4, worst  # one step at lr 1e-7 from the file's factors


def test_an_interrupted_run_leaves_its_last_step_and_the_node_continues_it(pack, sd15, tmp_path, monkeypatch):
    """Interrupted after step 3 of 6 (no save_every): `<name>_step3.safetensors` with its state is in models/loras,
    listed by the node's `resume_from` (the state file is not), and the node resumed from it for 3 more steps
    writes what 6 steps straight write."""
    import comfy.model_management as mm
    import folder_paths

    fam, twin, latent, positive = sd15
    loras = tmp_path / "loras"
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "loras",
                        ([str(loras)], folder_paths.supported_pt_extensions))
    monkeypatch.setattr(folder_paths, "filename_list_cache", {})
    s = _settings(pack, steps=6)
    out = loras / "tlora" / "run.safetensors"

    def stop_after_three(step, total, loss):
        if step == 3:
            mm.interrupt_current_processing(True)

    try:
        with pytest.raises(mm.InterruptProcessingException):
            _train(pack, twin.patcher, latent, positive, s, out, progress=stop_after_three)
    finally:
        mm.interrupt_current_processing(False)
    assert sorted(p.name for p in out.parent.iterdir()) == ["run_step3.lycoris_config.json", "run_step3.safetensors",
                                                            "run_step3.train_state"]
    node = pack.nodes.train.TLoRATrain
    names = folder_paths.get_filename_list("loras")
    options = next(i for i in node.define_schema().inputs if i.id == "resume_from").options
    assert "tlora/run_step3.safetensors" in names and "tlora/run_step3.safetensors" in options
    assert not [n for n in names if "train_state" in n]
    widgets = {k: [v] for k, v in s.record().items() if k != "weight_decay"}
    widgets.update(steps=[3], preset=["custom"], filename=["tlora/run"], overwrite=[False],
                   resume_from=["tlora/run_step3.safetensors"])
    with torch.inference_mode():
        result = node.execute([twin.patcher], [{"samples": latent}], positive, **widgets)
    text = result.ui["text"][0]
    assert text.startswith("tlora/run.safetensors: 6 steps"), text
    assert "continued run_step3.safetensors at step 3 (with its training state)" in text, text
    straight = _train(pack, twin.patcher, latent, positive, s, tmp_path / "straight.safetensors")
    _assert_same_factors(out, straight.path)
