"""Isolation and faults over the real server: run order, interrupts, two T-LoRAs in one graph, stock LoRAs
stacked before and after, and a file changed on disk between runs. Comparisons are bit-exact on latents."""

from __future__ import annotations

import re
import shutil
import time
from pathlib import Path

from tests.reliability import helpers as h
from tests.reliability.conftest import RANK4, SECOND, STOCK
from tlora_core import schedule
from tools.harness.server import ServerError

SESSION = Path(h.SDXL_LORA).name  # trace / log name of the session's SDXL T-LoRA
SIDE = (8, 2, 1.5)  # its schedule from the sidecar: max_rank, min_rank, alpha


def _check_trace(calls: list[dict], want: tuple[int, int, float]) -> None:
    assert calls
    for c in calls:
        assert (c["max_rank"], c["min_rank"], c["alpha"]) == want, c
        for t, r in zip(c["t"], c["rank"], strict=True):
            assert r == schedule.active_rank(t, *want), c


def test_run_order_does_not_matter(server, tiny, base_latent, tlora_latent):
    """T-LoRA and plain runs interleaved in every order each give exactly their first result (the sampler
    really runs each time: h.latents checks it was not answered from ComfyUI's cache)."""
    for kind in ("tlora", "base", "tlora", "base", "base", "tlora", "tlora"):
        if kind == "tlora":
            assert h.same(h.sample(server, h.graph(tiny, chains=[[h.tlora(h.SDXL_LORA)]])), tlora_latent)
        else:
            assert h.same(h.sample(server, h.graph(tiny)), base_latent["sdxl"])


def test_interrupt_during_a_tlora_run(server, tiny, base_latent, tlora_latent):
    steps = 400
    start = h.trace_len(server)
    pid = server.queue(h.graph(tiny, chains=[[h.tlora(h.SDXL_LORA)]], steps=steps))
    deadline = time.time() + 120
    while h.trace_len(server) - start < 3:  # a few model calls with the T-LoRA injected
        assert time.time() < deadline, "the long T-LoRA prompt did not start"
        time.sleep(0.05)
    server.post("/interrupt", {})
    entry = server.wait(pid, timeout=120)
    kinds = [k for k, _ in entry["status"]["messages"]]
    assert "execution_interrupted" in kinds and not entry["status"].get("completed"), kinds
    calls = h.trace_lines(server, start)
    assert 3 <= len(calls) < steps, len(calls)  # it stopped part-way, inside the T-LoRA sampling
    # the next prompts, with and without the T-LoRA, are exactly the uninterrupted ones
    assert h.same(h.sample(server, h.graph(tiny, chains=[[h.tlora(h.SDXL_LORA)]])), tlora_latent)
    assert h.same(h.sample(server, h.graph(tiny)), base_latent["sdxl"])
    assert h.same(h.sample(server, h.graph(tiny, chains=[[h.tlora(h.SDXL_LORA)]])), tlora_latent)


def test_two_tloras_on_two_branches_keep_their_own_schedule(server, tiny, tlora_latent, extra_loras):
    second = h.tlora(SECOND, schedule_source="sliders", min_rank=5, alpha=0.5, strength_model=0.7)
    start = h.trace_len(server)
    both = h.latents(server, server.run(h.graph(tiny, chains=[[h.tlora(h.SDXL_LORA)], [second]])))
    calls = h.trace_lines(server, start)
    by_name = {}
    for c in calls:
        by_name.setdefault(c["lora"], []).append(c)
    assert set(by_name) == {SESSION, SECOND}, set(by_name)
    assert len(by_name[SESSION]) == len(by_name[SECOND]) == 2  # 2 euler steps, one call each (cond+uncond batched)
    _check_trace(by_name[SESSION], SIDE)
    _check_trace(by_name[SECOND], (8, 5, 0.5))
    assert [c["rank"] for c in by_name[SESSION]] != [c["rank"] for c in by_name[SECOND]]
    # each branch gives exactly what it gives alone
    assert h.same(both[0], tlora_latent)
    alone = h.sample(server, h.graph(tiny, chains=[[second]]))
    assert h.same(both[1], alone)
    assert not h.same(both[0], both[1])


def test_stock_lora_stacked_before_and_after(server, tiny, base_latent, tlora_latent, extra_loras):
    stock, tl = h.stock_lora(STOCK), h.tlora(h.SDXL_LORA)
    start_log = h.log_len(server)
    s_only = h.sample(server, h.graph(tiny, chains=[[stock]]))
    assert not h.same(s_only, base_latent["sdxl"]), "the stock LoRA did nothing"
    start = h.trace_len(server)
    s_then_t = h.sample(server, h.graph(tiny, chains=[[stock, tl]]))  # T-LoRA applied on top of the stock LoRA
    mid = h.trace_len(server)
    t_then_s = h.sample(server, h.graph(tiny, chains=[[tl, stock]]))
    log = h.log_since(server, start_log)
    assert "lora key not loaded" not in log, "the stock LoRA file does not fit the model"
    # the T-LoRA ran its schedule in both orders
    _check_trace(h.trace_lines(server, start)[: mid - start], SIDE)
    _check_trace(h.trace_lines(server, mid), SIDE)
    # both adapters act, and the order does not matter (weight patch + forward injection commute)
    assert h.same(s_then_t, t_then_s)
    assert not h.same(s_then_t, s_only) and not h.same(s_then_t, tlora_latent)
    # the T-LoRA's SVD base came from the original weights, not the stock-LoRA-patched ones
    lines = re.findall(rf"T-LoRA {re.escape(SESSION)}: SVD base for (\d+) layers \((\d+) computed.*factors ([0-9.]+)",
                       log)
    assert lines and all(computed == "0" and float(fig) > 0.9 for _, computed, fig in lines), lines
    # and nothing stays behind
    assert h.same(h.sample(server, h.graph(tiny, chains=[[tl]])), tlora_latent)
    assert h.same(h.sample(server, h.graph(tiny)), base_latent["sdxl"])
    assert h.same(h.sample(server, h.graph(tiny, chains=[[stock]])), s_only)


def test_file_changed_on_disk_is_noticed(server, tiny, sdxl_tlora_file, extra_loras, tmp_path):
    """Same name, new content (same size, then another rank): the new file's effect is used every time."""
    settings = {"schedule_source": "sliders", "min_rank": 1, "alpha": 1.0}
    swap = tmp_path / "swap.safetensors"
    contents = {"first": sdxl_tlora_file, "second": extra_loras[SECOND], "rank4": extra_loras[RANK4]}
    assert sdxl_tlora_file.stat().st_size == extra_loras[SECOND].stat().st_size  # size alone cannot tell them apart
    with h.in_loras(server, {"rel_first.safetensors": sdxl_tlora_file}):
        refs = {k: h.sample(server, h.graph(tiny, chains=[[h.tlora(name, **settings)]]))
                for k, name in (("first", "rel_first.safetensors"), ("second", SECOND), ("rank4", RANK4))}
    assert not h.same(refs["first"], refs["second"]) and not h.same(refs["second"], refs["rank4"])
    cache_dir = Path(server.base) / "svd_cache"
    entries = h.dir_entries(cache_dir)
    with h.in_loras(server, {"rel_swap.safetensors": swap}):
        for k in ("first", "second", "rank4", "first"):
            shutil.copyfile(contents[k], swap)  # rewritten in place: same path, new mtime
            entry = server.run(h.graph(tiny, chains=[[h.tlora("rel_swap.safetensors", **settings)]]))
            assert "b0m0" not in h.cached_nodes(entry), "the loader answered from ComfyUI's cache"
            assert h.same(h.latents(server, entry)[0], refs[k]), f"stale adapter after switching to {k}"
            time.sleep(0.02)
    # the SVD base is keyed by the model's weights: switching files added no cache entries
    assert h.dir_entries(cache_dir) == entries


def test_removed_file_is_an_error_then_works_again(server, tiny, tlora_latent, sdxl_tlora_file, tmp_path):
    """A file deleted between runs is a clear error (no stale cached adapter is used); put back, it works."""
    path = tmp_path / "vanishing.safetensors"
    shutil.copyfile(sdxl_tlora_file, path)
    prompt = lambda: h.graph(tiny, chains=[[h.tlora("rel_vanishing.safetensors",  # noqa: E731
                                                     schedule_source="sliders", min_rank=2, alpha=1.5)]])
    with h.in_loras(server, {"rel_vanishing.safetensors": path}):
        first = h.sample(server, prompt())
        assert h.same(first, tlora_latent)  # same factors and schedule as the session file
        path.unlink()
        try:
            entry = server.run(prompt(), expect_error=True)
        except ServerError as e:  # or refused at validation: the name is no longer in the folder
            assert "rel_vanishing" in str(e), str(e)
        else:
            from tools.harness.server import error_message

            msg = error_message(entry)
            assert "rel_vanishing.safetensors" in msg and "not found" in msg, msg
        shutil.copyfile(sdxl_tlora_file, path)
        assert h.same(h.sample(server, prompt()), first)
