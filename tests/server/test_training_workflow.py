"""The training example workflow over HTTP on a real ComfyUI, on the tiny SDXL: a dataset of one captioned image,
Train T-LoRA with a preview prompt, the loss and noise-band graphs, the preview grid and the trained model sampled;
then the node's refusals, over the server."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open

from tests.conftest import ROOT
from tools.harness import workflow
from tools.harness.server import error_message

WF = ROOT / "example_workflows" / "tlora_train_single_image.json"
SDXL_COND = {"tokens": 8, "context_dim": 2048, "pooled_dim": 1280}
SIZE = 64


def _prompt(server, tiny, **train):
    """The example workflow on the tiny models, 64 px, a few steps; `train` overrides Train T-LoRA's inputs. Its
    dataset (input/sks_dog): one image with its caption, as ComfyUI's dataset loader reads it."""
    folder = Path(server.base) / "input" / "sks_dog"
    if not folder.exists():
        folder.mkdir(parents=True)
        rng = np.random.default_rng(0)
        Image.fromarray((rng.random((SIZE, SIZE, 3)) * 255).astype(np.uint8)).save(folder / "subject.png")
        (folder / "subject.txt").write_text("a photo of sks dog")
    info = server.get("/object_info")
    files = {"unet": Path(tiny["sdxl"]["comfy_file"]).name, "vae": Path(tiny["vae"]["vae_4ch"]).name, "lora": ""}
    overrides = {"EmptyLatentImage": {"width": SIZE, "height": SIZE}, "KSampler": {"steps": 3},
                 "TLoRATrain": {"preset": "custom", "steps": 6, "rank": 4, "min_rank": 2, "learning_rate": 1e-2,
                                "filename": "trained/e2e", "overwrite": True, "preview_steps": 2, **train}}
    return workflow.substitute_tiny(workflow.to_api(workflow.load(WF), info), files, SDXL_COND, overrides)


def test_the_training_example_runs_over_http(server, tiny):
    entry = server.run(_prompt(server, tiny), timeout=900)
    outputs = entry["outputs"]
    train_id = next(k for k, v in _prompt(server, tiny).items() if v["class_type"] == "TLoRATrain")
    text = outputs[train_id]["text"][0]
    assert text.startswith("trained/e2e.safetensors: 6 steps"), text
    path = Path(server.base) / "models" / "loras" / "trained" / "e2e.safetensors"
    with safe_open(str(path), "pt") as f:
        meta = f.metadata()
        keys = list(f.keys())
    cfg = json.loads(meta["lycoris_config"])
    assert (cfg["algo"], cfg["linear_dim"], cfg["tlora_min_rank"]) == ("tlora", 4, 2)
    assert any(k.endswith(".base_q") for k in keys) and any(k.endswith(".q_layer.weight") for k in keys)
    assert (path.parent / "e2e.lycoris_config.json").is_file()
    images = server.images(entry)
    # the loss graph, the loss per noise band, the preview grid (its one row: the last step) saved and shown on Train
    # T-LoRA itself, the trained model's image; the group that samples a picked checkpoint is bypassed until its
    # file exists
    assert len(images) == 5, len(images)
    assert (path.parent / "e2e.preview.png").is_file()
    body = server.get("/tlora/info?lora_name=trained/e2e.safetensors")
    assert body["rank"] == 4 and body["recorded"]["min_rank"]["value"] == 2 and body["stored_base"]


def test_the_node_refuses_bad_inputs_before_any_work(server, tiny):
    taken = Path(server.base) / "models" / "loras" / "trained" / "taken.safetensors"
    taken.parent.mkdir(exist_ok=True)
    taken.write_bytes(b"someone else's file")
    for train, says in (({"filename": "../outside"}, "inside models/loras"),
                        ({"filename": "trained/taken", "overwrite": False}, "exists"),
                        ({"min_rank": 9}, "min_rank")):
        prompt = _prompt(server, tiny, **train)
        entry = server.run(prompt, expect_error=True)
        msg = error_message(entry)
        assert msg.startswith("TLoRATrain:") and says in msg, msg
    assert taken.read_bytes() == b"someone else's file"
    assert not (Path(server.base) / "models" / "outside.safetensors").exists()
    assert "system" in server.get("/system_stats")


def test_presets_are_served_for_the_node(server):
    presets = server.get("/tlora/train_presets")
    assert presets["paper, single image"]["min_rank"] == 32 and presets["SimpleTuner"]["linear_alpha"] == 32


def test_the_node_previews_while_it_trains_over_http(server, tiny):
    """Previews every 3 of 6 steps over a real server: preview images reach the websocket client while the node runs
    (ComfyUI's progress preview), the PREVIEWS output (shown by a Preview Image node) is the grid of 2 rows, the
    LOSS_BANDS output is an image, and each step's previews lie beside its file."""
    import io

    import websocket

    prompt = _prompt(server, tiny, filename="trained/previewed", preview_every=3, preview_steps=2, preview_cfg=2.0,
                     preview_seed=1)
    train_id = next(k for k, v in prompt.items() if v["class_type"] == "TLoRATrain")
    node = prompt[train_id]["inputs"]
    vae = next(k for k, v in prompt.items() if v["class_type"] == "VAELoader")
    node.update(vae=[vae, 0], preview_prompts=node["positive"])
    prompt["9901"] = {"class_type": "PreviewImage", "inputs": {"images": [train_id, 3]}}
    prompt["9902"] = {"class_type": "PreviewImage", "inputs": {"images": [train_id, 4]}}
    ws = websocket.create_connection(f"ws://127.0.0.1:{server.port}/ws?clientId={server.client_id}", timeout=300)
    previews, executing = [], None
    try:
        prompt_id = server.queue(prompt)
        while True:
            msg = ws.recv()
            if isinstance(msg, bytes):
                kind = int.from_bytes(msg[:4], "big")
                if kind == 4:  # PREVIEW_IMAGE_WITH_METADATA: length, metadata JSON, image
                    n = int.from_bytes(msg[4:8], "big")
                    meta, image = json.loads(msg[8:8 + n]), msg[8 + n:]
                    previews.append((meta.get("node_id"), image))
                elif kind == 1:  # PREVIEW_IMAGE: format, image (sent while a node is executing)
                    previews.append((executing, msg[8:]))
                continue
            m = json.loads(msg)
            data = m.get("data", {})
            if m["type"] == "executing":
                executing = data.get("node")
                if executing is None and data.get("prompt_id") == prompt_id:
                    break
            assert m["type"] != "execution_error", data
    finally:
        ws.close()
    entry = server.wait(prompt_id)
    assert [n for n, _ in previews] == [train_id, train_id], [n for n, _ in previews]
    first, last = (Image.open(io.BytesIO(b)).size for b in (previews[0][1], previews[-1][1]))
    grid = entry["outputs"]["9901"]["images"]
    assert len(grid) == 1 and len(entry["outputs"]["9902"]["images"]) == 1
    shown = Image.open(io.BytesIO(server.images({"outputs": {"9901": entry["outputs"]["9901"]}})[0])).size
    assert shown[0] == SIZE and shown[1] > 2 * SIZE  # 2 rows (each under its step's label) of 1 prompt
    # the node shows the grid so far, scaled by ComfyUI to its preview size: one row, then both
    assert abs(first[1] / first[0] - shown[1] / shown[0] / 2) < 0.02, (first, shown)
    assert abs(last[1] / last[0] - shown[1] / shown[0]) < 0.02, (last, shown)
    folder = Path(server.base) / "models" / "loras" / "trained"
    assert (folder / "previewed_step3.preview.png").is_file() and (folder / "previewed.preview.png").is_file()
    assert "previews at 2 steps" in entry["outputs"][train_id]["text"][0]
    assert len(entry["outputs"][train_id]["images"]) == 1  # the grid stays on the node once it has run
