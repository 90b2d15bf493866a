// Live schedule graph on the Load T-LoRA node: active rank vs. timestep, redrawn as the
// min_rank / alpha / max_rank widgets change. The graph widget never enters the prompt.
// The node never rewrites what a saved workflow holds: the sliders are pre-filled from the file only when the
// user picks a file or switches schedule_source to "file", never when a workflow is opened. The server's own
// error for the chosen file (wrong family, standard LoRA without the vanilla switch, unreadable) is shown on
// the node.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { scheduleRanks } from "./tlora_schedule.js";

const NODE = "TLoRALoader";
const GRAPH_HEIGHT = 120;

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

// Chain, never replace, a widget's callback.
function onChange(w, fn) {
  if (!w) return;
  const prev = w.callback;
  w.callback = function (...args) {
    const r = prev?.apply(this, args);
    fn();
    return r;
  };
}

// A change of any input clears the error of the last run (it was about the old settings).
function changed(node, fn) {
  return () => {
    node.tloraRunError = null;
    fn();
  };
}

// The schedule the node will run: file rank when max_rank is 0, file values when schedule_source = file.
function currentSchedule(node) {
  const info = node.tloraInfo;
  const maxW = widget(node, "max_rank")?.value ?? 0;
  const maxRank = maxW > 0 ? maxW : info?.rank ?? null;
  let minRank = widget(node, "min_rank")?.value ?? 1;
  let alpha = widget(node, "alpha")?.value ?? 1;
  const source = widget(node, "schedule_source")?.value;
  if (source === "all_ranks" && maxRank != null) return { maxRank, minRank: maxRank, alpha: 1 };
  if (source === "file" && info?.recorded) {
    if (info.recorded.min_rank?.source !== "default") minRank = info.recorded.min_rank.value;
    if (info.recorded.alpha?.source !== "default") alpha = info.recorded.alpha.value;
  }
  return { maxRank, minRank, alpha };
}

// With schedule_source = file, show the values the file records on the sliders themselves.
function prefillFromFile(node) {
  const rec = node.tloraInfo?.recorded;
  if (!rec || widget(node, "schedule_source")?.value !== "file") return;
  for (const name of ["min_rank", "alpha"]) {
    const w = widget(node, name);
    if (w && rec[name] && rec[name].source !== "default") w.value = rec[name].value;
  }
}

function refresh(node) {
  const s = currentSchedule(node);
  let ranks = null;
  let error = node.tloraInfo?.error ?? node.tloraRunError ?? null;
  if (s.maxRank == null) error = error ?? "select a T-LoRA file (or set max_rank)";
  else {
    try {
      ranks = scheduleRanks(s.maxRank, Math.min(s.minRank, s.maxRank), s.alpha);
      if (s.minRank > s.maxRank) error = error ?? `min_rank ${s.minRank} > max_rank ${s.maxRank}`;
    } catch (e) {
      error = error ?? e.message;
    }
  }
  node.tloraSchedule = { ...s, ranks, error };
  node.setDirtyCanvas(true, true);
}

// Ask the server about the chosen file. `prefill`: only when the user picked it, never on opening a workflow.
// A newer request supersedes an older one still in flight (its answer would be for another file).
async function fetchInfo(node, prefill = false) {
  const name = widget(node, "lora_name")?.value;
  const ticket = (node.tloraTicket = (node.tloraTicket ?? 0) + 1);
  const edits = node.tloraEdits ?? 0;
  let info = null;
  if (name) {
    try {
      const vanilla = widget(node, "vanilla_tlora")?.value ? "true" : "false";
      const res = await api.fetchApi(`/tlora/info?lora_name=${encodeURIComponent(name)}&vanilla_tlora=${vanilla}`);
      const body = await res.json();
      info = res.ok ? body : { error: body.error ?? `HTTP ${res.status}` };
    } catch (e) {
      info = { error: String(e) };
    }
  }
  if (ticket !== node.tloraTicket) return;
  node.tloraInfo = info;
  // a slider the user moved while the answer was on its way stays as the user set it
  if (prefill && edits === (node.tloraEdits ?? 0)) prefillFromFile(node);
  refresh(node);
}

// Lines of at most `width` pixels.
function wrap(ctx, text, width) {
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

function drawGraph(ctx, node, width, y) {
  const s = node.tloraSchedule;
  const pad = 10;
  const x0 = pad, x1 = width - pad, y0 = y + 4, y1 = y + GRAPH_HEIGHT - 14;
  ctx.save();
  ctx.fillStyle = "#1e1e24";
  ctx.fillRect(x0, y0, x1 - x0, y1 - y0);
  ctx.font = "10px sans-serif";
  ctx.fillStyle = "#aaa";
  if (!s || !s.ranks) {
    ctx.fillStyle = s?.error && node.tloraInfo?.error ? "#f87171" : "#aaa";
    const lines = wrap(ctx, s?.error ?? "…", x1 - x0 - 12).slice(0, 7);
    lines.forEach((ln, i) => ctx.fillText(ln, x0 + 6, y0 + 14 + 13 * i));
    ctx.restore();
    return;
  }
  // t runs from 1000 (noise, left) to 0 (clean, right), like sampling.
  ctx.strokeStyle = "#3b82f6";
  ctx.lineWidth = 2;
  ctx.beginPath();
  const n = s.ranks.length;
  for (let i = 0; i < n; i++) {
    const t = n - 1 - i;
    const px = x0 + ((x1 - x0) * i) / (n - 1);
    const py = y1 - ((y1 - y0 - 4) * s.ranks[t]) / s.maxRank;
    i === 0 ? ctx.moveTo(px, py) : ctx.lineTo(px, py);
  }
  ctx.stroke();
  ctx.fillStyle = "#ddd";
  ctx.fillText(`rank ${s.ranks[999]} → ${s.ranks[0]} of ${s.maxRank}  (alpha ${Number(s.alpha).toFixed(2)})`, x0 + 6, y0 + 12);
  ctx.fillStyle = "#888";
  ctx.fillText("noise  t=1000", x0, y1 + 11);
  ctx.fillText("t=0  clean", x1 - 52, y1 + 11);
  if (s.error) {
    ctx.fillStyle = "#f87171";
    const lines = wrap(ctx, s.error, x1 - x0 - 12).slice(0, 5);
    lines.forEach((ln, i) => ctx.fillText(ln, x0 + 6, y0 + 26 + 13 * i));
  }
  ctx.restore();
}

// An error the server raised while running a Load T-LoRA node (another model family, a bad schedule, ...) is
// shown on that node until its file or settings change.
function showRunError({ detail }) {
  const node = app.graph?.getNodeById?.(detail?.node_id);
  if (node?.comfyClass !== NODE) return;
  node.tloraRunError = detail.exception_message;
  refresh(node);
}

app.registerExtension({
  name: "comfyui-tlora.loader",
  setup() {
    api.addEventListener("execution_error", showRunError);
  },
  async nodeCreated(node) {
    if (node.comfyClass !== NODE) return;
    node.addCustomWidget({
      name: "tlora_schedule_graph",
      type: "tlora_schedule_graph",
      value: null,
      serialize: false,
      options: { serialize: false },
      draw(ctx, n, width, y) {
        drawGraph(ctx, n, width, y);
      },
      computeSize(width) {
        return [width, GRAPH_HEIGHT];
      },
    });
    for (const name of ["min_rank", "alpha", "max_rank", "strength_model", "timestep_mode"]) {
      onChange(widget(node, name), changed(node, () => {
        node.tloraEdits = (node.tloraEdits ?? 0) + 1;
        refresh(node);
      }));
    }
    onChange(widget(node, "schedule_source"), changed(node, () => {
      prefillFromFile(node);
      refresh(node);
    }));
    for (const name of ["lora_name", "vanilla_tlora"]) {
      onChange(widget(node, name), changed(node, () => fetchInfo(node, true)));
    }
    // opening a saved workflow restores the widgets after creation: show that file, change nothing
    const configured = node.onConfigure;
    node.onConfigure = function (...args) {
      const r = configured?.apply(this, args);
      fetchInfo(node);
      return r;
    };
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    fetchInfo(node);
  },
});
