"""Readers for every T-LoRA file layout we know, and the schedule defaults recorded with them.

Layouts (see docs/formats.md):
  lycoris_tlora     SimpleTuner / LyCORIS `algo=tlora`: q_layer, p_layer, lambda_layer, alpha; the
                    SVD base is not stored and is rebuilt from the model's weights.
  official_ortho    ControlGenAI/T-LoRA SDXL Ortho: the same plus base_q, base_p, base_lambda; scale 1.
  official_vanilla  ControlGenAI/T-LoRA vanilla (SDXL safetensors or Flux lora.pt): down, up; scale 1.
  kohya, peft       vanilla T-LoRAs saved in standard LoRA layouts (lora_down/lora_up/alpha,
                    lora_A/lora_B): accepted only when asked for or when the metadata says T-LoRA.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from dataclasses import dataclass, field, replace

import torch
from safetensors import safe_open

from .adapter import ORTHO, VANILLA, ModuleAdapter
from .errors import TLoRAError

log = logging.getLogger("tlora.formats")

LYCORIS = "lycoris_tlora"
OFFICIAL_ORTHO = "official_ortho"
OFFICIAL_VANILLA = "official_vanilla"
KOHYA = "kohya"
PEFT = "peft"
STANDARD_LAYOUTS = (KOHYA, PEFT)

# Naming of the module names a format uses, for the ComfyUI key mapping.
NAMING = {
    LYCORIS: "lycoris",  # lycoris_<diffusers path, '.' -> '_'>
    OFFICIAL_ORTHO: "diffusers",  # dotted diffusers module path
    OFFICIAL_VANILLA: "diffusers",
    KOHYA: "kohya",  # lora_unet_... / lycoris_... stems as written
    PEFT: "diffusers",
}

TEXT_ENCODER_PREFIXES = ("lora_te", "lycoris_te", "text_encoder", "te_", "te1_", "te2_")

# official repo processor names -> diffusers module names
_OFFICIAL_PROC = {
    "to_q_lora": "to_q", "to_k_lora": "to_k", "to_v_lora": "to_v", "to_out_lora": "to_out.0",
    "to_q_proj_lora": "add_q_proj", "to_k_proj_lora": "add_k_proj", "to_v_proj_lora": "add_v_proj",
}

_SUFFIXES = {
    # suffix -> (layout family, role)
    ".q_layer.weight": ("ortho", "q"), ".p_layer.weight": ("ortho", "p"), ".lambda_layer": ("ortho", "lam"),
    ".base_q.weight": ("ortho", "q0"), ".base_p.weight": ("ortho", "p0"), ".base_lambda": ("ortho", "lam0"),
    ".base_lambda.weight": ("ortho", "lam0"),
    ".down.weight": ("official_vanilla", "down"), ".up.weight": ("official_vanilla", "up"),
    ".lora_down.weight": (KOHYA, "down"), ".lora_up.weight": (KOHYA, "up"),
    ".lora_A.weight": (PEFT, "down"), ".lora_B.weight": (PEFT, "up"),
    ".alpha": (None, "alpha"),
}


@dataclass
class TLoRA:
    path: str
    format: str
    modules: dict[str, ModuleAdapter]  # diffusion-model modules, keyed by name
    text_encoder_modules: dict[str, ModuleAdapter] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)  # name -> why it is not used
    # schedule values recorded with the file: name -> (value, where it was found)
    recorded: dict[str, tuple[float, str]] = field(default_factory=dict)
    metadata: dict[str, str] = field(default_factory=dict)
    # False where the trainer fed its mask a float timestep (official Flux pipeline: t = sigma * 1000)
    integer_timestep: bool = True

    @property
    def naming(self) -> str:
        return NAMING[self.format]

    @property
    def rank(self) -> int:
        ranks = [m.rank for m in self.modules.values()] or [m.rank for m in self.text_encoder_modules.values()]
        return max(ranks) if ranks else 0

    @property
    def needs_svd_base(self) -> bool:
        return any(m.needs_svd_base and not m.has_base for m in self.modules.values())

    def schedule_defaults(self) -> dict[str, tuple[float, str]]:
        """max_rank, min_rank, alpha with their sources ('file rank', metadata, sidecar, default)."""
        out = {"max_rank": (self.rank, "tensor shapes"), "min_rank": (1, "default"), "alpha": (1.0, "default")}
        out.update(self.recorded)
        return out

    def for_weights(self, weight_shapes: dict[str, tuple[int, ...]]) -> TLoRA:
        """A copy in which modules that cannot patch their layer (weight shapes by module name) are `skipped`.

        Needed for LyCORIS files, whose k x k conv modules look like 1x1 ones. This object stays untouched.
        """
        out = replace(self, modules=dict(self.modules), text_encoder_modules=dict(self.text_encoder_modules),
                      skipped=dict(self.skipped))
        for modules in (out.modules, out.text_encoder_modules):
            for name in [n for n in modules if n in weight_shapes]:
                why = modules[name].fit_error(weight_shapes[name])
                if why is not None:
                    del modules[name]
                    out.skipped[name] = why
        return out

    def summary(self) -> str:
        return (f"{os.path.basename(self.path)}: {self.format}, rank {self.rank}, "
                f"{len(self.modules)} modules, {len(self.text_encoder_modules)} text-encoder modules, "
                f"{len(self.skipped)} skipped")


def _read_state_dict(path: str) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    if not os.path.isfile(path):
        raise TLoRAError(path, "file not found")
    size = os.path.getsize(path)
    if size == 0:
        raise TLoRAError(path, "the file is empty (0 bytes)")
    if path.lower().endswith((".pt", ".pth", ".bin", ".ckpt")):
        return _read_pickle(path), {}
    try:
        with safe_open(path, framework="pt") as f:
            metadata = dict(f.metadata() or {})
            keys = list(f.keys())
            if keys and not any(_split_key(k) for k in keys):
                foreign = keys  # a checkpoint, VAE, ...: say so without reading gigabytes of tensors
            else:
                foreign = None
                sd = {k: f.get_tensor(k) for k in keys}
    except Exception as e:
        raise TLoRAError(path, f"not a readable safetensors file (truncated or corrupt?): {e}") from None
    if foreign is not None:
        raise TLoRAError(path, _guess_other(foreign))
    return sd, metadata


def _read_pickle(path: str) -> dict[str, torch.Tensor]:
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=False)
    except pickle.UnpicklingError as e:
        # name what torch refused, never pass on its hint to retry with weights_only=False
        found = re.search(r"GLOBAL ([\w.]+)", str(e)) or re.search(r"Unsupported operand (\d+)", str(e))
        what = "" if found is None else (f" (it calls {found.group(1)})" if "GLOBAL" in found.group(0)
                                         else f" (unsupported pickle opcode {found.group(1)})")
        raise TLoRAError(path, f"refused: the pickle holds objects other than tensors{what}, which could run "
                               "code when loaded; it was not unpickled") from None
    except Exception as e:
        raise TLoRAError(path, f"not a readable PyTorch file (truncated or corrupt?): {e}") from None
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(k, str) and isinstance(v, torch.Tensor)
                                            for k, v in obj.items()):
        raise TLoRAError(path, "expected a dict of tensors (the official repo's lora.pt), found "
                               f"{type(obj).__name__}")
    return obj


def _split_key(key: str) -> tuple[str, str] | None:
    for suffix in sorted(_SUFFIXES, key=len, reverse=True):
        if key.endswith(suffix):
            return key[: -len(suffix)], suffix
    return None


def _guess_other(keys: list[str]) -> str:
    joined = " ".join(keys[:2000])
    if "model.diffusion_model." in joined or "double_blocks." in joined and "lora" not in joined:
        return "a model checkpoint, not a LoRA"
    if re.search(r"\b(first_stage_model|encoder\.down|decoder\.up|taesd_(en|de)coder\.|vae_scale\b)", joined):
        return "a VAE, not a LoRA"
    if "string_to_param" in joined or "emb_params" in joined or re.search(r"\bclip_[lg]\b", joined):
        return "a textual-inversion embedding, not a LoRA"
    if "hada_w1" in joined or "lokr_w1" in joined or "oft_" in joined:
        return "a LyCORIS file of another algorithm (LoHa/LoKr/OFT), not a T-LoRA"
    if re.search(r"diffusion_model\.|transformer_blocks\.|\b(input_blocks|output_blocks|middle_block)\.\d", joined):
        return "a diffusion-model weight file, not a LoRA"
    return "no T-LoRA or LoRA tensors were recognised"


def _tensor(path, name, group, role, ndim=None):
    t = group.get(role)
    if t is None:
        raise TLoRAError(path, f"module '{name}' has no '{role}' tensor (incomplete or mixed-up file)")
    if not t.is_floating_point():
        raise TLoRAError(path, f"module '{name}': tensor '{role}' is {t.dtype}, expected floating point")
    if not torch.isfinite(t).all():
        raise TLoRAError(path, f"module '{name}': tensor '{role}' contains NaN or Inf")
    return t


def _flatten_factor(path, name, role, t, want_ndim_2=True):
    """(R, in) / (out, R) from a linear or 1x1-conv factor; None for k>1 convs."""
    if t.ndim == 2:
        return t, False
    if t.ndim == 4 and t.shape[2:] == (1, 1):
        return t.reshape(t.shape[0], t.shape[1]), True
    if t.ndim in (3, 4, 5):
        return None, True
    raise TLoRAError(path, f"module '{name}': tensor '{role}' has unexpected shape {tuple(t.shape)}")


def _check_rank(path, name, down, up, extra=()):
    r = down.shape[0]
    if up.shape[1] != r or any(e is not None and e.numel() != r for e in extra):
        shapes = ", ".join(str(tuple(x.shape)) for x in (down, up, *[e for e in extra if e is not None]))
        raise TLoRAError(path, f"module '{name}': rank differs across its tensors ({shapes})")
    if r < 1:
        raise TLoRAError(path, f"module '{name}': rank 0")


def _scalar(path, name, t, default):
    if t is None:
        return default
    if t.numel() != 1:
        raise TLoRAError(path, f"module '{name}': 'alpha' must be one finite number, got shape {tuple(t.shape)}")
    if not torch.isfinite(t).all():
        raise TLoRAError(path, f"module '{name}': 'alpha' must be one finite number, got {t.item()}")
    return float(t.reshape(()).item())


def _official_target(name: str) -> str | None:
    name = re.sub(r"^(unet|transformer)\.", "", name)
    m = re.match(r"^(.*)\.processor\.([a-z_]+)$", name)
    if not m or m.group(2) not in _OFFICIAL_PROC:
        return None
    return f"{m.group(1)}.{_OFFICIAL_PROC[m.group(2)]}"


def _is_text_encoder(name: str) -> bool:
    return name.startswith(TEXT_ENCODER_PREFIXES)


def load_tlora(path: str | os.PathLike, assume_vanilla: bool = False, sidecar: bool = True) -> TLoRA:
    """Read a T-LoRA file of any supported layout.

    assume_vanilla: accept a standard LoRA layout (kohya / PEFT) as a vanilla T-LoRA.
    sidecar: read schedule values from lycoris_config.json / hparams.yml beside the file.
    """
    path = os.fspath(path)
    sd, metadata = _read_state_dict(path)
    if not sd:
        raise TLoRAError(path, "the file holds no tensors")

    groups: dict[str, dict[str, torch.Tensor]] = {}
    families: dict[str, set[str]] = {}
    unknown = []
    for key, t in sd.items():
        split = _split_key(key)
        if split is None:
            unknown.append(key)
            continue
        name, suffix = split
        family, role = _SUFFIXES[suffix]
        groups.setdefault(name, {})[role] = t
        if family is not None:
            families.setdefault(family, set()).add(name)
    fams = {f for f in families}
    if not fams:
        raise TLoRAError(path, _guess_other(list(sd.keys())))
    if len(fams) > 1:
        raise TLoRAError(path, f"mixes several layouts ({', '.join(sorted(fams))}); one file must use one")
    (family,) = fams
    if unknown:
        log.warning("%s: %d tensors of unknown role ignored (e.g. %s)", os.path.basename(path),
                    len(unknown), unknown[0])

    recorded = _recorded_schedule(path, metadata, sidecar)
    marked_tlora = _metadata_says_tlora(metadata)

    if family == "ortho":
        has_base = any("q0" in g for g in groups.values())
        fmt = OFFICIAL_ORTHO if has_base else LYCORIS
    elif family == "official_vanilla":
        fmt = OFFICIAL_VANILLA
    else:
        fmt = family
        if not (assume_vanilla or marked_tlora):
            raise TLoRAError(path, f"this is a standard LoRA ({family} layout) with no T-LoRA marker in its "
                                   "metadata. If it was trained as a vanilla T-LoRA, switch on "
                                   "'vanilla_tlora' (assume_vanilla); otherwise load it with ComfyUI's "
                                   "LoraLoader")

    modules: dict[str, ModuleAdapter] = {}
    te_modules: dict[str, ModuleAdapter] = {}
    skipped: dict[str, str] = {}
    for name in sorted(groups):
        g = groups[name]
        if not any(r in g for r in ("q", "p", "down", "up", "lam")):
            continue  # a stray alpha
        adapter = _build(path, fmt, name, g, skipped)
        if adapter is None:
            continue
        (te_modules if _is_text_encoder(name) else modules)[adapter.name] = adapter
    if not modules and not te_modules:
        raise TLoRAError(path, f"no usable modules ({len(skipped)} skipped: "
                               f"{next(iter(skipped.values()), '')})")
    official_flux = fmt == OFFICIAL_VANILLA and path.lower().endswith((".pt", ".pth", ".bin", ".ckpt"))
    tl = TLoRA(path=path, format=fmt, modules=modules, text_encoder_modules=te_modules,
               integer_timestep=not official_flux,
               skipped=skipped, recorded=recorded, metadata=metadata)
    ranks = {m.rank for m in modules.values()}
    if len(ranks) > 1:
        log.info("%s: modules have different ranks %s; the schedule uses the largest", os.path.basename(path),
                 sorted(ranks))
    return tl


def _build(path, fmt, name, g, skipped) -> ModuleAdapter | None:
    if fmt in (LYCORIS, OFFICIAL_ORTHO):
        q = _tensor(path, name, g, "q")
        p = _tensor(path, name, g, "p")
        lam = _tensor(path, name, g, "lam")
        q2, conv_q = _flatten_factor(path, name, "q_layer.weight", q)
        p2, conv_p = _flatten_factor(path, name, "p_layer.weight", p)
        if q2 is None or p2 is None:
            skipped[name] = "convolution with kernel > 1 (LyCORIS tlora cannot run these either)"
            return None
        _check_rank(path, name, q2, p2, (lam,))
        if fmt == LYCORIS:
            r = q2.shape[0]
            alpha = _scalar(path, name, g.get("alpha"), r)
            alpha = r if alpha == 0 else alpha
            return ModuleAdapter(name=name, kind=ORTHO, up=p2, down=q2, lam=lam.reshape(-1), scale=alpha / r,
                                 needs_svd_base=True, conv=conv_q or conv_p)
        target = _official_target(name)
        if target is None:
            skipped[name] = "not a processor LoRA name of the official repo"
            return None
        q0, _ = _flatten_factor(path, name, "base_q.weight", _tensor(path, name, g, "q0"))
        p0, _ = _flatten_factor(path, name, "base_p.weight", _tensor(path, name, g, "p0"))
        lam0 = _tensor(path, name, g, "lam0")
        if q0 is None or p0 is None or q0.shape != q2.shape or p0.shape != p2.shape:
            raise TLoRAError(path, f"module '{name}': base factors {tuple(g['q0'].shape)}/{tuple(g['p0'].shape)} "
                                   f"do not match trained factors {tuple(q.shape)}/{tuple(p.shape)}")
        _check_rank(path, name, q0, p0, (lam0,))
        return ModuleAdapter(name=target, kind=ORTHO, up=p2, down=q2, lam=lam.reshape(-1), scale=1.0,
                             base_up=p0, base_down=q0, base_lam=lam0.reshape(-1))
    down = _tensor(path, name, g, "down")
    up = _tensor(path, name, g, "up")
    d2, conv_d = _flatten_factor(path, name, "down", down)
    u2, conv_u = _flatten_factor(path, name, "up", up)
    if d2 is None or u2 is None:
        skipped[name] = "convolution with kernel > 1 is not supported for T-LoRA"
        return None
    _check_rank(path, name, d2, u2)
    r = d2.shape[0]
    if fmt == OFFICIAL_VANILLA:
        target = _official_target(name)
        if target is None:
            skipped[name] = "not a processor LoRA name of the official repo"
            return None
        if name.startswith(("single_transformer_blocks.", "transformer.single_transformer_blocks.")) and \
                (target.endswith(("add_q_proj", "add_k_proj", "add_v_proj", "to_out.0"))):
            skipped[name] = "unused by the official Flux forward (single blocks have no context or out projection)"
            return None
        return ModuleAdapter(name=target, kind=VANILLA, up=u2, down=d2, scale=1.0)
    if fmt == KOHYA:
        alpha = _scalar(path, name, g.get("alpha"), r)
        return ModuleAdapter(name=name, kind=VANILLA, up=u2, down=d2, scale=alpha / r, conv=conv_d or conv_u)
    target = re.sub(r"^(base_model\.model\.|unet\.|transformer\.|diffusion_model\.)", "", name)
    return ModuleAdapter(name=target, kind=VANILLA, up=u2, down=d2, scale=1.0, conv=conv_d or conv_u)


# --- schedule values recorded with the file ---------------------------------------------------

_META_KEYS = {
    "max_rank": ("linear_dim", "tlora_max_rank", "max_rank", "rank"),
    "min_rank": ("tlora_min_rank", "min_rank"),
    "alpha": ("tlora_alpha",),
}


def _metadata_says_tlora(metadata: dict[str, str]) -> bool:
    text = " ".join(f"{k}={v}" for k, v in metadata.items()).lower()
    return "tlora" in text or "t-lora" in text


def _pick(source: dict, where: str, out: dict) -> None:
    for field_name, keys in _META_KEYS.items():
        for k in keys:
            v = source.get(k)
            if v is None:
                continue
            try:
                num = float(v)
            except (TypeError, ValueError):
                continue
            if not math.isfinite(num):
                continue
            out[field_name] = (int(num) if field_name != "alpha" else num, where)
            break


def _recorded_schedule(path: str, metadata: dict[str, str], sidecar: bool) -> dict[str, tuple[float, str]]:
    found: dict[str, tuple[float, str]] = {}
    flat = {k: v for k, v in metadata.items() if k in sum(_META_KEYS.values(), ())}
    for k in ("lycoris_config", "tlora_config", "training_config"):
        raw = metadata.get(k)
        if raw:
            try:
                cfg = json.loads(raw)
            except (ValueError, RecursionError):
                log.warning("%s: metadata '%s' is not JSON; ignored", os.path.basename(path), k)
                continue
            if isinstance(cfg, dict):
                _pick(cfg, f"metadata '{k}'", found)
    if flat:
        _pick(flat, "metadata", found)
    if sidecar:
        folder = os.path.dirname(os.path.abspath(path))
        stem = os.path.splitext(os.path.basename(path))[0]
        for cand in (f"{stem}.lycoris_config.json", f"{stem}.json", "lycoris_config.json"):
            sc = os.path.join(folder, cand)
            if os.path.isfile(sc):
                try:
                    with open(sc, encoding="utf-8") as f:
                        cfg = json.load(f)
                except (OSError, ValueError, RecursionError) as e:
                    log.warning("ignoring unreadable sidecar %s: %s", sc, e)
                    continue
                if isinstance(cfg, dict):
                    side: dict = {}
                    _pick(cfg, f"sidecar {cand}", side)
                    for k, v in side.items():
                        found.setdefault(k, v)
                break
        for cand in ("hparams.yml", os.path.join("..", "hparams.yml"), os.path.join("..", "logs", "hparams.yml")):
            hp = os.path.join(folder, cand)
            if os.path.isfile(hp):
                side = {}
                _pick(_simple_yaml(hp), f"sidecar {os.path.normpath(cand)}", side)
                for k, v in side.items():
                    found.setdefault(k, v)
                break
    return found


def _simple_yaml(path: str) -> dict[str, str]:
    """Top-level `key: value` scalars of a small YAML file (no YAML dependency in the core)."""
    out = {}
    try:
        with open(path, encoding="utf-8") as f:
            for line in f:
                m = re.match(r"^\s*([A-Za-z_][\w]*)\s*:\s*([^#\s][^#]*?)\s*(?:#.*)?$", line)
                if m:
                    out.setdefault(m.group(1), m.group(2).strip("'\""))
    except (OSError, ValueError):  # unreadable, or not UTF-8 text
        pass
    return out
