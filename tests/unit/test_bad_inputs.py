"""Files that are not usable T-LoRAs: each is a TLoRAError naming the file and the cause, never anything else."""

from __future__ import annotations

import json
import os
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from tests.evil import RunsCode
from tlora_core import TLoRA, TLoRAError, load_tlora
from tlora_core.layouts import SUFFIXES


def _ortho(stem, r=4, i=8, o=8, g=None):
    g = g or torch.Generator().manual_seed(0)
    return {f"{stem}.q_layer.weight": torch.randn(r, i, generator=g),
            f"{stem}.p_layer.weight": torch.randn(o, r, generator=g),
            f"{stem}.lambda_layer": torch.randn(1, r, generator=g),
            f"{stem}.alpha": torch.tensor(float(r))}


def _expect(path, *causes):
    with pytest.raises(TLoRAError) as e:
        load_tlora(path)
    msg = str(e.value)
    assert os.path.basename(path) in msg, msg
    assert any(c.lower() in msg.lower() for c in causes), msg
    return msg


def test_missing_file(tmp_path):
    _expect(tmp_path / "not_there.safetensors", "not found")


def test_zero_byte_file(tmp_path):
    path = tmp_path / "zero_bytes.safetensors"
    path.write_bytes(b"")
    _expect(path, "empty")


def test_zero_byte_pt(tmp_path):
    path = tmp_path / "zero_bytes.pt"
    path.write_bytes(b"")
    _expect(path, "empty")


def test_truncated_safetensors(tmp_path):
    path = tmp_path / "truncated.safetensors"
    save_file(_ortho("lycoris_a") | _ortho("lycoris_b"), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect(path, "truncated or corrupt")


def test_truncated_pt(tmp_path):
    path = tmp_path / "truncated.pt"
    torch.save(_ortho("a.processor.to_q_lora"), str(path))
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _expect(path, "truncated or corrupt", "not a readable")


@pytest.mark.parametrize("name", ["random.safetensors", "random.pt"])
def test_random_bytes(tmp_path, name):
    path = tmp_path / name
    path.write_bytes(os.urandom(4096))
    _expect(path, "not a readable", "refused")


def test_checkpoint_like_file(tmp_path):
    path = tmp_path / "sd_xl_base.safetensors"
    save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(4, 4, 3, 3),
               "model.diffusion_model.x.weight": torch.zeros(2, 2),
               "model.diffusion_model.x.bias": torch.zeros(2)}, str(path))
    _expect(path, "checkpoint")


def test_diffusion_model_weights_file(tmp_path):
    path = tmp_path / "flux_transformer.safetensors"
    save_file({"transformer_blocks.0.attn.to_q.weight": torch.zeros(4, 4),
               "transformer_blocks.0.attn.to_q.bias": torch.zeros(4)}, str(path))
    _expect(path, "not a LoRA")


@pytest.mark.parametrize("keys", [
    ["first_stage_model.encoder.down.0.block.0.conv1.weight", "first_stage_model.decoder.up.0.block.0.conv1.weight"],
    ["encoder.down.0.block.0.conv1.weight", "decoder.up.1.block.0.conv1.weight", "quant_conv.weight"],
    ["encoder.down_blocks.0.resnets.0.conv1.weight", "decoder.up_blocks.0.resnets.0.conv1.weight"],
])
def test_vae_like_file(tmp_path, keys):
    path = tmp_path / "vae.safetensors"
    save_file({k: torch.zeros(2, 2, 3, 3) for k in keys}, str(path))
    _expect(path, "VAE")


@pytest.mark.parametrize("tensors", [
    {"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)},  # SDXL embedding
    {"emb_params": torch.zeros(2, 768)},
])
def test_embedding_like_file(tmp_path, tensors):
    path = tmp_path / "embedding.safetensors"
    save_file(tensors, str(path))
    _expect(path, "embedding")


def test_embedding_pt(tmp_path):
    path = tmp_path / "embedding.pt"
    torch.save({"string_to_param": {"*": torch.zeros(2, 768)}, "name": "x", "step": 3}, str(path))
    _expect(path, "dict of tensors", "embedding")


def test_loha_file(tmp_path):
    path = tmp_path / "loha.safetensors"
    save_file({"lycoris_x.hada_w1_a": torch.zeros(4, 2), "lycoris_x.hada_w1_b": torch.zeros(2, 4),
               "lycoris_x.alpha": torch.tensor(2.0)}, str(path))
    _expect(path, "LoHa")


@pytest.mark.parametrize(("tensor", "shape"), [("p_layer.weight", (8, 3)), ("lambda_layer", (1, 5))])
def test_rank_inconsistent_across_a_module(tmp_path, tensor, shape):
    sd = _ortho("lycoris_block_to_q")
    sd[f"lycoris_block_to_q.{tensor}"] = torch.randn(*shape)
    path = tmp_path / "inconsistent.safetensors"
    save_file(sd, str(path))
    msg = _expect(path, "rank differs")
    assert "lycoris_block_to_q" in msg


def test_vanilla_rank_inconsistent(tmp_path):
    stem = "down_blocks.0.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    path = tmp_path / "inconsistent_vanilla.safetensors"
    save_file({f"{stem}.down.weight": torch.randn(4, 8), f"{stem}.up.weight": torch.randn(8, 6)}, str(path))
    _expect(path, "rank differs")


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
@pytest.mark.parametrize("tensor", ["q_layer.weight", "p_layer.weight", "lambda_layer", "alpha"])
def test_non_finite_weights(tmp_path, bad, tensor):
    sd = _ortho("lycoris_block_to_q")
    t = sd[f"lycoris_block_to_q.{tensor}"]
    t.reshape(-1)[0] = bad
    path = tmp_path / "nonfinite.safetensors"
    save_file(sd, str(path))
    _expect(path, "NaN or Inf", "finite")


def test_non_finite_official_base(tmp_path):
    stem = "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    sd = {k.replace(".alpha", ".base_lambda"): v for k, v in _ortho(stem).items()}
    sd[f"{stem}.base_lambda"] = torch.ones(1, 4)
    sd[f"{stem}.base_q.weight"] = torch.full((4, 8), float("nan"))
    sd[f"{stem}.base_p.weight"] = torch.ones(8, 4)
    path = tmp_path / "nan_base.safetensors"
    save_file(sd, str(path))
    _expect(path, "NaN or Inf")


@pytest.mark.parametrize(("q0", "p0"), [((4, 8, 3, 3), (8, 4)), ((4, 8, 2), (8, 4)), ((4, 8), (8, 4, 1, 1, 1))])
def test_official_base_factor_shapes(tmp_path, q0, p0):
    # found by the fuzz test below: a k x k / 3-D base factor was an AttributeError
    stem = "mid_block.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora"
    sd = {k: v for k, v in _ortho(stem).items() if not k.endswith(".alpha")}
    sd |= {f"{stem}.base_q.weight": torch.randn(*q0), f"{stem}.base_p.weight": torch.randn(*p0),
           f"{stem}.base_lambda": torch.ones(1, 4)}
    path = tmp_path / "base_shapes.safetensors"
    save_file(sd, str(path))
    _expect(path, "do not match")


@pytest.mark.parametrize("other", [
    {"lora_unet_x.lora_down.weight": torch.zeros(4, 8), "lora_unet_x.lora_up.weight": torch.zeros(8, 4)},
    {"y.processor.to_q_lora.down.weight": torch.zeros(4, 8), "y.processor.to_q_lora.up.weight": torch.zeros(8, 4)},
    {"base_model.model.z.lora_A.weight": torch.zeros(4, 8), "base_model.model.z.lora_B.weight": torch.zeros(8, 4)},
])
def test_mixed_layouts(tmp_path, other):
    path = tmp_path / "mixed.safetensors"
    save_file(_ortho("lycoris_block_to_q") | other, str(path))
    _expect(path, "mixes several layouts")


def test_integer_tensors(tmp_path):
    sd = _ortho("lycoris_block_to_q")
    sd["lycoris_block_to_q.q_layer.weight"] = torch.ones(4, 8, dtype=torch.int64)
    path = tmp_path / "ints.safetensors"
    save_file(sd, str(path))
    _expect(path, "floating point")


def test_incomplete_module(tmp_path):
    sd = _ortho("lycoris_block_to_q")
    del sd["lycoris_block_to_q.p_layer.weight"]
    path = tmp_path / "incomplete.safetensors"
    save_file(sd, str(path))
    _expect(path, "incomplete")


def test_no_tensors(tmp_path):
    path = tmp_path / "no_tensors.safetensors"
    save_file({}, str(path), {"format": "pt"})
    _expect(path, "no tensors")


def _raw_safetensors(path, header: dict, data: bytes):
    h = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(h)) + h + data)


@pytest.mark.parametrize("shape", [[2**20, 2**20], [2**40, 2**40], [2**62, 4]])
def test_header_claiming_a_huge_shape(tmp_path, shape):
    path = tmp_path / "huge_shape.safetensors"
    _raw_safetensors(path, {"lycoris_x.q_layer.weight": {"dtype": "F32", "shape": shape, "data_offsets": [0, 16]},
                            "lycoris_x.p_layer.weight": {"dtype": "F32", "shape": [2, 2], "data_offsets": [16, 32]}},
                     b"\0" * 32)
    _expect(path, "not a readable safetensors")


def test_header_claiming_huge_offsets(tmp_path):
    path = tmp_path / "huge_offsets.safetensors"
    _raw_safetensors(path, {"lycoris_x.q_layer.weight": {"dtype": "F32", "shape": [2**20, 2**20],
                                                         "data_offsets": [0, 4 * 2**40]}}, b"\0" * 16)
    _expect(path, "not a readable safetensors")


def test_header_length_larger_than_the_file(tmp_path):
    path = tmp_path / "huge_header.safetensors"
    path.write_bytes(struct.pack("<Q", 2**62) + b"{}")
    _expect(path, "not a readable safetensors")


@pytest.mark.parametrize("wrap", ["bare", "in_dict", "beside_tensors"])
def test_pickle_that_would_run_code_is_refused(tmp_path, wrap):
    marker = tmp_path / "PWNED"
    evil = RunsCode(marker)
    obj = {"bare": evil, "in_dict": {"x": evil},
           "beside_tensors": {"a.processor.to_q_lora.down.weight": torch.zeros(2, 4), "z": evil}}[wrap]
    path = tmp_path / "lora.pt"
    torch.save(obj, str(path))
    assert not marker.exists()
    msg = _expect(path, "refused")
    assert "not unpickled" in msg or "could run code" in msg
    assert not marker.exists(), "unpickling ran code"


@pytest.mark.parametrize(("obj", "kind"), [
    (torch.zeros(3), "Tensor"),
    ([torch.zeros(3)], "list"),
    ({"a": 1}, "dict"),
    ({1: torch.zeros(3)}, "dict"),
    ("hello", "str"),
])
def test_pt_not_holding_a_dict_of_tensors(tmp_path, obj, kind):
    path = tmp_path / "not_dict.pt"
    torch.save(obj, str(path))
    msg = _expect(path, "dict of tensors")
    assert kind in msg


def test_deeply_nested_metadata_json_is_not_a_crash(tmp_path):
    path = tmp_path / "deep.safetensors"
    save_file(_ortho("lycoris_block_to_q"), str(path), {"lycoris_config": "[" * 100_000})
    tl = load_tlora(path)
    assert tl.schedule_defaults()["min_rank"] == (1, "default")


@pytest.mark.parametrize(("name", "content"), [("hparams.yml", b"rank: \xff\xfe 3\n"),
                                               ("lycoris_config.json", b"{\"tlora_min_rank\": \xff}")])
def test_sidecar_that_is_not_utf8_is_ignored(tmp_path, name, content):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(_ortho("lycoris_block_to_q"), str(path))
    (tmp_path / name).write_bytes(content)
    assert load_tlora(path).schedule_defaults()["min_rank"] == (1, "default")


def test_deeply_nested_sidecar_json_is_not_a_crash(tmp_path):
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(_ortho("lycoris_block_to_q"), str(path))
    (tmp_path / "lycoris_config.json").write_text("{\"a\": " * 100_000)
    assert load_tlora(path).schedule_defaults()["alpha"] == (1.0, "default")


# --- fuzz -----------------------------------------------------------------------------------------

STEMS = ["lycoris_block_to_q", "lycoris_te1_x", "down_blocks.0.attn1.processor.to_q_lora",
         "transformer_blocks.0.attn.processor.to_q_proj_lora", "single_transformer_blocks.1.attn.processor.to_out_lora",
         "lora_unet_mid", "base_model.model.ff.net.2", "unet.x.processor.to_k_lora", "model.diffusion_model.x", ""]
JUNK_SUFFIXES = [".weight", ".bias", ".hada_w1_a", "", ".lora_mid.weight", ".dora_scale"]
# each layout's tensors and the shape each has for rank r, in i, out o
LAYOUTS = {
    "lycoris": {".q_layer.weight": "ri", ".p_layer.weight": "or", ".lambda_layer": "1r", ".alpha": ""},
    "official_ortho": {".q_layer.weight": "ri", ".p_layer.weight": "or", ".lambda_layer": "1r",
                       ".base_q.weight": "ri", ".base_p.weight": "or", ".base_lambda": "1r"},
    "vanilla": {".down.weight": "ri", ".up.weight": "or"},
    "kohya": {".lora_down.weight": "ri", ".lora_up.weight": "or", ".alpha": ""},
    "peft": {".lora_A.weight": "ri", ".lora_B.weight": "or"},
}
DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.int64]
assert {k for layout in LAYOUTS.values() for k in layout} <= set(SUFFIXES)


DEFECTS = [None, None, None, "missing", "rank", "dtype", "nan", "inf", "zeros", "any_shape", "conv1x1", "conv3x3",
           "extra_dim"]


@st.composite
def module_tensors(draw, stem):
    """One module's tensors in one layout, with at most one defect in one of its tensors (and 1x1 convs)."""
    layout = LAYOUTS[draw(st.sampled_from(sorted(LAYOUTS)))]
    r, i, o = draw(st.integers(1, 4)), draw(st.integers(1, 6)), draw(st.integers(1, 6))
    conv = draw(st.integers(0, 4)) == 0
    defect = draw(st.sampled_from(DEFECTS))
    victim = draw(st.sampled_from(sorted(layout)))
    out = {}
    for suffix, template in layout.items():
        dims = [{"r": r, "i": i, "o": o, "1": 1}[c] for c in template]
        if conv and len(dims) == 2 and template != "1r":
            dims += [1, 1]
        dtype = torch.float32 if draw(st.integers(0, 3)) else draw(st.sampled_from(DTYPES[:3]))
        if suffix == victim:
            if defect == "missing":
                continue
            if defect == "rank" and "r" in template:
                dims[template.index("r")] = draw(st.sampled_from([x for x in range(6) if x != r]))
            elif defect == "any_shape":
                dims = draw(st.lists(st.integers(0, 5), max_size=5))
            elif defect in ("conv1x1", "conv3x3") and len(dims) == 2:
                dims += [1, 1] if defect == "conv1x1" else [3, 3]
            elif defect == "extra_dim":
                dims += [draw(st.integers(1, 3))]
            elif defect == "dtype":
                dtype = torch.int64
        g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
        if dtype == torch.int64:
            out[stem + suffix] = torch.randint(-3, 4, dims, dtype=dtype, generator=g)
            continue
        t = torch.randn(dims, generator=g)
        if suffix == victim and defect == "zeros":
            t.zero_()
        elif suffix == victim and defect in ("nan", "inf") and t.numel():
            t.reshape(-1)[draw(st.integers(0, t.numel() - 1))] = float(defect)
        out[stem + suffix] = t.to(dtype)
    return out


@st.composite
def state_dicts(draw):
    """Up to three modules, each in some layout (a file may mix them), plus junk keys."""
    sd = {}
    for stem in draw(st.lists(st.sampled_from(STEMS), max_size=3, unique=True)):
        sd.update(draw(module_tensors(stem)))
    for _ in range(draw(st.integers(0, 2)) if draw(st.integers(0, 3)) == 0 else 0):
        key = draw(st.sampled_from(STEMS)) + draw(st.sampled_from(JUNK_SUFFIXES + sorted(SUFFIXES)))
        if key:
            dims = draw(st.lists(st.integers(0, 4), max_size=4))
            sd[key] = torch.randn(dims).to(draw(st.sampled_from(DTYPES[:3])))
    return sd


metadata_strategy = st.dictionaries(
    st.sampled_from(["lycoris_config", "tlora_config", "training_config", "tlora_min_rank", "min_rank", "tlora_alpha",
                     "linear_dim", "rank", "ss_network_module", "junk"]),
    st.one_of(st.text(max_size=30), st.integers(-5, 200).map(str), st.floats().map(str),
              st.fixed_dictionaries({"linear_dim": st.integers(-3, 70), "tlora_min_rank": st.one_of(
                  st.integers(-3, 70), st.text(max_size=5)), "tlora_alpha": st.floats()}).map(json.dumps)),
    max_size=4)


sidecar_strategy = st.one_of(
    st.none(),
    st.tuples(st.sampled_from(["lycoris_config.json", "hparams.yml", "fuzz.json", "lora.json"]),
              st.one_of(st.binary(max_size=40),
                        st.text(max_size=40).map(str.encode),
                        st.fixed_dictionaries({"linear_dim": st.integers(-3, 70), "tlora_min_rank": st.integers(-3, 70),
                                               "tlora_alpha": st.floats()}).map(lambda d: json.dumps(d).encode()),
                        st.sampled_from([b"rank: 8\nmin_rank: 4\n", b"min_rank: x # y\n", b"\xff\xfe: 3\n"]))))


@settings(max_examples=500, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(sd=state_dicts(), metadata=metadata_strategy, as_pt=st.booleans(), assume_vanilla=st.booleans(),
       sidecar=sidecar_strategy)
def test_fuzz_load_returns_tlora_or_raises_tlora_error(tmp_path_factory, sd, metadata, as_pt, assume_vanilla,
                                                       sidecar):
    folder = tmp_path_factory.mktemp("fuzz")
    if sidecar is not None:
        (folder / sidecar[0]).write_bytes(sidecar[1])
    path = folder / ("lora.pt" if as_pt else "fuzz.safetensors")
    if as_pt:
        torch.save(sd, str(path))
    else:
        save_file(sd, str(path), metadata)
    try:
        tl = load_tlora(path, assume_vanilla=assume_vanilla)
    except TLoRAError as e:
        assert path.name in str(e)
        return
    assert isinstance(tl, TLoRA)
    assert tl.modules or tl.text_encoder_modules
    tl.schedule_defaults()
    for m in [*tl.modules.values(), *tl.text_encoder_modules.values()]:
        assert m.rank >= 1
        if m.has_base:
            delta = m.delta_weight(m.rank)
            assert delta.shape == m.weight_shape
            assert delta.dtype == torch.float32


# --- valid files must load (no false refusals) ------------------------------------------------------------

VALID_NAMES = {  # layout -> module name i, in that layout's own spelling
    "lycoris": lambda i: f"lycoris_down_blocks_{i}_attentions_0_transformer_blocks_0_attn1_to_q",
    "official_ortho": lambda i: f"unet.down_blocks.{i}.attentions.0.transformer_blocks.0.attn1.processor.to_q_lora",
    "vanilla": lambda i: f"down_blocks.{i}.attentions.0.transformer_blocks.0.attn2.processor.to_k_lora",
    "kohya": lambda i: f"lora_unet_down_blocks_{i}_attentions_0_proj_in",
    "peft": lambda i: f"base_model.model.down_blocks.{i}.attentions.0.proj_in",
}


@st.composite
def valid_files(draw):
    """1-3 well-formed modules of one layout, with its own names, any float dtype, finite non-zero values."""
    layout = draw(st.sampled_from(sorted(VALID_NAMES)))
    n, r = draw(st.integers(1, 3)), draw(st.integers(1, 4))
    i, o = draw(st.integers(r, 8)), draw(st.integers(1, 8))
    conv = layout in ("lycoris", "kohya", "peft") and draw(st.booleans())
    dtype = draw(st.sampled_from([torch.float32, torch.float16, torch.bfloat16]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**16)))
    sd = {}
    for m in range(n):
        stem = VALID_NAMES[layout](m)
        for suffix, template in LAYOUTS[layout].items():
            dims = [{"r": r, "i": i, "o": o, "1": 1}[c] for c in template]
            if conv and len(dims) == 2 and template != "1r":
                dims += [1, 1]
            sd[stem + suffix] = (torch.rand(dims, generator=g) + 0.5).to(dtype)  # finite, never zero
    return layout, n, r, sd, layout == "vanilla" and draw(st.booleans())


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                   HealthCheck.too_slow])
@given(case=valid_files())
def test_fuzz_valid_files_always_load(tmp_path_factory, case):
    layout, n, r, sd, as_pt = case
    folder = tmp_path_factory.mktemp("valid")
    path = folder / ("lora.pt" if as_pt else "valid.safetensors")
    if as_pt:
        torch.save(sd, str(path))
    else:
        save_file(sd, str(path))
    tl = load_tlora(path, assume_vanilla=layout in ("kohya", "peft"))
    assert len(tl.modules) == n and not tl.skipped and tl.rank == r
    for m in tl.modules.values():
        if m.has_base:
            assert torch.isfinite(m.delta_weight(r)).all()
