"""Which trainer wrote a T-LoRA file, what the pack assumes for it, and the formats that carry LyCORIS' own math.

LyCORIS' rank-2R export and the stored-base files of 67372a's LyCORIS fork are built from a real LyCORIS `tlora`
network (PyPI 4.1.3, whose forward the fork and pull request 280 leave unchanged), and read back: every rank's
weight change must equal LyCORIS' `get_diff_weight` under that rank's mask. The comfy tier runs each writer on its
model family (tests/comfy/test_writers.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch
from lycoris.modules.tlora import set_timestep_mask
from safetensors.torch import save_file

from tests.unit.test_lycoris_format import RANK, TESTED, _train
from tlora_core import TLoRAError, load_tlora, schedule
from tlora_core.describe import describe
from tools import writer_files as wf


@pytest.fixture(scope="module")
def trained(lycoris_preset):
    return _train(lycoris_preset)


def _lycoris_delta(lora, rank: int) -> torch.Tensor:
    mask = torch.zeros(1, lora.lora_dim)
    mask[:, :rank] = 1
    set_timestep_mask(mask)
    return lora.get_diff_weight()[0].reshape(lora.shape[0], -1)


def _factors(lora) -> dict[str, torch.Tensor]:
    flat = {"q": lora.q_layer.weight, "p": lora.p_layer.weight, "lam": lora.lambda_layer, "q0": lora.base_q,
            "p0": lora.base_p, "lam0": lora.base_lambda}
    out = {k: v.detach().float().reshape(v.shape[0], -1) for k, v in flat.items()}
    out["lam"], out["lam0"] = out["lam"].reshape(-1), out["lam0"].reshape(-1)
    return out


def _tested(net):
    return [lo for lo in net.loras if lo.lora_name.removeprefix("lycoris_block_") in TESTED]


def _check_every_rank(tl, net, rename=lambda n: n):
    for lora in _tested(net):
        adapter = tl.modules[rename(lora.lora_name)]
        for r in range(RANK + 1):
            ref = _lycoris_delta(lora, r)
            got = adapter.delta_weight(r).reshape(ref.shape)
            assert torch.allclose(got, ref, atol=2e-6 * float(ref.abs().max()) + 1e-7), (lora.lora_name, r)


@pytest.mark.parametrize("metadata", ["lycoris_config", "none"])
def test_lycoris_rank_2r_export_gates_rank_i_with_rank_r_plus_i(trained, tmp_path, metadata):
    """The export (lora_up = [P diag(l), -P0 diag(l0)], lora_down = [Q; Q0], alpha = 2a) read as pairs equals
    LyCORIS at every rank; read one rank per index (a plain rank-2R vanilla T-LoRA) it does not."""
    net, _ = trained
    sd = {}
    for lora in _tested(net):
        e = wf.export_pairs(_factors(lora), float(lora.alpha))
        conv = lora.q_layer.weight.ndim == 4
        n = lora.lora_name
        sd |= {f"{n}.lora_up.weight": e["up"].reshape(*e["up"].shape, *((1, 1) if conv else ())).contiguous(),
               f"{n}.lora_down.weight": e["down"].reshape(*e["down"].shape, *((1, 1) if conv else ())).contiguous(),
               f"{n}.alpha": e["alpha"]}
    path = tmp_path / "exported.safetensors"
    meta = {"lycoris_config": json.dumps({"algo": "tlora", "linear_dim": RANK})} if metadata != "none" else None
    save_file(sd, str(path), metadata=meta)
    if meta is None:  # convert_tlora.py records nothing: never a T-LoRA unless asked
        with pytest.raises(TLoRAError, match="standard_layout to 'pairs'"):
            load_tlora(path)
    tl = load_tlora(path, standard_layout="auto" if meta else "pairs")
    assert tl.format == "lycoris_export" and tl.writer.id == "lycoris_export" and tl.rank == RANK
    _check_every_rank(tl, net)
    assert describe(path, standard_layout="auto" if meta else "pairs")["rank"] == RANK
    one_by_one = load_tlora(path, assume_vanilla=True, standard_layout="ranks")
    assert one_by_one.rank == 2 * RANK
    lora = _tested(net)[0]
    wrong = one_by_one.modules[lora.lora_name].delta_weight(RANK // 2).reshape(-1)
    assert (wrong - _lycoris_delta(lora, RANK // 2).reshape(-1)).norm() > 0.1 * wrong.norm()


def test_67372a_stored_base_file_equals_lycoris(trained, tmp_path):
    """67372a's fork saves LyCORIS' tensors and its base buffers under kohya names; the stored base is used as it
    is (no SVD), and min_rank defaults to ceil(rank / 2), its trainer's default."""
    net, _ = trained
    sd = {}
    for lora in _tested(net):
        n = lora.lora_name.replace("lycoris_", "lora_unet_", 1)
        sd |= {f"{n}.q_layer.weight": lora.q_layer.weight.detach().clone(),
               f"{n}.p_layer.weight": lora.p_layer.weight.detach().clone(),
               f"{n}.lambda_layer": lora.lambda_layer.detach().clone(), f"{n}.alpha": lora.alpha.detach().clone(),
               f"{n}.base_q": lora.base_q.clone(), f"{n}.base_p": lora.base_p.clone(),
               f"{n}.base_lambda": lora.base_lambda.clone()}
    path = tmp_path / "sd_scripts.safetensors"
    save_file(sd, str(path), metadata={"ss_network_module": "lycoris.kohya", "ss_network_dim": str(RANK),
                                      "ss_network_args": json.dumps({"algo": "tlora", "preset": "full"})})
    tl = load_tlora(path)
    assert tl.writer.id == "sd_scripts_67372a" and not tl.needs_svd_base
    assert tl.schedule_defaults()["min_rank"][0] == math.ceil(RANK / 2)
    _check_every_rank(tl, net, lambda n: n.replace("lycoris_", "lora_unet_", 1))


def _write(tmp_path, kind, metadata, layers=None, **kw):
    layers = layers or [wf.Layer("lora_unet_blocks_0_self_attn_q_proj", 24, 16)]
    path = tmp_path / f"{kind}.safetensors"
    {"ortho": wf.write_ortho, "export": wf.write_export, "vanilla": wf.write_vanilla}[kind](
        path, layers, 4, 4.0, metadata, **kw)
    return path


LSN = {"ss_network_module": "networks.tlora_anima"}
STUDIO = {"ss_network_module": "lycoris.kohya",
          "ss_network_args": json.dumps({"algo": "lora", "source_algo": "tlora_ortho", "model_family": "anima"})}
# (layout, metadata, writer id, curve, integer timestep, min_rank and its source's first word)
IDENTIFIED = {
    "simpletuner": ("ortho_nobase", {"lycoris_config": json.dumps({"algo": "tlora", "tlora_min_rank": 2})},
                    "simpletuner", "power", True, (2, "metadata")),
    "enferlain": ("enferlain", {"ss_adapter_module": "library.adapters.tlora"}, "enferlain", "power", True,
                  (1, "default")),
    "67372a": ("ortho", {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4",
                         "ss_network_args": json.dumps({"algo": "tlora"})}, "sd_scripts_67372a", "power", True,
               (2, "the")),
    "stored_base_unknown": ("ortho", {}, "lycoris_stored_base", "power", True, (1, "default")),
    "export": ("export", {"lycoris_config": json.dumps({"algo": "tlora", "linear_dim": 4})}, "lycoris_export",
               "power", True, (1, "default")),
    "export_kohya": ("export", {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4",
                                "ss_network_args": json.dumps({"algo": "tlora"})}, "lycoris_export", "power", True,
                     (1, "default")),
    "studio": ("vanilla", STUDIO, "anima_lora_studio", "power_ceil", False, (1, "default")),
    "studio_locon": ("vanilla", {"ss_network_module": "lycoris.kohya", "ss_network_dim": "4",
                                 "ss_network_args": json.dumps({"algo": "tlora", "model_family": "anima"})},
                     "anima_lora_studio", "power_ceil", False, (1, "default")),
    "lsn_cosine": ("vanilla", {**LSN, "ss_tlora_min_rank": "3", "ss_tlora_rank_schedule": "cosine"},
                   "lora_scripts_next", "cosine", False, (3, "metadata")),
    "lsn_linear": ("vanilla", {**LSN, "ss_adapter_algorithm": "timestep_lora", "ss_tlora_rank_schedule": "linear"},
                   "lora_scripts_next", "linear", False, (1, "default")),
    "lsn_unmasked": ("vanilla", LSN, "lora_scripts_next_unmasked", "power", True, (4, "trained")),
    "orangemagic_ortho": ("ortho", {"ss_network_module": "networks.lora_tlora_anima", "ss_tlora_min_rank": "2",
                                    "ss_tlora_alpha_rank_scale": "1.3"}, "orangemagic_tlora_anima", "power", False,
                          (2, "metadata")),
    "orangemagic_comfy": ("export", {"ss_network_module": "networks.lora_tlora_anima"}, "orangemagic_tlora_anima",
                          "power", False, (1, "default")),
    "anima_lora": ("vanilla", {"ss_network_module": "networks.lora_anima", "ss_network_args": json.dumps(
        {"use_timestep_mask": "true", "min_rank": "2", "alpha_rank_scale": "1.5"})}, "anima_lora", "power_ceil",
                   False, (2, "metadata")),
    "vanilla_marked": ("vanilla", {"training_config": json.dumps({"tlora_min_rank": 2})}, "vanilla", "power", True,
                       (2, "metadata")),
}


@pytest.mark.parametrize("case", IDENTIFIED)
def test_each_writer_is_named_with_its_curve_and_defaults(tmp_path, case):
    layout, meta, writer, curve, integer, (min_rank, source) = IDENTIFIED[case]
    if layout == "enferlain":
        path = _write(tmp_path, "ortho", meta, [wf.Layer("tlora_unet_input_blocks_4_1_attn1_to_q", 24, 16)])
    elif layout == "ortho_nobase":
        path = tmp_path / "nobase.safetensors"
        f = wf.ortho_factors(wf.Layer("x", 24, 16), 4, torch.Generator().manual_seed(0))
        save_file({"lycoris_a.q_layer.weight": f["q"], "lycoris_a.p_layer.weight": f["p"],
                   "lycoris_a.lambda_layer": f["lam"][None].clone()}, str(path), metadata=meta)
    else:
        path = _write(tmp_path, layout, meta)
    tl = load_tlora(path)
    assert (tl.writer.id, tl.curve, tl.integer_timestep) == (writer, curve, integer), tl.writer
    got = tl.schedule_defaults()["min_rank"]
    assert got[0] == min_rank and got[1].split()[0].strip("'") == source, got
    info = describe(path)
    assert (info["writer"]["id"], info["curve"], info["integer_timestep"]) == (writer, curve, integer)
    assert info["recorded"]["min_rank"]["value"] == min_rank


def test_a_plain_lora_is_never_a_tlora_unless_asked(tmp_path):
    for meta in ({}, {"ss_network_module": "networks.lora", "ss_network_dim": "4"},
                 {"ss_network_module": "lycoris.kohya", "ss_network_args": json.dumps({"algo": "locon"})}):
        path = _write(tmp_path, "vanilla", meta)
        with pytest.raises(TLoRAError, match="no T-LoRA marker"):
            load_tlora(path)
        with pytest.raises(TLoRAError, match="no T-LoRA marker"):  # 'ranks' says how, not whether
            load_tlora(path, standard_layout="ranks")
        assert load_tlora(path, assume_vanilla=True).writer.id == "vanilla"


def test_lora_scripts_next_state_tensors_are_read_and_not_modules(tmp_path):
    path = _write(tmp_path, "vanilla", LSN, extra={".tlora_min_rank_state": torch.tensor(3.0, dtype=torch.bfloat16),
                                                  ".tlora_rank_schedule_state": torch.tensor(1.0)})
    tl = load_tlora(path)
    assert tl.writer.id == "lora_scripts_next" and tl.curve == "cosine" and len(tl.modules) == 1
    assert tl.schedule_defaults()["min_rank"] == (3, "tlora_min_rank_state tensors")
    assert describe(path)["recorded"]["min_rank"]["value"] == 3


@pytest.mark.parametrize("keys, what", [
    (("transformer_blocks.0.attn.to_q.lora_A.weight", "transformer_blocks.0.attn.to_q.lora_B.weight",
      "transformer_blocks.0.attn.to_q.lora_time_gamma.weight", "transformer_blocks.0.attn.to_q.lora_time_beta.bias"),
     "DiffSynth-Studio timestep-aware LoRA"),
    (("lora_unet_a.experts.0.0.down.weight", "lora_unet_a.experts.0.0.up.weight", "lora_unet_a.router_fc.weight",
      "lora_unet_a.timestep_embed.weight", "lora_unet_a.alpha"), "TimeStep Master"),
])
def test_timestep_files_that_are_not_tloras_are_named(tmp_path, keys, what):
    path = tmp_path / "other.safetensors"
    save_file({k: torch.ones(2, 2) for k in keys}, str(path))
    for read in (load_tlora, describe):
        with pytest.raises(TLoRAError, match=what) as e:
            read(path)
        assert "other.safetensors" in str(e.value)


def test_standard_layout_choice_is_checked(tmp_path):
    path = _write(tmp_path, "vanilla", STUDIO)
    with pytest.raises(TLoRAError, match="standard_layout must be one of"):
        load_tlora(path, standard_layout="halves")
    odd = _write(tmp_path, "vanilla", {}, [wf.Layer("lora_unet_a", 8, 8)])  # rank 4 is even; make an odd one
    sd = {"lora_unet_a.lora_down.weight": torch.ones(3, 8), "lora_unet_a.lora_up.weight": torch.ones(8, 3)}
    save_file(sd, str(odd))
    with pytest.raises(TLoRAError, match="odd rank 3"):
        load_tlora(odd, standard_layout="pairs")
    peft = tmp_path / "peft.safetensors"  # the export in PEFT names (orangemagic123's `_comfy` sibling)
    save_file({"diffusion_model.a.lora_A.weight": torch.ones(4, 8),
               "diffusion_model.a.lora_B.weight": torch.ones(8, 4)}, str(peft))
    tl = load_tlora(peft, standard_layout="pairs")
    assert tl.format == "lycoris_export_peft" and tl.rank == 2 and "diffusion_model.a" in tl.modules


@pytest.mark.parametrize("rank, min_rank, alpha", [(8, 1, 1.0), (8, 3, 1.0), (16, 4, 1.7), (32, 1, 0.5)])
def test_curves_are_the_trainers_own_rules(rank, min_rank, alpha):
    """At every sigma step of 1/2000 (float32, as a sampler's sigmas are), the pack's curves give the rank each
    trainer's own code gives."""
    for i in range(2001):
        sigma = float(torch.tensor(i / 2000, dtype=torch.float32))
        t = schedule.flow_timestep(sigma, integer=False)
        assert schedule.active_rank(t, rank, min_rank, alpha, curve=schedule.POWER_CEIL) == \
            wf.rank_anima_lora_studio(sigma, rank, min_rank, alpha), sigma
        assert schedule.active_rank(t, rank, min_rank, 1.0, curve=schedule.COSINE) == \
            wf.rank_lora_scripts_next(sigma, rank, min_rank, "cosine"), sigma
        assert schedule.active_rank(t, rank, min_rank, 1.0, curve=schedule.LINEAR) == \
            wf.rank_lora_scripts_next(sigma, rank, min_rank, "linear"), sigma
        ti = schedule.flow_timestep(sigma)
        assert schedule.active_rank(ti, rank, min_rank, alpha) == wf.rank_lycoris(int(ti), rank, min_rank, alpha)
    with pytest.raises(ValueError, match="curve must be one of"):
        schedule.active_rank(10, 8, curve="sigmoid")
