"""Self-contained LyCORIS T-LoRA files: the trained factors plus the SVD base, written by the "Save T-LoRA with base"
node's function or by `python -m tlora_core embed-base`, read back by this pack (no SVD at load) and by LyCORIS.

Effects on every checkpoint storage are in test_storage.py; this tier covers the file itself: what LyCORIS makes of
it, the command line, and damaged or mismatched files.
"""

from __future__ import annotations

import json
import logging

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from tools import tiny_models as tm
from tools.families import FAMILIES

R = 8


@pytest.fixture(scope="module")
def made(pack, tmp_path_factory):
    """The tiny SD1.5 twin, its LyCORIS file (with a SimpleTuner sidecar) and the node's self-contained copy."""
    twin = FAMILIES["sd15"].build(31)
    d = tmp_path_factory.mktemp("self_contained")
    path = d / "pytorch_lora_weights.safetensors"
    tm.write_lycoris_tlora(twin.diffusers, path, R, R, seed=2, strength=1.0).restore()
    (d / "lycoris_config.json").write_text(json.dumps({"algo": "tlora", "linear_dim": R, "tlora_min_rank": 3,
                                                       "tlora_alpha": 1.5}))
    out = pack.engine.save.save_with_base(twin.patcher, str(path), str(d / "with_base.safetensors"), "sd15 twin")
    return {"twin": twin, "plain": path, "contained": out, "dir": d}


def test_the_file_records_its_base_and_schedule(pack, made):
    tl = pack.tlora_core.load_tlora(made["contained"], sidecar=False)  # no sidecar: the file alone
    plain = pack.tlora_core.load_tlora(made["plain"])
    assert tl.format == plain.format == "lycoris_tlora" and not tl.needs_svd_base and plain.needs_svd_base
    assert set(tl.modules) == set(plain.modules)
    info = tl.stored_base
    assert info["checkpoint"] == "sd15 twin" and info["layers"] == len(tl.modules)
    assert len(info["checkpoint_digest"]) == 40
    d = tl.schedule_defaults()
    assert d["min_rank"][0] == 3 and d["alpha"][0] == pytest.approx(1.5) and "metadata" in d["min_rank"][1]
    keys = {t.adapter.name: t.key for t in pack.engine.plan.plan(made["twin"].patcher, plain).targets}
    for name, a in tl.modules.items():  # the stored base is the top-r SVD of the layer's weight
        w = pack.engine.weights.layer_weight(made["twin"].patcher, keys[name]).dequantized()
        assert pack.tlora_core.diagnostics.base_fit(a, w) < 1e-5, name


def test_lycoris_still_reads_it_and_fills_its_base_from_it(made):
    """`create_lycoris_from_weights` ignores the extra tensors; once applied, `load_state_dict(strict=False)` (what
    LyCORIS' `load_weights` does) fills each module's base buffers with the stored base."""
    from lycoris import create_lycoris_from_weights

    unet = made["twin"].diffusers
    with tm.fast_lycoris():
        net, weights = create_lycoris_from_weights(1.0, str(made["contained"]), unet)
    try:
        assert len(net.loras) == len({k.split(".")[0] for k in weights})
        net.apply_to()
        missing, unexpected = net.load_state_dict(weights, strict=False)
        assert not unexpected, unexpected
        assert not [k for k in unexpected if ".base_" in k], unexpected
        stored = load_file(str(made["contained"]))
        for lora in net.loras:
            for buf in ("base_q", "base_p", "base_lambda"):
                assert torch.equal(getattr(lora, buf), stored[f"{lora.lora_name}.{buf}"].reshape(
                    getattr(lora, buf).shape)), (lora.lora_name, buf)
    finally:
        net.restore()


def test_loading_it_does_no_svd_and_reads_no_base_weights_for_the_base(pack, made, caplog):
    bases = pack.engine.bases
    before = bases.stats.snapshot()
    apply = pack.engine.apply
    tl = pack.tlora_core.load_tlora(made["contained"])
    with caplog.at_level(logging.INFO, logger="tlora"):
        apply.apply_tlora(made["twin"].patcher, tl, apply.Settings(1.0, R, 3, 1.5))
    assert bases.stats["svd"] == before["svd"] and bases.stats["digests"] == before["digests"]
    said = " ".join(r.getMessage() for r in caplog.records)
    assert "stored SVD base (from sd15 twin); residual on this checkpoint 0.000" in said, said
    assert "not this checkpoint" not in said


def test_command_line_writes_the_same_base_from_a_diffusers_folder(pack, made, tmp_path):
    folder = tmp_path / "unet"
    made["twin"].diffusers.save_pretrained(str(folder))
    out = tmp_path / "cli_with_base.safetensors"
    from tlora_core.__main__ import main

    assert main(["embed-base", str(made["plain"]), "--base", str(tmp_path), "--out", str(out)]) == 0
    cli, node = load_file(str(out)), load_file(str(made["contained"]))
    assert cli.keys() == node.keys()
    for k in cli:
        assert torch.allclose(cli[k], node[k], atol=1e-6), k
    with safe_open(str(out), "pt") as f:
        info = json.loads(f.metadata()["tlora_base"])
    assert info["checkpoint"] == tmp_path.name and info["created_by"] == "tlora_core embed-base"
    assert main(["embed-base", str(made["plain"]), "--base", str(tmp_path / "nothing_here")]) == 2


@pytest.mark.parametrize("damage", ["edited_base", "one_base_missing", "record_without_digest", "truncated"])
def test_damaged_self_contained_files_are_refused(pack, made, tmp_path, damage):
    sd = load_file(str(made["contained"]))
    with safe_open(str(made["contained"]), "pt") as f:
        meta = dict(f.metadata())
    path = tmp_path / f"{damage}.safetensors"
    victim = sorted(k for k in sd if k.endswith(".base_q"))[3]
    if damage == "edited_base":
        sd[victim] = sd[victim] * 1.001
    elif damage == "one_base_missing":
        del sd[victim]
    elif damage == "record_without_digest":
        meta["tlora_base"] = json.dumps({k: v for k, v in json.loads(meta["tlora_base"]).items() if k != "digest"})
    save_file(sd, str(path), metadata=meta)
    if damage == "truncated":
        with open(made["contained"], "rb") as f:
            data = f.read()
        path.write_bytes(data[: len(data) * 2 // 3])
    cause = {"edited_base": "digest mismatch", "one_base_missing": "stores the SVD base of",
             "record_without_digest": "has no digest", "truncated": "truncated or corrupt"}[damage]
    with pytest.raises(pack.tlora_core.TLoRAError) as e:
        pack.tlora_core.load_tlora(path)
    assert path.name in str(e.value) and cause in str(e.value), str(e.value)


def test_a_stored_base_without_the_record_is_a_trainers_and_is_used_as_stored(pack, made, tmp_path):
    """Trainers that store the base they trained against (Enferlain, 67372a) write no `tlora_base` record: such a
    file is read with its stored base, never an SVD, and named as a stored-base writer's."""
    sd = load_file(str(made["contained"]))
    path = tmp_path / "trainer_stored.safetensors"
    save_file(sd, str(path))
    tl = pack.tlora_core.load_tlora(path)
    assert tl.writer.id == "lycoris_stored_base" and not tl.needs_svd_base
    ref = pack.tlora_core.load_tlora(made["contained"])
    for name, a in tl.modules.items():
        assert torch.equal(a.base_down, ref.modules[name].base_down)


def test_self_contained_file_on_another_checkpoint_is_reported(pack, made, caplog):
    """Same architecture, another seed: the stored base is not this checkpoint's, and the log says so (the
    T-LoRA still runs: it is a warning)."""
    other = FAMILIES["sd15"].build(77).patcher
    apply = pack.engine.apply
    with caplog.at_level(logging.INFO, logger="tlora"):
        apply.apply_tlora(other, pack.tlora_core.load_tlora(made["contained"]), apply.Settings(1.0, R, 3, 1.5))
    warns = [r.getMessage() for r in caplog.records if r.levelname == "WARNING"]
    assert len(warns) == 1 and "with_base.safetensors" in warns[0] and "not this checkpoint's" in warns[0], warns
    assert float(warns[0].split("residual ")[1].split(" ")[0]) > pack.tlora_core.diagnostics.FIT_DIFFERENT_ABOVE


def test_saving_refuses_files_that_need_no_base_and_existing_outputs(pack, made, tmp_path):
    save = pack.engine.save.save_with_base
    with pytest.raises(pack.tlora_core.TLoRAError, match="already stores its SVD base"):
        save(made["twin"].patcher, str(made["contained"]), str(tmp_path / "x.safetensors"))
    existing = tmp_path / "exists.safetensors"
    existing.write_bytes(b"keep me")
    with pytest.raises(pack.tlora_core.TLoRAError, match="exists"):
        save(made["twin"].patcher, str(made["plain"]), str(existing))
    assert existing.read_bytes() == b"keep me"
    with pytest.raises(pack.tlora_core.TLoRAError, match="plain file name"):  # beside the input, no folders
        pack.engine.output_path("../escape.safetensors", str(tmp_path), False, subfolders=False)
