// Train T-LoRA in the graph editor: the schedule it trains with, drawn live from rank / min_rank / alpha (or the
// chosen preset's values), and a preset choice that fills the widgets it sets (through the widgets: undo works).
// The presets come from the server (/tlora/train_presets), where they are defined.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { chainCallback as chain, graphWidget, redraw, setWidget } from "./tlora_graph.js";
import { scheduleRanks } from "./tlora_schedule.js";

const NODE = "TLoRATrain";
let presets = null;

async function loadPresets() {
  if (presets) return presets;
  try {
    const res = await api.fetchApi("/tlora/train_presets");
    presets = res.ok && (res.headers.get("content-type") ?? "").includes("application/json") ? await res.json() : {};
  } catch {
    presets = {};
  }
  return presets;
}

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function refresh(node) {
  const rank = widget(node, "rank")?.value ?? 64;
  const minRank = widget(node, "min_rank")?.value ?? 1;
  const alpha = widget(node, "alpha")?.value ?? 1;
  let schedule;
  try {
    schedule = { ranks: scheduleRanks(rank, minRank, alpha), maxRank: rank, alpha, error: null };
  } catch (e) {
    schedule = { ranks: null, error: `min_rank ${minRank} > rank ${rank}: ${e.message}` };
  }
  node.tloraTrain = { schedule };
  redraw(node);
}

// The preset's values shown on the widgets it replaces (the server applies the preset whatever the widgets say).
async function applyPreset(node) {
  const name = widget(node, "preset")?.value;
  const values = (await loadPresets())[name];
  if (!values) return refresh(node);
  for (const [key, value] of Object.entries(values)) {
    const w = widget(node, key);
    if (w) setWidget(node, w, value);
  }
  refresh(node);
}

app.registerExtension({
  name: "comfyui-tlora.train",
  async nodeCreated(node) {
    if (node.comfyClass !== NODE) return;
    graphWidget(node, "tlora_train_schedule", (n) => ({ schedule: n.tloraTrain?.schedule, label: "training: " }));
    for (const name of ["rank", "min_rank", "alpha"]) chain(widget(node, name), () => refresh(node));
    chain(widget(node, "preset"), () => applyPreset(node));
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    refresh(node);
  },
});
