"""Files laid out exactly as the official ControlGenAI/T-LoRA code writes them (see docs/formats.md).

The layers below re-state the official forward (output = P(Q(x)·λ·m) − P0(Q0(x)·λ0·m) for Ortho,
up(down(x)·m) for vanilla); their state_dict keys are the ones the official processors save.
"""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import save_file

from tlora_core import ORTHO, VANILLA, load_tlora
from tlora_core.formats import OFFICIAL_ORTHO, OFFICIAL_VANILLA


class OrthoLayer(torch.nn.Module):
    """Official T-LoRA Ortho layer: base initialised from the SVD of a random matrix (sig_type "last")."""

    def __init__(self, in_features, out_features, rank, g):
        super().__init__()
        self.q_layer = torch.nn.Linear(in_features, rank, bias=False)
        self.p_layer = torch.nn.Linear(rank, out_features, bias=False)
        self.lambda_layer = torch.nn.Parameter(torch.ones(1, rank))
        self.base_q = torch.nn.Linear(in_features, rank, bias=False)
        self.base_p = torch.nn.Linear(rank, out_features, bias=False)
        self.base_lambda = torch.nn.Parameter(torch.ones(1, rank), requires_grad=False)
        u, s, vh = torch.linalg.svd(torch.randn(out_features, in_features, generator=g) / rank)
        with torch.no_grad():
            for q, p, lam in ((self.q_layer, self.p_layer, self.lambda_layer),
                              (self.base_q, self.base_p, self.base_lambda)):
                q.weight.copy_(vh[-rank:])
                p.weight.copy_(u[:, -rank:])
                lam.copy_(s[-rank:][None])
            # "training" moves the trained copy away from the frozen base
            for t in (self.q_layer.weight, self.p_layer.weight, self.lambda_layer):
                t.add_(torch.randn(t.shape, generator=g) * t.abs().mean())

    def forward(self, x, mask):
        return self.p_layer(self.q_layer(x) * self.lambda_layer * mask) - \
            self.base_p(self.base_q(x) * self.base_lambda * mask)


class VanillaLayer(torch.nn.Module):
    def __init__(self, in_features, out_features, rank, g):
        super().__init__()
        self.down = torch.nn.Linear(in_features, rank, bias=False)
        self.up = torch.nn.Linear(rank, out_features, bias=False)
        with torch.no_grad():
            self.down.weight.copy_(torch.randn(rank, in_features, generator=g))
            self.up.weight.copy_(torch.randn(out_features, rank, generator=g))

    def forward(self, x, mask):
        return self.up(self.down(x) * mask)


RANK = 6
# (processor path of the official file, LoRA attribute, in, out) -> the diffusers module it patches
SDXL_LAYERS = {
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn1.processor", "to_q_lora", 20, 20):
        "down_blocks.1.attentions.0.transformer_blocks.0.attn1.to_q",
    ("down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor", "to_k_lora", 12, 20):
        "down_blocks.1.attentions.0.transformer_blocks.0.attn2.to_k",
    ("mid_block.attentions.0.transformer_blocks.1.attn2.processor", "to_v_lora", 12, 20):
        "mid_block.attentions.0.transformer_blocks.1.attn2.to_v",
    ("up_blocks.0.attentions.2.transformer_blocks.0.attn1.processor", "to_out_lora", 20, 20):
        "up_blocks.0.attentions.2.transformer_blocks.0.attn1.to_out.0",
}
FLUX_LAYERS = {
    ("transformer_blocks.0.attn.processor", "to_q_lora", 16, 16): "transformer_blocks.0.attn.to_q",
    ("transformer_blocks.0.attn.processor", "to_k_proj_lora", 16, 16): "transformer_blocks.0.attn.add_k_proj",
    ("transformer_blocks.0.attn.processor", "to_q_proj_lora", 16, 16): "transformer_blocks.0.attn.add_q_proj",
    ("transformer_blocks.0.attn.processor", "to_v_proj_lora", 16, 16): "transformer_blocks.0.attn.add_v_proj",
    ("transformer_blocks.1.attn.processor", "to_out_lora", 16, 16): "transformer_blocks.1.attn.to_out.0",
    ("single_transformer_blocks.0.attn.processor", "to_v_lora", 16, 16): "single_transformer_blocks.0.attn.to_v",
}
# present in the official Flux lora.pt, but the single blocks' forward never calls them
FLUX_UNUSED = [("single_transformer_blocks.0.attn.processor", "to_q_proj_lora", 16, 16),
               ("single_transformer_blocks.0.attn.processor", "to_out_lora", 16, 16)]


def _build(layer_cls, specs, prefix="", seed=0):
    g = torch.Generator().manual_seed(seed)
    layers, sd = {}, {}
    for spec in specs:
        proc, attr, in_f, out_f = spec
        layer = layers[spec] = layer_cls(in_f, out_f, RANK, g)
        for k, v in layer.state_dict().items():  # what diffusers' save_attn_procs writes
            sd[f"{prefix}{proc}.{attr}.{k}"] = v.detach().clone().contiguous()
    return layers, sd


def _check_deltas(module, layer, in_f):
    x = torch.randn(7, in_f, generator=torch.Generator().manual_seed(11), dtype=torch.float64)
    ref_layer = layer.double()
    for r in range(0, RANK + 1):
        mask = torch.zeros(1, RANK, dtype=torch.float64)
        mask[:, :r] = 1.0
        with torch.no_grad():
            expected = ref_layer(x, mask)
        got = x @ module.delta_weight(r).double().T
        assert module.delta_weight(r).dtype == torch.float32
        if r == 0:
            assert got.abs().max() == 0 and expected.abs().max() == 0
            continue
        assert ((got - expected).norm() / expected.norm()).item() < 1e-5, (module.name, r)


@pytest.mark.parametrize("prefix", ["", "unet."])
def test_official_sdxl_ortho(tmp_path, prefix):
    layers, sd = _build(OrthoLayer, SDXL_LAYERS, prefix)
    assert any(k.endswith("to_q_lora.base_lambda") for k in sd) and any(k.endswith(".base_q.weight") for k in sd)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(path))
    tl = load_tlora(path)
    assert tl.format == OFFICIAL_ORTHO and tl.naming == "diffusers"
    assert set(tl.modules) == set(SDXL_LAYERS.values())
    assert not tl.needs_svd_base and tl.rank == RANK and not tl.skipped
    for spec, target in SDXL_LAYERS.items():
        m = tl.modules[target]
        assert m.kind == ORTHO and m.scale == 1.0 and m.has_base and not m.needs_svd_base
        assert m.weight_shape == (spec[3], spec[2])
        _check_deltas(m, layers[spec], spec[2])
    d = tl.schedule_defaults()
    assert d["max_rank"] == (RANK, "tensor shapes") and d["min_rank"] == (1, "default")


@pytest.mark.parametrize("prefix", ["", "unet."])
def test_official_sdxl_vanilla(tmp_path, prefix):
    layers, sd = _build(VanillaLayer, SDXL_LAYERS, prefix, seed=1)
    path = tmp_path / "pytorch_lora_weights.safetensors"
    save_file(sd, str(path))
    tl = load_tlora(path)
    assert tl.format == OFFICIAL_VANILLA and tl.naming == "diffusers"
    assert set(tl.modules) == set(SDXL_LAYERS.values())
    for spec, target in SDXL_LAYERS.items():
        m = tl.modules[target]
        assert m.kind == VANILLA and m.scale == 1.0 and m.rank == RANK
        _check_deltas(m, layers[spec], spec[2])


def test_official_flux_lora_pt(tmp_path):
    layers, sd = _build(VanillaLayer, [*FLUX_LAYERS, *FLUX_UNUSED], seed=2)
    assert "transformer_blocks.0.attn.processor.to_q_lora.down.weight" in sd
    folder = tmp_path / "checkpoint-500"
    folder.mkdir()
    path = folder / "lora.pt"
    torch.save(sd, str(path))  # the official Flux trainer: a plain dict of tensors
    tl = load_tlora(path)
    assert tl.format == OFFICIAL_VANILLA
    assert set(tl.modules) == set(FLUX_LAYERS.values())
    for spec in FLUX_UNUSED:
        name = f"{spec[0]}.{spec[1]}"
        assert name in tl.skipped and "single" in tl.skipped[name]
    for spec, target in FLUX_LAYERS.items():
        m = tl.modules[target]
        assert m.kind == VANILLA and m.scale == 1.0
        _check_deltas(m, layers[spec], spec[2])


@pytest.mark.parametrize("hparams", ["rank: 6\nmin_rank: 3\nlearning_rate: 0.0001\n",
                                     "# run 7\nrank: 6  # r\nmin_rank: 3  # half of rank\n"])
def test_official_hparams_sidecar_is_read(tmp_path, hparams):
    _, sd = _build(OrthoLayer, SDXL_LAYERS)
    run = tmp_path / "run"
    (run / "logs").mkdir(parents=True)
    ckpt = run / "checkpoint-1000"
    ckpt.mkdir()
    save_file(sd, str(ckpt / "pytorch_lora_weights.safetensors"))
    (run / "logs" / "hparams.yml").write_text(hparams)
    d = load_tlora(ckpt / "pytorch_lora_weights.safetensors").schedule_defaults()
    assert d["min_rank"][0] == 3 and "hparams.yml" in d["min_rank"][1]
    assert d["max_rank"][0] == 6
    assert d["alpha"] == (1.0, "default")


def test_base_shapes_must_match_trained_shapes(tmp_path):
    from tlora_core import TLoRAError

    _, sd = _build(OrthoLayer, list(SDXL_LAYERS)[:1])
    key = next(k for k in sd if k.endswith(".base_q.weight"))
    sd[key] = torch.randn(RANK, 7)
    save_file(sd, str(tmp_path / "mismatch.safetensors"))
    with pytest.raises(TLoRAError, match="mismatch.safetensors"):
        load_tlora(tmp_path / "mismatch.safetensors")


def test_hparams_yml_reads_top_level_keys_only(tmp_path):
    """A nested `min_rank:` (say, under a model section) is not the run's schedule; the top-level one is."""
    from tlora_core.recorded import recorded_schedule

    (tmp_path / "hparams.yml").write_text("model:\n  min_rank: 7\n  rank: 4\nrank: 64\nmin_rank: 32  # half\n")
    rec = recorded_schedule(str(tmp_path / "lora.safetensors"), {})
    assert rec["min_rank"][0] == 32 and rec["max_rank"][0] == 64, rec
