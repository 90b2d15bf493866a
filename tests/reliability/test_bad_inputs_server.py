"""Bad inputs over the real server: a clear execution error naming the file and the cause, the server keeps
serving, and the model is untouched (the next plain run is bit-identical to the one before any of them)."""

from __future__ import annotations

import math
import os
import pickle
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from tests.evil import RunsCode
from tests.reliability import helpers as h
from tools.harness.server import ServerError, error_message


def _tlora_sd(sdxl_tlora_file: Path) -> dict[str, torch.Tensor]:
    return load_file(str(sdxl_tlora_file))


def _first_module(sd: dict) -> str:
    return sorted(k[: -len(".q_layer.weight")] for k in sd if k.endswith(".q_layer.weight"))[0]


def _make(case: str, d: Path, src: Path, tiny) -> tuple[Path, dict]:
    """Write the bad file for `case` in folder d; returns (path, TLoRALoader inputs to override)."""
    sd = _tlora_sd(src)
    mod = _first_module(sd)
    st = d / f"bad_{case}.safetensors"
    if case == "truncated":
        data = src.read_bytes()
        st.write_bytes(data[: len(data) // 2])
    elif case == "corrupt_header":
        data = bytearray(src.read_bytes())
        data[8:72] = b"#" * 64  # the JSON header's start is garbage now
        st.write_bytes(bytes(data))
    elif case == "zero_bytes":
        st.write_bytes(b"")
    elif case == "checkpoint":
        save_file({"model.diffusion_model.input_blocks.0.0.weight": torch.zeros(8, 4, 3, 3),
                   "model.diffusion_model.out.2.weight": torch.zeros(4, 8, 3, 3),
                   "first_stage_model.decoder.conv_in.weight": torch.zeros(8, 4, 3, 3),
                   "cond_stage_model.transformer.text_model.final_layer_norm.weight": torch.zeros(8)}, str(st))
    elif case == "unet_weights":  # a real diffusion-model file dropped into loras by mistake
        st = Path(tiny["sd15"]["comfy_file"])
    elif case == "vae":
        save_file({"encoder.down.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
                   "decoder.up.0.block.0.conv1.weight": torch.zeros(8, 8, 3, 3),
                   "quant_conv.weight": torch.zeros(8, 8, 1, 1)}, str(st))
    elif case == "taesd_vae":  # a real (tiny) TAESD file
        st = Path(tiny["vae"]["vae_4ch"])
    elif case == "embedding":
        save_file({"clip_l": torch.zeros(2, 768), "clip_g": torch.zeros(2, 1280)}, str(st))
    elif case == "rank_mismatch":
        sd[f"{mod}.p_layer.weight"] = sd[f"{mod}.p_layer.weight"][:, :-2].contiguous()
        save_file(sd, str(st))
    elif case == "alpha_nan":
        sd[f"{mod}.alpha"] = torch.tensor(math.nan)
        save_file(sd, str(st))
    elif case == "nan_weight":
        sd[f"{mod}.q_layer.weight"][0, 0] = math.nan
        save_file(sd, str(st))
    elif case == "inf_weight":
        sd[f"{mod}.lambda_layer"][0, 1] = math.inf
        save_file(sd, str(st))
    else:
        raise ValueError(case)
    return st, {}


# case -> (model family to run on, words the message must contain (any of each tuple))
CASES = {
    "truncated": ("sdxl", [("truncated or corrupt",)]),
    "corrupt_header": ("sdxl", [("truncated or corrupt", "not a readable safetensors")]),
    "zero_bytes": ("sdxl", [("empty", "0 bytes")]),
    "checkpoint": ("sdxl", [("checkpoint",), ("not a lora",)]),
    "unet_weights": ("sdxl", [("diffusion-model", "diffusion model", "checkpoint"), ("not a lora",)]),
    "vae": ("sdxl", [("vae",), ("not a lora",)]),
    "taesd_vae": ("sdxl", [("vae",), ("not a lora",)]),
    "embedding": ("sdxl", [("embedding",), ("not a lora",)]),
    "rank_mismatch": ("sdxl", [("rank differs",)]),
    "alpha_nan": ("sdxl", [("'alpha'",), ("got nan",)]),
    "nan_weight": ("sdxl", [("nan or inf",), ("q_layer", "'q'")]),
    "inf_weight": ("sdxl", [("nan or inf",), ("lambda", "'lam'")]),
}


def _expect_error(server, prompt: dict, file_name: str, words) -> str:
    entry = server.run(prompt, expect_error=True)
    msg = error_message(entry)
    assert msg.startswith("TLoRALoader:"), msg
    assert file_name in msg, msg
    for alternatives in words:
        assert any(w in msg.lower() for w in alternatives), f"expected one of {alternatives} in: {msg}"
    return msg


def _assert_untouched(server, tiny, base_latent, family: str) -> None:
    assert "system" in server.get("/system_stats")
    assert h.same(h.sample(server, h.graph(tiny, family)), base_latent[family]), "the base model changed"


@pytest.mark.parametrize("case", list(CASES))
def test_bad_file_is_a_clear_error_and_leaves_the_model_alone(server, tiny, base_latent, tlora_latent, sdxl_tlora_file,
                                                              tmp_path, case):
    family, words = CASES[case]
    target, inputs = _make(case, tmp_path, sdxl_tlora_file, tiny)
    name = f"bad_{case}{target.suffix}"
    with h.in_loras(server, {name: target}):
        _expect_error(server, h.graph(tiny, family, [[h.tlora(name, **inputs)]]), name, words)
    _assert_untouched(server, tiny, base_latent, family)


@pytest.mark.parametrize(("lora", "family", "looks"), [
    (h.SD15_LORA, "sdxl", ("sd1.5", "different model architecture", "shape")),
    (h.SDXL_LORA, "sd15", ("sdxl", "different model architecture", "shape")),
])
def test_tlora_for_another_architecture(server, tiny, base_latent, lora, family, looks):
    msg = _expect_error(server, h.graph(tiny, family, [[h.tlora(lora)]]), "pytorch_lora_weights.safetensors",
                        [looks])
    if "shape" in msg.lower():  # a shape mismatch must say which shapes
        assert " but the model's " in msg and "x" in msg, msg
    _assert_untouched(server, tiny, base_latent, family)


def test_stock_lora_in_the_tlora_loader(server, tiny, base_latent, extra_loras):
    """A plain kohya LoRA (no T-LoRA marker) is not silently run as a T-LoRA: the error says what to do."""
    from tests.reliability.conftest import STOCK

    _expect_error(server, h.graph(tiny, "sdxl", [[h.tlora(STOCK)]]), STOCK,
                  [("standard lora",), ("vanilla_tlora",), ("loraloader",)])
    _assert_untouched(server, tiny, base_latent, "sdxl")


@pytest.mark.parametrize("inputs", [
    {"schedule_source": "sliders", "min_rank": 12},  # rank of the file is 8
    {"schedule_source": "file", "max_rank": 1, "min_rank": 2},  # the sidecar's min_rank 2 > max_rank override 1
    {"schedule_source": "sliders", "alpha": math.nan},
    {"max_rank": 9},  # above the file's rank
])
def test_bad_schedule_settings_are_an_error_naming_the_file(server, tiny, base_latent, inputs):
    msg = _expect_error(server, h.graph(tiny, "sdxl", [[h.tlora(h.SDXL_LORA, **inputs)]]),
                        "pytorch_lora_weights.safetensors", [("min_rank", "alpha", "max_rank")])
    key = "alpha" if "alpha" in inputs else ("max_rank" if inputs.get("max_rank") == 9 else "min_rank")
    assert key in msg, msg
    _assert_untouched(server, tiny, base_latent, "sdxl")


@pytest.mark.parametrize("layout", ["zip", "legacy", "plain_pickle"])
def test_pickle_that_runs_code_is_refused_and_never_executed(server, tiny, base_latent, tmp_path, layout):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pt"
    tensors = {f"transformer_blocks.0.attn.processor.to_q_lora.{k}.weight": torch.zeros(4, 4) for k in ("down", "up")}
    payload = {**tensors, "trigger": RunsCode(marker)}
    if layout == "plain_pickle":
        with open(evil, "wb") as f:
            pickle.dump(payload, f, protocol=2)
    else:
        torch.save(payload, str(evil), _use_new_zipfile_serialization=layout == "zip")
    # the payload is live: unpickling it without weights_only runs the command (checked on a probe copy)
    probe = tmp_path / "probe"
    pickle.loads(pickle.dumps({"x": RunsCode(probe)}))
    assert probe.exists(), "the test payload is inert: the check below would prove nothing"
    name = f"evil_{layout}.pt"
    with h.in_loras(server, {name: evil}):
        msg = _expect_error(server, h.graph(tiny, "sdxl", [[h.tlora(name)]]), name, [("refused",), ("run code",)])
        body = _info(server, name)
    assert not marker.exists(), "the pickle's code ran inside the server"
    assert "refused" in body.get("error", ""), body
    if layout != "plain_pickle":  # torch's own formats: the refused callable is named
        assert "posix.system" in msg, msg
    # never the advice to load it unsafely
    assert "weights_only" not in msg and "will likely succeed" not in msg, msg
    _assert_untouched(server, tiny, base_latent, "sdxl")


def _info(server, name: str) -> dict:
    import json
    import urllib.error
    import urllib.parse

    try:
        return server.get(f"/tlora/info?lora_name={urllib.parse.quote(name)}")
    except urllib.error.HTTPError as e:
        assert e.code == 400, e.code
        return json.loads(e.read())


def test_lora_name_outside_the_loras_folder_is_refused(server, tiny, base_latent, sdxl_tlora_file):
    """A valid T-LoRA one folder above models/loras: '../' names never reach it, neither in a prompt nor the route."""
    outside = Path(server.base) / "models" / "outside_tlora.safetensors"
    outside.write_bytes(sdxl_tlora_file.read_bytes())
    try:
        for name in ("../outside_tlora.safetensors", "tlora_sdxl/../../outside_tlora.safetensors",
                     str(outside)):
            start = h.trace_len(server)
            try:  # refused either when the prompt is validated (not one of the folder's files) ...
                entry = server.run(h.graph(tiny, "sdxl", [[h.tlora(name)]]), expect_error=True)
            except ServerError as e:
                assert "400" in str(e) and "lora_name" in str(e), str(e)
            else:  # ... or by the node: an execution error naming the file, and nothing loaded
                msg = error_message(entry)
                assert msg.startswith("TLoRALoader:") and os.path.basename(name) in msg, msg
                assert "not found" in msg or "outside" in msg, msg
            assert h.trace_len(server) == start, "a T-LoRA ran"
            # the info route takes any string: it must not read the file either
            body = _info(server, name)
            assert "error" in body and "rank" not in body, body
            assert "not found" in body["error"] or "outside" in body["error"], body
    finally:
        outside.unlink()
    _assert_untouched(server, tiny, base_latent, "sdxl")


def test_good_tlora_unchanged_after_bad_inputs(server, tiny, tlora_latent, sdxl_tlora_file, tmp_path):
    """Bad files run on the same server (here, in this test, whatever ran before it) leave nothing behind: the good
    T-LoRA then gives exactly its first result."""
    for case in ("truncated", "rank_mismatch", "nan_weight", "checkpoint", "alpha_nan"):
        target, inputs = _make(case, tmp_path, sdxl_tlora_file, tiny)
        name = f"again_{case}{target.suffix}"
        with h.in_loras(server, {name: target}):
            _expect_error(server, h.graph(tiny, "sdxl", [[h.tlora(name, **inputs)]]), name, CASES[case][1])
    assert h.same(h.sample(server, h.graph(tiny, chains=[[h.tlora(h.SDXL_LORA)]])), tlora_latent)
