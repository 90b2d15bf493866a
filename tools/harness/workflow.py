"""UI-format workflow -> API prompt, driven by the server's /object_info, and tiny-model substitution.

The browser tier checks this converter against the real frontend's `app.graphToPrompt()` on every
committed workflow, so the server tests can run the same workflows without a browser.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UI_ONLY_NODES = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
SEED_NAMES = {"seed", "noise_seed"}


def _is_widget(spec) -> bool:
    kind = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(kind, list) or kind in WIDGET_TYPES


def _has_control(name: str, spec) -> bool:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "control_after_generate" in opts:
        return bool(opts["control_after_generate"])
    return spec[0] == "INT" and name in SEED_NAMES


def _default(spec) -> object:
    """A widget's default as the frontend fills it (a combo's first option when it names none)."""
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    choices = spec[0] if isinstance(spec[0], list) else opts.get("options")
    return choices[0] if choices else None


def to_api(workflow: dict, object_info: dict) -> dict:
    """Convert a saved (UI) workflow to the API prompt the frontend would queue."""
    links = {lk[0]: lk for lk in workflow.get("links", [])}  # id -> [id, from, from_slot, to, to_slot, type]
    prompt = {}
    for node in workflow["nodes"]:
        ntype = node["type"]
        if ntype in UI_ONLY_NODES or node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        info = object_info.get(ntype)
        if info is None:
            raise KeyError(f"workflow node {node['id']} has unknown type {ntype!r}")
        linked = {}
        for inp in node.get("inputs", []):
            if inp.get("link") is not None:
                lk = links[inp["link"]]
                linked[inp["name"]] = [str(lk[1]), lk[2]]
        values = list(node.get("widgets_values", []) or [])
        if isinstance(node.get("widgets_values"), dict):
            raise ValueError(f"node {node['id']} ({ntype}) stores widgets as a dict; not supported")
        inputs = {}
        order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
        for section in ("required", "optional"):
            for name in order.get(section, []):
                spec = info["input"][section][name]
                if name in linked:
                    inputs[name] = linked[name]
                    if _is_widget(spec):  # a widget converted to an input keeps its value slot
                        values.pop(0) if values else None
                        if _has_control(name, spec) and values:
                            values.pop(0)
                    continue
                if not _is_widget(spec):
                    continue
                if not values:
                    if section == "optional":  # saved before the widget existed: the frontend gives its default
                        default = _default(spec)
                        if default is not None:
                            inputs[name] = default
                        continue
                    raise ValueError(f"node {node['id']} ({ntype}): no widget value left for {name!r}")
                inputs[name] = values.pop(0)
                if _has_control(name, spec) and values:
                    values.pop(0)  # the frontend's control_after_generate value
        prompt[str(node["id"])] = {"class_type": ntype, "inputs": inputs, "_meta": {"title": node.get("title", ntype)}}
    return prompt


def load(path: str | Path) -> dict:
    return json.loads(Path(path).read_text())


def substitute_tiny(prompt: dict, files: dict, conditioning: dict, overrides: dict | None = None) -> dict:
    """Point a prompt at tiny test models.

    files: {"unet": name, "vae": name, "lora": {original: tiny} or name}
    conditioning: TLoRADevConditioning inputs for this model family (tokens, context_dim, pooled_dim).
    CheckpointLoaderSimple becomes UNETLoader + VAELoader; CLIPTextEncode becomes seeded conditioning;
    CLIP loaders are dropped together with the optional clip inputs that used them.
    overrides: {class_type: {input: value}} applied last (smaller latents, fewer steps).
    """
    p = copy.deepcopy(prompt)
    rewire = {}
    dropped = set()
    for nid, node in list(p.items()):
        ct = node["class_type"]
        if ct == "CheckpointLoaderSimple":
            p[nid] = {"class_type": "UNETLoader", "inputs": {"unet_name": files["unet"], "weight_dtype": "default"}}
            vae_id = f"{nid}9000"
            p[vae_id] = {"class_type": "VAELoader", "inputs": {"vae_name": files["vae"]}}
            rewire[(nid, 2)] = [vae_id, 0]
            dropped.add((nid, 1))
        elif ct == "UNETLoader":
            node["inputs"]["unet_name"] = files["unet"]
        elif ct == "VAELoader":
            node["inputs"]["vae_name"] = files["vae"]
        elif ct in ("CLIPLoader", "DualCLIPLoader", "TripleCLIPLoader"):
            del p[nid]
            dropped.add((nid, 0))
    for nid, node in list(p.items()):
        ct = node["class_type"]
        if ct == "CLIPTextEncode":
            text = node["inputs"].get("text", "")
            if isinstance(text, list):  # captions from another node (a dataset): one conditioning per text
                p[nid] = {"class_type": "TLoRADevCaptionConditioning",
                          "inputs": {"seed": 0, "text": text, **conditioning}}
                continue
            seed = sum(map(ord, str(text))) % 100000
            p[nid] = {"class_type": "TLoRADevConditioning", "inputs": {"seed": seed, **conditioning}}
        elif ct in ("TLoRALoader", "TLoRAScheduledLoRA", "LoraLoader", "LoraLoaderModelOnly"):
            lora = files["lora"]
            cur = node["inputs"].get("lora_name")
            node["inputs"]["lora_name"] = lora.get(cur, next(iter(lora.values()))) if isinstance(lora, dict) else lora
    for node in p.values():
        for k, v in list(node["inputs"].items()):
            if isinstance(v, list) and len(v) == 2:
                ref = (str(v[0]), v[1])
                if ref in rewire:
                    node["inputs"][k] = rewire[ref]
                elif ref in dropped or (str(v[0]) not in p):
                    del node["inputs"][k]
    for node in p.values():
        node["inputs"].update((overrides or {}).get(node["class_type"], {}))
    return p
