"""`describe`: what the node's frontend is told about a file, from its header alone."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

import tlora_core.describe as describe_mod
from tlora_core import TLoRAError, load_tlora
from tlora_core.describe import describe


def _lycoris(r=4, i=8, o=6, stem="lycoris_down_blocks_0_attn_to_q"):
    return {f"{stem}.q_layer.weight": torch.randn(r, i), f"{stem}.p_layer.weight": torch.randn(o, r),
            f"{stem}.lambda_layer": torch.rand(1, r), f"{stem}.alpha": torch.tensor(float(r))}


def _kohya(r=3, stem="lora_unet_x"):
    return {f"{stem}.lora_down.weight": torch.randn(r, 8), f"{stem}.lora_up.weight": torch.randn(6, r),
            f"{stem}.alpha": torch.tensor(float(r))}


CASES = {
    "lycoris": (lambda: _lycoris() | _lycoris(6, stem="lycoris_up_blocks_0_attn_to_k"), {}),
    "lycoris_meta": (_lycoris, {"lycoris_config": json.dumps({"algo": "tlora", "tlora_min_rank": 2,
                                                              "tlora_alpha": 1.5})}),
    "kohya_marked": (_kohya, {"ss_network_module": "networks.tlora"}),
    "official_vanilla": (lambda: {"unet.a.attn1.processor.to_q_lora.down.weight": torch.randn(5, 8),
                                  "unet.a.attn1.processor.to_q_lora.up.weight": torch.randn(6, 5)}, {}),
    "text_encoder": (lambda: _lycoris() | _lycoris(stem="lycoris_te1_text_model_encoder_layers_0_mlp_fc1"), {}),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_describe_agrees_with_loading_the_file(tmp_path, case):
    make, meta = CASES[case]
    path = tmp_path / f"{case}.safetensors"
    save_file(make(), str(path), metadata=meta)
    info, tl = describe(path), load_tlora(path)
    assert info["format"] == tl.format and info["rank"] == tl.rank
    assert info["modules"] == len(tl.modules) and info["text_encoder_modules"] == len(tl.text_encoder_modules)
    assert info["recorded"] == {k: {"value": v, "source": s} for k, (v, s) in tl.schedule_defaults().items()}


def test_describe_reads_no_tensor(tmp_path, monkeypatch):
    path = tmp_path / "a.safetensors"
    save_file(_lycoris(), str(path))
    real = describe_mod.safe_open

    class HeaderOnly:
        def __init__(self, *a, **k):
            self.f = real(*a, **k)

        def __enter__(self):
            self.f.__enter__()
            return self

        def __exit__(self, *exc):
            return self.f.__exit__(*exc)

        def get_tensor(self, key):
            raise AssertionError(f"describe read tensor {key}")

        def __getattr__(self, name):
            return getattr(self.f, name)

    monkeypatch.setattr(describe_mod, "safe_open", HeaderOnly)
    assert describe(path)["rank"] == 4


def test_describe_refuses_what_loading_refuses(tmp_path):
    path = tmp_path / "plain.safetensors"
    save_file(_kohya(), str(path))
    for fn in (describe, load_tlora):
        with pytest.raises(TLoRAError, match="standard LoRA"):
            fn(path)
    assert describe(path, assume_vanilla=True)["format"] == "kohya"
    (tmp_path / "broken.safetensors").write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json}")
    with pytest.raises(TLoRAError, match="broken.safetensors.*not a readable"):
        describe(tmp_path / "broken.safetensors")
