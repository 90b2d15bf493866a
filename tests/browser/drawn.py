"""What a node's live graph shows on screen, read from the pixels of a screenshot: in the classic editor the part of
the shared canvas the widget is drawn on, with Nodes 2.0 the widget's own <canvas> inside the node's element.

A graph (js/tlora_graph.js `drawSeries`) is a dark plot rectangle with a blue line of the values (left to right),
drawn from yMin at the bottom edge to yMax 4 px below the top; errors are red text, notes and hints grey. Reading
the line back column by column gives the values the user sees, compared here with the Python reference."""

from __future__ import annotations

import io
import time
from dataclasses import dataclass

import numpy as np

from tests.conftest import ARTIFACTS

PLOT = (0x1E, 0x1E, 0x24)
LINE = (0x3B, 0x82, 0xF6)
ERROR = (0xF8, 0x71, 0x71)
TICK = (0x55, 0x55, 0x55)

# The graph widget of the first node the expression finds, as a page rectangle, and how it is drawn.
_LOCATE = """([find, name]) => {
  const node = (FIND)(), w = node && node.widgets.find(w => w.name === name);
  if (!w) return {missing: 'no node or no widget ' + name};
  const el = document.querySelector(`[data-node-id="${node.id}"]`);
  if (el) {  // Nodes 2.0: the widget's own canvas inside the node's element
    const cs = [...el.querySelectorAll('canvas')];
    if (cs.length !== 1) return {missing: cs.length + ' canvases in the node'};
    const r = cs[0].getBoundingClientRect();
    return {x: r.left, y: r.top, width: r.width, height: r.height, scale: window.app.canvas.ds.scale};
  }
  const c = window.app.canvas, ds = c.ds, b = c.canvas.getBoundingClientRect();
  const y = w.y ?? w.last_y;
  if (y == null) return {missing: 'the widget was never drawn'};
  const [x0, y0] = ds.convertOffsetToCanvas([node.pos[0], node.pos[1] + y]);
  return {x: b.left + x0, y: b.top + y0, width: node.size[0] * ds.scale, height: 120 * ds.scale, scale: ds.scale};
}"""


def locate(page, find: str, widget: str) -> dict:
    return page.evaluate(_LOCATE.replace("FIND", find), [find, widget])


def close_dialogs(page) -> None:
    """Close a dialog over the canvas as a user would (Escape): frontend 1.32.9 shows a run's error in one."""
    for _ in range(5):
        if not page.evaluate("() => !!document.querySelector('.p-dialog-mask')"):
            return
        page.keyboard.press("Escape")
        page.wait_for_timeout(200)
    raise AssertionError("a dialog over the canvas does not close")


def focus(page, find: str, scale: float = 1.0, top: int = 140, left: int = 120) -> None:
    """Zoom to `scale` with the node's top left at (left, top) on the canvas (whole pixels: sharp edges), nothing
    over it."""
    close_dialogs(page)
    page.evaluate("""([scale, top, left]) => { const n = (FIND)(), c = window.app.canvas; c.ds.scale = scale;
        c.ds.offset = [Math.round(left / scale - n.pos[0]), Math.round(top / scale - n.pos[1])];
        c.setDirty(true, true); }""".replace("FIND", find), [scale, top, left])
    page.wait_for_timeout(150)  # two frames, and the Vue layer's transform


def grab(page, rect: dict) -> np.ndarray:
    from PIL import Image

    clip = {k: rect[k] for k in ("x", "y", "width", "height")}
    png = page.screenshot(clip=clip)
    return np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)


def _blueness(img: np.ndarray) -> np.ndarray:
    """0 for the plot's background, grey or red, 1 for the line's colour: (b - r) against the line's (b - r)."""
    bg, line = PLOT[2] - PLOT[0], LINE[2] - LINE[0]
    return np.clip((img[..., 2] - img[..., 0] - bg) / (line - bg), 0, 1)


def _near(img: np.ndarray, rgb: tuple, tol: int) -> np.ndarray:
    return (np.abs(img - np.array(rgb)).max(axis=2) <= tol)


@dataclass
class Graph:
    box: tuple[int, int, int, int] | None  # top, left, bottom, right of the plot (inclusive), None: no plot drawn
    img: np.ndarray
    scale: float = 1.0  # the canvas zoom it was drawn at

    @property
    def found(self) -> bool:
        return self.box is not None

    def _inside(self) -> np.ndarray:
        t, left, b, r = self.box
        return self.img[t + 1:b, left + 1:r]

    def line_pixels(self) -> int:
        if not self.found:
            return 0
        return int((_blueness(self._inside()) > 0.25).sum())

    def red_pixels(self) -> int:
        if not self.found:
            return 0
        inner = self._inside()
        return int((_near(inner, ERROR, 60) & (inner[..., 0] - inner[..., 1] > 80)).sum())

    def text_pixels(self) -> int:
        """Light grey (hints, notes, the head line) anywhere in the plot."""
        if not self.found:
            return 0
        inner = self._inside()
        grey = (inner.max(axis=2) - inner.min(axis=2) < 16) & (inner.min(axis=2) > 90)
        return int(grey.sum())

    def line(self) -> np.ndarray:
        """Per plot column, the line's height as a fraction of the drawn range (0 = yMin, 1 = yMax); NaN where the
        column has no line pixel."""
        t, left, b, r = self.box
        inner = self.img[t:b + 1, left:r + 1]
        weight = _blueness(inner)  # antialiased edges (and thin lines at low zoom) count by how blue they are
        weight[weight < 0.1] = 0
        rows = np.arange(inner.shape[0])[:, None]
        mass = weight.sum(axis=0)
        centre = np.where(mass > 0.3, (weight * rows).sum(axis=0) / np.maximum(mass, 1e-9) + 0.5, np.nan)
        y0, y1 = 0, inner.shape[0]  # the rectangle's top and bottom edges in this crop
        return (y1 - centre) / (y1 - y0 - 4 * self.scale)  # the top 4 px of the plot are a margin

    def values(self, lo: float, hi: float) -> np.ndarray:
        return lo + self.line() * (hi - lo)

    def check_line(self, want: list[float], lo: float, hi: float, px: float = 1.6) -> None:
        """The drawn line is `want` (drawn left to right over the plot): in every column it lies within `px` pixels
        of the values that column and its neighbours cover (a step is a vertical segment), and text drawn over it
        hides at most 3 % of the columns."""
        assert self.found, "no plot drawn"
        got = self.values(lo, hi)
        width = len(got)
        tol = px * (hi - lo) / (self.box[2] - self.box[0] + 1 - 4 * self.scale)
        w = np.asarray(want, dtype=float)
        n = len(w)
        missing, bad = [], []
        for col in range(width):
            a = int(np.clip(np.floor((col - 1) / width * (n - 1)), 0, n - 1))
            b = int(np.clip(np.ceil((col + 2) / width * (n - 1)), 0, n - 1))
            span = w[a:b + 1]
            if np.isnan(got[col]):
                missing.append(col)
            elif not span.min() - tol <= got[col] <= span.max() + tol:
                bad.append((col, round(float(got[col]), 3), float(span.min()), float(span.max())))
        assert len(missing) <= 0.03 * width, f"no line in {len(missing)} of {width} columns: {missing[:12]}"
        assert not bad, f"{len(bad)} of {width} columns off the expected line (column, drawn, expected): {bad[:8]}"

    def tick_columns(self) -> list[int]:
        """Columns of the short tick marks rising from the bottom edge (the sigma axis)."""
        t, left, b, r = self.box
        band = self.img[b - 3:b + 1, left:r + 1]
        tick = (np.abs(band - np.array(TICK)).max(axis=2) <= 40) & (band.min(axis=2) > 50)
        cols = np.nonzero(tick.sum(axis=0) >= 2)[0]
        groups: list[list[int]] = []
        for c in cols:
            if groups and c - groups[-1][-1] <= 1:
                groups[-1].append(int(c))
            else:
                groups.append([int(c)])
        return [round(sum(g) / len(g)) for g in groups]


def _longest_run(mask: np.ndarray, gap: int = 3) -> tuple[int, int] | None:
    """First and last index of the longest run of True, across gaps of up to `gap` (the line crossing the plot)."""
    idx = np.nonzero(mask)[0]
    if not len(idx):
        return None
    runs, start = [], idx[0]
    for a, b in zip(idx[:-1], idx[1:], strict=True):
        if b - a > gap + 1:
            runs.append((int(start), int(a)))
            start = b
    runs.append((int(start), int(idx[-1])))
    return max(runs, key=lambda r: r[1] - r[0])


def read(img: np.ndarray, scale: float = 1.0) -> Graph:
    """The plot in a screenshot of the widget: the longest block of rows and columns that are mostly the plot's
    exact colour (what is around it, a node's background or border, can come within a few levels of it)."""
    bg = _near(img, PLOT, 2)
    if bg.sum() < 200:
        return Graph(None, img, scale)
    rows, cols = bg.sum(axis=1), bg.sum(axis=0)
    # a row or column of the plot: mostly its colour (a line along the bottom edge covers up to half a row)
    ys, xs = _longest_run(rows > 0.2 * rows.max()), _longest_run(cols > 0.2 * cols.max())
    return Graph((ys[0], xs[0], ys[1], xs[1]), img, scale)


def _into_view(page, find: str, widget: str, rect: dict) -> dict:
    """The widget's rectangle once it lies inside the window: a tall node (Nodes 2.0 draws taller widgets) can put
    its graph below the bottom edge, where nothing is drawn; the canvas is panned up (or down) by whole pixels."""
    vw, vh = page.evaluate("() => [window.innerWidth, window.innerHeight]")
    dy = 0
    if rect["y"] + rect["height"] > vh - 8:
        dy = vh - 8 - rect["y"] - rect["height"]
    if rect["y"] + dy < 40:  # below the menu bar
        dy = 40 - rect["y"]
    dx = -rect["x"] + 60 if rect["x"] < 60 or rect["x"] + rect["width"] > vw - 8 else 0
    if not dx and not dy:
        return rect
    page.evaluate("""([dx, dy]) => { const c = window.app.canvas;
        c.ds.offset = [c.ds.offset[0] + Math.round(dx / c.ds.scale), c.ds.offset[1] + Math.round(dy / c.ds.scale)];
        c.setDirty(true, true); }""", [dx, dy])
    page.wait_for_timeout(150)  # two frames, and the Vue layer's transform
    return locate(page, find, widget)


def graph(page, find: str, widget: str) -> Graph:
    rect = locate(page, find, widget)
    assert "missing" not in rect, rect["missing"]
    rect = _into_view(page, find, widget, rect)
    return read(grab(page, rect), rect["scale"])


def _save(img: np.ndarray, path) -> None:
    from PIL import Image

    Image.fromarray(img.astype(np.uint8)).save(path)


def wait_graph(page, find: str, widget: str, ok, timeout: float = 15.0, what: str = "") -> Graph:
    """The node's graph once `ok(graph)` holds (a redraw can follow the data by a frame); otherwise fails with the
    last reading, and the page as it was goes to test_artifacts/<host>/drawn_failure_<n>.png."""
    deadline = time.time() + timeout
    while True:
        g = graph(page, find, widget)
        try:
            ok(g)
            return g
        except AssertionError as e:
            if time.time() > deadline:
                ARTIFACTS.mkdir(parents=True, exist_ok=True)
                shot = ARTIFACTS / f"drawn_failure_{len(list(ARTIFACTS.glob('drawn_failure_*')))}.png"
                page.screenshot(path=str(shot))
                _save(g.img, shot.with_name(shot.stem + "_widget.png"))
                raise AssertionError(f"the drawn graph never showed {what} (page: {shot}): {e}") from None
        page.wait_for_timeout(150)
