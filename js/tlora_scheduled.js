// Load LoRA (timestep schedule) in the graph editor: its strength curve against the sampling's progress, drawn
// live from the schedule widgets with the port of the server's rule (tlora_strength.js), labelled with the sigmas
// of the sampling, and any error the server raised for the node on its last run.
// The labels: when the node runs, its output carries the sigmas of the model it was given (a first guess: a
// ModelSampling node placed after it changes them); every sampling run with its LoRA then sends the sigmas of the
// sampling that runs ("tlora.sigma_ticks", nodes/scheduled.py), after the node's own (or cached) output.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { chainCallback as chain, drawSeries, graphWidget, redraw } from "./tlora_graph.js";
import { strengthCurve } from "./tlora_strength.js";

const NODE = "TLoRAScheduledLoRA";
const TICKS_EVENT = "tlora.sigma_ticks";
const INPUTS = ["strength_model", "start_percent", "end_percent", "strength_start", "strength_end", "curve",
  "keyframes"];

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function state(node) {
  return (node.tloraScheduled ??= { curve: null, runError: null, sigmaTicks: null });
}

// the graph node of a server node id (its last part for a node inside a subgraph)
function nodeOf(id) {
  return app.graph?.getNodeById?.(Number(String(id ?? "").split(":").at(-1)));
}

function setTicks(node, ticks) {  // [[percent, sigma], ...] at 0, 25, 50, 75, 100 %
  if (!Array.isArray(ticks) || !ticks.length) return;
  state(node).sigmaTicks = ticks;
  refresh(node);
}

function refresh(node) {
  const v = Object.fromEntries(INPUTS.map((n) => [n, widget(node, n)?.value]));
  const c = strengthCurve({
    start: v.start_percent ?? 0, end: v.end_percent ?? 1, strengthStart: v.strength_start ?? 1,
    strengthEnd: v.strength_end ?? 1, shape: v.curve ?? "linear", keyframesText: v.keyframes ?? "",
  });
  const st = state(node);
  const k = v.strength_model ?? 1;
  if (c.error) st.curve = { error: c.error };
  else {
    const values = c.values.map((x) => x * k);
    const lo = Math.min(0, ...values), hi = Math.max(0, ...values);
    st.curve = { values, yMin: lo, yMax: hi, error: st.runError,
      head: `strength ${values[0].toFixed(2)} → ${values.at(-1).toFixed(2)}  (peak ${hi.toFixed(2)})`,
      left: "noise  0%", right: "100%  clean",
      ticks: st.sigmaTicks?.map(([p, sigma]) => [p, `σ ${Number(sigma).toPrecision(3)}`]) };
  }
  redraw(node);
}

app.registerExtension({
  name: "comfyui-tlora.scheduled",
  setup() {
    api.addEventListener("execution_error", ({ detail }) => {
      const node = nodeOf(detail?.node_id);
      if (node?.comfyClass !== NODE) return;
      state(node).runError = detail.exception_message;
      refresh(node);
    });
    api.addEventListener(TICKS_EVENT, ({ detail }) => {
      const node = nodeOf(detail?.node);
      if (node?.comfyClass === NODE) setTicks(node, detail.ticks);
    });
    api.addEventListener("execution_start", () => {
      for (const node of app.graph?._nodes ?? []) {
        if (node.comfyClass === NODE && state(node).runError != null) {
          state(node).runError = null;
          refresh(node);
        }
      }
    });
  },
  async nodeCreated(node) {
    if (node.comfyClass !== NODE) return;
    graphWidget(node, "tlora_strength_graph", (n) => ({ schedule: state(n).curve, loud: !!state(n).runError }),
      drawSeries);
    for (const name of INPUTS) chain(widget(node, name), () => refresh(node));
    const executed = node.onExecuted;
    node.onExecuted = function (output) {  // the first guess: the sampling of the model the node was given
      const r = executed?.apply(this, arguments);
      setTicks(node, output?.tlora_sigma_ticks);
      return r;
    };
    const configured = node.onConfigure;
    node.onConfigure = function (...args) {
      const r = configured?.apply(this, args);
      refresh(node);
      return r;
    };
    const size = node.computeSize();
    node.setSize([Math.max(node.size[0], size[0]), Math.max(node.size[1], size[1])]);
    refresh(node);
  },
});
