"""API prompts for the tiny models, exact latents back from the server, and temporary files in its loras folder.

Every prompt saves its sampled latent with `SaveLatent`, so comparisons are bit-exact on the float
tensor (a PNG would round small differences away). Each prompt carries a fresh nonce on its
KSampler: ComfyUI ignores inputs a node does not declare, but they enter its cache signature, so
the sampler really runs every time instead of answering from the output cache.
"""

from __future__ import annotations

import contextlib
import json
import uuid
from pathlib import Path

import torch
from safetensors.torch import load_file

SIZE = 64
COND = {"sdxl": {"tokens": 8, "context_dim": 2048, "pooled_dim": 1280},
        "sd15": {"tokens": 8, "context_dim": 768, "pooled_dim": 0},
        "flux": {"tokens": 8, "context_dim": 4096, "pooled_dim": 768}}
SDXL_LORA = "tlora_sdxl/pytorch_lora_weights.safetensors"
SD15_LORA = "tlora_sd15/pytorch_lora_weights.safetensors"


def tlora(lora_name: str, **inputs) -> tuple[str, dict]:
    """A Load T-LoRA step of a model chain."""
    base = {"lora_name": lora_name, "strength_model": 1.0, "strength_clip": 1.0, "schedule_source": "file",
            "min_rank": 1, "alpha": 1.0, "max_rank": 0, "timestep_mode": "auto", "vanilla_tlora": False}
    return "TLoRALoader", {**base, **inputs}


def scheduled_lora(lora_name: str, **inputs) -> tuple[str, dict]:
    """A Load LoRA (timestep schedule) step of a model chain (constant strength 1 over the whole range unless told)."""
    base = {"lora_name": lora_name, "strength_model": 1.0, "strength_clip": 0.0, "start_percent": 0.0,
            "end_percent": 1.0, "strength_start": 1.0, "strength_end": 1.0, "curve": "constant", "keyframes": ""}
    return "TLoRAScheduledLoRA", {**base, **inputs}


def with_hook_keyframes(prompt: dict, lora_name: str, strength: float, keyframes: list[tuple[float, float]]) -> dict:
    """`prompt` with the LoRA on ComfyUI's hook route (CreateHookLoraModelOnly, one CreateHookKeyframe per
    (start_percent, strength_mult), SetHookKeyframes, ConditioningSetProperties on both conditionings)."""
    p = dict(prompt)
    p["hook"] = {"class_type": "CreateHookLoraModelOnly", "inputs": {"lora_name": lora_name,
                                                                     "strength_model": strength}}
    prev = None
    for i, (pct, mult) in enumerate(keyframes):
        p[f"kf{i}"] = {"class_type": "CreateHookKeyframe", "inputs": {"strength_mult": mult, "start_percent": pct,
                                                                      **({"prev_hook_kf": prev} if prev else {})}}
        prev = [f"kf{i}", 0]
    p["hooked"] = {"class_type": "SetHookKeyframes", "inputs": {"hooks": ["hook", 0], "hook_kf": prev}}
    for c in ("pos", "neg"):
        p[f"{c}_hooked"] = {"class_type": "ConditioningSetProperties", "inputs": {
            "cond_NEW": [c, 0], "strength": 1.0, "set_cond_area": "default", "hooks": ["hooked", 0]}}
    for node in p.values():
        if node["class_type"] == "KSampler":
            node["inputs"] = {**node["inputs"], "positive": ["pos_hooked", 0], "negative": ["neg_hooked", 0]}
    return p


def stock_lora(lora_name: str, strength: float = 1.0) -> tuple[str, dict]:
    """A stock `LoraLoaderModelOnly` step of a model chain."""
    return "LoraLoaderModelOnly", {"lora_name": lora_name, "strength_model": strength}


def graph(tiny, family: str = "sdxl", chains=((),), steps: int = 2, seed: int = 42, cfg: float = 4.0,
          sampler: str = "euler", scheduler: str = "normal") -> dict:
    """One UNETLoader feeding one branch per chain: chain steps (see `tlora`, `stock_lora`) -> KSampler -> SaveLatent.

    Branch i's sampler is node `ks{i}`, its latent output node `save{i}`."""
    p = {
        "unet": {"class_type": "UNETLoader",
                 "inputs": {"unet_name": Path(tiny[family]["comfy_file"]).name, "weight_dtype": "default"}},
        "pos": {"class_type": "TLoRADevConditioning", "inputs": {"seed": 1, **COND[family]}},
        "neg": {"class_type": "TLoRADevConditioning", "inputs": {"seed": 2, **COND[family]}},
        "latent": {"class_type": "EmptyLatentImage", "inputs": {"width": SIZE, "height": SIZE, "batch_size": 1}},
    }
    for b, chain in enumerate(chains):
        model = ["unet", 0]
        for i, (ctype, inputs) in enumerate(chain):
            nid = f"b{b}m{i}"
            p[nid] = {"class_type": ctype, "inputs": {"model": model, **inputs}}
            model = [nid, 0]
        p[f"ks{b}"] = {"class_type": "KSampler", "inputs": {
            "model": model, "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": sampler,
            "scheduler": scheduler, "positive": ["pos", 0], "negative": ["neg", 0], "latent_image": ["latent", 0],
            "denoise": 1.0, "_nonce": uuid.uuid4().hex}}
        p[f"save{b}"] = {"class_type": "SaveLatent",
                         "inputs": {"samples": [f"ks{b}", 0], "filename_prefix": f"reliability/b{b}"}}
    return p


def graph_nonce(prompt: dict) -> dict:
    """`prompt` with new nonces on its samplers: they run again (the loaders stay cached)."""
    return {k: {**v, "inputs": {**v["inputs"], "_nonce": uuid.uuid4().hex}} if v["class_type"] == "KSampler" else v
            for k, v in prompt.items()}


def cached_nodes(entry: dict) -> set[str]:
    out: set[str] = set()
    for kind, data in entry.get("status", {}).get("messages", []):
        if kind == "execution_cached":
            out.update(data.get("nodes", []))
    return out


def latents(server, entry: dict) -> dict[int, torch.Tensor]:
    """Branch index -> the latent its SaveLatent wrote in this run (the sampler must have run)."""
    out = {}
    for nid, node_out in entry.get("outputs", {}).items():
        if not nid.startswith("save"):
            continue
        assert f"ks{nid[4:]}" not in cached_nodes(entry), "the sampler answered from ComfyUI's cache"
        (item,) = node_out["latents"]
        path = Path(server.base) / "output" / item.get("subfolder", "") / item["filename"]
        out[int(nid[4:])] = load_file(str(path))["latent_tensor"]
    return out


def sample(server, prompt: dict, branch: int = 0) -> torch.Tensor:
    return latents(server, server.run(prompt))[branch]


def same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit-identical."""
    return a.dtype == b.dtype and a.shape == b.shape and a.contiguous().view(torch.uint8).equal(
        b.contiguous().view(torch.uint8))


@contextlib.contextmanager
def in_loras(server, files: dict[str, Path]):
    """Symlink files into the server's loras folder under the given names (subfolders allowed); removed after."""
    root = Path(server.base) / "models" / "loras"
    made = []
    try:
        for name, target in files.items():
            link = root / name
            link.parent.mkdir(parents=True, exist_ok=True)
            if link.is_symlink() or link.exists():
                link.unlink()
            link.symlink_to(Path(target).resolve())
            made.append(link)
        yield
    finally:
        for link in made:
            with contextlib.suppress(FileNotFoundError):
                link.unlink()


def trace_len(server) -> int:
    return len(server.trace_path.read_text().splitlines()) if server.trace_path.exists() else 0


def trace_lines(server, start: int) -> list[dict]:
    lines = server.trace_path.read_text().splitlines() if server.trace_path.exists() else []
    return [json.loads(x) for x in lines[start:]]


def log_len(server) -> int:
    return len(server.log_text())


def log_since(server, start: int) -> str:
    return server.log_text()[start:]


def rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def dir_entries(path: Path) -> dict[str, int]:
    """name -> size of every file in a folder (recursively)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): p.stat().st_size for p in sorted(path.rglob("*")) if p.is_file()}

