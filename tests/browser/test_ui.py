"""Real browser (Debian Chromium, headless, driven by Playwright) against the real server."""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import pytest

from tests.conftest import MIN_RANK, RANK, ROOT, TLORA_ALPHA
from tlora_core.schedule import active_rank
from tools.harness import workflow

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
HERE = Path(__file__).resolve().parent
LORA = "tlora_sdxl/pytorch_lora_weights.safetensors"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]

pytestmark = pytest.mark.skipif(not os.path.exists(CHROMIUM) and not os.environ.get("CI"),
                                reason="Debian chromium is not installed (make setup-browser)")


@pytest.fixture(scope="module")
def page(server, tmp_path_factory):
    from playwright.sync_api import sync_playwright

    errors: list[str] = []
    # a returning user: no first-run templates dialog over the canvas
    server.post("/settings/Comfy.TutorialCompleted", True)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        ctx = browser.new_context(viewport={"width": 1600, "height": 1000})
        pg = ctx.new_page()
        pg.on("pageerror", lambda e: errors.append(f"pageerror: {e}"))
        pg.on("console", lambda m: errors.append(f"console: {m.text}") if m.type == "error" else None)
        pg.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
        pg.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager !== undefined",
                             timeout=120_000)
        pg.wait_for_function("() => LiteGraph.registered_node_types['TLoRALoader'] !== undefined", timeout=60_000)
        pg.errors = errors
        yield pg
        browser.close()


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
        return n.tloraSchedule ? {...n.tloraSchedule} : null; }""")


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
    values = page.evaluate("""() => Object.fromEntries(window.app.graph._nodes.find(n => n.type === 'TLoRALoader')
        .widgets.map(w => [w.name, w.value]))""")
    assert (values["min_rank"], values["alpha"]) == (MIN_RANK, TLORA_ALPHA)
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
