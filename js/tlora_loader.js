// Live schedule graph on the Load T-LoRA node: active rank vs. timestep, redrawn as the
// min_rank / alpha / max_rank widgets change. The graph widget never enters the prompt.
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
  let error = null;
  if (s.maxRank == null) error = "select a T-LoRA file (or set max_rank)";
  else {
    try {
      ranks = scheduleRanks(s.maxRank, Math.min(s.minRank, s.maxRank), s.alpha);
      if (s.minRank > s.maxRank) error = `min_rank ${s.minRank} > max_rank ${s.maxRank}`;
    } catch (e) {
      error = e.message;
    }
  }
  node.tloraSchedule = { ...s, ranks, error };
  node.setDirtyCanvas(true, true);
}

async function fetchInfo(node) {
  const name = widget(node, "lora_name")?.value;
  node.tloraInfo = null;
  if (name) {
    try {
      const vanilla = widget(node, "vanilla_tlora")?.value ? "true" : "false";
      const res = await api.fetchApi(`/tlora/info?lora_name=${encodeURIComponent(name)}&vanilla_tlora=${vanilla}`);
      const body = await res.json();
      node.tloraInfo = res.ok ? body : { error: body.error };
      prefillFromFile(node);
    } catch (e) {
      node.tloraInfo = { error: String(e) };
    }
  }
  refresh(node);
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
    ctx.fillText(s?.error ?? "…", x0 + 6, y0 + 16);
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
    ctx.fillText(s.error, x0 + 6, y0 + 26);
  }
  ctx.restore();
}

app.registerExtension({
  name: "comfyui-tlora.loader",
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
    for (const name of ["min_rank", "alpha", "max_rank"]) onChange(widget(node, name), () => refresh(node));
    onChange(widget(node, "schedule_source"), () => {
      prefillFromFile(node);
      refresh(node);
    });
    for (const name of ["lora_name", "vanilla_tlora"]) onChange(widget(node, name), () => fetchInfo(node));
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    fetchInfo(node);
  },
});
