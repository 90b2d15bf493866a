// Live schedule graph on the Load T-LoRA node: active rank vs. timestep, redrawn as the min_rank / alpha /
// max_rank widgets change. The graph widget never enters the prompt.
// The node never rewrites what a saved workflow holds: the sliders are pre-filled from the file only when the
// user picks a file or switches schedule_source to "file", never when a workflow is opened; pre-filled values go
// through the widget (its callbacks, the workflow's modified flag and undo). What the server says about the
// chosen file (wrong family, standard LoRA without the vanilla switch, unreadable) and the error of the last run
// are shown on the node; a run error goes away when the next run starts.
// All of the node's state lives in one object, `node.tlora`.
import { app } from "../../scripts/app.js";
import { api } from "../../scripts/api.js";
import { chainCallback as onChange, graphWidget, redraw, setWidget } from "./tlora_graph.js";
import { resolveSchedule, scheduleRanks } from "./tlora_schedule.js";

const NODE = "TLoRALoader";

function widget(node, name) {
  return node.widgets?.find((w) => w.name === name);
}

function state(node) {
  return (node.tlora ??= { info: null, runError: null, ticket: 0, edits: 0, schedule: null });
}

// The schedule the node will run (tlora_schedule.js `resolveSchedule`, the port of the server's rule).
function currentSchedule(node) {
  const s = state(node);
  return resolveSchedule(s.info?.recorded ?? null, {
    source: widget(node, "schedule_source")?.value,
    maxRank: widget(node, "max_rank")?.value ?? 0,
    minRank: widget(node, "min_rank")?.value ?? 1,
    alpha: widget(node, "alpha")?.value ?? 1,
  });
}

// With schedule_source = file, show the values the file records on the sliders themselves.
function prefillFromFile(node) {
  const rec = state(node).info?.recorded;
  if (!rec || widget(node, "schedule_source")?.value !== "file") return;
  for (const name of ["min_rank", "alpha"]) {
    const w = widget(node, name);
    if (w && rec[name] && rec[name].source !== "default") setWidget(node, w, rec[name].value);
  }
}

function refresh(node) {
  const s = state(node);
  const sch = currentSchedule(node);
  let ranks = null;
  let error = s.info?.error ?? s.runError ?? null;
  if (sch.error) error = error ?? (sch.error === "no file rank" ? "select a T-LoRA file (or set max_rank)" : sch.error);
  else {
    try {
      ranks = scheduleRanks(sch.maxRank, Math.min(sch.minRank, sch.maxRank), sch.alpha, s.info?.curve ?? "power");
      if (sch.minRank > sch.maxRank) error = error ?? `min_rank ${sch.minRank} > max_rank ${sch.maxRank}`;
    } catch (e) {
      error = error ?? e.message;
    }
  }
  const w = s.info?.writer;
  const note = w ? `${w.title}${w.assumed ? `: ${w.assumed}` : ""}` : null;
  s.schedule = { maxRank: sch.maxRank ?? null, minRank: sch.minRank ?? null, alpha: sch.alpha ?? null, ranks, error, note };
  redraw(node);
}

// The server's answer as JSON, or a readable error for anything else (an HTML error page, a proxy's reply).
async function readReply(res) {
  const type = res.headers.get("content-type") ?? "";
  if (type.includes("application/json")) {
    const body = await res.json();
    return res.ok ? body : { error: body.error ?? `HTTP ${res.status}` };
  }
  const text = (await res.text()).replace(/<[^>]*>/g, " ").replace(/\s+/g, " ").trim();
  return { error: `the server answered HTTP ${res.status} ${res.statusText}${text ? `: ${text.slice(0, 160)}` : ""}` };
}

// Ask the server about the chosen file. `prefill`: only when the user picked it, never on opening a workflow.
// A newer request supersedes an older one still in flight (its answer would be for another file).
async function fetchInfo(node, prefill = false) {
  const s = state(node);
  const name = widget(node, "lora_name")?.value;
  const ticket = ++s.ticket;
  const edits = s.edits;
  let info = null;
  if (name) {
    try {
      const vanilla = widget(node, "vanilla_tlora")?.value ? "true" : "false";
      const layout = encodeURIComponent(widget(node, "standard_layout")?.value ?? "auto");
      info = await readReply(
        await api.fetchApi(
          `/tlora/info?lora_name=${encodeURIComponent(name)}&vanilla_tlora=${vanilla}&standard_layout=${layout}`,
        ),
      );
    } catch (e) {
      info = { error: String(e) };
    }
  }
  if (ticket !== s.ticket) return;
  s.info = info;
  // a slider the user moved while the answer was on its way stays as the user set it
  if (prefill && edits === s.edits) prefillFromFile(node);
  refresh(node);
}

// The node an execution id names: "12" in the root graph, "12:5" node 5 inside the subgraph of node 12, ...
function nodeForExecutionId(id) {
  const parts = String(id ?? "").split(":");
  let graph = app.rootGraph ?? app.graph;
  let node = null;
  for (const [i, part] of parts.entries()) {
    node = graph?.getNodeById?.(part) ?? graph?.getNodeById?.(Number(part)) ?? null;
    if (!node) return null;
    if (i < parts.length - 1) graph = node.subgraph;
  }
  return node;
}

// Every Load T-LoRA node, in the root graph and in subgraphs.
function loaderNodes() {
  const out = [];
  const seen = new Set();
  const visit = (graph) => {
    if (!graph || seen.has(graph)) return;
    seen.add(graph);
    for (const n of graph._nodes ?? graph.nodes ?? []) {
      if (n.comfyClass === NODE) out.push(n);
      if (n.subgraph) visit(n.subgraph);
    }
    for (const sg of graph.subgraphs?.values?.() ?? []) visit(sg);
  };
  visit(app.rootGraph ?? app.graph);
  return out;
}

// An error the server raised while running a Load T-LoRA node (another model family, a bad schedule, ...) is
// shown on that node until the next run starts.
function showRunError({ detail }) {
  const node = nodeForExecutionId(detail?.node_id);
  if (node?.comfyClass !== NODE) return;
  state(node).runError = detail.exception_message;
  refresh(node);
}

// A run starting also asks again about a file the server could not read: it may have been fixed on disk since.
function clearRunErrors() {
  for (const node of loaderNodes()) {
    if (state(node).info?.error) fetchInfo(node);
    if (state(node).runError == null) continue;
    state(node).runError = null;
    refresh(node);
  }
}

app.registerExtension({
  name: "comfyui-tlora.loader",
  setup() {
    api.addEventListener("execution_error", showRunError);
    api.addEventListener("execution_start", clearRunErrors);
  },
  async nodeCreated(node) {
    if (node.comfyClass !== NODE) return;
    state(node);
    graphWidget(node, "tlora_schedule_graph", (n) => {
      const st = state(n);
      return { schedule: st.schedule, loud: !!(st.info?.error || st.runError) };
    });
    for (const name of ["min_rank", "alpha", "max_rank", "strength_model", "timestep_mode"]) {
      onChange(widget(node, name), () => {
        state(node).edits++;
        refresh(node);
      });
    }
    onChange(widget(node, "schedule_source"), () => {
      prefillFromFile(node);
      refresh(node);
    });
    for (const name of ["lora_name", "vanilla_tlora", "standard_layout"]) {
      onChange(widget(node, name), () => fetchInfo(node, true));
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
