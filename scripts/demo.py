"""The main job: run the SDXL T-LoRA example workflow through a real headless ComfyUI on tiny models, then the
training example (train a T-LoRA on a captioned dataset with previews at each checkpoint, plot the loss and the
loss per noise band, sample with the trained model and with a checkpoint picked from the preview grid).

Writes to --out:
  tlora_sdxl_*.png          the image ComfyUI produced
  trace.jsonl               one line per model call: sigma -> trainer timestep -> active rank
  schedule.png              the schedule plot from the T-LoRA Schedule Preview node, with the run's calls
  train/                    the training example: preview_grid.png (a row per checkpoint, its step written on it),
                            loss_graph.png, loss_bands.png, the trained T-LoRA and its checkpoints (with their
                            previews), the image of the trained model and of the checkpoint picked
  summary.json              what ran, and the check that every call's rank matches the schedule formula
"""

from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tlora_core import schedule  # noqa: E402
from tools import tiny_models  # noqa: E402
from tools.harness import workflow  # noqa: E402
from tools.harness.server import ComfyServer  # noqa: E402

log = logging.getLogger("tlora.demo")

RANK, ALPHA_LORA, MIN_RANK, TLORA_ALPHA = 8, 4, 2, 1.5
STEPS, SIZE = 8, 256


def make_tlora(models: Path, sdxl: dict) -> Path:
    """A LyCORIS T-LoRA written by LyCORIS itself on the diffusers twin of the tiny SDXL, SimpleTuner-style."""
    folder = models / "loras" / "demo_tlora_sdxl"
    path = folder / "pytorch_lora_weights.safetensors"
    if not path.exists():
        from diffusers import UNet2DConditionModel

        unet = UNet2DConditionModel.from_pretrained(str(sdxl["diffusers_dir"]), torch_dtype=__import__("torch").float32)
        tiny_models.write_lycoris_tlora(unet, path, RANK, ALPHA_LORA, seed=1, strength=0.5)
        # SimpleTuner copies its LyCORIS config beside the weights
        (folder / "lycoris_config.json").write_text(json.dumps({
            "algo": "tlora", "multiplier": 1.0, "linear_dim": RANK, "linear_alpha": ALPHA_LORA,
            "tlora_min_rank": MIN_RANK, "tlora_alpha": TLORA_ALPHA,
            "apply_preset": {"target_module": ["Attention", "FeedForward"]}}, indent=2))
    return path


def check_trace(lines: list[dict]) -> dict:
    """Every call's rank equals active_rank(t) for its schedule; returns counts."""
    bad = []
    for rec in lines:
        for t, r in zip(rec["t"], rec["rank"], strict=True):
            want = schedule.active_rank(t, rec["max_rank"], rec["min_rank"], rec["alpha"])
            if r != want:
                bad.append((rec, want))
    ranks = [rec["rank"][0] for rec in lines]
    return {"calls": len(lines), "mismatches": len(bad), "ranks_seen": sorted(set(ranks)),
            "rank_changes": sum(1 for a, b in zip(ranks, ranks[1:], strict=False) if a != b)}


TRAIN_STEPS, PREVIEW_EVERY = 30, 10
PICKED = f"demo/trained_tlora_step{2 * PREVIEW_EVERY}.safetensors"


def _dataset(srv: ComfyServer) -> None:
    """The subject: two seeded images at two sizes, each with its caption, as ComfyUI's dataset loader reads them."""
    import numpy as np
    from PIL import Image

    folder = srv.base / "input" / "sks_dog"
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for name, (w, h) in {"front.png": (64, 64), "side.png": (96, 64)}.items():
        Image.fromarray((rng.random((h, w, 3)) * 255).astype(np.uint8)).save(folder / name)
        (folder / name).with_suffix(".txt").write_text(f"a photo of sks dog, {name[:-4]}")


def _save_images(srv: ComfyServer, entry: dict, prompt: dict, out: Path, names: dict, only_named: bool = False) -> None:
    """The run's images, under `names` (by class or title); others under their prefix, unless `only_named`.
    (Train T-LoRA's own image on the node is the preview grid again: left out.)"""
    for nid, node_out in entry["outputs"].items():
        title, kind = prompt[nid]["_meta"]["title"], prompt[nid]["class_type"]
        if kind == "TLoRATrain" or (only_named and not (names.get(kind) or names.get(title))):
            continue
        for i, img in enumerate(node_out.get("images", [])):
            name = names.get(kind) or names.get(title) or \
                f"{prompt[nid]['inputs'].get('filename_prefix', nid)}_{i:02d}.png"
            q = f"/view?filename={img['filename']}&subfolder={img.get('subfolder', '')}&type={img['type']}"
            (out / name).write_bytes(srv.get(q))


def run_training(srv: ComfyServer, info: dict, tiny: dict, cond: dict, out: Path) -> dict:
    """The training example on the tiny SDXL: a dataset of two images at two sizes, Train T-LoRA with previews every
    PREVIEW_EVERY steps (each a checkpoint), the loss and noise-band graphs, the preview grid and the trained model
    sampled; then the example's second part: the checkpoint picked from the grid, sampled through Load T-LoRA."""
    out.mkdir()
    _dataset(srv)
    wf = workflow.load(ROOT / "example_workflows" / "tlora_train_single_image.json")
    overrides = {"EmptyLatentImage": {"width": 64, "height": 64}, "KSampler": {"steps": STEPS},
                 "TLoRATrain": {"preset": "custom", "steps": TRAIN_STEPS, "rank": RANK, "min_rank": MIN_RANK,
                                "learning_rate": 1e-2, "filename": "demo/trained_tlora", "overwrite": True,
                                "preview_every": PREVIEW_EVERY, "preview_steps": STEPS}}
    prompt = workflow.substitute_tiny(workflow.to_api(wf, info), {**tiny, "lora": ""}, cond, overrides)
    entry = srv.run(prompt, timeout=1800)
    names = {"LossGraphNode": "loss_graph.png", "loss per noise band": "loss_bands.png",
             "previews: a row per checkpoint, a column per prompt": "preview_grid.png",
             "image with the trained T-LoRA": "trained.png"}
    _save_images(srv, entry, prompt, out, names)
    text = next(v["text"][0] for k, v in entry["outputs"].items() if prompt[k]["class_type"] == "TLoRATrain")
    # the second part: the group bypassed until training has written the checkpoint, now on, with the one picked
    for node in wf["nodes"]:
        if node.get("mode") == 4:
            node["mode"] = 0
    prompt = workflow.substitute_tiny(workflow.to_api(wf, info),
                                      {**tiny, "lora": {"tlora/sks_dog_step400.safetensors": PICKED}}, cond, overrides)
    entry = srv.run(prompt, timeout=1800)
    _save_images(srv, entry, prompt, out, {"image with the picked checkpoint": "picked_checkpoint.png"},
                 only_named=True)
    trained = srv.base / "models" / "loras" / "demo"
    for f in trained.iterdir():
        shutil.copy(f, out / f.name)
    return {"workflow": "example_workflows/tlora_train_single_image.json", "steps": TRAIN_STEPS, "result": text,
            "file": "demo/trained_tlora.safetensors", "picked": PICKED, "grid": "train/preview_grid.png",
            "outputs": sorted(p.name for p in out.iterdir())}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default=str(ROOT / ".cache" / "tiny"), help="where tiny models are cached")
    ap.add_argument("--out", default=str(ROOT / "demo_out"))
    args = ap.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    models, out = Path(args.models).absolute(), Path(args.out).absolute()
    if out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True)
    t0 = time.time()

    sdxl = tiny_models.make_sdxl(models)
    vae = tiny_models.make_vae(models)
    lora = make_tlora(models, sdxl)
    trace = out / "trace.jsonl"

    with tempfile.TemporaryDirectory(prefix="tlora-demo-") as base:
        files = {"diffusion_models": [sdxl["comfy_file"]], "vae": [vae["vae_4ch"]], "loras": [lora.parent]}
        with ComfyServer(Path(base), models=files, env={"TLORA_TRACE": trace}) as srv:
            info = srv.get("/object_info")
            tiny = {"unet": Path(sdxl["comfy_file"]).name, "vae": Path(vae["vae_4ch"]).name,
                    "lora": f"{lora.parent.name}/{lora.name}"}
            cond = {"tokens": 8, "context_dim": 2048, "pooled_dim": 1280}
            overrides = {"EmptyLatentImage": {"width": SIZE, "height": SIZE}, "KSampler": {"steps": STEPS}}

            wf = workflow.load(ROOT / "example_workflows" / "tlora_sdxl_txt2img.json")
            prompt = workflow.substitute_tiny(workflow.to_api(wf, info), tiny, cond, overrides)
            entry = srv.run(prompt)
            for i, png in enumerate(srv.images(entry)):
                (out / f"tlora_sdxl_{i:02d}.png").write_bytes(png)
            lines = [json.loads(x) for x in trace.read_text().splitlines()]

            # the schedule the run used, with its calls, drawn by the preview node
            rec = lines[0]
            wf = workflow.load(ROOT / "example_workflows" / "tlora_schedule_preview.json")
            prompt = workflow.substitute_tiny(workflow.to_api(wf, info), tiny, cond, {
                "TLoRASchedulePreview": {"max_rank": rec["max_rank"], "min_rank": rec["min_rank"],
                                         "alpha": rec["alpha"], "steps": STEPS}})
            trace_len = len(lines)
            entry = srv.run(prompt)
            (out / "schedule.png").write_bytes(srv.images(entry)[0])
            lines = lines[:trace_len]
            training = run_training(srv, info, tiny, cond, out / "train")
            log_text = srv.log_text()

    result = check_trace(lines)
    summary = {"workflow": "example_workflows/tlora_sdxl_txt2img.json", "model": "tiny SDXL-family UNet (random)",
               "tlora": str(lora.relative_to(models)), "schedule": {k: lines[0][k] for k in ("max_rank", "min_rank",
                                                                                            "alpha")},
               "steps": STEPS, "size": SIZE, **result, "training": training, "seconds": round(time.time() - t0, 1),
               "server_log_tlora_lines": [x for x in log_text.splitlines() if "T-LoRA" in x][:6]}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    print(f"T-LoRA demo: {result['calls']} model calls, ranks {result['ranks_seen']}, "
          f"{result['mismatches']} mismatches with the schedule formula; trained {training['file']} in "
          f"{training['steps']} steps")
    for p in sorted(out.iterdir()):
        print(f"  {p}")
    return 0 if result["mismatches"] == 0 and result["calls"] > 0 and len(result["ranks_seen"]) > 1 else 1


if __name__ == "__main__":
    sys.exit(main())
