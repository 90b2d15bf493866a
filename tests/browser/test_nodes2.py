"""The live graphs in both node designs (the classic canvas and Nodes 2.0, where a custom widget has its own canvas
and is redrawn only when told), read from the pixels: the design asked for is the one running, the issue's steps
redraw the graph, the graphs stay right at low zoom and in a large graph, and a screenshot of every node."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from tests.browser import drawn
from tests.browser.test_ui import ADD_NODE, LOADER, LORA, drawn_schedule, load_graph
from tests.conftest import MIN_RANK, RANK, ROOT, STYLE_LORA_SDXL, TLORA_ALPHA
from tools.harness import workflow

HERE = Path(__file__).resolve().parent
SET = """([find, values]) => { const n = (FIND)();
    for (const [name, v] of values) { const w = n.widgets.find(w => w.name === name); w.value = v;
        w.callback?.(v, window.app.canvas, n); } }"""


def set_widgets(page, find: str, values: list) -> None:
    """Widgets set as the frontend's own widgets do: the value, then its callback (value, canvas, node)."""
    page.evaluate(SET.replace("FIND", find), [find, values])


def test_the_page_runs_the_node_design_it_was_asked_for(page):
    """The setting reads back as posted (a boolean) and the nodes are Vue elements only with Nodes 2.0 on."""
    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    page.wait_for_timeout(300)
    setting = page.evaluate("() => window.app.extensionManager.setting.get('Comfy.VueNodes.Enabled')")
    elements = page.evaluate("""() => window.app.graph._nodes.filter(
        n => document.querySelector(`[data-node-id="${n.id}"]`)).length""")
    assert setting is page.ui_mode.nodes2, setting
    assert elements == (9 if page.ui_mode.nodes2 else 0), elements


def test_sliders_redraw_the_graph_of_the_sdxl_example(page):
    """The SDXL example workflow, then max_rank 8 and min_rank 5 set as the widget callbacks do: what is drawn is
    the schedule 5 -> 8, where Nodes 2.0 used to keep the first drawing."""
    load_graph(page, workflow.load(ROOT / "example_workflows" / "tlora_sdxl_txt2img.json"))
    page.wait_for_function("() => { const n = (FIND)(); return n.tlora && n.tlora.schedule; }".replace("FIND", LOADER))
    drawn.focus(page, LOADER)
    before = drawn.graph(page, LOADER, "tlora_schedule_graph")
    set_widgets(page, LOADER, [["max_rank", 8], ["min_rank", 5]])
    after = drawn_schedule(page, 8, 5, 1.0)
    assert before.line_pixels() == 0 and not np.array_equal(before.img, after.img)


def test_graphs_stay_right_at_low_zoom_and_after_zooming_back(page):
    """Zoomed out to half size (the classic canvas' low level of detail), the sliders changed there: the graph
    drawn at that zoom is the new schedule, and so is the one drawn at full size again."""
    load_graph(page, json.loads((HERE / "tiny_sdxl_ui.json").read_text()))
    set_widgets(page, LOADER, [["lora_name", LORA]])
    drawn_schedule(page, RANK, MIN_RANK, TLORA_ALPHA)
    drawn.focus(page, LOADER, 0.5)
    if not page.ui_mode.nodes2:
        assert page.evaluate("() => window.app.canvas.low_quality ?? window.app.canvas.isLowQuality?.()")
    set_widgets(page, LOADER, [["schedule_source", "sliders"], ["max_rank", 6], ["min_rank", 3], ["alpha", 0.7]])
    low = drawn_schedule(page, 6, 3, 0.7, scale=0.5)
    assert low.box[2] - low.box[0] < 60  # drawn at half size
    drawn_schedule(page, 6, 3, 0.7)


def test_a_large_graph_keeps_every_graph_right(page):
    """Forty Load T-LoRA nodes, each with its own max_rank, seen all at once (zoomed out) while every one is
    changed, then three of them up close: each shows its own schedule."""
    count = 40
    page.evaluate("""([count, lora]) => { const g = window.app.graph; g.clear(); const add = ADD;
        for (let i = 0; i < count; i++) { const n = add('TLoRALoader', [(i % 8) * 400, Math.floor(i / 8) * 520]);
            for (const [k, v] of [['lora_name', lora], ['schedule_source', 'sliders'], ['max_rank', 2 + i % 7],
                                  ['alpha', 1.0]]) {
                const w = n.widgets.find(w => w.name === k); w.value = v; w.callback?.(v, window.app.canvas, n); } }
        const c = window.app.canvas; c.ds.scale = 0.3; c.ds.offset = [200, 200]; c.setDirty(true, true); }"""
                  .replace("ADD", ADD_NODE), [count, LORA])
    page.wait_for_timeout(500)
    page.evaluate("""() => window.app.graph._nodes.forEach((n, i) => {
        const w = n.widgets.find(w => w.name === 'min_rank'), v = 1 + i % 2; w.value = v;
        w.callback?.(v, window.app.canvas, n); })""")
    for i in (0, count // 2, count - 1):
        drawn_schedule(page, 2 + i % 7, 1 + i % 2, 1.0, find=f"() => window.app.graph._nodes[{i}]")
    assert page.evaluate("() => window.app.graph._nodes.length") == count


NODES = {  # the pack's nodes, as a user finds them: the loader with its file, the fade-in, the trainer
    "TLoRALoader": [["lora_name", LORA]],
    "TLoRAScheduledLoRA": [["lora_name", STYLE_LORA_SDXL], ["start_percent", 0.5], ["strength_start", 0.0]],
    "TLoRASchedulePreview": [],
    "TLoRATrain": [],
    "TLoRASaveWithBase": [],
}


def test_screenshot_of_every_node(page, artifacts):
    """Each node of the pack on its own, as drawn in this design (test_artifacts/<host>/node_<id>_<mode>.png; the
    README shows the newest frontend's); the live graphs are drawn, not blank."""
    page.set_viewport_size({"width": 1600, "height": 2000})  # room for the tallest node (Train T-LoRA)
    try:
        _shoot_every_node(page, artifacts)
    finally:
        page.set_viewport_size({"width": 1600, "height": 1000})


def _shoot_every_node(page, artifacts) -> None:
    for node_type, values in NODES.items():
        page.evaluate("""(t) => { window.app.graph.clear(); (ADD)(t, [0, 0]); }""".replace("ADD", ADD_NODE), node_type)
        find = f"() => window.app.graph._nodes.find(n => n.type === '{node_type}')"
        set_widgets(page, find, values)
        if node_type == "TLoRALoader":
            drawn_schedule(page, RANK, MIN_RANK, TLORA_ALPHA, find=find)
        drawn.focus(page, find, top=200, left=400)  # clear of the tab bar and the canvas' toolbar
        rect = page.evaluate("""() => { const n = window.app.graph._nodes[0], c = window.app.canvas;
            const el = document.querySelector(`[data-node-id="${n.id}"]`);
            if (el) { const r = el.getBoundingClientRect();
                return {x: r.left - 8, y: r.top - 8, width: r.width + 16, height: r.height + 16}; }
            const b = c.canvas.getBoundingClientRect(), [x, y] = c.ds.convertOffsetToCanvas([n.pos[0], n.pos[1]]);
            const th = LiteGraph.NODE_TITLE_HEIGHT * c.ds.scale;
            return {x: b.left + x - 8, y: b.top + y - th - 8, width: n.size[0] * c.ds.scale + 16,
                    height: n.size[1] * c.ds.scale + th + 16}; }""")
        page.screenshot(path=str(artifacts / f"node_{node_type}_{page.ui_mode}.png"), clip=rect)
        for w in page.evaluate(f"() => ({find})().widgets.map(w => w.name)"):
            if w in ("tlora_schedule_graph", "tlora_strength_graph", "tlora_train_schedule"):
                g = drawn.graph(page, find, w)
                assert g.found and g.line_pixels() > 100, (node_type, w, g.line_pixels())
