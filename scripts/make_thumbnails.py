"""Render each example workflow in the real ComfyUI frontend (headless Chromium) and save a same-name .jpg
thumbnail beside it, as ComfyUI's template browser expects.

    .venv/bin/python scripts/make_thumbnails.py
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from tools.harness import workflow  # noqa: E402
from tools.harness.server import ComfyServer  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SIZE = (768, 432)


def main() -> int:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="tlora-thumbs-") as base, ComfyServer(Path(base)) as srv:
        srv.post("/settings/Comfy.TutorialCompleted", True)
        srv.post("/settings/Comfy.Minimap.Visible", False)
        with sync_playwright() as p:
            browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
            page = browser.new_page(viewport={"width": 1920, "height": 1080})
            page.goto(srv.url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
            for path in sorted((ROOT / "example_workflows").glob("*.json")):
                page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow.load(path))
                page.keyboard.press("Escape")
                # fit every node in view: screen = (graph + offset) * scale
                page.evaluate("""() => { const c = window.app.canvas, ns = window.app.graph._nodes;
                    const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - 30));
                    const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0]));
                    const y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
                    const W = c.canvas.clientWidth, H = c.canvas.clientHeight;
                    const s = Math.min(W / (x1 - x0), H / (y1 - y0)) * 0.85;
                    c.ds.scale = s; c.ds.offset = [(W / s - (x1 - x0)) / 2 - x0, (H / s - (y1 - y0)) / 2 - y0];
                    c.setDirty(true, true); }""")
                page.wait_for_timeout(800)
                box = page.locator("canvas#graph-canvas").bounding_box()
                # leave out the banner, the tab bar and the side bar
                png = page.screenshot(clip={"x": box["x"] + 50, "y": box["y"] + 100, "width": box["width"] - 50,
                                            "height": box["height"] - 100})
                img = Image.open(io.BytesIO(png)).convert("RGB")
                img.thumbnail(SIZE)
                img.save(path.with_suffix(".jpg"), quality=85)
                print(path.with_suffix(".jpg"))
            browser.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
