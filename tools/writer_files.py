"""T-LoRA files in the layouts of trainers that cannot be installed here, built from their documented key layouts.

Each writer's layout, metadata and schedule are in tlora_core/writers.py and the README's writers table; this
module writes seeded files shaped exactly like theirs, and holds each trainer's rank rule written the way its own
code computes it (torch float32), as the tests' oracle. Torch and safetensors only.

  ortho   q_layer / p_layer / lambda_layer / alpha and the stored base (base_q, base_p, base_lambda): Enferlain's
          sd-scripts (`tlora_<component>_` names) and 67372a's LyCORIS fork (`lora_unet_` names)
  export  LyCORIS' rank-2R tlora export (pull request 280's save, tools/convert_tlora.py): lora_up = [P diag(l),
          -P0 diag(l0)], lora_down = [Q; Q0], alpha = 2a
  vanilla lora_down / lora_up / alpha with a rank mask in training: AnimaLoraStudio, lora-scripts-next
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file


@dataclass(frozen=True)
class Layer:
    name: str  # the module name as the writer spells it
    out_features: int
    in_features: int
    conv: bool = False  # a conv layer: factors saved 1x1 (out, R, 1, 1) / (R, in, 1, 1)


def _orthonormal(rows: int, cols: int, g: torch.Generator) -> torch.Tensor:
    q, _ = torch.linalg.qr(torch.randn(max(rows, cols), min(rows, cols), generator=g))
    return q.T.contiguous() if rows <= cols else q.contiguous()


def ortho_factors(layer: Layer, rank: int, g: torch.Generator, strength: float = 0.3,
                  weight: torch.Tensor | None = None) -> dict[str, torch.Tensor]:
    """q, p, lam (trained) and q0, p0, lam0 (the frozen base they started from), as 2-D / 1-D float32. The base is
    the top-`rank` SVD of `weight` where given (the trainers' default data init; a conv's flattened weight, its
    first `in` columns), else random orthonormal (their `use_data_init=False`)."""
    if weight is not None:
        u, sv, vh = torch.linalg.svd(weight.detach().double().reshape(weight.shape[0], -1), full_matrices=False)
        k = min(rank, sv.shape[0])  # ranks beyond the weight's: zero vectors, lambda 1e-6 (as they pad)
        q0, p0 = torch.zeros(rank, layer.in_features), torch.zeros(layer.out_features, rank)
        q0[:k], p0[:, :k] = vh[:k, : layer.in_features].float(), u[:, :k].float()
        lam0 = torch.cat([sv[:k].float(), torch.full((rank - k,), 1e-6)])
    else:
        q0, p0 = _orthonormal(rank, layer.in_features, g), _orthonormal(layer.out_features, rank, g)
        lam0 = torch.rand(rank, generator=g) + 0.5
    return {"q": q0 + strength * torch.randn(q0.shape, generator=g) / math.sqrt(layer.in_features),
            "p": p0 + strength * torch.randn(p0.shape, generator=g) / math.sqrt(layer.out_features),
            "lam": lam0 * (1 + strength * torch.randn(rank, generator=g)), "q0": q0, "p0": p0, "lam0": lam0}


def _shaped(t: torch.Tensor, conv: bool) -> torch.Tensor:
    return t.reshape(*t.shape, 1, 1).contiguous() if conv else t.contiguous()


def write_ortho(path: str | Path, layers: list[Layer], rank: int, alpha: float, metadata: dict[str, str],
                seed: int = 0, weights: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """A q/p/lambda file with its stored base (Enferlain: `.base_q`; 67372a: `.base_q` too, LyCORIS' buffer names),
    the base from `weights[name]` where given. Returns {module name: factors}."""
    g = torch.Generator().manual_seed(seed)
    sd, out = {}, {}
    for layer in layers:
        f = out[layer.name] = ortho_factors(layer, rank, g, weight=(weights or {}).get(layer.name))
        n = layer.name
        sd |= {f"{n}.q_layer.weight": _shaped(f["q"], layer.conv), f"{n}.p_layer.weight": _shaped(f["p"], layer.conv),
               f"{n}.lambda_layer": f["lam"][None].clone(), f"{n}.alpha": torch.tensor(float(alpha)),
               f"{n}.base_q": _shaped(f["q0"], layer.conv), f"{n}.base_p": _shaped(f["p0"], layer.conv),
               f"{n}.base_lambda": f["lam0"][None].clone()}
    _save(path, sd, metadata)
    return out


def export_pairs(factors: dict[str, torch.Tensor], alpha: float) -> dict[str, torch.Tensor]:
    """One module of LyCORIS' rank-2R export, as convert_tlora.py builds it (up, down, alpha)."""
    up = torch.cat([factors["p"] * factors["lam"][None], -factors["p0"] * factors["lam0"][None]], dim=1)
    down = torch.cat([factors["q"], factors["q0"]], dim=0)
    return {"up": up.contiguous(), "down": down.contiguous(), "alpha": torch.tensor(2.0 * alpha)}


def write_export(path: str | Path, layers: list[Layer], rank: int, alpha: float, metadata: dict[str, str] | None,
                 seed: int = 0, peft: bool = False) -> dict[str, dict[str, torch.Tensor]]:
    """A rank-2R export file (metadata None: none at all, as convert_tlora.py writes; `peft`: lora_A / lora_B, as
    orangemagic123's `_comfy.safetensors`). Returns the ortho factors it was exported from."""
    g = torch.Generator().manual_seed(seed)
    sd, out = {}, {}
    up_key, down_key = ("lora_B.weight", "lora_A.weight") if peft else ("lora_up.weight", "lora_down.weight")
    for layer in layers:
        f = out[layer.name] = ortho_factors(layer, rank, g)
        e = export_pairs(f, alpha)
        sd |= {f"{layer.name}.{up_key}": _shaped(e["up"], layer.conv),
               f"{layer.name}.{down_key}": _shaped(e["down"], layer.conv), f"{layer.name}.alpha": e["alpha"]}
    _save(path, sd, metadata)
    return out


def write_vanilla(path: str | Path, layers: list[Layer], rank: int, alpha: float, metadata: dict[str, str],
                  seed: int = 0, extra: dict[str, torch.Tensor] | None = None) -> dict[str, dict[str, torch.Tensor]]:
    """A kohya-layout file (lora_down, lora_up, alpha) of non-zero seeded factors; `extra` tensors per module
    (suffix -> tensor) as lora-scripts-next's mid-2026 `*_state` buffers. Returns {name: {"up", "down"}}."""
    g = torch.Generator().manual_seed(seed)
    sd, out = {}, {}
    for layer in layers:
        down = torch.randn(rank, layer.in_features, generator=g) / math.sqrt(layer.in_features)
        up = 0.3 * torch.randn(layer.out_features, rank, generator=g) / math.sqrt(rank)
        out[layer.name] = {"up": up, "down": down}
        sd |= {f"{layer.name}.lora_down.weight": down, f"{layer.name}.lora_up.weight": up,
               f"{layer.name}.alpha": torch.tensor(float(alpha))}
        for suffix, t in (extra or {}).items():
            sd[f"{layer.name}{suffix}"] = t.clone()
    _save(path, sd, metadata)
    return out


def _save(path: str | Path, sd: dict[str, torch.Tensor], metadata: dict[str, str] | None) -> None:
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    save_file(sd, str(path), metadata=metadata)


# --- each trainer's rank rule, as its own code computes it ---------------------------------------------------
def rank_lycoris(t: int, rank: int, min_rank: int, alpha: float) -> int:
    """LyCORIS / 67372a / Enferlain: int(((T - t) / T) ** a * (R - Rmin)) + Rmin, t the integer trainer timestep."""
    from lycoris.modules.tlora import compute_timestep_mask

    return int(compute_timestep_mask(int(t), 1000, rank, min_rank, alpha).sum())


def rank_anima_lora_studio(sigma: float, rank: int, min_rank: int = 1, alpha: float = 1.0) -> int:
    """AnimaLoraStudio: ranks i < clamp((1 - sigma) ** a * (R - m) + m, m, R), sigma the post-shift flow sigma."""
    t = torch.tensor(sigma).float().clamp(min=0.0, max=1.0)
    active = ((1.0 - t).pow(alpha) * (rank - min_rank) + min_rank).clamp(min=float(min_rank), max=float(rank))
    return int((torch.arange(rank) < active).sum())


def rank_orangemagic(sigma: float, rank: int, min_rank: int, alpha: float) -> int:
    """orangemagic123/sd-scripts lora_tlora_anima: clamp(int(((T - t) / T) ** a * (R - m)) + m, m, R), t = sigma,
    T = 1."""
    return min(max(int(((1.0 - sigma) / 1.0) ** alpha * (rank - min_rank)) + min_rank, min_rank), rank)


def rank_lora_scripts_next(sigma: float, rank: int, min_rank: int, schedule: str) -> int:
    """lora-scripts-next: p = 1 - sigma (cosine: 0.5 - 0.5 cos(pi p)); clamp(m + floor((R - m) p), m, R)."""
    p = 1.0 - torch.tensor(sigma).float().clamp(0.0, 1.0)
    if schedule == "cosine":
        p = 0.5 - 0.5 * torch.cos(math.pi * p)
    return int((min_rank + torch.floor((rank - min_rank) * p)).clamp(min_rank, rank))


def write_style_lora(checkpoint: str | Path, out: str | Path, seed: int = 6, attention: str = ".attn") -> None:
    """A standard kohya LoRA (no T-LoRA marker) of every attention Linear of a ComfyUI diffusion-model checkpoint
    (weights whose name holds `attention`: ".attn" in a UNet, "_attn." in Flux): what Load LoRA (timestep schedule)
    takes in the tests and benchmarks."""
    from safetensors import safe_open

    with safe_open(str(checkpoint), "pt") as f:
        layers = [Layer("lora_unet_" + k.removesuffix(".weight").replace(".", "_"), *shape)
                  for k in f.keys() if k.endswith(".weight") and attention in k
                  and len(shape := f.get_slice(k).get_shape()) == 2]
    write_vanilla(out, layers, 4, 4.0, {"ss_network_module": "networks.lora"}, seed=seed)
