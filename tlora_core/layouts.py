"""Tensor layouts of T-LoRA files, and how each becomes `ModuleAdapter`s (docs/formats.md).

  lycoris_tlora     SimpleTuner / LyCORIS `algo=tlora`: q_layer, p_layer, lambda_layer, alpha. The SVD base is
                    rebuilt from the model's weight at load, unless the file is self-contained (it then also
                    holds base_q, base_p, base_lambda, written by this pack's "Save T-LoRA with base").
  official_ortho    ControlGenAI/T-LoRA SDXL Ortho: q/p/lambda plus base_q, base_p, base_lambda; scale 1.
  official_vanilla  ControlGenAI/T-LoRA vanilla (SDXL safetensors or Flux lora.pt): down, up; scale 1.
  kohya, peft       vanilla T-LoRAs saved in standard LoRA layouts (lora_down/lora_up/alpha, lora_A/lora_B).
  lycoris_export    LyCORIS' tlora export as a rank-2R standard LoRA: up = [P diag(l), -P0 diag(l0)],
                    down = [Q; Q0], alpha = 2a; read back as the ortho T-LoRA it is (rank i with rank R + i).
Which trainer wrote a file, and what it did that the file does not say, is in `writers`.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable
from dataclasses import replace
from typing import Any

import torch

from .adapter import ORTHO, VANILLA, ModuleAdapter
from .errors import TLoRAError

LYCORIS = "lycoris_tlora"
OFFICIAL_ORTHO = "official_ortho"
OFFICIAL_VANILLA = "official_vanilla"
KOHYA = "kohya"
PEFT = "peft"
EXPORT = "lycoris_export"
EXPORT_PEFT = "lycoris_export_peft"  # the same in PEFT names (lora_A = [Q; Q0], lora_B = [P diag(l), -P0 diag(l0)])
EXPORTS = (EXPORT, EXPORT_PEFT)
STANDARD_LAYOUTS = (KOHYA, PEFT)

# How a format spells module names, for the ComfyUI key mapping.
NAMING = {
    LYCORIS: "lycoris",  # lycoris_<diffusers path, '.' -> '_'>
    OFFICIAL_ORTHO: "diffusers",  # dotted diffusers module path
    OFFICIAL_VANILLA: "diffusers",
    KOHYA: "kohya",  # lora_unet_... / lycoris_... stems as written
    PEFT: "diffusers",
    EXPORT: "kohya",
    EXPORT_PEFT: "diffusers",
}

# text-encoder modules: kohya / LyCORIS `lora_te_`, `lora_te1_`, `lycoris_te2_`, ..., diffusers `text_encoder(_2).`;
# Enferlain/sd-scripts `tlora_clip_l_`, `tlora_clip_g_`, `tlora_t5xxl_`;
# a separator is required: `lycoris_text_transformer_blocks_0` is a Kandinsky 5 transformer module
_TEXT_ENCODER = re.compile(r"^((lora|lycoris)_te\d?_|text_encoder(_\d)?[._]|te\d?_|tlora_(clip_[lg]|t5xxl)_)")

# official repo processor names -> diffusers module names
_OFFICIAL_PROC = {
    "to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0",
    "to_q_proj_lora": "add_q_proj", "to_k_proj_lora": "add_k_proj", "to_v_proj_lora": "add_v_proj",
}

# tensor suffix -> (layout family, role)
SUFFIXES = {
    ".q_layer.weight": ("ortho", "q"), ".p_layer.weight": ("ortho", "p"), ".lambda_layer": ("ortho", "lam"),
    ".base_q.weight": ("ortho", "q0"), ".base_p.weight": ("ortho", "p0"), ".base_lambda": ("ortho", "lam0"),
    ".base_lambda.weight": ("ortho", "lam0"), ".base_lambda_buf": ("ortho", "lam0"),
    ".base_q": ("ortho", "q0"), ".base_p": ("ortho", "p0"),  # a self-contained LyCORIS file (LyCORIS' buffer names)
    ".down.weight": (OFFICIAL_VANILLA, "down"), ".up.weight": (OFFICIAL_VANILLA, "up"),
    ".lora_down.weight": (KOHYA, "down"), ".lora_up.weight": (KOHYA, "up"),
    ".lora_A.weight": (PEFT, "down"), ".lora_B.weight": (PEFT, "up"),
    ".alpha": ("", "alpha"),
    # lora-scripts-next (mid-2026) saved its schedule settings per module as tensors
    ".tlora_min_rank_state": ("", "min_rank_state"), ".tlora_rank_schedule_state": ("", "schedule_state"),
}
# Files with a timestep dependence other than a rank schedule: (key pattern, what it is)
NOT_TLORA = (
    (re.compile(r"\.lora_time_(gamma|beta)\."),
     "a DiffSynth-Studio timestep-aware LoRA (lora_time_gamma / lora_time_beta: every rank modulated by the "
     "timestep embedding), not a T-LoRA rank schedule; this pack does not run it (use DiffSynth-Studio)"),
    (re.compile(r"\.experts\.\d+\.\d+\.(down|up)\.weight$|\.timestep_embed\.weight$"),
     "a TimeStep Master file (LyCORIS tsm: a mixture of per-interval LoRA experts), not a T-LoRA rank schedule; "
     "this pack does not run it"),
)
_BY_LENGTH = sorted(SUFFIXES, key=len, reverse=True)

Group = dict[str, torch.Tensor]


def split_key(key: str) -> tuple[str, str] | None:
    """(module name, suffix) of a tensor name, or None for a name no layout uses."""
    for suffix in _BY_LENGTH:
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return None


def group_tensors(sd: dict[str, torch.Tensor]) -> tuple[dict[str, Group], set[str], list[str]]:
    """({module: {role: tensor}}, layout families present, unknown tensor names)."""
    groups: dict[str, Group] = {}
    families: set[str] = set()
    unknown = []
    for key, t in sd.items():
        split = split_key(key)
        if split is None:
            unknown.append(key)
            continue
        name, suffix = split
        family, role = SUFFIXES[suffix]
        groups.setdefault(name, {})[role] = t
        if family:
            families.add(family)
    return groups, families, unknown


def format_of(family: str, module_names: Iterable[str]) -> str:
    """The file format of an ortho / vanilla / standard layout family."""
    if family == "ortho":
        return OFFICIAL_ORTHO if any(".processor." in n for n in module_names) else LYCORIS
    return family


def is_text_encoder(name: str) -> bool:
    return _TEXT_ENCODER.match(name) is not None


def _tensor(path: str, name: str, g: Group, role: str) -> torch.Tensor:
    t = g.get(role)
    if t is None:
        raise TLoRAError(path, f"module '{name}' has no '{role}' tensor (incomplete or mixed-up file)")
    if not t.is_floating_point():
        raise TLoRAError(path, f"module '{name}': tensor '{role}' is {t.dtype}, expected floating point")
    if not torch.isfinite(t).all():
        raise TLoRAError(path, f"module '{name}': tensor '{role}' contains NaN or Inf")
    return t


def _matrix(path: str, name: str, role: str, t: torch.Tensor) -> tuple[torch.Tensor | None, bool]:
    """(R, in) / (out, R) of a linear or 1x1-conv factor, and whether it was a conv; None for k>1 convs."""
    if t.ndim == 2:
        return t, False
    if t.ndim == 4 and tuple(t.shape[2:]) == (1, 1):
        return t.reshape(t.shape[0], t.shape[1]), True
    if t.ndim in (3, 4, 5):
        return None, True
    raise TLoRAError(path, f"module '{name}': tensor '{role}' has unexpected shape {tuple(t.shape)}")


def _check_rank(path: str, name: str, down: torch.Tensor, up: torch.Tensor, *extra: torch.Tensor) -> int:
    r = int(down.shape[0])
    if up.shape[1] != r or any(e.numel() != r for e in extra):
        shapes = ", ".join(str(tuple(x.shape)) for x in (down, up, *extra))
        raise TLoRAError(path, f"module '{name}': rank differs across its tensors ({shapes})")
    if r < 1:
        raise TLoRAError(path, f"module '{name}': rank 0")
    return r


def _alpha(path: str, name: str, t: torch.Tensor | None, rank: int) -> float:
    if t is None:
        return float(rank)
    if t.numel() != 1:
        raise TLoRAError(path, f"module '{name}': 'alpha' must be one finite number, got shape {tuple(t.shape)}")
    value = float(t.reshape(()).item())
    if not math.isfinite(value):
        raise TLoRAError(path, f"module '{name}': 'alpha' must be one finite number, got {value}")
    return value


def official_target(name: str) -> str | None:
    """The diffusers module an official-repo processor LoRA patches (`...processor.to_q_lora` -> `...to_q`)."""
    name = re.sub(r"^(unet|transformer)\.", "", name)
    m = re.match(r"^(.*)\.processor\.([a-z_]+)$", name)
    if not m or m.group(2) not in _OFFICIAL_PROC:
        return None
    return f"{m.group(1)}.{_OFFICIAL_PROC[m.group(2)]}"


def build(path: str, fmt: str, name: str, g: Group, skipped: dict[str, str]) -> ModuleAdapter | None:
    """The adapter of one module (None when it is skipped, with the reason in `skipped`)."""
    if fmt in (LYCORIS, OFFICIAL_ORTHO):
        return _ortho(path, fmt, name, g, skipped)
    if fmt in EXPORTS:
        adapter = _export(path, name, g, skipped)
        if adapter is not None and fmt == EXPORT_PEFT:
            adapter = replace(adapter, name=re.sub(r"^(base_model\.model\.|unet\.|transformer\.)", "", name))
        return adapter
    return _vanilla(path, fmt, name, g, skipped)


def _ortho(path: str, fmt: str, name: str, g: Group, skipped: dict[str, str]) -> ModuleAdapter | None:
    lam = _tensor(path, name, g, "lam").reshape(-1)
    q, conv_q = _matrix(path, name, "q_layer.weight", _tensor(path, name, g, "q"))
    p, conv_p = _matrix(path, name, "p_layer.weight", _tensor(path, name, g, "p"))
    if q is None or p is None:
        skipped[name] = "convolution with kernel > 1 (LyCORIS tlora cannot run these either)"
        return None
    r = _check_rank(path, name, q, p, lam)
    base = _ortho_base(path, name, g, q, p) if fmt == OFFICIAL_ORTHO or "q0" in g else {}
    if fmt == LYCORIS:
        alpha = _alpha(path, name, g.get("alpha"), r)
        # with its base stored, a conv module of any kernel runs as the trainers that store it run it: 1x1 factors
        # on the layer's stride, i.e. at the kernel tap of index `padding` (Enferlain/sd-scripts, 67372a LyCORIS)
        return ModuleAdapter(name=name, kind=ORTHO, up=p, down=q, lam=lam, scale=(alpha or r) / r, svd_base=True,
                             conv=conv_q or conv_p, tap=bool(base) and (conv_q or conv_p), **base)
    target = official_target(name)
    if target is None:
        skipped[name] = "not a processor LoRA name of the official repo"
        return None
    return ModuleAdapter(name=target, kind=ORTHO, up=p, down=q, lam=lam, scale=1.0, **base)


def _ortho_base(path: str, name: str, g: Group, q: torch.Tensor, p: torch.Tensor) -> dict[str, Any]:
    q0, _ = _matrix(path, name, "base_q.weight", _tensor(path, name, g, "q0"))
    p0, _ = _matrix(path, name, "base_p.weight", _tensor(path, name, g, "p0"))
    lam0 = _tensor(path, name, g, "lam0").reshape(-1)
    if q0 is None or p0 is None or q0.shape != q.shape or p0.shape != p.shape:
        raise TLoRAError(path, f"module '{name}': base factors {tuple(g['q0'].shape)}/{tuple(g['p0'].shape)} "
                               f"do not match trained factors {tuple(q.shape)}/{tuple(p.shape)}")
    _check_rank(path, name, q0, p0, lam0)
    return {"base_up": p0, "base_down": q0, "base_lam": lam0}


def _export(path: str, name: str, g: Group, skipped: dict[str, str]) -> ModuleAdapter | None:
    """A module of LyCORIS' rank-2R tlora export, as the ortho adapter it was exported from: rank i of the trained
    half and of the base half are one rank of the schedule."""
    factors = _down_up(path, name, g, skipped)
    if factors is None:
        return None
    down, up, conv, r2, kernel = factors
    if kernel is not None:  # LyCORIS' tlora never writes one
        skipped[name] = "a k x k convolution kernel in a T-LoRA export is not supported"
        return None
    if r2 % 2:
        raise TLoRAError(path, f"module '{name}' has odd rank {r2}: a LyCORIS tlora export (rank 2R, ranks paired) "
                               "has even rank; set standard_layout to 'ranks' if this is a vanilla T-LoRA")
    r = r2 // 2
    ones = torch.ones(r)
    alpha = _alpha(path, name, g.get("alpha"), r2)  # 2a: alpha / rank is the T-LoRA's a / R
    return ModuleAdapter(name=name, kind=ORTHO, up=up[:, :r], down=down[:r], lam=ones, base_up=-up[:, r:],
                         base_down=down[r:], base_lam=ones, scale=alpha / r2, conv=conv)


def _down_up(path: str, name: str, g: Group, skipped: dict[str, str]
             ) -> tuple[torch.Tensor, torch.Tensor, bool, int, tuple[int, int] | None] | None:
    """(down, up, conv, rank, kernel) of a standard-layout module: a LoCon's k x k conv is a k x k down kernel,
    flattened to (R, in * kh * kw), then a 1x1 up; None (the reason in `skipped`) for other k x k shapes."""
    raw_down = _tensor(path, name, g, "down")
    down, conv_d = _matrix(path, name, "down", raw_down)
    up, conv_u = _matrix(path, name, "up", _tensor(path, name, g, "up"))
    kernel = None
    if down is None and up is not None and raw_down.ndim == 4:
        down, kernel = raw_down.flatten(1), (int(raw_down.shape[2]), int(raw_down.shape[3]))
    if down is None or up is None:
        skipped[name] = "convolution with kernel > 1 other than a LoCon (k x k down, 1x1 up) is not supported"
        return None
    return down, up, conv_d or conv_u, _check_rank(path, name, down, up), kernel


def _vanilla(path: str, fmt: str, name: str, g: Group, skipped: dict[str, str]) -> ModuleAdapter | None:
    factors = _down_up(path, name, g, skipped)
    if factors is None:
        return None
    down, up, conv, r, kernel = factors
    if fmt == OFFICIAL_VANILLA:
        target = official_target(name)
        if target is None:
            skipped[name] = "not a processor LoRA name of the official repo"
            return None
        if name.startswith(("single_transformer_blocks.", "transformer.single_transformer_blocks.")) and \
                target.endswith(("add_q_proj", "add_k_proj", "add_v_proj", "to_out.0")):
            skipped[name] = "unused by the official Flux forward (single blocks have no context or out projection)"
            return None
        return ModuleAdapter(name=target, kind=VANILLA, up=up, down=down, scale=1.0)
    if fmt == KOHYA:
        alpha = _alpha(path, name, g.get("alpha"), r)
        return ModuleAdapter(name=name, kind=VANILLA, up=up, down=down, scale=alpha / r, conv=conv, kernel=kernel)
    target = re.sub(r"^(base_model\.model\.|unet\.|transformer\.|diffusion_model\.)", "", name)
    # PEFT keeps lora_alpha / r in its adapter config (scale 1 here); an `.alpha` tensor beside the factors is
    # read as ComfyUI reads it
    scale = 1.0 if g.get("alpha") is None else _alpha(path, name, g["alpha"], r) / r
    return ModuleAdapter(name=target, kind=VANILLA, up=up, down=down, scale=scale, conv=conv, kernel=kernel)
