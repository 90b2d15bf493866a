"""The trainable T-LoRA module against LyCORIS' own: per-sample gradients equal LyCORIS' backward with
`set_timestep_mask` item by item (fp64, linear and 1x1 conv), masked ranks get exactly zero gradient, the factors are
the loader's, the file round-trips bit-exactly, and the draws follow the seed."""

from __future__ import annotations

import pytest
import torch

from tlora_core import load_tlora
from tlora_core.slot import rank_mask
from tlora_core.svd import top_singular
from tlora_core.training import (
    TrainableTLoRA,
    draw_discrete_t,
    draw_flow_u,
    lycoris_config,
    write_trained,
)

R, ALPHA_LIN = 6, 3.0


def _lycoris(layer: torch.nn.Module):
    from lycoris.modules.tlora import TLoraModule

    lo = TLoraModule("lycoris_layer", layer, 1.0, lora_dim=R, alpha=ALPHA_LIN)
    lo.apply_to()
    return lo.double()


def _pair(conv: bool, seed: int = 0):
    """A layer, LyCORIS' T-LoRA on it and ours, the same exact base and the same moved factors (fp64)."""
    g = torch.Generator().manual_seed(seed)
    layer = (torch.nn.Conv2d(6, 8, 1) if conv else torch.nn.Linear(12, 10)).double()
    with torch.no_grad():
        layer.weight.copy_(torch.randn(layer.weight.shape, generator=g, dtype=torch.float64))
    lo = _lycoris(layer)
    u, s, v = (t.double() for t in top_singular(layer.weight.reshape(layer.weight.shape[0], -1), R))
    ours = TrainableTLoRA("lycoris_layer", u, s, v, ALPHA_LIN / R, conv=conv, dtype=torch.float64)
    with torch.no_grad():  # "trained": off their init, the same on both sides
        for p in (ours.q, ours.p, ours.lam):
            p.add_(0.3 * p.abs().mean() * torch.randn(p.shape, generator=g, dtype=torch.float64))
        shape = lo.q_layer.weight.shape
        lo.q_layer.weight.copy_(ours.q.reshape(shape))
        lo.p_layer.weight.copy_(ours.p.reshape(lo.p_layer.weight.shape))
        lo.lambda_layer.copy_(ours.lam.reshape(1, R))
        lo.base_q.copy_(ours.q0.reshape(lo.base_q.shape))
        lo.base_p.copy_(ours.p0.reshape(lo.base_p.shape))
        lo.base_lambda.copy_(ours.lam0.reshape(1, R))
    return layer, lo, ours


@pytest.mark.parametrize("conv", [False, True], ids=["linear", "conv1x1"])
def test_per_sample_gradients_equal_lycoris_item_by_item(conv):
    from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask

    layer, lo, ours = _pair(conv)
    g = torch.Generator().manual_seed(1)
    ranks = [2, 4, 5]
    x = torch.randn((3, 6, 3, 3) if conv else (3, 7, 12), generator=g, dtype=torch.float64)
    G = torch.randn(layer(x).shape, generator=g, dtype=torch.float64)
    conv_args = {"stride": 1, "padding": 0, "dilation": 1, "groups": 1} if conv else None
    out = layer(x).detach() + ours.delta(x, rank_mask(ranks, R, "cpu").double(), conv_args)
    (out * G).sum().backward()
    try:
        for i, r in enumerate(ranks):
            set_timestep_mask(rank_mask([r], R).double())
            (lo(x[i:i + 1]) * G[i:i + 1]).sum().backward()
    finally:
        clear_timestep_mask()
    for mine, theirs in ((ours.q, lo.q_layer.weight), (ours.p, lo.p_layer.weight), (ours.lam, lo.lambda_layer)):
        theirs_g = theirs.grad.reshape(mine.shape)
        assert torch.allclose(mine.grad, theirs_g, rtol=1e-12, atol=1e-12 * theirs_g.abs().max()), \
            (mine.grad - theirs_g).abs().max()


def test_masked_rows_get_exactly_zero_gradient_at_every_step_and_only_adamw_moves_them():
    """Rows above each sample's rank get exactly zero gradient at every step (AdamW with weight decay, state carried
    over several steps with changing ranks). They still move, as in LyCORIS and every reference trainer: a row never
    unmasked only decays (p * (1 - lr * wd) per step, bit for bit), and a row trained once keeps moving on Adam's
    momentum while masked."""
    _, _, ours = _pair(False, seed=2)
    lr, wd = 1e-2, 1e-2
    opt = torch.optim.AdamW(ours.parameters(), lr=lr, weight_decay=wd)
    g = torch.Generator().manual_seed(3)
    start = {n: p.detach().clone() for n, p in ours.named_parameters()}
    ranks = [3, 5, 2, 4, 2]  # row 5 is never trained; rows 2..4 are trained, then masked
    decayed = start["q"][5].clone()
    for step, r in enumerate(ranks):
        before = ours.q.detach().clone()
        x = torch.randn(1, 5, 12, generator=g, dtype=torch.float64)
        opt.zero_grad(set_to_none=True)
        ours.delta(x, rank_mask([r], R).double()).square().sum().backward()
        assert torch.count_nonzero(ours.q.grad[r:]) == 0 and torch.count_nonzero(ours.p.grad[:, r:]) == 0
        assert torch.count_nonzero(ours.lam.grad[r:]) == 0 and torch.count_nonzero(ours.q.grad[:r]) > 0
        opt.step()
        decayed.mul_(1 - lr * wd)
        if step > 1 and r == 2:  # rows 2..4 were trained at step 1 and are masked now: Adam's momentum moves them
            moved = (ours.q.detach()[2:5] - before[2:5]).abs().max()
            assert moved > 10 * lr * wd * before[2:5].abs().max(), float(moved)
    assert torch.equal(ours.q.detach()[5], decayed) and not torch.equal(decayed, start["q"][5])


def test_from_adapter_aligns_a_rebuilt_base_as_the_loader_does():
    """A LyCORIS-initialised layer (q = its own SVD base, untrained: zero change) resumed on the pack's rebuilt SVD
    base, whose signs differ on some ranks: the trainer's module gives the loader's delta in bf16 (near zero),
    not the sign-flipped difference rows' round-off."""
    from lycoris.modules.tlora import TLoraModule

    from tlora_core.adapter import ORTHO, ModuleAdapter

    rank = 16
    g = torch.Generator().manual_seed(5)
    layer = torch.nn.Linear(64, 64)
    with torch.no_grad():
        layer.weight.copy_(torch.randn(64, 64, generator=g) / 8)
    lo = TLoraModule("lycoris_layer", layer, 1.0, lora_dim=rank, alpha=rank)
    file = ModuleAdapter(name="lycoris_layer", kind=ORTHO, up=lo.p_layer.weight.detach().clone(),
                         down=lo.q_layer.weight.detach().clone(), lam=lo.lambda_layer.detach().reshape(-1).clone(),
                         scale=1.0, svd_base=True)
    u, s, v = top_singular(layer.weight.detach(), rank)
    flipped = int(((file.down * v.T).sum(1) < 0).sum())
    assert flipped > 0, "the rebuilt base has the file's signs: the case is not exercised"
    a = file.with_base(u, s, v)
    x = torch.randn(32, 64, generator=g)
    y = layer(x).detach()
    down, up_t, _ = a.prefix_factors(torch.bfloat16)
    loader = ((x.bfloat16() @ down.T) @ up_t).float()
    trainer = TrainableTLoRA.from_adapter(a).delta(x.bfloat16(), None).detach().float()
    rel = {k: float(d.norm() / y.norm()) for k, d in (("loader", loader), ("trainer", trainer),
                                                      ("difference", trainer - loader))}
    print(f"{flipped} of {rank} ranks flipped; untrained delta / |y| in bf16: {rel}")
    assert rel["loader"] < 2e-5 and rel["trainer"] < 2e-5 and rel["difference"] < 2e-5, rel


def test_trainable_factors_are_the_loaders():
    """At every rank, the trainable module's delta equals what the loader computes from the same module."""
    _, lo, ours = _pair(False, seed=3)
    adapter = ours.adapter()
    down, up_t = ours.factors()
    for r in range(R + 1):
        mine = (up_t[: 2 * r].T @ down[: 2 * r]).detach()
        assert torch.allclose(mine, adapter.delta_weight(r).double(), atol=1e-6 * mine.abs().max().clamp_min(1e-9))
    from lycoris.modules.tlora import clear_timestep_mask, set_timestep_mask

    set_timestep_mask(rank_mask([4], R).double())
    try:
        theirs = lo.get_diff_weight()[0].detach()
    finally:
        clear_timestep_mask()
    mine = (up_t[:8].T @ down[:8]).detach()
    assert torch.allclose(mine, theirs, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("store_base", [True, False])
def test_the_file_round_trips_bit_exactly(tmp_path, store_base):
    mods = {}
    for i, conv in enumerate((False, True)):
        _, _, m = _pair(conv, seed=10 + i)
        mods[f"lycoris_layer{i}"] = m.float()
        m.name = f"lycoris_layer{i}"
    path = str(tmp_path / "trained.safetensors")
    cfg = lycoris_config(R, ALPHA_LIN, 2, 1.5, ["Attention"])
    base = {"checkpoint": "unit", "created_by": "Train T-LoRA"} if store_base else None
    write_trained(path, mods, cfg, {"steps": 3, "seed": 1}, base)
    tl = load_tlora(path, sidecar=False)
    assert tl.format == "lycoris_tlora" and tl.needs_svd_base != store_base
    d = tl.schedule_defaults()
    assert (d["max_rank"][0], d["min_rank"][0], d["alpha"][0]) == (R, 2, 1.5)
    for name, m in mods.items():
        a = tl.modules[name]
        assert torch.equal(a.down, m.q.detach()) and torch.equal(a.up, m.p.detach())
        assert torch.equal(a.lam.reshape(-1), m.lam.detach()) and a.scale == pytest.approx(m.scale)
        if store_base:
            assert torch.equal(a.base_down, m.q0) and torch.equal(a.base_up, m.p0)
            assert torch.equal(a.base_lam.reshape(-1), m.lam0)
    sidecar = tmp_path / "trained.lycoris_config.json"
    assert sidecar.is_file() and '"tlora_min_rank": 2' in sidecar.read_text()


def test_same_seed_same_draws():
    draw = [(draw_flow_u(torch.Generator().manual_seed(s), 64), draw_discrete_t(torch.Generator().manual_seed(s), 64))
            for s in (5, 5, 6)]
    assert torch.equal(draw[0][0], draw[1][0]) and torch.equal(draw[0][1], draw[1][1])
    assert not torch.equal(draw[0][0], draw[2][0])
    u, t = draw[0]
    assert (0 < u).all() and (u < 1).all() and t.min() >= 0 and t.max() <= 999
    uni = draw_flow_u(torch.Generator().manual_seed(5), 4096, "uniform")
    assert abs(float(uni.mean()) - 0.5) < 0.03


class Attention(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.to_q, self.to_q_extra = torch.nn.Linear(8, 8), torch.nn.Linear(8, 8)
        self.to_out = torch.nn.ModuleList([torch.nn.Linear(8, 8), torch.nn.Dropout(0.0)])


class _Block(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.attn = Attention()
        self.ff_net = torch.nn.ModuleList([torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 8)])


class _Toy(torch.nn.Module):
    """Names a loose pattern would confuse: blocks.1 / blocks.10 / blocks.11, to_q / to_q_extra, a class named
    Attention whose other modules are not trained."""

    def __init__(self):
        super().__init__()
        self.proj_in = torch.nn.Conv2d(4, 8, 1)
        self.blocks = torch.nn.ModuleList([_Block() for _ in range(12)])


def test_the_recorded_preset_makes_lycoris_build_exactly_the_modules_written(tmp_path):
    """`write_trained` records an `apply_preset` (in the metadata and the sidecar) from which LyCORIS, applied as
    SimpleTuner applies it, builds the written modules and nothing else, whatever class preset the caller gave."""
    import json

    from lycoris import LycorisNetwork, create_lycoris
    from safetensors import safe_open

    toy = _Toy()
    chosen = ["proj_in", "blocks.1.attn.to_q", "blocks.1.attn.to_out.0", "blocks.10.ff_net.2"]
    mods = {}
    for path in chosen:
        w = toy.get_submodule(path).weight.detach()
        u, s, v = top_singular(w.reshape(w.shape[0], -1), 2)
        name = "lycoris_" + path.replace(".", "_")
        mods[name] = TrainableTLoRA(name, u, s, v, 1.0, conv=w.ndim == 4)
    out = tmp_path / "toy.safetensors"
    write_trained(str(out), mods, lycoris_config(2, 2.0, 1, 1.0, ["Attention"]), {"steps": 1})
    with safe_open(str(out), "pt") as f:
        cfg = json.loads(f.metadata()["lycoris_config"])
    assert json.loads((tmp_path / "toy.lycoris_config.json").read_text()) == cfg
    keys = ("ENABLE_CONV", "TARGET_REPLACE_MODULE", "TARGET_REPLACE_NAME", "MODULE_ALGO_MAP", "NAME_ALGO_MAP",
            "LORA_PREFIX", "USE_FNMATCH", "TARGET_EXCLUDE_NAME")
    saved = {k: getattr(LycorisNetwork, k) for k in keys}
    try:
        LycorisNetwork.apply_preset(cfg["apply_preset"])
        net = create_lycoris(toy, 1.0, linear_dim=cfg["linear_dim"], linear_alpha=cfg["linear_alpha"], algo="tlora")
    finally:
        for k, v in saved.items():
            setattr(LycorisNetwork, k, v)
    assert {lo.lora_name for lo in net.loras} == set(mods)
