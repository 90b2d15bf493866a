"""Render each example workflow in the real ComfyUI frontend (headless Chromium) and save a same-name .jpg
thumbnail beside it, as ComfyUI's template browser expects.

    .venv/bin/python scripts/make_thumbnails.py [name ...]    (only the named workflows, e.g. tlora_sdxl_txt2img)
"""

from __future__ import annotations

import io
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from PIL import Image  # noqa: E402

from tools import tiny_models  # noqa: E402
from tools.harness import workflow  # noqa: E402
from tools.harness.server import ComfyServer  # noqa: E402

CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
SIZE = (768, 432)


def example_loras(folder: Path) -> Path:
    """The workflows' T-LoRA names as real LyCORIS files on the tiny SDXL / Flux twins, each with the sidecar that
    records its schedule, so the loader's live graph shows a file's schedule rather than "not found"."""
    import torch
    from diffusers import FluxTransformer2DModel, UNet2DConditionModel

    folder.mkdir()
    models = ROOT / ".cache" / "tiny"
    twins = {"my_tlora_sdxl": (UNet2DConditionModel, tiny_models.make_sdxl(models), tiny_models.UNET_TARGETS),
             "my_tlora_flux": (FluxTransformer2DModel, tiny_models.make_flux(models), tiny_models.FLUX_TARGETS)}
    for name, (cls, tiny, targets) in twins.items():
        model = cls.from_pretrained(str(tiny["diffusers_dir"]), torch_dtype=torch.float32)
        tiny_models.write_lycoris_tlora(model, folder / f"{name}.safetensors", 8, 8.0, targets, seed=1).restore()
        (folder / f"{name}.json").write_text(
            '{"algo": "tlora", "linear_dim": 8, "tlora_min_rank": 2, "tlora_alpha": 1.5}')
    return folder


def main() -> int:
    from playwright.sync_api import sync_playwright

    with tempfile.TemporaryDirectory(prefix="tlora-thumbs-") as base:
        loras = example_loras(Path(base) / "thumb_loras")
        with ComfyServer(Path(base), models={"loras": sorted(loras.iterdir())}) as srv:
            shoot(srv, sync_playwright, sys.argv[1:])
    return 0


def shoot(srv: ComfyServer, sync_playwright, names: list[str]) -> None:
    srv.post("/settings/Comfy.TutorialCompleted", True)
    srv.post("/settings/Comfy.Minimap.Visible", False)
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path="/usr/bin/chromium", headless=True, args=CHROMIUM_ARGS)
        page = browser.new_page(viewport={"width": 1920, "height": 1080})
        page.goto(srv.url, wait_until="domcontentloaded", timeout=120_000)
        page.wait_for_function("() => window.app && window.app.graph", timeout=120_000)
        for path in sorted((ROOT / "example_workflows").glob("*.json")):
            if names and path.stem not in names:
                continue
            page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow.load(path))
            page.keyboard.press("Escape")
            # fit every node in the clipped view below: screen = (graph + offset) * scale
            page.evaluate("""() => { const c = window.app.canvas, ns = window.app.graph._nodes;
                const x0 = Math.min(...ns.map(n => n.pos[0])), y0 = Math.min(...ns.map(n => n.pos[1] - 30));
                const x1 = Math.max(...ns.map(n => n.pos[0] + n.size[0]));
                const y1 = Math.max(...ns.map(n => n.pos[1] + n.size[1]));
                const L = 50, T = 100, W = c.canvas.clientWidth - L, H = c.canvas.clientHeight - T;
                const s = Math.min(W / (x1 - x0), H / (y1 - y0)) * 0.85;
                c.ds.scale = s;
                c.ds.offset = [(L + W / 2) / s - (x0 + x1) / 2, (T + H / 2) / s - (y0 + y1) / 2];
                c.setDirty(true, true); }""")
            page.wait_for_timeout(1500)  # the loader's graph reads /tlora/info
            box = page.locator("canvas#graph-canvas").bounding_box()
            # leave out the banner, the tab bar and the side bar
            png = page.screenshot(clip={"x": box["x"] + 50, "y": box["y"] + 100, "width": box["width"] - 50,
                                        "height": box["height"] - 100})
            img = Image.open(io.BytesIO(png)).convert("RGB")
            img.thumbnail(SIZE)
            img.save(path.with_suffix(".jpg"), quality=85)
            print(path.with_suffix(".jpg"))
        browser.close()


if __name__ == "__main__":
    sys.exit(main())
