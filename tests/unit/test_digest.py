"""The stored-base digest of self-contained files is a file-format fact: frozen per format version, and never moved
by the SVD cache's version. The expected value below was computed by the digest the first self-contained files were
written with; if this test fails, files users saved would be refused as damaged."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import save_file

from tlora_core import digest, load_tlora

# computed by the digest the first self-contained files were written with
GOLDEN_V1 = "ab4513873e209972e919b10289a0f9545b1f795b"


def fixed_tensors() -> dict[str, torch.Tensor]:
    """Exact values on every platform (no random generator)."""
    return {"lycoris_a.base_q": (torch.arange(6.0).reshape(2, 3) - 2.5) / 7,
            "lycoris_a.base_p": (torch.arange(8.0).reshape(4, 2) * 0.375 - 1),
            "lycoris_a.base_lambda": torch.tensor([[3.0, 0.5]]),
            "lycoris_b.base_q": torch.arange(6.0).reshape(2, 3, 1, 1).to(torch.float16),
            "lycoris_a.q_layer.weight": torch.ones(2, 3)}  # not part of the digest


def test_format_v1_digest_is_frozen():
    assert digest.stored_base_digest(fixed_tensors(), version=1) == GOLDEN_V1


def test_a_cache_version_bump_changes_cache_keys_but_not_the_file_format(monkeypatch):
    t = fixed_tensors()
    key = digest.cache_key(t["lycoris_a.base_q"])
    monkeypatch.setattr(digest, "CACHE_VERSION", digest.CACHE_VERSION + 1)
    assert digest.cache_key(t["lycoris_a.base_q"]) != key
    assert digest.stored_base_digest(t) == GOLDEN_V1


def test_only_base_tensors_count_and_every_byte_does():
    t = fixed_tensors()
    t["lycoris_a.q_layer.weight"] = torch.zeros(2, 3)
    assert digest.stored_base_digest(t) == GOLDEN_V1
    t["lycoris_a.base_lambda"] = torch.tensor([[3.0, 0.5000001]])
    assert digest.stored_base_digest(t) != GOLDEN_V1


def _self_contained(path, version: int, record_digest: str) -> None:
    r, i, o = 2, 3, 4
    sd = {"lycoris_a.q_layer.weight": torch.ones(r, i) / 3, "lycoris_a.p_layer.weight": torch.ones(o, r) / 2,
          "lycoris_a.lambda_layer": torch.ones(1, r), "lycoris_a.alpha": torch.tensor(float(r)),
          "lycoris_a.base_q": torch.eye(r, i), "lycoris_a.base_p": torch.eye(o, r),
          "lycoris_a.base_lambda": torch.ones(1, r)}
    record = {"version": version, "digest": record_digest or digest.stored_base_digest(sd)}
    save_file(sd, str(path), metadata={"tlora_base": json.dumps(record)})


def test_a_file_of_an_unknown_format_version_says_so(tmp_path):
    _self_contained(tmp_path / "ok.safetensors", 1, "")
    assert not load_tlora(tmp_path / "ok.safetensors").needs_svd_base
    _self_contained(tmp_path / "future.safetensors", 99, "0" * 40)
    with pytest.raises(ValueError, match="format version 99.*update ComfyUI-TLoRA"):
        load_tlora(tmp_path / "future.safetensors")


def test_checkpoint_digest_is_one_definition_for_every_storage_of_the_same_values():
    w = torch.arange(12.0).reshape(3, 4) / 8  # exact in fp16 and bf16
    d32 = digest.checkpoint_digest({"m": digest.weight_digest(w)})
    assert d32 == digest.checkpoint_digest({"m": digest.weight_digest(w.to(torch.float16))})
    assert d32 == digest.checkpoint_digest({"m": digest.weight_digest(w.to(torch.bfloat16))})
    assert d32 != digest.checkpoint_digest({"m": digest.weight_digest(w + 1)})
