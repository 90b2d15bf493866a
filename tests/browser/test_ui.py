"""Real browser (Debian Chromium, headless, driven by Playwright) against the real server."""

from __future__ import annotations

import json
import os
import time
from pathlib import Path

import pytest

from tests.browser import drawn
from tests.browser.conftest import CHROMIUM, ready
from tests.conftest import MIN_RANK, RANK, ROOT, SD_SCRIPTS_SDXL, TLORA_ALPHA
from tlora_core.schedule import active_rank
from tools.harness import workflow

HERE = Path(__file__).resolve().parent
LORA = "tlora_sdxl/pytorch_lora_weights.safetensors"
LOADER = "() => window.app.graph._nodes.find(n => n.type === 'TLoRALoader')"
# A node added by a test gets an id no earlier graph of the page used: frontend 1.49.6 gives a new node the widget
# values of a removed node that had its id (1.58.1 does not).
ADD_NODE = """(type, pos) => { const n = LiteGraph.createNode(type);
    n.id = window.tloraTestIds = (window.tloraTestIds ?? 9000) + 1; n.pos = pos; window.app.graph.add(n); return n; }"""
INNER_LOADER = """() => { const outer = window.app.graph._nodes.find(n => n.subgraph);
    return outer && outer.subgraph._nodes.find(n => n.type === 'TLoRALoader'); }"""


def test_chromium_is_installed():
    """The browser tier needs Debian's chromium (`make setup-browser`): missing, it fails here, never skips."""
    assert os.path.exists(CHROMIUM), f"no chromium at {CHROMIUM}: run `make setup-browser`"


def drawn_schedule(page, max_rank: int, min_rank: int, alpha: float, find: str = LOADER,
                   widget: str = "tlora_schedule_graph", scale: float = 1.0) -> drawn.Graph:
    """The node's graph as drawn on screen once it shows the schedule (max_rank, min_rank, alpha): its line read
    back from the pixels equals tlora_core's active rank at every timestep (noise on the left)."""
    want = [active_rank(t, max_rank, min_rank, alpha) for t in range(1000)][::-1]
    drawn.focus(page, find, scale)
    return drawn.wait_graph(page, find, widget, lambda g: g.check_line(want, 0, max_rank),
                            what=f"the schedule ({max_rank}, {min_rank}, {alpha})")


def drawn_error(page, find: str = LOADER, widget: str = "tlora_schedule_graph") -> drawn.Graph:
    """The node's graph once it shows an error in red."""
    drawn.focus(page, find)

    def red(g):
        assert g.found and g.red_pixels() > 20, f"{g.red_pixels()} red pixels"
    return drawn.wait_graph(page, find, widget, red, what="an error")


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
    # raised by the pack's scripts (not the frontend's own: 1.32.9 asks api.comfy.org about every node it shows,
    # which the page's content security policy blocks)
    ours = [e for e in page.errors if "/extensions/ComfyUI-TLoRA/" in e]
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
    # every live graph in it is drawn on screen (its plot, with a line or a message)
    # (a bypassed node, such as the training example's "checkpoint you pick", is drawn tinted: not read here)
    graphs = page.evaluate("""() => window.app.graph._nodes.filter(n => !n.mode).flatMap(n => (n.widgets || [])
        .filter(w => ['tlora_schedule_graph', 'tlora_strength_graph', 'tlora_train_schedule'].includes(w.name))
        .map(w => [n.id, w.name]))""")
    for node_id, widget in graphs:
        find = f"() => window.app.graph.getNodeById({json.dumps(node_id)})"
        drawn.focus(page, find)
        g = drawn.wait_graph(page, find, widget, lambda g: _drawn_something(g), what="a plot")
        assert g.line_pixels() or g.text_pixels() or g.red_pixels()
    page.wait_for_timeout(300)
    page.screenshot(path=str(artifacts / f"ui_{Path(name).stem}_{page.ui_mode}.png"))


def _drawn_something(g) -> None:
    assert g.found, "no plot"
    assert g.line_pixels() > 50 or g.text_pixels() > 20 or g.red_pixels() > 20, "an empty plot"


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
    drawn_schedule(page, RANK, MIN_RANK, TLORA_ALPHA)
    # the sliders are pre-filled with the values the file records
    deadline = time.time() + 10  # the widgets may take a frame longer than the graph to show it
    while (got := (_loader_widgets(page)["min_rank"], _loader_widgets(page)["alpha"])) != (MIN_RANK, TLORA_ALPHA):
        if time.time() > deadline:
            break
        page.wait_for_timeout(100)
    assert got == (MIN_RANK, TLORA_ALPHA)
    screenshot_loader(page, artifacts / f"ui_loader_file_schedule_{page.ui_mode}.png")
    _set(page, "schedule_source", "sliders")
    _set(page, "min_rank", 3)
    _set(page, "alpha", 0.7)
    s = _wait_schedule(page, (RANK, 3, 0.7))
    assert s["ranks"] == [active_rank(t, RANK, 3, 0.7) for t in range(1000)]
    drawn_schedule(page, RANK, 3, 0.7)
    _set(page, "max_rank", 6)
    s = _wait_schedule(page, (6, 3, 0.7))
    assert s["ranks"] == [active_rank(t, 6, 3, 0.7) for t in range(1000)]
    drawn_schedule(page, 6, 3, 0.7)
    screenshot_loader(page, artifacts / f"ui_loader_slider_schedule_{page.ui_mode}.png")


def test_the_graph_follows_the_writers_rule_and_says_who_wrote_the_file(page, artifacts):
    """An sd-scripts (67372a) file: the live graph starts at that trainer's default min_rank ceil(R/2) and names the
    writer; a standard LoRA switched to standard_layout 'pairs' is read as LyCORIS' rank-2R export (half the rank)."""
    import math

    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    _set(page, "lora_name", SD_SCRIPTS_SDXL)
    s = _wait_schedule(page, (RANK, math.ceil(RANK / 2), 1.0))
    assert s["ranks"] == [active_rank(t, RANK, math.ceil(RANK / 2), 1.0) for t in range(1000)]
    assert "67372a" in s["note"], s["note"]
    g = drawn_schedule(page, RANK, math.ceil(RANK / 2), 1.0)
    assert g.text_pixels() > 100  # the head line and the writer's note
    screenshot_loader(page, artifacts / f"ui_loader_writer_{page.ui_mode}.png")
    _set(page, "lora_name", "standard_lora.safetensors")  # rank 4, no marker: refused until asked
    _set(page, "min_rank", 1)
    _set(page, "standard_layout", "pairs")
    s = _wait_schedule(page, (2, 1, 1.0))
    assert "rank 2R" in s["note"] and not s["error"], s
    assert drawn_schedule(page, 2, 1, 1.0).red_pixels() == 0
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
    drawn_schedule(page, *want)
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
    assert drawn_error(page).line_pixels() == 0
    screenshot_loader(page, artifacts / f"ui_loader_error_{Path(name).stem}_{page.ui_mode}.png")
    if name == "standard_lora.safetensors":  # switched on, the same file is accepted as a vanilla T-LoRA
        _set(page, "vanilla_tlora", True)
        page.wait_for_function("""() => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRALoader');
            return n.tlora.info && !n.tlora.info.error && n.tlora.schedule && !n.tlora.schedule.error; }""",
                               timeout=20_000)
        assert drawn_schedule(page, 4, 1, 1.0).red_pixels() == 0  # rank 4, the sliders' min_rank and alpha


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
        drawn_error(page)
        victim.write_bytes(good.resolve().read_bytes())  # repaired on disk; the node is not touched
        entry = _queue_and_wait(page, server)
        assert entry["status"].get("completed"), entry["status"]
        page.wait_for_function("""() => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRALoader');
            return n.tlora.runError === null; }""", timeout=30_000)
        drawn.focus(page, LOADER)
        drawn.wait_graph(page, LOADER, "tlora_schedule_graph", _no_red, what="the error gone")
    finally:
        victim.unlink(missing_ok=True)


def _no_red(g) -> None:
    assert g.found and g.red_pixels() == 0, f"{g.red_pixels()} red pixels"


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
    drawn_error(page)


def test_a_node_inside_a_subgraph_gets_its_graph_and_its_run_error(page, server):
    """The Load T-LoRA node moved into a subgraph: its execution id is '<subgraph node>:<node>'; the run error still
    reaches it, and it still draws its schedule."""
    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    _set(page, "lora_name", "tlora_flux/lora.pt")
    _wait_info(page, "tlora_flux/lora.pt")
    made = page.evaluate("""() => { const g = window.app.graph, n = g._nodes.find(n => n.type === 'TLoRALoader');
        const r = g.convertToSubgraph(new Set([n])); return !!r; }""")
    assert made, "the frontend could not make a subgraph"
    inner = INNER_LOADER
    assert page.evaluate(f"() => {{ const n = ({inner})(); return !!(n && n.tlora); }}")
    page.evaluate("async () => { await window.app.queuePrompt(0, 1); }")
    page.wait_for_function(f"""() => {{ const n = ({inner})();
        return n && n.tlora.runError && n.tlora.runError.includes('matched 0 of'); }}""", timeout=120_000)
    # opened, the subgraph shows the node with its schedule (the file's rank, the sliders) and the run's error
    open_subgraph(page)
    try:
        drawn_error(page, find=inner)
        drawn_schedule(page, RANK, 1, 1.0, find=inner)
    finally:
        page.evaluate("() => window.app.canvas.setGraph(window.app.graph)")


def open_subgraph(page) -> None:
    """Into the first subgraph, as a double-click on its node does."""
    page.evaluate("""() => { const c = window.app.canvas, outer = window.app.graph._nodes.find(n => n.subgraph);
        c.openSubgraph ? c.openSubgraph(outer.subgraph, outer) : c.setGraph(outer.subgraph); }""")
    page.wait_for_timeout(300)


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
        drawn_error(page)
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
    drawn_schedule(page, RANK, MIN_RANK, TLORA_ALPHA)  # schedule_source = file: the file's values
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
    train = "() => window.app.graph._nodes.find(n => n.type === 'TLoRATrain')"
    drawn_schedule(page, w["rank"], w["min_rank"], w["alpha"], find=train, widget="tlora_train_schedule")
    page.evaluate(setw, ["preset", "custom"])
    page.evaluate(setw, ["min_rank", 16])
    page.evaluate(setw, ["alpha", 2.0])
    s = page.evaluate(get)
    assert s["ranks"] == [active_rank(t, 64, 16, 2.0) for t in range(1000)]
    drawn_schedule(page, 64, 16, 2.0, find=train, widget="tlora_train_schedule")
    page.wait_for_timeout(300)
    page.screenshot(path=str(artifacts / f"ui_train_node_{page.ui_mode}.png"))


def test_scheduled_lora_curve_gets_its_models_sigmas_once_run(page, server, artifacts):
    """Load LoRA (timestep schedule) built in the editor (UNETLoader -> the node -> the schedule preview): its live
    curve follows the widgets at once, and once the graph has run it labels the progress axis with the connected
    model's sigmas (the tiny SDXL: its discrete sigmas, sigma_max at 0 %, sigma_min at 100 %)."""
    from tests.conftest import STYLE_LORA_SDXL
    from tests.server.test_sampling import discrete_sigmas

    # strength_clip (no CLIP connected, not drawn) differs from any earlier run on this server: the node runs and
    # sends its sigmas (ComfyUI sends nothing for a node it takes from its cache)
    page.evaluate("""([lora, clip]) => {
        const g = window.app.graph; g.clear();
        const add = ADD;""".replace("ADD", ADD_NODE) + """
        const set = (n, name, v) => { const w = n.widgets.find(w => w.name === name); w.value = v; w.callback?.(v); };
        const u = add('UNETLoader', [40, 60]), s = add('TLoRAScheduledLoRA', [360, 60]),
              p = add('TLoRASchedulePreview', [760, 60]);
        set(u, 'unet_name', 'sdxl_koala_comfy.safetensors');
        set(s, 'lora_name', lora);
        set(s, 'start_percent', 0.5); set(s, 'strength_start', 0.0); set(s, 'curve', 'linear');
        set(s, 'strength_clip', clip);
        set(p, 'max_rank', 4);
        u.connect(0, s, s.findInputSlot('model'));
        s.connect(0, p, p.findInputSlot('model'));
    }""", [STYLE_LORA_SDXL, round(0.5 + time.time() % 1000 / 2000, 6)])
    get = """() => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRAScheduledLoRA');
        const st = n.tloraScheduled; return st && st.curve ? {values: st.curve.values, ticks: st.curve.ticks ?? null,
        raw: st.sigmaTicks} : null; }"""
    page.wait_for_function(f"() => !!({get})()", timeout=20_000)
    before = page.evaluate(get)
    assert before["ticks"] is None and before["values"][0] == 0 and before["values"][-1] == pytest.approx(1.0)
    node = "() => window.app.graph._nodes.find(n => n.type === 'TLoRAScheduledLoRA')"
    drawn.focus(page, node)
    # on screen: 0 until 50 %, then up to 1 (strength_model 1); no sigma axis yet
    g = drawn.wait_graph(page, node, "tlora_strength_graph", lambda g: g.check_line(before["values"], 0, 1.0),
                         what="the fade-in curve")
    assert g.tick_columns() == []
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
    # on screen: the same curve, and a tick at 0, 25, 50, 75 and 100 % of the plot's width
    drawn.focus(page, node)

    def ticked(g):
        g.check_line(before["values"], 0, 1.0)
        width = g.box[3] - g.box[1] + 1
        got, want = g.tick_columns(), [width * p for p, _ in after["raw"]]
        assert len(got) == 5 and all(abs(a - b) <= 1.5 for a, b in zip(got, want, strict=True)), (got, want)
    drawn.wait_graph(page, node, "tlora_strength_graph", ticked, what="the sigma axis")
    page.wait_for_timeout(300)
    page.screenshot(path=str(artifacts / f"ui_scheduled_sigma_axis_{page.ui_mode}.png"))


def test_scheduled_lora_labels_follow_a_model_sampling_node_after_it(page, server, artifacts):
    """UNETLoader -> Load LoRA (timestep schedule) -> ModelSamplingSD3 shift 8 -> KSampler, built and queued in the
    editor: the node's run labels its curve with the model it was given (the tiny SDXL's discrete sigmas), then the
    sampling run sends the sigmas of the sampling that runs, and the curve ends labelled with shift 8's."""
    from tests.conftest import STYLE_LORA_SDXL
    from tests.reliability.helpers import cached_nodes
    from tests.server.test_sampling import discrete_sigmas

    page.evaluate("""(lora) => {
        const g = window.app.graph; g.clear();
        window.__tloraEvents = [];  // what the frontend receives for the node, in order
        for (const type of ['executed', 'tlora.sigma_ticks'])
          window.app.api.addEventListener(type, ({ detail }) => window.__tloraEvents.push([type, detail]));
        const add = ADD;""".replace("ADD", ADD_NODE) + """
        const set = (n, name, v) => { const w = n.widgets.find(w => w.name === name); w.value = v; w.callback?.(v); };
        const u = add('UNETLoader', [40, 60]), s = add('TLoRAScheduledLoRA', [360, 60]),
              m = add('ModelSamplingSD3', [760, 60]), k = add('KSampler', [1060, 60]),
              c1 = add('TLoRADevConditioning', [40, 1100]), c2 = add('TLoRADevConditioning', [40, 1300]),
              e = add('EmptyLatentImage', [760, 1100]), o = add('SaveLatent', [1400, 60]);
        set(u, 'unet_name', 'sdxl_koala_comfy.safetensors');
        set(s, 'lora_name', lora); set(s, 'start_percent', 0.5); set(s, 'strength_model', 0.93); set(m, 'shift', 8.0);
        for (const [c, seed] of [[c1, 1], [c2, 2]]) {
          set(c, 'seed', seed); set(c, 'context_dim', 2048); set(c, 'pooled_dim', 1280);
        }
        set(e, 'width', 64); set(e, 'height', 64); set(k, 'steps', 2);
        u.connect(0, s, s.findInputSlot('model')); s.connect(0, m, m.findInputSlot('model'));
        m.connect(0, k, k.findInputSlot('model')); c1.connect(0, k, k.findInputSlot('positive'));
        c2.connect(0, k, k.findInputSlot('negative')); e.connect(0, k, k.findInputSlot('latent_image'));
        k.connect(0, o, o.findInputSlot('samples'));
    }""", STYLE_LORA_SDXL)
    entry = _queue_and_wait(page, server)
    assert entry["status"].get("completed"), entry["status"]
    node = next(k for k, v in entry["prompt"][2].items() if v["class_type"] == "TLoRAScheduledLoRA")
    get = """() => { const n = window.app.graph._nodes.find(n => n.type === 'TLoRAScheduledLoRA');
        const st = n.tloraScheduled;
        return {raw: st.sigmaTicks, ticks: st.curve.ticks, events: window.__tloraEvents}; }"""
    page.wait_for_function(f"() => ({get})().raw?.[0]?.[1] === 1", timeout=30_000)
    st = page.evaluate(get)
    ours = [(t, d) for t, d in st["events"] if (d.get("node") or d.get("display_node")) == node]
    assert node not in cached_nodes(entry), "the node answered from ComfyUI's cache"
    assert [t for t, _ in ours] == ["executed", "tlora.sigma_ticks"], ours
    guess = ours[0][1]["output"]["tlora_sigma_ticks"]  # what the node saw when it ran: the SDXL's discrete sigmas
    assert guess[0][1] == pytest.approx(discrete_sigmas()[-1], rel=1e-5), guess
    shift8 = [8 * (1 - p) / (1 + 7 * (1 - p)) for p in (0.25, 0.5, 0.75)]
    assert [t[1] for t in st["raw"][1:4]] == pytest.approx(shift8, rel=1e-6), st["raw"]
    assert ours[1][1]["ticks"] == st["raw"]
    assert [lab for _, lab in st["ticks"]][:3] == ["σ 1.00", "σ 0.960", "σ 0.889"], st["ticks"]
    # on screen: the curve with its five sigma ticks, drawn after the sampling's event
    find = "() => window.app.graph._nodes.find(n => n.type === 'TLoRAScheduledLoRA')"
    drawn.focus(page, find)

    def five_ticks(g):
        assert len(g.tick_columns()) == 5, g.tick_columns()
    drawn.wait_graph(page, find, "tlora_strength_graph", five_ticks, what="the shift-8 sigma axis")
    page.wait_for_timeout(300)
    page.screenshot(path=str(artifacts / f"ui_scheduled_sigma_axis_shift8_{page.ui_mode}.png"))
