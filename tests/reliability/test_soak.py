"""Soak: 50 consecutive prompts over the real server, alternating T-LoRA files and settings.

Every run of a configuration must be bit-identical to its first run (no state carried between prompts),
the server's memory must stop growing once every configuration has run once, the SVD cache must hold
exactly its entries, and a plain run at the end must equal the first plain run (no injection or wrapper
left on the base model).
"""

from __future__ import annotations

from pathlib import Path

from tests.reliability import helpers as h
from tests.reliability.conftest import RANK4, SECOND, STOCK

PROMPTS = 50
# Allowed growth of the peak RSS after the warm-up (the first two rounds of configurations) over the warm-up's
# peak, in MiB. RSS swings by ~150 MiB inside a round (the stock LoRA's patched weights and their backups come
# and go), so peaks are compared, never single samples. Measured on the tiny SDXL: +3 MiB over 34 prompts.
# What a leak would cost: one T-LoRA application holds its factors (4.4 MiB fp32 for these rank-8 files), its
# rebuilt SVD base (4.4 MiB) and the interleaved prefix factors (8.8 MiB) -> ~18 MiB each, and 30 of the 34
# measured prompts apply one or two; a leaked patched model clone costs ~150 MiB. 48 MiB catches three leaked
# applications while leaving room for allocator noise.
RSS_BOUND_MIB = 48

def _configs():
    tl = h.tlora
    return [
        ("base", []),
        ("file_schedule", [tl(h.SDXL_LORA)]),
        ("sliders", [tl(h.SDXL_LORA, schedule_source="sliders", min_rank=1, alpha=1.0)]),
        ("all_ranks", [tl(h.SDXL_LORA, schedule_source="all_ranks", strength_model=0.6)]),
        ("second_discrete", [tl(SECOND, max_rank=6, timestep_mode="discrete", schedule_source="sliders",
                                min_rank=3, alpha=2.0)]),
        ("rank4", [tl(RANK4, schedule_source="sliders", min_rank=2, alpha=0.7)]),
        ("stock_then_tlora", [h.stock_lora(STOCK), tl(SECOND)]),
        ("two_tloras", [tl(h.SDXL_LORA), tl(RANK4, strength_model=-0.5)]),
    ]


def test_soak_fifty_prompts(server, tiny, base_latent, extra_loras):
    configs = _configs()
    warm = 2 * len(configs)
    cache_dir = Path(server.base) / "svd_cache"
    before = h.dir_entries(cache_dir)
    first: dict[str, object] = {}
    rss, cache_after_warmup = [], None
    for i in range(PROMPTS):
        name, chain = configs[i % len(configs)]
        out = h.sample(server, h.graph(tiny, chains=[chain]))
        if name in first:
            assert h.same(out, first[name]), f"prompt {i}: {name} differs from its first run"
        else:
            first[name] = out
        rss.append(h.rss_kib(server.proc.pid) / 1024)
        if i + 1 == warm:
            cache_after_warmup = h.dir_entries(cache_dir)
    print("RSS MiB per prompt:", [round(x) for x in rss])
    # every configuration did something different
    outs = list(first.values())
    assert all(not h.same(a, b) for i, a in enumerate(outs) for b in outs[i + 1:])
    assert h.same(first["base"], base_latent["sdxl"])
    # memory: flat after the warm-up
    growth = max(rss[warm:]) - max(rss[:warm])
    assert growth < RSS_BOUND_MIB, f"RSS grew {growth:.0f} MiB after warm-up: {[round(x) for x in rss]}"
    # SVD cache: nothing new after the warm-up, at most one entry per (layer, rank) -- 110 layers x ranks 8
    # and 4 -- from the soak at all (fewer when earlier tests made them), and no temp files
    entries = h.dir_entries(cache_dir)
    assert entries == cache_after_warmup
    assert not [n for n in entries if not n.endswith(".safetensors")], entries
    assert len(set(entries) - set(before)) <= 2 * 110
    assert {n.rsplit("-r", 1)[1] for n in entries} >= {"8.safetensors", "4.safetensors"}
    # no injection or wrapper left on the base model
    assert h.same(h.sample(server, h.graph(tiny)), base_latent["sdxl"])
