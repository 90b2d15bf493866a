"""Train T-LoRA in a real browser against the real server: a preset only fills widgets, an edited value turns it to
"custom", the run trains what the widgets show, and an opened workflow keeps its preset and values."""

from __future__ import annotations

import json
import time
from pathlib import Path

from safetensors import safe_open

from tests.browser.test_ui import ADD_NODE, _queue_and_wait, drawn_schedule, load_graph, ui_prompt
from tests.conftest import ROOT
from tlora_core.schedule import active_rank
from tools.harness import workflow

PAPER = "paper, single image"
NODE = "window.app.graph._nodes.find(n => n.type === 'TLoRATrain')"
FIND = f"() => {NODE}"
GRAPH = "tlora_train_schedule"
SD15_COND = {"tokens": 8, "context_dim": 768, "pooled_dim": 0}


def _set(page, name, value) -> None:
    """A widget value set as the user sets it: the value, then the widget's callback."""
    page.evaluate(f"""([name, value]) => {{ const n = {NODE};
        const w = n.widgets.find(w => w.name === name); w.value = value; w.callback?.(value); }}""", [name, value])


def _widgets(page) -> dict:
    return page.evaluate(f"""() => Object.fromEntries({NODE}.widgets.filter(w => w.name !== 'tlora_train_schedule')
        .map(w => [w.name, w.value]))""")


def _schedule(page) -> dict | None:
    return page.evaluate(f"() => {{ const s = {NODE}.tloraTrain.schedule; return s && s.ranks ? {{...s}} : null; }}")


def _until(page, check, what: str, timeout: float = 10.0):
    deadline = time.time() + timeout
    while not (got := check()):
        assert time.time() < deadline, f"{what}: {_widgets(page)}"
        page.wait_for_timeout(100)
    return got


def _train_graph(page, tiny) -> None:
    """A new graph: the tiny SD1.5 (UNETLoader), an empty 64 px latent and a seeded conditioning into a new Train
    T-LoRA node, whose widgets are its defaults."""
    page.evaluate("""([unet, cond]) => {
        const g = window.app.graph; g.clear();
        const add = ADD;""".replace("ADD", ADD_NODE) + """
        const set = (n, name, v) => { const w = n.widgets.find(w => w.name === name); w.value = v; w.callback?.(v); };
        const u = add('UNETLoader', [40, 40]), l = add('EmptyLatentImage', [40, 200]),
              c = add('TLoRADevConditioning', [40, 380]), t = add('TLoRATrain', [420, 40]);
        set(u, 'unet_name', unet);
        set(l, 'width', 64); set(l, 'height', 64);
        for (const [k, v] of Object.entries(cond)) set(c, k, v);
        u.connect(0, t, t.findInputSlot('model'));
        l.connect(0, t, t.findInputSlot('latents'));
        c.connect(0, t, t.findInputSlot('positive'));
    }""", [Path(tiny["sd15"]["comfy_file"]).name, SD15_COND])


def test_a_preset_fills_its_widgets_and_stays_chosen(page, server):
    """Choosing a preset writes its values into the widgets it names (the preset stays the one chosen); choosing the
    other one writes that one's."""
    presets = server.get("/tlora/train_presets")
    load_graph(page, workflow.load(ROOT / "example_workflows" / "tlora_train_single_image.json"))
    for name in ("SimpleTuner", PAPER):
        _set(page, "preset", name)
        want = presets[name]

        def shown(want=want):
            w = _widgets(page)
            return w if all(w[k] == v for k, v in want.items()) else None

        w = _until(page, shown, f"the widgets never showed {name}'s values")
        assert w["preset"] == name
        page.wait_for_timeout(300)  # no late switch to custom
        assert _widgets(page)["preset"] == name


def test_an_edited_value_turns_the_preset_to_custom_and_the_run_trains_the_widgets(page, server, tiny):
    """Under the default preset, set steps 2, rank 4 and min_rank 2 as a user would: the preset reads "custom", the
    schedule graph follows, and the queued run trains 2 steps at rank 4 (the file's tensors and its record)."""
    _train_graph(page, tiny)
    w = _widgets(page)
    assert (w["preset"], w["steps"], w["rank"], w["min_rank"]) == (PAPER, 800, 64, 32), w
    _set(page, "filename", "ui/preset_edit")
    _set(page, "overwrite", True)
    assert _widgets(page)["preset"] == PAPER  # widgets the preset does not set leave it alone
    _set(page, "steps", 2)
    _until(page, lambda: _widgets(page)["preset"] == "custom", "editing steps did not turn the preset to custom")
    _set(page, "rank", 4)
    _set(page, "min_rank", 2)
    _set(page, "gradient_checkpointing", False)
    s = _until(page, lambda: (s := _schedule(page)) and s["maxRank"] == 4 and s, "the graph never showed rank 4")
    assert s["ranks"] == [active_rank(t, 4, 2, 1.0) for t in range(1000)]
    drawn_schedule(page, 4, 2, 1.0, FIND, GRAPH)  # on screen
    node_id = page.evaluate(f"() => String({NODE}.id)")
    sent = ui_prompt(page)[node_id]["inputs"]
    assert (sent["preset"], sent["steps"], sent["rank"], sent["min_rank"]) == ("custom", 2, 4, 2), sent
    entry = _queue_and_wait(page, server, timeout=300)
    assert entry["status"].get("completed"), entry["status"]
    text = entry["outputs"][node_id]["text"][0]
    assert text.startswith("ui/preset_edit.safetensors: 2 steps") and "except" not in text, text
    with safe_open(str(Path(server.base) / "models" / "loras" / "ui" / "preset_edit.safetensors"), "pt") as f:
        ranks = {f.get_slice(k).get_shape()[0] for k in f.keys() if k.endswith(".q_layer.weight")}
        record = json.loads(f.metadata()["tlora_training"])
    assert ranks == {4}
    assert (record["steps"], record["rank"], record["min_rank"], record["preset"]) == (2, 4, 2, "custom"), record
    assert record["preset_departures"] == {}


def test_an_opened_workflow_keeps_its_preset_and_its_values(page):
    """A workflow saved with the preset 'paper, single image' and steps 200, rank 16, min_rank 8 (as one saved before
    editing switched presets to custom): opening it rewrites nothing, the graph shows rank 16, and the prompt sends
    those values (which the server trains)."""
    wf = workflow.load(ROOT / "example_workflows" / "tlora_train_single_image.json")
    node = next(n for n in wf["nodes"] if n["type"] == "TLoRATrain")
    values = node["widgets_values"]
    assert values[1:6] == [PAPER, 800, 1e-4, 64, 32], values
    values[2], values[4], values[5] = 200, 16, 8
    load_graph(page, wf)
    s = _until(page, lambda: (s := _schedule(page)) and s["maxRank"] == 16 and s, "the graph never showed rank 16")
    assert s["ranks"] == [active_rank(t, 16, 8, 1.0) for t in range(1000)]
    drawn_schedule(page, 16, 8, 1.0, FIND, GRAPH)  # on screen
    page.wait_for_timeout(500)  # the presets' late arrival must not rewrite anything either
    w = _widgets(page)
    assert (w["preset"], w["steps"], w["rank"], w["min_rank"]) == (PAPER, 200, 16, 8), w
    node_id = page.evaluate(f"() => String({NODE}.id)")
    sent = ui_prompt(page)[node_id]["inputs"]
    assert (sent["preset"], sent["steps"], sent["rank"], sent["min_rank"]) == (PAPER, 200, 16, 8), sent
