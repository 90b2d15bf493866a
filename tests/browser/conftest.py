"""The browser tier's matrix: every test that uses `page` or `server` runs once per (frontend, Nodes 2.0 mode) this
host serves (tools/harness/frontends.py). One ComfyUI server per frontend (the session's own for the host's
frontend), one Chromium for the session, one page per combination; pytest runs a combination's tests together.
What each combination ran and how long it took goes to test_artifacts/<host>/browser.json (the README's table)."""

from __future__ import annotations

import os
import shutil
from collections import defaultdict

import pytest

from tests.conftest import make_server, save_results
from tools.harness import frontends
from tools.harness.server import comfy_path, host_version

CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
        "--disable-component-update", "--disable-sync", "--disable-dev-shm-usage"]
MATRIX = frontends.matrix(comfy_path())
# a returning user: no first-run templates dialog over the canvas, no minimap over the nodes
SETTINGS = {"Comfy.TutorialCompleted": True, "Comfy.Minimap.Visible": False}


@pytest.fixture(scope="session", params=MATRIX, ids=str)
def ui_mode(request) -> frontends.UiMode:
    return request.param


@pytest.fixture(scope="session")
def _frontend_servers(tiny, loras, tmp_path_factory):
    """Servers for the frontends the host does not pin, started when first needed, one at a time."""
    running: dict[str, object] = {}

    def get(version: str, svd_cache):
        if version not in running:
            for old in running.values():
                old.stop()
            running.clear()
            srv = make_server(tmp_path_factory.mktemp(f"comfy-fe{version}"), tiny, loras, frontend=version,
                              svd_cache=svd_cache)
            running[version] = srv.start()
        return running[version]

    yield get
    for srv in running.values():
        srv.stop()


@pytest.fixture(scope="session")
def server(server, ui_mode, _frontend_servers):
    """The server that serves this combination's frontend (the session's own for the host's frontend; another one
    shares its SVD base cache: the browser tier runs one prompt at a time)."""
    return server if ui_mode.pinned else _frontend_servers(ui_mode.frontend, server.base / "svd_cache")


@pytest.fixture(scope="session")
def _chromium():
    from playwright.sync_api import sync_playwright

    assert os.path.exists(CHROMIUM), f"no chromium at {CHROMIUM}: run `make setup-browser`"
    with sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, headless=True, args=ARGS)
        yield browser
        browser.close()


def ready(pg) -> None:
    pg.wait_for_function("() => window.app && window.app.graph && window.app.extensionManager !== undefined",
                         timeout=120_000)
    pg.wait_for_function("() => LiteGraph.registered_node_types['TLoRALoader'] !== undefined", timeout=60_000)


@pytest.fixture(scope="session")
def page(server, ui_mode, _chromium):
    """A page of this combination's frontend with Nodes 2.0 set as asked (the setting is read when the page loads)."""
    errors: list[str] = []
    for key, value in {**SETTINGS, "Comfy.VueNodes.Enabled": ui_mode.nodes2}.items():
        server.post(f"/settings/{key}", value)
    ctx = _chromium.new_context(viewport={"width": 1600, "height": 1000})
    pg = ctx.new_page()
    pg.on("pageerror", lambda e: errors.append(f"pageerror: {e} {e.stack or ''}"))
    pg.on("console", lambda m: errors.append(f"console: {m.text} at {m.location.get('url')}") if m.type == "error"
          else None)
    pg.goto(server.url, wait_until="domcontentloaded", timeout=120_000)
    ready(pg)
    pg.errors = errors
    pg.ui_mode = ui_mode
    yield pg
    ctx.close()


# --- what each combination ran: test_artifacts/<host>/browser.json ------------------------------------------------
_mode_of: dict[str, str] = {}
_failed: set[str] = set()
_passed: set[str] = set()
_seconds: dict[str, float] = defaultdict(float)


def pytest_collection_modifyitems(config, items):
    for item in items:
        mode = getattr(item, "callspec", None) and item.callspec.params.get("ui_mode")
        if mode is not None:
            _mode_of[item.nodeid] = str(mode)


def pytest_runtest_logreport(report):
    mode = _mode_of.get(report.nodeid)
    if mode is None:
        return
    _seconds[mode] += report.duration  # set-up included: a combination's first test starts its server and page
    if report.failed:
        _failed.add(report.nodeid)
    elif report.when == "call":
        _passed.add(report.nodeid)


def pytest_sessionfinish(session):
    if not _seconds:
        return
    host = host_version(comfy_path())
    modes = {str(m): m for m in MATRIX}
    results = {}
    for key in _seconds:
        m = modes[key]
        ids = [n for n, k in _mode_of.items() if k == key]
        results[key] = {"host": host, "frontend": m.frontend, "nodes2": m.nodes2, "pinned": m.pinned,
                        "passed": sum(n in _passed and n not in _failed for n in ids),
                        "failed": sum(n in _failed for n in ids), "seconds": round(_seconds[key], 1)}
    save_results("browser.json", results)
