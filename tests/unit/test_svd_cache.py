"""Exact top-r SVD base (`top_singular`) against float64 `torch.linalg.svd`, and its persistent cache."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from tlora_core.digest import cache_key
from tlora_core.svd import BaseJob, SVDCache, compute_base_triplets, top_singular


def _terms_sum(u, s, v, k):
    """sum_{i<k} s_i u_i v_i^T in float64 (independent of each vector's sign)."""
    return (u[:, :k].double() * s[:k].double()) @ v[:, :k].double().T


def _reference(w):
    u, s, vh = torch.linalg.svd(w.reshape(w.shape[0], -1).double(), full_matrices=False)
    return u, s, vh.T


def _rel(a, b):
    return ((a - b).norm() / b.norm().clamp_min(1e-300)).item()


def _low_rank(out_dim, in_dim, true_rank, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_dim, true_rank, generator=g) @ torch.randn(true_rank, in_dim, generator=g)


CASES = {
    "tall": (torch.randn(48, 12, generator=torch.Generator().manual_seed(1)), 8),
    "wide": (torch.randn(12, 48, generator=torch.Generator().manual_seed(2)), 8),
    "square": (torch.randn(24, 24, generator=torch.Generator().manual_seed(3)), 16),
    "rank_deficient": (_low_rank(30, 20, 3, 4), 8),
    "rank_one_3x3": (_low_rank(3, 3, 1, 0), 3),  # found by hypothesis: its null space overflowed to inf
    "rank_over_min_dim": (torch.randn(6, 20, generator=torch.Generator().manual_seed(5)), 10),
    "zero": (torch.zeros(10, 7), 4),
    "conv_1x1": (torch.randn(16, 8, 1, 1, generator=torch.Generator().manual_seed(6)), 4),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_top_singular_terms_sum_like_float64_svd(case):
    w, rank = CASES[case]
    u, s, v = top_singular(w, rank)
    out_dim, in_dim = w.shape[0], w[0].numel()
    assert u.shape == (out_dim, rank) and s.shape == (rank,) and v.shape == (in_dim, rank)
    assert u.dtype == s.dtype == v.dtype == torch.float32
    assert torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(v).all()
    assert (s[:-1] >= s[1:]).all(), "singular values sorted descending"
    ru, rs, rv = _reference(w)
    full = min(out_dim, in_dim)
    norm_w = w.double().norm().item()
    for k in range(1, min(rank, full) + 1):
        ours, ref = _terms_sum(u, s, v, k), _terms_sum(ru, rs, rv, k)
        # relative to the sum, or to |W| where the sum is (numerically) zero: rank-deficient tails
        assert (ours - ref).norm().item() <= 1e-5 * max(ref.norm().item(), 1e-3 * norm_w) + 1e-30, (case, k)
    if rank > full:  # LyCORIS' padding: zero vectors, s = 1e-6
        assert torch.count_nonzero(u[:, full:]) == 0 and torch.count_nonzero(v[:, full:]) == 0
        assert torch.allclose(s[full:], torch.full((rank - full,), 1e-6))
        assert _rel(_terms_sum(u, s, v, rank), w.reshape(out_dim, -1).double()) < 1e-5


@settings(max_examples=60, deadline=None)
@given(st.integers(1, 24), st.integers(1, 24), st.integers(0, 24), st.integers(1, 30), st.integers(0, 2**31 - 1))
def test_top_singular_is_finite_and_exact_on_low_rank_weights(out_dim, in_dim, true_rank, rank, seed):
    w = _low_rank(out_dim, in_dim, true_rank, seed) if true_rank else torch.zeros(out_dim, in_dim)
    u, s, v = top_singular(w, rank)
    assert torch.isfinite(u).all() and torch.isfinite(s).all() and torch.isfinite(v).all()
    k = min(rank, out_dim, in_dim)
    ru, rs, rv = _reference(w)
    ref = _terms_sum(ru, rs, rv, k)
    scale = max(ref.norm().item(), 1e-3 * w.double().norm().item())
    assert (_terms_sum(u, s, v, k) - ref).norm().item() <= 1e-5 * scale + 1e-30


def test_top_singular_accepts_half_precision_weights():
    w = torch.randn(20, 12, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    u, s, v = top_singular(w, 4)
    ru, rs, rv = _reference(w.float())
    assert _rel(_terms_sum(u, s, v, 4), _terms_sum(ru, rs, rv, 4)) < 1e-5


# --- cache ----------------------------------------------------------------------------------------

def _weights(seed=0):
    g = torch.Generator().manual_seed(seed)
    return {"a": torch.randn(32, 16, generator=g), "b": torch.randn(16, 40, generator=g),
            "c": torch.randn(24, 24, generator=g).to(torch.float16)}


RANKS = {"a": 4, "b": 8, "c": 6}


def _jobs(weights, fetched=None):
    """One job per weight; `fetched` (a list) records which weights were fetched for decomposition."""
    def fetch(name, w):
        if fetched is not None:
            fetched.append(name)
        return w
    return [BaseJob(n, RANKS[n], tuple(w.shape), lambda w=w: cache_key(w), lambda n=n, w=w: fetch(n, w))
            for n, w in weights.items()]


def _run(cache, weights=None, fetched=None):
    stats = {}
    out = compute_base_triplets(_jobs(weights or _weights(), fetched), cache, stats=stats)
    return out, stats


def _assert_same(x, y):
    for name in x:
        for a, b in zip(x[name], y[name], strict=True):
            assert torch.equal(a, b), name


def test_second_call_reads_everything_from_the_cache(tmp_path):
    cache = SVDCache(tmp_path / "svd")
    first, stats = _run(cache)
    assert stats["computed"] == 3 and stats["cached"] == 0
    assert len(os.listdir(tmp_path / "svd")) == 3
    fetched = []
    second, stats = _run(SVDCache(tmp_path / "svd"), fetched=fetched)  # a new process would build a new SVDCache
    assert stats["computed"] == 0 and stats["cached"] == 3
    assert fetched == [], "a cache hit never fetches (dequantizes, moves) the weight"
    _assert_same(first, second)
    for name, w in _weights().items():
        _assert_same({name: second[name]}, {name: top_singular(w, RANKS[name])})


def test_changing_one_weight_recomputes_exactly_one(tmp_path):
    cache = SVDCache(tmp_path / "svd")
    _run(cache)
    weights = _weights()
    weights["b"] = weights["b"].clone()
    weights["b"][3, 7] += 0.25
    out, stats = _run(cache, weights)
    assert stats["computed"] == 1 and stats["cached"] == 2
    _assert_same({"b": out["b"]}, {"b": top_singular(weights["b"], RANKS["b"])})


def test_same_values_other_dtype_is_another_entry(tmp_path):
    w = torch.randn(8, 8)
    assert cache_key(w) != cache_key(w.to(torch.float16))
    assert cache_key(w) == cache_key(w.clone())
    assert cache_key(w) != cache_key(w.reshape(4, 16))
    assert cache_key(w) != cache_key("scaled_fp8", w)


@pytest.mark.parametrize("damage", ["garbage", "truncated", "empty", "foreign_tensors", "wrong_shapes"])
def test_corrupt_cache_entry_is_ignored_and_recomputed(tmp_path, damage):
    from safetensors.torch import save_file

    cache = SVDCache(tmp_path / "svd")
    first, _ = _run(cache)
    victim = os.path.join(cache.directory, f"{cache_key(_weights()['a'])}-r{RANKS['a']}.safetensors")
    assert os.path.exists(victim)
    if damage == "garbage":
        with open(victim, "wb") as f:
            f.write(os.urandom(300))
    elif damage == "truncated":
        data = open(victim, "rb").read()
        with open(victim, "wb") as f:
            f.write(data[: len(data) // 2])
    elif damage == "empty":
        open(victim, "wb").close()
    elif damage == "foreign_tensors":
        save_file({"x": torch.zeros(3)}, victim)
    else:
        save_file({"u": torch.zeros(5, 2), "s": torch.zeros(2), "v": torch.zeros(3, 2)}, victim)
    out, stats = _run(cache)
    assert stats["computed"] == 1 and stats["cached"] == 2
    _assert_same(first, out)
    _, stats = _run(cache)  # the bad entry was overwritten
    assert stats["computed"] == 0 and stats["cached"] == 3


def test_no_cache_directory_always_computes(tmp_path):
    for cache in (None, SVDCache(None)):
        out, stats = _run(cache)
        assert stats["computed"] == 3 and stats.get("cached", 0) == 0
    assert os.listdir(tmp_path) == []


def test_progress_reports_every_layer(tmp_path):
    calls = []
    compute_base_triplets(_jobs(_weights()), SVDCache(tmp_path), progress=lambda i, n: calls.append((i, n)))
    assert calls == [(1, 3), (2, 3), (3, 3)]


def test_one_weight_at_a_time():
    """Each weight is fetched only when its layer is decomposed and is no longer referenced after it."""
    import gc
    import weakref

    alive = []

    def fetch(seed):
        w = torch.randn(64, 32, generator=torch.Generator().manual_seed(seed))
        alive.append(weakref.ref(w))
        assert sum(r() is not None for r in alive) == 1, "the previous layer's weight is still held"
        return w

    jobs = [BaseJob(f"l{i}", 4, (64, 32), lambda: "", lambda i=i: fetch(i)) for i in range(5)]

    def progress(done, total):
        gc.collect()

    out = compute_base_triplets(jobs, None, progress)
    gc.collect()
    assert len(out) == 5 and all(r() is None for r in alive)
