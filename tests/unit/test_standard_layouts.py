"""Vanilla T-LoRAs saved in standard LoRA layouts: kohya/LyCORIS (lora_down/lora_up/alpha) and PEFT (lora_A/lora_B).

Refused unless asked for (assume_vanilla) or marked as T-LoRA in the metadata: otherwise they are ordinary LoRAs.
"""

from __future__ import annotations

import json

import pytest
import torch
from lycoris import create_lycoris
from safetensors.torch import save_file

from tlora_core import VANILLA, TLoRAError, load_tlora
from tlora_core.formats import KOHYA, PEFT

RANK, ALPHA = 4, 2


class Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_k = torch.nn.Linear(12, 20)
        self.ff = torch.nn.Linear(20, 8)
        self.conv1 = torch.nn.Conv2d(6, 10, 1)
        self.conv3 = torch.nn.Conv2d(6, 10, 3, padding=1)


class Model(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.block = Block()


@pytest.fixture(scope="module")
def locon(lycoris_preset):
    """A kohya-layout LoRA written by LyCORIS (algo=lora), its factors moved away from LyCORIS' zero init."""
    torch.manual_seed(0)
    net = create_lycoris(Model(), 1.0, linear_dim=RANK, linear_alpha=ALPHA, algo="lora", preset=lycoris_preset)
    net.apply_to()
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for lora in net.loras:
            lora.lora_up.weight.copy_(torch.randn(lora.lora_up.weight.shape, generator=g))
    return net


def _save(net, folder, name, metadata=None):
    path = folder / name
    net.save_weights(str(path), torch.float32, metadata)
    return path


@pytest.mark.parametrize("metadata", [None, {"ss_network_module": "networks.lora", "ss_network_dim": "4"}])
def test_kohya_layout_is_refused_by_default(locon, tmp_path, metadata):
    path = _save(locon, tmp_path, "plain_kohya.safetensors", metadata)
    with pytest.raises(TLoRAError) as e:
        load_tlora(path)
    assert "standard LoRA" in str(e.value) and "plain_kohya.safetensors" in str(e.value)
    assert "assume_vanilla" in str(e.value) or "vanilla_tlora" in str(e.value)


def _check_kohya(tl, net):
    assert tl.format == KOHYA and tl.naming == "kohya"
    # the 3x3 conv is a LoCon: a 3x3 down kernel and a 1x1 up, its rank prefixes as sliceable as a Linear's
    assert set(tl.modules) == {"lycoris_block_to_k", "lycoris_block_ff", "lycoris_block_conv1", "lycoris_block_conv3"}
    assert not tl.skipped and tl.modules["lycoris_block_conv3"].kernel == (3, 3)
    assert tl.modules["lycoris_block_conv3"].fit_error((10, 6, 3, 3)) is None
    assert "LoCon" in tl.modules["lycoris_block_conv3"].fit_error((10, 6, 5, 5))
    for lora in net.loras:
        m = tl.modules[lora.lora_name]
        assert m.kind == VANILLA and m.rank == RANK
        assert m.scale == pytest.approx(ALPHA / RANK)
        ref, _ = lora.get_diff_weight()
        got = m.delta_weight(RANK)
        assert got.shape == ref.shape
        assert torch.allclose(got, ref, rtol=1e-6, atol=1e-6 * ref.abs().max().item())
        # the first r ranks: up[:, :r] @ down[:r] * alpha / rank
        up = lora.lora_up.weight.reshape(ref.shape[0], RANK)
        down = lora.lora_down.weight.reshape(RANK, -1)
        for r in range(1, RANK):
            expected = (up[:, :r] @ down[:r] * (ALPHA / RANK)).reshape(ref.shape)
            assert torch.allclose(m.delta_weight(r), expected, rtol=1e-6, atol=1e-6 * expected.abs().max().item())


def test_kohya_layout_accepted_when_asked(locon, tmp_path):
    tl = load_tlora(_save(locon, tmp_path, "vanilla_tlora.safetensors"), assume_vanilla=True)
    _check_kohya(tl, locon)


@pytest.mark.parametrize("metadata", [
    {"modelspec.title": "my vanilla T-LoRA"},
    {"ss_network_args": json.dumps({"algo": "lora", "tlora_min_rank": 2})},
])
def test_kohya_layout_accepted_when_metadata_says_tlora(locon, tmp_path, metadata):
    tl = load_tlora(_save(locon, tmp_path, "marked.safetensors", metadata))
    _check_kohya(tl, locon)


def test_kohya_text_encoder_modules_are_kept_apart(tmp_path):
    g = torch.Generator().manual_seed(2)
    sd = {}
    for stem, (i, o) in {"lora_unet_mid_block_attentions_0_proj_in": (8, 8), "lora_te1_text_model_encoder_layers_0_"
                         "self_attn_q_proj": (6, 6)}.items():
        sd[f"{stem}.lora_down.weight"] = torch.randn(RANK, i, generator=g)
        sd[f"{stem}.lora_up.weight"] = torch.randn(o, RANK, generator=g)
        sd[f"{stem}.alpha"] = torch.tensor(float(RANK))  # alpha == rank -> scale 1
    save_file(sd, str(tmp_path / "kohya.safetensors"))
    tl = load_tlora(tmp_path / "kohya.safetensors", assume_vanilla=True)
    assert set(tl.modules) == {"lora_unet_mid_block_attentions_0_proj_in"}
    assert set(tl.text_encoder_modules) == {"lora_te1_text_model_encoder_layers_0_self_attn_q_proj"}
    assert tl.modules["lora_unet_mid_block_attentions_0_proj_in"].scale == 1.0


def _peft_file(path, prefix, metadata=None):
    g = torch.Generator().manual_seed(3)
    sd, factors = {}, {}
    for target, (i, o) in {"down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q": (16, 16),
                           "down_blocks.1.attentions.0.transformer_blocks.0.ff.net.2": (32, 16)}.items():
        a, b = torch.randn(RANK, i, generator=g), torch.randn(o, RANK, generator=g)
        sd[f"{prefix}{target}.lora_A.weight"], sd[f"{prefix}{target}.lora_B.weight"] = a, b
        factors[target] = (a, b)
    save_file(sd, str(path), metadata)
    return factors


@pytest.mark.parametrize("prefix", ["base_model.model.", "unet.", "transformer.", ""])
def test_peft_layout(tmp_path, prefix):
    path = tmp_path / "adapter_model.safetensors"
    factors = _peft_file(path, prefix)
    with pytest.raises(TLoRAError, match="standard LoRA") as e:
        load_tlora(path)
    assert "adapter_model.safetensors" in str(e.value)
    tl = load_tlora(path, assume_vanilla=True)
    assert tl.format == PEFT and tl.naming == "diffusers"
    assert set(tl.modules) == set(factors)
    for target, (a, b) in factors.items():
        m = tl.modules[target]
        assert m.kind == VANILLA and m.scale == 1.0 and m.rank == RANK
        for r in range(1, RANK + 1):
            assert torch.allclose(m.delta_weight(r), b[:, :r] @ a[:r], rtol=1e-6, atol=1e-5)


def test_peft_layout_accepted_when_metadata_says_tlora(tmp_path):
    path = tmp_path / "adapter_model.safetensors"
    _peft_file(path, "base_model.model.", {"trainer": "t-lora vanilla"})
    assert load_tlora(path).format == PEFT
