"""ComfyUI's own dataset nodes into Train T-LoRA over HTTP on a real ComfyUI (tiny SD1.5): a folder of three PNGs
at two sizes with .txt captions -> Load Image and Text Dataset from Folder -> VAE Encode (the tiny VAE) and a seeded
conditioning per caption (the tiny models have no text encoder) -> Train T-LoRA, directly and, where the host has it
(0.33), through Resolution Bucket. 0.3.75 has the folder loader but no Resolution Bucket."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
from PIL import Image
from safetensors import safe_open

from tools.harness.server import host_version
from tools.harness.workflow import _default, _is_widget

FOLDER = "tlora_dataset"
IMAGES = {"a.png": (64, 64, "a photo of sks dog on grass"), "b.png": (64, 64, "a photo of sks dog on a sofa"),
          "c.png": (96, 64, "a photo of sks dog, wide")}  # name: (width, height, caption)


def _dataset(server) -> None:
    folder = Path(server.base) / "input" / FOLDER
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    for name, (w, h, caption) in IMAGES.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(caption)


def _prompt(server, tiny, bucket: bool, filename: str) -> dict:
    info = server.get("/object_info")
    train = {k: _default(v) for k, v in info["TLoRATrain"]["input"]["required"].items() if _is_widget(v)}
    train.update(preset="custom", steps=6, rank=4, min_rank=2, learning_rate=1e-2, batch_size=2, filename=filename,
                 overwrite=True, gradient_checkpointing=False, caption_dropout=0.1)
    p = {
        "1": {"class_type": "LoadImageTextDataSetFromFolder", "inputs": {"folder": FOLDER}},
        "2": {"class_type": "UNETLoader",
              "inputs": {"unet_name": Path(tiny["sd15"]["comfy_file"]).name, "weight_dtype": "default"}},
        "3": {"class_type": "VAELoader", "inputs": {"vae_name": Path(tiny["vae"]["vae_4ch"]).name}},
        "4": {"class_type": "VAEEncode", "inputs": {"pixels": ["1", 0], "vae": ["3", 0]}},
        "5": {"class_type": "TLoRADevCaptionConditioning",
              "inputs": {"seed": 0, "tokens": 8, "context_dim": 768, "pooled_dim": 0, "text": ["1", 1]}},
        "7": {"class_type": "TLoRATrain", "inputs": {**train, "model": ["2", 0], "latents": ["4", 0],
                                                     "positive": ["5", 0]}},
    }
    if bucket:
        p["6"] = {"class_type": "ResolutionBucket", "inputs": {"latents": ["4", 0], "conditioning": ["5", 0]}}
        p["7"]["inputs"].update(latents=["6", 0], positive=["6", 1])
    return p


def _record(server, name: str) -> dict:
    with safe_open(str(Path(server.base) / "models" / "loras" / f"{name}.safetensors"), "pt") as f:
        return json.loads(f.metadata()["tlora_training"])


def test_comfyuis_dataset_nodes_train_directly(server, tiny):
    _dataset(server)
    info = server.get("/object_info")
    has_bucket = "ResolutionBucket" in info
    assert has_bucket == (host_version() != "0.3.75"), host_version()  # 0.3.75 has no Resolution Bucket
    assert "LoadImageTextDataSetFromFolder" in info and "MakeTrainingDataset" in info
    layouts = [False, True] if has_bucket else [False]
    for bucket in layouts:
        name = f"data/{'bucketed' if bucket else 'lists'}"
        entry = server.run(_prompt(server, tiny, bucket, name), timeout=900)
        text = entry["outputs"]["7"]["text"][0]
        record = _record(server, name)
        print(f"bucket {bucket}: {text}; images {record['images']}, buckets {record['buckets']}")
        assert text.startswith(f"{name}.safetensors: 6 steps"), text
        assert record["images"] == 3 and sorted(record["buckets"]) == ["8x12", "8x8"], record
        assert record["caption_dropout"] == 0.1
