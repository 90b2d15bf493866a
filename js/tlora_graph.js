import { app } from "../../scripts/app.js";

// What both T-LoRA nodes share in the graph editor: the schedule graph they draw on themselves (active rank against
// timestep, noise on the left) and setting a widget as the user would.

export const GRAPH_HEIGHT = 120;

// Lines of at most `width` pixels.
export function wrap(ctx, text, width) {
  const lines = [];
  let line = "";
  for (const word of String(text).split(/\s+/)) {
    const next = line ? `${line} ${word}` : word;
    if (line && ctx.measureText(next).width > width) {
      lines.push(line);
      line = word;
    } else line = next;
  }
  if (line) lines.push(line);
  return lines;
}

// A line over the sampling, noise on the left: s = { values (left to right, or null), yMin, yMax, head, left,
// right, note, error }; `loud`: the error comes from the server (red).
// s: { values, yMin, yMax, head, left, right, ticks ([fraction, label] along the bottom), error, note }
export function drawSeries(ctx, s, width, y, loud = false) {
  const pad = 10;
  const x0 = pad, x1 = width - pad, y0 = y + 4, y1 = y + GRAPH_HEIGHT - 14;
  ctx.save();
  ctx.fillStyle = "#1e1e24";
  ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#aaa";
  if (!s || !s.values) {
    ctx.fillStyle = s?.error && loud ? "#f87171" : "#aaa";
    const lines = wrap(ctx, s?.error ?? "…", x1 - x0 - 12).slice(0, 7);
    lines.forEach((ln, i) => ctx.fillText(ln, x0 + 6, y0 + 14 + 13 * i));
    ctx.restore();
    return;
  }
  const lo = s.yMin ?? 0, hi = s.yMax > lo ? s.yMax : lo + 1;
  ctx.strokeStyle = "#3b82f6";
  ctx.lineWidth = 2;
  ctx.beginPath();
  const n = s.values.length;
  for (let i = 0; i < n; i++) {
    const px = x0 + ((x1 - x0) * i) / (n - 1);
    const py = y1 - ((y1 - y0 - 4) * (s.values[i] - lo)) / (hi - lo);
    i === 0 ? ctx.moveTo(px, py) : ctx.lineTo(px, py);
  }
  ctx.stroke();
  ctx.fillStyle = "#ddd";
  ctx.fillText(s.head ?? "", x0 + 6, y0 + 12);
  ctx.fillStyle = "#888";
  ctx.fillText(s.left ?? "", x0, y1 + 11);
  ctx.fillText(s.right ?? "", x1 - ctx.measureText(s.right ?? "").width, y1 + 11);
  if (s.ticks?.length) {  // a second axis along the bottom edge: [fraction of the width, label]
    ctx.fillStyle = "#777";
    ctx.strokeStyle = "#555";
    ctx.lineWidth = 1;
    for (const [at, label] of s.ticks) {
      const px = x0 + (x1 - x0) * at;
      ctx.beginPath();
      ctx.moveTo(px, y1);
      ctx.lineTo(px, y1 - 4);
      ctx.stroke();
      const w = ctx.measureText(label).width;
      ctx.fillText(label, Math.min(Math.max(px - w / 2, x0 + 2), x1 - w - 2), y1 - 6);
    }
  }
  const text = s.error ?? s.note;
  if (text) {  // an error (red), or who wrote the file and what was assumed for it
    ctx.fillStyle = s.error ? "#f87171" : "#999";
    const lines = wrap(ctx, text, x1 - x0 - 12).slice(0, s.error ? 5 : 3);
    lines.forEach((ln, i) => ctx.fillText(ln, x0 + 6, y0 + 26 + 13 * i));
  }
  ctx.restore();
}

// s: { ranks (per integer t, or null), maxRank, alpha, error, note }: active rank against timestep.
export function drawSchedule(ctx, s, width, y, loud = false, label = "") {
  const n = s?.ranks?.length ?? 0;
  drawSeries(ctx, s?.ranks ? {
    values: [...s.ranks].reverse(), yMax: s.maxRank, note: s.note, error: s.error,
    head: `${label}rank ${s.ranks.at(-1)} → ${s.ranks[0]} of ${s.maxRank}  (schedule exponent ${Number(s.alpha).toFixed(2)})`,
    left: `noise  t=${n}`, right: "t=0  clean",
  } : s, width, y, loud);
}

// The graph as a widget that never enters the prompt; `get(node)` gives what to draw, `draw` how (a rank schedule
// unless told). Call `redraw(node)` whenever what `get` returns changes.
export function graphWidget(node, name, get, draw = drawSchedule) {
  return node.addCustomWidget({
    name,
    type: name,
    value: null,
    serialize: false,
    options: { serialize: false },
    tloraGraph: true,
    draw(ctx, n, width, y) {
      const { schedule, loud, label } = get(n);
      draw(ctx, schedule, width, y, loud, label);
    },
    computeSize(width) {
      return [width, GRAPH_HEIGHT];
    },
  });
}

// Show a node's graphs again after their data changed. The classic editor draws every node on its shared canvas
// each frame it is marked dirty. Nodes 2.0 (Vue nodes) gives a custom widget a canvas of its own and draws it only
// on mount, resize, palette change and `widget.triggerDraw()` (never `onDrawForeground`): without the call the
// graph keeps its first drawing.
export function redraw(node) {
  for (const w of node.widgets ?? []) if (w.tloraGraph) w.triggerDraw?.();
  node.setDirtyCanvas?.(true, true);
}

// A value set as the user would set it: through the widget, so its callbacks run, the workflow is marked
// modified and the change can be undone.
export function setWidget(node, w, value) {
  if (w.value === value) return;
  const canvas = app.canvas;
  if (typeof w.setValue === "function") w.setValue(value, { e: undefined, node, canvas });
  else {
    w.value = value;
    w.callback?.(value, canvas, node);
  }
  node.graph?.change?.();
  app.extensionManager?.workflow?.activeWorkflow?.changeTracker?.checkState?.();
}


// Chain, never replace, a widget's callback.
export function chainCallback(w, fn) {
  if (!w) return;
  const prev = w.callback;
  w.callback = function (...args) {
    const r = prev?.apply(this, args);
    fn();
    return r;
  };
}
