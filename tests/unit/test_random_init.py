"""The paper's init against the official repository's construction: ControlGenAI/T-LoRA's
`OrthogonalLoRALinearLayer(in_features, out_features, rank, sig_type="last")`, its formula written out here as that
code computes it (global RNG seeded with the module's seed), bit for bit; the module it makes changes nothing."""

from __future__ import annotations

import hashlib

import pytest
import torch

from tlora_core.random_init import module_seed, random_last
from tlora_core.training import TrainableTLoRA


def official_last(in_features: int, out_features: int, rank: int, seed: int):
    """The official layer's training init, as its code computes it (q_layer, p_layer, lambda_layer)."""
    torch.manual_seed(seed)
    base_m = torch.normal(size=(in_features, out_features), mean=0, std=1 / rank)
    u, s, v = torch.linalg.svd(base_m)
    return u[-rank:].clone(), v[:, -rank:].clone(), s[None, -rank:].clone()


@pytest.mark.parametrize(("in_features", "out_features", "rank"), [(32, 48, 4), (48, 32, 8), (40, 40, 40), (7, 5, 3)])
def test_the_paper_init_is_the_official_construction(in_features, out_features, rank):
    seed = module_seed(11, "lycoris_down_blocks_0_attentions_0_to_q")
    q, p, lam = official_last(in_features, out_features, rank, seed)
    m = TrainableTLoRA("m", *random_last(in_features, out_features, rank, seed), 1.0)
    assert m.q.shape == (rank, in_features) and m.p.shape == (out_features, rank)
    assert torch.equal(m.q.detach(), q) and torch.equal(m.p.detach(), p)
    assert torch.equal(m.lam.detach(), lam.reshape(-1))
    # the frozen base is the init: the module starts with no change, at every rank
    assert torch.equal(m.q0, q) and torch.equal(m.p0, p) and torch.equal(m.lam0, lam.reshape(-1))
    down, up_t = m.factors()
    assert float((up_t.T @ down).abs().max()) == 0.0


def test_the_seed_is_the_runs_plus_a_hash_of_the_module_name():
    """Each module's own stream: other modules, the order they are built in, and the process do not change it."""
    a = module_seed(0, "lycoris_a")
    assert a == module_seed(0, "lycoris_a") and a != module_seed(0, "lycoris_b")
    assert module_seed(1, "lycoris_a") == a + 1
    assert a == int.from_bytes(hashlib.sha256(b"lycoris_a").digest()[:8], "little") % 2**63  # in every process
    first = random_last(16, 24, 4, a)
    random_last(16, 24, 4, module_seed(0, "lycoris_b"))
    assert all(torch.equal(x, y) for x, y in zip(first, random_last(16, 24, 4, a), strict=True))
    # std 1/r (not variance): the matrix the components come from has that spread
    torch.manual_seed(a)
    m = torch.normal(size=(400, 300), mean=0, std=1 / 4)
    assert abs(float(m.std()) - 0.25) < 0.005


def test_a_rank_above_the_layer_is_refused():
    with pytest.raises(ValueError, match=r"rank 9 is larger than the layer \(8 x 16\) allows \(8\)"):
        random_last(16, 8, 9, 0)
