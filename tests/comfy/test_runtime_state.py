"""State that belongs to one call, one application or one model stays there: the per-call rank is per thread, the
timestep rules hold sampling objects weakly, each application owns its factors, the memo goes with its model, and a
file that changes while it is read is never cached."""

from __future__ import annotations

import gc
import threading
import weakref

import pytest
import torch

from tools import tiny_models as tm
from tools.families import FAMILIES
from tools.families.base import capture, sigma_for

R, MIN_RANK, ALPHA = 8, 1, 1.0


@pytest.fixture(scope="module")
def made(pack, tmp_path_factory):
    fam = FAMILIES["sd15"]
    twin = fam.build(52)
    path = tmp_path_factory.mktemp("state") / "pytorch_lora_weights.safetensors"
    tm.write_lycoris_tlora(twin.diffusers, path, R, R, seed=5, strength=1.0).restore()
    x, conds = fam.inputs(twin, torch.Generator().manual_seed(3))
    return {"fam": fam, "twin": twin, "path": path, "x": x, "conds": conds}


def _apply(pack, patcher, path):
    apply = pack.engine.apply
    tl = pack.engine.files.read_file(str(path))
    return apply.apply_tlora(patcher, tl, apply.Settings(1.0, R, MIN_RANK, ALPHA))


def test_two_threads_on_one_model_each_get_their_own_rank(pack, made):
    """Thread A enters a model call at t = 999 (rank 1) and waits inside the model until thread B is inside its own
    call at t = 0 (rank 8): each must still compute with its own rank. With one shared rank, A computes with B's."""
    import comfy.model_management
    import comfy.patcher_extension

    clone, app = _apply(pack, made["twin"].patcher, made["path"])
    sig = {t: sigma_for(clone, t, False) for t in (999, 0)}
    comfy.model_management.load_models_gpu([clone])

    def call(t):  # one model call with the clone's wrappers and injections live
        with torch.no_grad():
            return clone.model.apply_model(made["x"], sig[t], transformer_options={
                "wrappers": comfy.patcher_extension.copy_nested_dicts(clone.wrappers)}, **made["conds"])

    alone = {t: call(t) for t in sig}
    assert not torch.equal(alone[999], alone[0]), "the two ranks give the same output: the test shows nothing"
    first_layer = pack.tlora_core.slot.LayerSlot.__call__
    barrier = threading.Barrier(2, timeout=60)
    waited = threading.local()

    def meet_inside(self, x, y):  # both threads are inside a model call, each past its wrapper, before any slot
        if not getattr(waited, "done", False):
            waited.done = True
            barrier.wait()
        return first_layer(self, x, y)

    out, errors = {}, []

    def run(t):
        try:
            out[t] = call(t)
        except Exception as e:  # reported below
            errors.append(e)

    pack.tlora_core.slot.LayerSlot.__call__ = meet_inside
    try:
        threads = [threading.Thread(target=run, args=(t,)) for t in sig]
        for th in threads:
            th.start()
        for th in threads:
            th.join(120)
    finally:
        pack.tlora_core.slot.LayerSlot.__call__ = first_layer
    assert not errors, errors
    for t in sig:
        assert torch.equal(out[t], alone[t]), f"t={t}: the call computed with another thread's rank"


def test_timestep_rules_hold_sampling_objects_weakly(pack, made):
    import comfy.model_sampling as ms

    state = pack.engine.patcher.RankState("weak", R, MIN_RANK, ALPHA, "auto")

    class Flow(ms.ModelSamplingDiscreteFlow, ms.CONST):
        pass

    sampling = Flow()
    ref = weakref.ref(sampling)
    assert state.ranks_for(torch.tensor([0.5]), sampling)[1] == [pack.tlora_core.active_rank(500, R)]
    del sampling
    gc.collect()
    assert ref() is None, "the rank state keeps a sampling object alive"
    assert len(state._rules) == 0


def test_each_application_owns_its_factors(pack, made):
    """The same file applied twice on one model (the comparison workflow does this): unloading one leaves the other's
    factors in place, and each clone registers its own store with the memory planner."""
    base = made["twin"].patcher
    (c1, a1), (c2, a2) = _apply(pack, base, made["path"]), _apply(pack, base, made["path"])
    assert a1.store is not a2.store
    sig = sigma_for(c2, 0, False)
    ref = capture(c2, made["x"], sig, made["conds"]).out
    capture(c1, made["x"], sig, made["conds"])  # loads c1, unloads c2 (one model at a time on this device)
    c1.unpatch_model()
    assert all(p.numel() > 0 for p in a2.store.parameters())
    assert torch.equal(capture(c2, made["x"], sig, made["conds"]).out, ref)
    stores = {id(m.model) for c in (c1, c2) for m in c.get_nested_additional_models()}
    assert stores == {id(a1.store), id(a2.store)}


def test_the_prepared_memo_goes_with_its_model(pack, made):
    twin = made["fam"].build(53)
    model = weakref.ref(twin.patcher.model)
    _apply(pack, twin.patcher, made["path"])
    assert twin.patcher.model in pack.engine.bases._memos
    del twin
    gc.collect()
    assert model() is None, "something in the pack keeps a loaded model alive"


def test_a_file_rewritten_while_it_is_read_is_not_cached(pack, made, tmp_path, monkeypatch):
    import os
    import shutil

    path = tmp_path / "moving.safetensors"
    shutil.copy(made["path"], path)
    files = pack.engine.files
    real = files.load_tlora

    def load_then_touch(p, **kw):  # the file changes on disk while (just after) it is read
        tl = real(p, **kw)
        st = os.stat(p)
        os.utime(p, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000))
        return tl

    monkeypatch.setattr(files, "load_tlora", load_then_touch)
    files.read_file(str(path))
    monkeypatch.setattr(files, "load_tlora", real)
    misses = files.files.counters["misses"]
    files.read_file(str(path))
    assert files.files.counters["misses"] == misses + 1, "a file read while it changed was served from the cache"
    files.read_file(str(path))
    assert files.files.counters["misses"] == misses + 1, "an unchanged file was read again"


def test_a_trace_that_cannot_be_written_leaves_no_rank_set(pack, made, tmp_path):
    """TLORA_TRACE pointing at something that cannot be appended to: the call fails with that error, and the rank it
    was about to run with is not left set on the thread (the next call outside the wrapper sees every rank)."""
    import comfy.model_management
    import comfy.patcher_extension

    clone, app = _apply(pack, made["twin"].patcher, made["path"])
    app.state.trace_path = str(tmp_path)  # a folder: open(..., "a") fails
    comfy.model_management.load_models_gpu([clone])
    with pytest.raises(OSError), torch.no_grad():
        clone.model.apply_model(made["x"], sigma_for(clone, 999, False), transformer_options={
            "wrappers": comfy.patcher_extension.copy_nested_dicts(clone.wrappers)}, **made["conds"])
    active = app.state.active
    assert (active.rank, active.sample_ranks, active.mask) == (None, None, None), (active.rank, active.sample_ranks)
