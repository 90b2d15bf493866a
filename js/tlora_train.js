// Train T-LoRA in the graph editor: the schedule it trains with, drawn live from rank / min_rank / alpha (the
// schedule exponent), and presets that are only a way to fill widgets: choosing one writes its values into the
// widgets it names (through the widgets: undo works), and editing one of those values afterwards turns the preset to
// "custom", so the node always shows what trains (the server trains the widgets' values). Opening a saved workflow
// changes nothing: neither its values nor its preset. The presets come from the server (/tlora/train_presets).
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { chainCallback as chain, graphWidget, redraw, setWidget } from "./tlora_graph.js";
import { scheduleRanks } from "./tlora_schedule.js";

const NODE = "TLoRATrain";
const CUSTOM = "custom";
// the widgets a preset sets (the server's PRESET_VALUES keys)
const PRESET_WIDGETS = ["steps", "learning_rate", "rank", "min_rank", "alpha", "linear_alpha", "targets", "init",
  "optimizer", "lr_schedule"];
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

function state(node) {
  return (node.tloraTrain ??= { schedule: null, applying: false });
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
  state(node).schedule = schedule;
  redraw(node);
}

// A number widget may hold 0.00010000000000000002 for the preset's 1e-4.
function same(a, b) {
  if (typeof a === "number" && typeof b === "number") return Math.abs(a - b) <= 1e-6 * Math.max(Math.abs(a), Math.abs(b));
  return a === b;
}

// The preset the user chose, written into the widgets it names.
async function applyPreset(node) {
  const name = widget(node, "preset")?.value;
  const values = (await loadPresets())[name];
  if (values) {
    const s = state(node);
    s.applying = true;
    try {
      for (const [key, value] of Object.entries(values)) {
        const w = widget(node, key);
        if (w) setWidget(node, w, value);
      }
    } finally {
      s.applying = false;
    }
  }
  refresh(node);
}

// A value the user edited: if it is no longer the chosen preset's, the preset becomes "custom".
async function edited(node, name) {
  if (state(node).applying || app.configuringGraph) return;
  const preset = widget(node, "preset");
  const values = (await loadPresets())[preset?.value];
  const w = widget(node, name);
  if (values && name in values && w && !same(w.value, values[name])) setWidget(node, preset, CUSTOM);
}

app.registerExtension({
  name: "comfyui-tlora.train",
  async nodeCreated(node) {
    if (node.comfyClass !== NODE) return;
    state(node);
    graphWidget(node, "tlora_train_schedule", (n) => ({ schedule: state(n).schedule, label: "training: " }));
    for (const name of PRESET_WIDGETS) {
      chain(widget(node, name), () => {
        refresh(node);
        edited(node, name);
      });
    }
    chain(widget(node, "preset"), () => {
      if (!state(node).applying && !app.configuringGraph) applyPreset(node);
    });
    // opening a saved workflow restores the widgets after creation: draw them, rewrite nothing
    const configured = node.onConfigure;
    node.onConfigure = function (...args) {
      const r = configured?.apply(this, args);
      refresh(node);
      return r;
    };
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    refresh(node);
    loadPresets();
  },
});
