"""What Train T-LoRA records and trains: the LyCORIS config in the file rebuilds, applied the way SimpleTuner applies
it, exactly the modules that were trained (SD1.5, SDXL, SD3 and Flux twins, every `targets` value); and the node
trains the values it is sent, whatever preset it is sent with, and says which depart from that preset."""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open

from tests.comfy.test_training import _conditioning
from tools import tiny_models as tm
from tools.families import FAMILIES

# LyCORIS' class-level preset state (`LycorisNetwork.apply_preset` sets it for every later network)
PRESET_STATE = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
                "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
RECORD_FAMILIES = ("sd15", "sdxl", "sd3", "flux", "flux2")
TARGETS = ("attention", "attention+feed_forward", "all_linears")


@pytest.fixture(scope="module")
def twins():
    """Each family's twin, built once for the module."""
    made: dict = {}

    def get(name):
        if name not in made:
            made[name] = FAMILIES[name].build(51)
        return made[name]

    return get


@pytest.fixture
def lycoris_defaults():
    """LyCORIS' class-level preset, restored after the test."""
    from lycoris import LycorisNetwork

    saved = {k: getattr(LycorisNetwork, k) for k in PRESET_STATE}
    yield
    for k, v in saved.items():
        setattr(LycorisNetwork, k, v)


def _rebuilt(model: torch.nn.Module, cfg: dict) -> set[str]:
    """The module names of the network SimpleTuner makes from a `lycoris_config`: `apply_preset`, then
    `create_lycoris(model, multiplier, linear_dim, linear_alpha, **config)`."""
    from lycoris import LycorisNetwork, create_lycoris

    if "apply_preset" in cfg:
        LycorisNetwork.apply_preset(cfg["apply_preset"])
    rest = {k: v for k, v in cfg.items() if k not in ("multiplier", "linear_dim", "linear_alpha")}
    with tm.fast_lycoris():
        net = create_lycoris(model, cfg["multiplier"], linear_dim=cfg["linear_dim"], linear_alpha=cfg["linear_alpha"],
                             **rest)
    return {lo.lora_name for lo in net.loras}


def _file(path) -> tuple[dict, dict, dict[str, tuple[int, ...]]]:
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    return json.loads(meta["lycoris_config"]), json.loads(meta["tlora_training"]), shapes


@pytest.mark.parametrize("targets", TARGETS)
@pytest.mark.parametrize("name", RECORD_FAMILIES)
def test_the_recorded_lycoris_config_rebuilds_exactly_the_trained_modules(pack, twins, lycoris_defaults, tmp_path,
                                                                          monkeypatch, name, targets):
    """One training step on the family's twin; the file's `lycoris_config` (and the sidecar beside it), applied to the
    diffusers twin as SimpleTuner applies it, makes LyCORIS build the modules the file holds, no more, no fewer."""
    fam = FAMILIES[name]
    twin = twins(name)
    monkeypatch.setenv("TLORA_CACHE_DIR", str(tmp_path / "svd"))
    x, _ = fam.inputs(twin, torch.Generator().manual_seed(1))
    s = pack.engine.training.TrainSettings(steps=1, rank=2, min_rank=1, targets=targets, learning_rate=1e-3,
                                           gradient_checkpointing=False, store_base=False)
    out = tmp_path / "record.safetensors"
    with torch.inference_mode():
        cond = _conditioning(fam, twin)
        if name == "flux2":  # ComfyUI 0.3.75's Flux 2 asks its conditioning for a pooled output it never uses
            cond = [[cond[0][0], {**cond[0][1], "pooled_output": torch.zeros(1, 768)}]]
        pack.engine.training.train(twin.patcher, [x * 0.5], [cond], s, str(out))
    cfg, _, shapes = _file(out)
    trained = {k.split(".")[0] for k in shapes}
    assert trained == {t.name for t in pack.engine.train_targets.trainable_targets(twin.patcher.model, targets)}
    assert json.loads((tmp_path / "record.lycoris_config.json").read_text()) == cfg
    rebuilt = _rebuilt(twin.diffusers, cfg)
    print(name, targets, f"trained {len(trained)}, LyCORIS rebuilds {len(rebuilt)}")
    assert rebuilt == trained, (f"{len(rebuilt)} modules rebuilt for {len(trained)} trained; missing "
                                f"{sorted(trained - rebuilt)[:4]}, extra {sorted(rebuilt - trained)[:4]}")


def _node_inputs(pack, **values) -> dict:
    """Every Train T-LoRA widget at its schema default, `values` replacing some, as ComfyUI passes them to an
    `is_input_list` node (one-item lists); optional links (no default) unconnected."""
    schema = pack.nodes.train.TLoRATrain.define_schema()
    links = {"model", "latents", "positive"}
    widgets = {i.id: i.default for i in schema.inputs if i.id not in links and hasattr(i, "default")}
    unknown = set(values) - set(widgets)
    assert not unknown, unknown
    return {k: [v] for k, v in {**widgets, **values}.items()}


def test_the_node_trains_the_values_it_is_sent_under_a_preset(pack, tmp_path, monkeypatch, caplog):
    """Preset 'paper, single image' (800 steps, rank 64, min_rank 32, lr 1e-4) sent with steps 2, rank 4, min_rank 2
    and lr 1e-3: the file has rank 4 modules, the record says 2 steps and names the preset and each departure, and so
    do the log and the text under the node."""
    import folder_paths

    fam = FAMILIES["sd15"]
    twin = fam.build(52)
    monkeypatch.setenv("TLORA_CACHE_DIR", str(tmp_path / "svd"))
    folder = tmp_path / "loras"
    folder.mkdir()
    x, _ = fam.inputs(twin, torch.Generator().manual_seed(2))
    sent = {"preset": "paper, single image", "steps": 2, "rank": 4, "min_rank": 2, "learning_rate": 1e-3,
            "filename": "preset/sent", "gradient_checkpointing": False}
    assert pack.nodes.train.PRESET_VALUES[sent["preset"]]["steps"] == 800
    real_train = pack.nodes.train.train

    def checked_train(patcher, latents, positive, s, *args, **kw):  # the real training, once the settings are seen
        got = {k: getattr(s, k) for k in ("steps", "rank", "min_rank", "learning_rate")}
        assert got == {k: sent[k] for k in got}, f"the node was sent {sent} and trains {got}"
        return real_train(patcher, latents, positive, s, *args, **kw)

    monkeypatch.setattr(pack.nodes.train, "train", checked_train)
    folder_paths.add_model_folder_path("loras", str(folder), is_default=True)
    try:
        with torch.inference_mode(), caplog.at_level(logging.WARNING, logger="tlora.train"):
            res = pack.nodes.train.TLoRATrain.execute(model=[twin.patcher], latents=[{"samples": x * 0.5}],
                                                      positive=[_conditioning(fam, twin)], **_node_inputs(pack, **sent))
    finally:
        folder_paths.folder_names_and_paths["loras"][0].remove(str(folder))
    cfg, record, shapes = _file(folder / "preset" / "sent.safetensors")
    ranks = {v[0] for k, v in shapes.items() if k.endswith(".q_layer.weight")}
    assert ranks == {4} and cfg["linear_dim"] == 4 and cfg["tlora_min_rank"] == 2, (ranks, cfg)
    assert (record["steps"], record["rank"], record["min_rank"], record["learning_rate"]) == (2, 4, 2, 1e-3), record
    assert record["preset"] == "paper, single image"
    assert record["preset_departures"] == {"steps": {"preset": 800, "trained": 2}, "rank": {"preset": 64, "trained": 4},
                                           "min_rank": {"preset": 32, "trained": 2},
                                           "learning_rate": {"preset": 1e-4, "trained": 1e-3}}, record
    assert len(res.result[1]["loss"]) == 2
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "preset 'paper, single image'" in said and "steps 2 (preset 800)" in said and "rank 4 (preset 64)" in said
    text = res.ui["text"][0]
    assert text.startswith("preset/sent.safetensors: 2 steps") and "except rank, min_rank, learning_rate, steps" in text


def test_a_preset_sent_with_its_own_values_records_no_departure(pack):
    """'custom' departs from nothing, and values equal to the preset's (1e-4 read back as 0.00010000000000000002 by
    a number widget) are no departure."""
    train = pack.nodes.train
    paper = dict(train.PRESET_VALUES["paper, single image"])
    assert train.preset_departures("paper, single image", {**paper, "learning_rate": 0.00010000000000000002}) == {}
    assert train.preset_departures("custom", {**paper, "steps": 3}) == {}
    assert train.preset_departures("SimpleTuner", paper) == {
        "min_rank": {"preset": 1, "trained": 32}, "linear_alpha": {"preset": 32.0, "trained": 0.0},
        "targets": {"preset": "attention+feed_forward", "trained": "attention"}}
