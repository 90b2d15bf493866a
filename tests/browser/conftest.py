"""Fixtures of the browser tier: Debian's Chromium, headless, driven by Playwright against the real server."""

from __future__ import annotations

import shutil

import pytest

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]


def ready(pg) -> None:
    """Until the frontend has started and the pack's nodes are registered."""
    pg.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager !== undefined",
                         timeout=120_000)
    pg.wait_for_function("() => LiteGraph.registered_node_types['TLoRALoader'] !== undefined", timeout=60_000)


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
        ready(pg)
        pg.errors = errors
        yield pg
        browser.close()
