"""Real browser (Debian Chromium, headless, driven by Playwright) against the real server."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.browser.conftest import CHROMIUM, ready
from tests.conftest import MIN_RANK, RANK, ROOT, SD_SCRIPTS_SDXL, TLORA_ALPHA
from tlora_core.schedule import active_rank
from tools.harness import workflow

HERE = Path(__file__).resolve().parent
LORA = "tlora_sdxl/pytorch_lora_weights.safetensors"


def test_chromium_is_installed():
    """The browser tier needs Debian's chromium (`make setup-browser`): missing, it fails here, never skips."""
    assert os.path.exists(CHROMIUM), f"no chromium at {CHROMIUM}: run `make setup-browser`"


def load_graph(page, wf: dict) -> None:
    page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", wf)
    page.keyboard.press("Escape")


def ui_prompt(page) -> dict:
    return page.evaluate("async () => (await window.app.graphToPrompt()).output")


def strip_meta(prompt: dict) -> dict:
    return {k: {"class_type": v["class_type"], "inputs": v["inputs"]} for k, v in prompt.items()}


def test_pack_extension_loads_without_errors(page, server):
    exts = server.get("/extensions")
    assert any(e.endswith("ComfyUI-TLoRA/tlora_loader.js") for e in exts), exts
    ours = [e for e in page.errors if "tlora" in e.lower()]
    assert not ours, ours


@pytest.mark.parametrize("name", sorted(p.name for p in (ROOT / "example_workflows").glob("*.json")))
def test_example_workflow_renders_and_converts_like_the_frontend(page, server, name, artifacts):
    wf = workflow.load(ROOT / "example_workflows" / name)
    # open it the way ComfyUI's template browser does: from the pack's template URL
    served = page.evaluate("async (url) => await (await fetch(url)).json()",
                           f"/api/workflow_templates/ComfyUI-TLoRA/{name}")
    assert served == wf
    load_graph(page, served)
    types = page.evaluate("() => window.app.graph._nodes.map(n => n.type)")
    assert sorted(types) == sorted(n["type"] for n in wf["nodes"])
    # our object_info-driven converter agrees with the real frontend's graphToPrompt
    ours = strip_meta(workflow.to_api(wf, server.get("/object_info")))
    theirs = strip_meta(ui_prompt(page))
    assert ours == theirs
    # the live graph widget never enters the prompt
    for node in theirs.values():
        assert "tlora_schedule_graph" not in node["inputs"]
    page.wait_for_timeout(300)
    page.screenshot(path=str(artifacts / f"ui_{Path(name).stem}.png"))


def _schedule(page) -> dict:
    return page.evaluate("""() => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRALoader');
        return n.tlora && n.tlora.schedule ? {...n.tlora.schedule} : null; }""")


def _set(page, name, value) -> None:
    page.evaluate("""([name, value]) => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRALoader');
        const w = n.widgets.find(w => w.name === name); w.value = value; w.callback?.(value); }""", [name, value])


def _wait_schedule(page, want: tuple[int, int, float], timeout=20.0) -> dict:
    deadline = time.time() + timeout
    while time.time() < deadline:
        s = _schedule(page)
        if s and s.get("ranks") and (s["maxRank"], s["minRank"], s["alpha"]) == want:
            return s
        page.wait_for_timeout(100)
    raise AssertionError(f"live graph never showed {want}: {_schedule(page)}")


def screenshot_loader(page, path: Path) -> None:
    """A screenshot of just the Load T-LoRA node (used in the README)."""
    rect = page.evaluate("""() => { const c = window.app.canvas, n = window.app.graph._nodes.find(
            n => n.type === 'TLoRALoader'), W = c.canvas.clientWidth, H = c.canvas.clientHeight;
        c.ds.scale = 1.3;
        c.ds.offset = [W / 2 / 1.3 - n.pos[0] - n.size[0] / 2, H / 2 / 1.3 - n.pos[1] - n.size[1] / 2];
        c.setDirty(true, true); const b = c.canvas.getBoundingClientRect();
        return {x: b.left + W / 2 - n.size[0] * 1.3 / 2 - 12, y: b.top + H / 2 - (n.size[1] + 30) * 1.3 / 2 - 20,
                width: n.size[0] * 1.3 + 24, height: (n.size[1] + 30) * 1.3 + 28}; }""")
    page.wait_for_timeout(300)
    page.screenshot(path=str(path), clip=rect)


def test_live_graph_follows_file_and_sliders(page, artifacts):
    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    _set(page, "lora_name", LORA)
    # schedule_source = file: rank from tensor shapes, min_rank and alpha from the sidecar
    s = _wait_schedule(page, (RANK, MIN_RANK, TLORA_ALPHA))
    assert s["ranks"] == [active_rank(t, RANK, MIN_RANK, TLORA_ALPHA) for t in range(1000)]
    # the sliders are pre-filled with the values the file records
    deadline = time.time() + 10  # the widgets may take a frame longer than the graph to show it
    while (got := (_loader_widgets(page)["min_rank"], _loader_widgets(page)["alpha"])) != (MIN_RANK, TLORA_ALPHA):
        if time.time() > deadline:
            break
        page.wait_for_timeout(100)
    assert got == (MIN_RANK, TLORA_ALPHA)
    screenshot_loader(page, artifacts / "ui_loader_file_schedule.png")
    _set(page, "schedule_source", "sliders")
    _set(page, "min_rank", 3)
    _set(page, "alpha", 0.7)
    s = _wait_schedule(page, (RANK, 3, 0.7))
    assert s["ranks"] == [active_rank(t, RANK, 3, 0.7) for t in range(1000)]
    _set(page, "max_rank", 6)
    s = _wait_schedule(page, (6, 3, 0.7))
    assert s["ranks"] == [active_rank(t, 6, 3, 0.7) for t in range(1000)]
    screenshot_loader(page, artifacts / "ui_loader_slider_schedule.png")


def test_the_graph_follows_the_writers_rule_and_says_who_wrote_the_file(page, artifacts):
    """An sd-scripts (67372a) file: the live graph starts at that trainer's default min_rank ceil(R/2) and names the
    writer; a standard LoRA switched to standard_layout 'pairs' is read as LyCORIS' rank-2R export (half the rank)."""
    import math

    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    _set(page, "lora_name", SD_SCRIPTS_SDXL)
    s = _wait_schedule(page, (RANK, math.ceil(RANK / 2), 1.0))
    assert s["ranks"] == [active_rank(t, RANK, math.ceil(RANK / 2), 1.0) for t in range(1000)]
    assert "67372a" in s["note"], s["note"]
    screenshot_loader(page, artifacts / "ui_loader_writer.png")
    _set(page, "lora_name", "standard_lora.safetensors")  # rank 4, no marker: refused until asked
    _set(page, "min_rank", 1)
    _set(page, "standard_layout", "pairs")
    s = _wait_schedule(page, (2, 1, 1.0))
    assert "rank 2R" in s["note"] and not s["error"], s
    _set(page, "standard_layout", "auto")


def test_queue_from_the_ui_produces_an_image(page, server):
    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    before = set(server.get("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.time() + 300
    while time.time() < deadline:
        new = set(server.get("/history")) - before
        if new:
            entry = server.get("/history")[new.pop()]
            if entry.get("status", {}).get("completed"):
                assert len(server.images(entry)) == 1
                return
            assert entry.get("status", {}).get("status_str") != "error", entry.get("status")
        time.sleep(0.5)
    raise AssertionError("the prompt queued from the UI did not finish")


def _loader_widgets(page) -> dict:
    return page.evaluate("""() => Object.fromEntries(window.app.graph._nodes.find(n => n.type === 'TLoRALoader')
        .widgets.filter(w => w.name !== 'tlora_schedule_graph').map(w => [w.name, w.value]))""")


def _wait_info(page, lora_name: str, timeout=20.0) -> None:
    """Until the node shows what the server says about `lora_name` (or its error)."""
    deadline = time.time() + timeout
    while time.time() < deadline:
        ok = page.evaluate("""(name) => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRALoader');
            const i = n.tlora && n.tlora.info; return !!i && (i.lora_name === name || !!i.error); }""", lora_name)
        if ok:
            return
        page.wait_for_timeout(100)
    raise AssertionError(f"the node never showed the server's answer for {lora_name}")


@pytest.mark.parametrize("source", ["sliders", "file"])
def test_reopened_workflow_shows_its_own_values_and_rewrites_nothing(page, source):
    """Save a workflow whose sliders differ from what the file records, reload the page, open it again: the widgets,
    the graph and the queued prompt are the saved ones (the file's values are pre-filled only when the user
    picks the file)."""
    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    _set(page, "lora_name", LORA)
    _wait_info(page, LORA)
    _wait_schedule(page, (RANK, MIN_RANK, TLORA_ALPHA))  # picked by the user: pre-filled from the sidecar
    _set(page, "schedule_source", source)
    _set(page, "min_rank", 5)
    _set(page, "alpha", 0.6)
    saved = page.evaluate("() => window.app.graph.serialize()")
    widgets, prompt = _loader_widgets(page), strip_meta(ui_prompt(page))
    assert (widgets["min_rank"], widgets["alpha"]) == (5, 0.6)
    page.evaluate("() => { localStorage.clear(); sessionStorage.clear(); }")  # a fresh tab: nothing restored
    page.reload(wait_until="domcontentloaded")
    ready(page)
    page.wait_for_timeout(1000)  # the frontend's own start-up (default graph) is over
    load_graph(page, saved)
    _wait_info(page, LORA)
    want = (RANK, 5, 0.6) if source == "sliders" else (RANK, MIN_RANK, TLORA_ALPHA)  # "file": the file's values run
    s = _wait_schedule(page, want)
    assert s["ranks"] == [active_rank(t, *want) for t in range(1000)]
    page.wait_for_timeout(500)  # a late answer from the server must not rewrite anything either
    assert _loader_widgets(page) == widgets
    assert strip_meta(ui_prompt(page)) == prompt


@pytest.mark.parametrize(("name", "says"), [
    ("not_a_lora.safetensors", "a VAE, not a LoRA"),
    ("standard_lora.safetensors", "vanilla_tlora"),
])
def test_server_errors_about_the_file_show_on_the_node(page, artifacts, name, says):
    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    _set(page, "lora_name", name)
    _wait_info(page, name)
    error = _schedule(page)["error"]
    assert name in error and says in error, error
    screenshot_loader(page, artifacts / f"ui_loader_error_{Path(name).stem}.png")
    if name == "standard_lora.safetensors":  # switched on, the same file is accepted as a vanilla T-LoRA
        _set(page, "vanilla_tlora", True)
        page.wait_for_function("""() => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRALoader');
            return n.tlora.info && !n.tlora.info.error && n.tlora.schedule && !n.tlora.schedule.error; }""",
                               timeout=20_000)


def _queue_and_wait(page, server, timeout=180.0) -> dict:
    """Queue the graph from the UI; the history entry of that prompt once it has finished (or failed)."""
    before = set(server.get("/history"))
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    deadline = time.time() + timeout
    while time.time() < deadline:
        new = set(server.get("/history")) - before
        if new:
            entry = server.get("/history")[new.pop()]
            if entry.get("status", {}).get("completed") or entry.get("status", {}).get("status_str") == "error":
                return entry
        time.sleep(0.3)
    raise AssertionError("the prompt queued from the UI did not finish")


def test_a_run_error_shows_on_the_node_until_a_later_run_succeeds(page, server, tmp_path):
    """A T-LoRA file that is broken on disk when the prompt runs: the server's message appears on the node. The
    file is repaired on disk (no widget touched) and the graph queued again: the run succeeds and the message goes."""
    good = server.base / "models" / "loras" / "tlora_sdxl" / "pytorch_lora_weights.safetensors"
    victim = server.base / "models" / "loras" / "flaky_tlora.safetensors"
    victim.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not a header}")
    try:
        load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
        _set(page, "lora_name", "flaky_tlora.safetensors")
        _wait_info(page, "flaky_tlora.safetensors")
        entry = _queue_and_wait(page, server)
        assert entry["status"]["status_str"] == "error"
        page.wait_for_function("""() => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRALoader');
            return n.tlora.runError && n.tlora.schedule.error === n.tlora.info.error; }""", timeout=30_000)
        assert "flaky_tlora.safetensors" in _schedule(page)["error"]
        victim.write_bytes(good.resolve().read_bytes())  # repaired on disk; the node is not touched
        entry = _queue_and_wait(page, server)
        assert entry["status"].get("completed"), entry["status"]
        page.wait_for_function("""() => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRALoader');
            return n.tlora.runError === null; }""", timeout=30_000)
    finally:
        victim.unlink(missing_ok=True)


def test_a_run_error_of_another_family_shows_on_the_node(page, server):
    """The official Flux lora.pt on the SDXL graph: the server refuses it when the prompt runs."""
    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    _set(page, "lora_name", "tlora_flux/lora.pt")
    _wait_info(page, "tlora_flux/lora.pt")
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function("""() => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRALoader');
        return n.tlora.schedule && n.tlora.schedule.error && n.tlora.schedule.error.includes('matched 0 of'); }""",
                           timeout=120_000)
    error = _schedule(page)["error"]
    assert "lora.pt" in error and "Flux" in error, error


def test_a_node_inside_a_subgraph_gets_its_graph_and_its_run_error(page, server):
    """The Load T-LoRA node moved into a subgraph: its execution id is '<subgraph node>:<node>'; the run error still
    reaches it, and it still draws its schedule."""
    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    _set(page, "lora_name", "tlora_flux/lora.pt")
    _wait_info(page, "tlora_flux/lora.pt")
    made = page.evaluate("""() => { const g = window.app.graph, n = g._nodes.find(n => n.type === 'TLoRALoader');
        const r = g.convertToSubgraph(new Set([n])); return !!r; }""")
    assert made, "the frontend could not make a subgraph"
    inner = """() => { const outer = window.app.graph._nodes.find(n => n.subgraph);
        return outer && outer.subgraph._nodes.find(n => n.type === 'TLoRALoader'); }"""
    assert page.evaluate(f"() => {{ const n = ({inner})(); return !!(n && n.tlora); }}")
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function(f"""() => {{ const n = ({inner})();
        return n && n.tlora.runError && n.tlora.runError.includes('matched 0 of'); }}""", timeout=120_000)


def test_a_reply_that_is_not_json_shows_as_a_readable_error(page):
    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    page.route("**/tlora/info**", lambda route: route.fulfill(status=502, content_type="text/html",
                                                            body="<html><body><h1>Bad Gateway</h1></body></html>"))
    try:
        _set(page, "lora_name", LORA)
        page.wait_for_function("""() => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRALoader');
            return n.tlora.info && n.tlora.info.error; }""", timeout=20_000)
        error = _schedule(page)["error"]
        assert "HTTP 502" in error and "Bad Gateway" in error and "SyntaxError" not in error, error
    finally:
        page.unroute("**/tlora/info**")


def test_prefilled_values_go_through_the_widgets(page):
    """Picking a file pre-fills min_rank and alpha as a user edit would: the workflow is marked modified, and undo
    brings back the values from before."""
    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    _set(page, "schedule_source", "file")
    _set(page, "min_rank", 5)
    _set(page, "alpha", 0.6)
    page.evaluate("() => window.app.extensionManager.workflow.activeWorkflow.changeTracker.checkState()")
    page.evaluate("() => { const w = window.app.extensionManager.workflow.activeWorkflow; w.changeTracker.reset?.();"
                  " }")
    _set(page, "lora_name", LORA)
    _wait_info(page, LORA)
    deadline = time.time() + 10
    while (_loader_widgets(page)["min_rank"], _loader_widgets(page)["alpha"]) != (MIN_RANK, TLORA_ALPHA):
        assert time.time() < deadline, _loader_widgets(page)
        page.wait_for_timeout(100)
    assert page.evaluate("() => window.app.extensionManager.workflow.activeWorkflow.isModified")
    for _ in range(4):  # back through the pre-fill (one undo step per widget, and the file pick)
        if (_loader_widgets(page)["min_rank"], _loader_widgets(page)["alpha"]) == (5, 0.6):
            break
        page.evaluate("async () => { await window.app.extensionManager.command.execute('Comfy.Undo'); }")
        page.wait_for_timeout(300)
    assert (_loader_widgets(page)["min_rank"], _loader_widgets(page)["alpha"]) == (5, 0.6)


def test_train_node_draws_its_schedule_and_fills_presets(page, artifacts):
    """Train T-LoRA in the editor: its schedule graph follows rank / min_rank / alpha, and choosing a preset shows the
    preset's values on the widgets it sets."""
    load_graph(page, workflow.load(ROOT / "example_workflows" / "tlora_train_single_image.json"))
    get = """() => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRATrain');
        const s = n.tloraTrain && n.tloraTrain.schedule;
        return s && s.ranks ? {ranks: s.ranks, maxRank: s.maxRank,
            widgets: Object.fromEntries(n.widgets.map(w => [w.name, w.value]))} : null; }"""
    page.wait_for_function(f"() => !!({get})()", timeout=20_000)
    s = page.evaluate(get)
    w = s["widgets"]
    assert s["ranks"] == [active_rank(t, w["rank"], w["min_rank"], w["alpha"]) for t in range(1000)]
    setw = """([name, value]) => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRATrain');
        const w = n.widgets.find(w => w.name === name); w.value = value; w.callback?.(value); }"""
    page.evaluate(setw, ["preset", "SimpleTuner"])
    deadline = time.time() + 10
    while (w := page.evaluate(get)["widgets"])["linear_alpha"] != 32 or w["min_rank"] != 1:
        assert time.time() < deadline, w
        page.wait_for_timeout(100)
    assert w["targets"] == "attention+feed_forward"
    page.evaluate(setw, ["preset", "custom"])
    page.evaluate(setw, ["min_rank", 16])
    page.evaluate(setw, ["alpha", 2.0])
    s = page.evaluate(get)
    assert s["ranks"] == [active_rank(t, 64, 16, 2.0) for t in range(1000)]
    page.wait_for_timeout(300)
    page.screenshot(path=str(artifacts / "ui_train_node.png"))


def test_scheduled_lora_curve_gets_its_models_sigmas_once_run(page, server, artifacts):
    """Load LoRA (timestep schedule) built in the editor (UNETLoader -> the node -> the schedule preview): its live
    curve follows the widgets at once, and once the graph has run it labels the progress axis with the connected
    model's sigmas (the tiny SDXL: its discrete sigmas, sigma_max at 0 %, sigma_min at 100 %)."""
    from tests.conftest import STYLE_LORA_SDXL
    from tests.server.test_sampling import discrete_sigmas

    page.evaluate("""(lora) => {
        const g = window.app.graph; g.clear();
        const add = (type, pos) => { const n = LiteGraph.createNode(type); n.pos = pos; g.add(n); return n; };
        const set = (n, name, v) => { const w = n.widgets.find(w => w.name === name); w.value = v; w.callback?.(v); };
        const u = add('UNETLoader', [40, 60]), s = add('TLoRAScheduledLoRA', [360, 60]),
              p = add('TLoRASchedulePreview', [760, 60]);
        set(u, 'unet_name', 'sdxl_koala_comfy.safetensors');
        set(s, 'lora_name', lora);
        set(s, 'start_percent', 0.5); set(s, 'strength_start', 0.0); set(s, 'curve', 'linear');
        set(p, 'max_rank', 4);
        u.connect(0, s, s.findInputSlot('model'));
        s.connect(0, p, p.findInputSlot('model'));
    }""", STYLE_LORA_SDXL)
    get = """() => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRAScheduledLoRA');
        const st = n.tloraScheduled; return st && st.curve ? {values: st.curve.values, ticks: st.curve.ticks ?? null,
        raw: st.sigmaTicks} : null; }"""
    page.wait_for_function(f"() => !!({get})()", timeout=20_000)
    before = page.evaluate(get)
    assert before["ticks"] is None and before["values"][0] == 0 and before["values"][-1] == pytest.approx(1.0)
    entry = _queue_and_wait(page, server)
    assert entry["status"].get("completed"), entry["status"]
    page.wait_for_function(f"() => {{ const s = ({get})(); return s && s.ticks; }}", timeout=30_000)
    after = page.evaluate(get)
    sig = discrete_sigmas()
    assert [p for p, _ in after["raw"]] == [0, 0.25, 0.5, 0.75, 1]
    assert after["raw"][0][1] == pytest.approx(sig[-1], rel=1e-5) and after["raw"][-1][1] == pytest.approx(sig[0],
                                                                                                         rel=1e-5)
    assert [lab for _, lab in after["ticks"]][0] == f"σ {sig[-1]:.3g}", after["ticks"]
    assert after["values"] == before["values"]
    page.wait_for_timeout(300)
    page.screenshot(path=str(artifacts / "ui_scheduled_sigma_axis.png"))
