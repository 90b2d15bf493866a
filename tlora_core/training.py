"""Training a T-LoRA: the trainable module, the per-sample rank mask, timestep draws, the loss weight, the file.

Torch only. The trainable module is LyCORIS' `tlora` parametrisation (q (R, in), p (out, R), lambda (R,), frozen base
q0, p0, lambda0 = the top-R SVD of the layer's weight, "principal" init: the delta starts at exactly 0), computed in
the pack's difference form

    x -> h = x @ down[:2R]^T,   y += (h * mask) @ up_t[:2R]
    down = [q_i - q0_i ; q0_i],  up_t = scale * [lambda_i p_i ; lambda_i p_i - lambda0_i p0_i]  (rows interleaved)

which is exactly LyCORIS' scale * (P diag(lambda m) Q - P0 diag(lambda0 m) Q0) x, per sample: rows past a sample's
rank are multiplied by an exact 0, so they get exactly zero gradient from it, and in bf16 the large trained and
base terms never cancel each other (the subtraction happens in fp32, in the factors).
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import torch
import torch.nn.functional as F

from .adapter import ORTHO, ModuleAdapter, align_base_signs, ortho_rows
from .digest import FORMAT_VERSION, stored_base_digest
from .embed import write_atomically
from .writers import TRAINED_METADATA

METADATA = TRAINED_METADATA  # "tlora_training", JSON: how the file was trained (steps, lr, seed, ...)
LOGIT_NORMAL, UNIFORM = "logit_normal", "uniform"
T_MAX = 1000


class TrainableTLoRA(torch.nn.Module):
    """One module's trainable factors (fp32 parameters) and frozen base (fp32 buffers)."""

    q0: torch.Tensor
    p0: torch.Tensor
    lam0: torch.Tensor

    def __init__(self, name: str, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor, scale: float,
                 conv: bool = False, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.name, self.scale, self.conv = name, float(scale), conv
        # normal tensors even when built where ComfyUI runs nodes (under inference mode): autograd needs them
        with torch.inference_mode(False):
            u, s, v = (t.detach().to(dtype).clone() for t in (u, s.reshape(-1), v))
            self.q = torch.nn.Parameter(v.T.contiguous().clone())  # (R, in)
            self.p = torch.nn.Parameter(u.contiguous().clone())  # (out, R)
            self.lam = torch.nn.Parameter(s.clone())  # (R,)
            self.register_buffer("q0", v.T.contiguous().clone())
            self.register_buffer("p0", u.contiguous().clone())
            self.register_buffer("lam0", s.clone())

    @property
    def rank(self) -> int:
        return int(self.q.shape[0])

    @classmethod
    def from_adapter(cls, a: ModuleAdapter) -> TrainableTLoRA:
        """Resume from a LyCORIS module with its base installed (trained factors and base as the file has them; a
        rebuilt base's signs aligned with the factors as the loader aligns them)."""
        if a.kind != ORTHO or a.base_up is None or a.base_down is None or a.base_lam is None or a.lam is None:
            raise ValueError(f"{a.name}: a T-LoRA module with its base is needed to resume training")
        q0, p0 = align_base_signs(a.down.float(), a.base_down.float(), a.base_up.float())
        m = cls(a.name, p0, a.base_lam, q0.T, a.scale, a.conv)
        with torch.inference_mode(False), torch.no_grad():
            m.q.copy_(a.down.float())
            m.p.copy_(a.up.float())
            m.lam.copy_(a.lam.float().reshape(-1))
        return m

    def factors(self, dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """(down (2R, in), up_t (2R, out)), differentiable, interleaved per rank: the first r ranks are the first
        2r rows, exactly as the loader's `ModuleAdapter.prefix_factors` builds them (the same function)."""
        down, up_t = ortho_rows(self.q, self.p, self.lam, self.q0, self.p0, self.lam0, self.scale)
        return (down, up_t) if dtype is None else (down.to(dtype), up_t.to(dtype))

    def delta(self, x: torch.Tensor, mask: torch.Tensor | None, conv_args: Mapping[str, Any] | None = None
              ) -> torch.Tensor:
        """The module's output change for input x; `mask` is (items, R) of 0/1 (None: every rank). Items of one
        mask row are consecutive in x's batch (a model may fold frames or tokens into the batch)."""
        down, up_t = self.factors(x.dtype)
        if conv_args is not None:
            h = F.conv2d(x, down[:, :, None, None], None, **conv_args)
        else:
            h = F.linear(x, down)
        if mask is not None:
            m = mask.to(h.dtype).repeat_interleave(2, dim=1)
            m = m.repeat_interleave(h.shape[0] // m.shape[0], dim=0)
            shape = [h.shape[0]] + [1] * (h.ndim - 1)
            shape[1 if conv_args is not None else -1] = m.shape[1]
            h = h * m.reshape(shape)
        if conv_args is not None:
            return F.conv2d(h, up_t.T[:, :, None, None])
        return h @ up_t

    def adapter(self) -> ModuleAdapter:
        """The trained module as the loader holds one (base installed, float32)."""
        return ModuleAdapter(name=self.name, kind=ORTHO, up=self.p.detach().clone(), down=self.q.detach().clone(),
                             lam=self.lam.detach().clone(), scale=self.scale, base_up=self.p0.clone(),
                             base_down=self.q0.clone(), base_lam=self.lam0.clone(), svd_base=True, conv=self.conv)


def draw_flow_u(generator: torch.Generator, n: int, how: str = LOGIT_NORMAL, eps: float = 1e-4) -> torch.Tensor:
    """Noise fractions in (0, 1) for flow models: sigmoid(N(0, 1)) (SimpleTuner's default) or uniform; the model's
    own shift turns them into sigmas."""
    if how == LOGIT_NORMAL:
        u = torch.sigmoid(torch.randn(n, generator=generator, dtype=torch.float64))
    elif how == UNIFORM:
        u = torch.rand(n, generator=generator, dtype=torch.float64)
    else:
        raise ValueError(f"timestep sampling must be {LOGIT_NORMAL} or {UNIFORM}, got {how!r}")
    return u.clamp(eps, 1 - eps)


def draw_discrete_t(generator: torch.Generator, n: int) -> torch.Tensor:
    """Integer DDPM timesteps, uniform over 0..999 (as SimpleTuner and the official repository draw them)."""
    return torch.randint(0, T_MAX, (n,), generator=generator)


def loss_weight(c_out: torch.Tensor) -> torch.Tensor:
    """1 / c_out^2: turns the MSE of the denoised image (x0 space) into the MSE of the model's own prediction (eps,
    v or flow velocity), which is what SimpleTuner and the official repository minimise, for any sampling.
    c_out is d(denoised) / d(model output) at the sample's sigma."""
    return 1.0 / c_out.double().square().clamp_min(1e-12)


def lycoris_config(rank: int, linear_alpha: float, min_rank: int, alpha: float, preset: list[str] | None
                   ) -> dict[str, Any]:
    """SimpleTuner's `lycoris_config`: LyCORIS' network arguments, the schedule (tlora_min_rank, the schedule
    exponent tlora_alpha) and, given `preset` (LyCORIS class names), an `apply_preset` of those classes.
    `write_trained` replaces that `apply_preset` with the modules it writes, by name (`module_preset`)."""
    cfg: dict[str, Any] = {"algo": "tlora", "multiplier": 1.0, "linear_dim": rank, "linear_alpha": linear_alpha,
                           "tlora_min_rank": min_rank, "tlora_alpha": alpha}
    if preset:
        cfg["apply_preset"] = {"target_module": preset}
    return cfg


_FNMATCH = {"_": "[._]", "[": "[[]", "]": "[]]", "*": "[*]", "?": "[?]"}


def module_preset(names: Iterable[str], prefix: str = "lycoris") -> dict[str, Any]:
    """The LyCORIS `apply_preset` that selects exactly the modules named (`<prefix>_<module path, '.' -> '_'>`):
    no class (LyCORIS' class presets select other modules on some families: its "Attention" finds none in diffusers'
    Flux, whose attention class is FluxAttention), and one fnmatch pattern per module path, `[._]` where the name has
    `_` (the flattened name does not say which were dots). `LycorisNetwork.apply_preset(p)` then
    `create_lycoris(model, ...)` builds those modules and no other, on any diffusers version that keeps the paths."""
    head = f"{prefix}_"
    names = sorted(set(names))
    if bad := [n for n in names if not n.startswith(head)]:
        raise ValueError(f"module names must start with {head!r}, got {bad[:3]}")
    paths = [n[len(head):] for n in names]
    return {"target_module": [], "target_name": ["".join(_FNMATCH.get(c, c) for c in p) for p in paths],
            "use_fnmatch": True}


def trained_tensors(modules: Mapping[str, TrainableTLoRA], store_base: bool) -> dict[str, torch.Tensor]:
    """LyCORIS' own tensor names and shapes, float32 (a bf16 save puts ~12% error on the small trained change)."""
    out: dict[str, torch.Tensor] = {}
    for name, m in sorted(modules.items()):
        tail = (1, 1) if m.conv else ()
        r, (o, i) = m.rank, (m.p.shape[0], m.q.shape[1])
        out[f"{name}.q_layer.weight"] = m.q.detach().float().cpu().reshape(r, i, *tail).contiguous()
        out[f"{name}.p_layer.weight"] = m.p.detach().float().cpu().reshape(o, r, *tail).contiguous()
        out[f"{name}.lambda_layer"] = m.lam.detach().float().cpu().reshape(1, r).contiguous()
        out[f"{name}.alpha"] = torch.tensor(float(m.scale * r))
        if store_base:
            out[f"{name}.base_q"] = m.q0.float().cpu().reshape(r, i, *tail).contiguous()
            out[f"{name}.base_p"] = m.p0.float().cpu().reshape(o, r, *tail).contiguous()
            out[f"{name}.base_lambda"] = m.lam0.float().cpu().reshape(1, r).contiguous()
    return out


def write_trained(path: str, modules: Mapping[str, TrainableTLoRA], config: Mapping[str, Any],
                  training: Mapping[str, Any], base_source: Mapping[str, Any] | None = None) -> str:
    """A standard LyCORIS `tlora` file (LyCORIS' key names, `lycoris_config` metadata) written atomically, with the
    stored base and its `tlora_base` record when `base_source` is given (the pack's self-contained format), and a
    SimpleTuner-style `lycoris_config.json` sidecar beside it, named `<stem>.lycoris_config.json`. The config's
    `apply_preset` is always `module_preset` of the modules written: what LyCORIS rebuilds from it is this file."""
    tensors = trained_tensors(modules, base_source is not None)
    config = {**config, "apply_preset": module_preset(modules)}
    meta = {"lycoris_config": json.dumps(config, sort_keys=True),
            METADATA: json.dumps(dict(training), sort_keys=True),
            "linear_dim": str(config["linear_dim"]), "tlora_min_rank": str(config["tlora_min_rank"]),
            "tlora_alpha": str(config["tlora_alpha"])}
    if base_source is not None:
        record = {"version": FORMAT_VERSION, **base_source, "layers": len(modules),
                  "digest": stored_base_digest(tensors)}
        meta["tlora_base"] = json.dumps(record, sort_keys=True)
    stem = path[: -len(".safetensors")] if path.endswith(".safetensors") else path
    sidecar = f"{stem}.lycoris_config.json"
    tmp = f"{sidecar}.{os.getpid()}.tmp"
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    try:  # the sidecar first, to a temporary name: nothing is replaced unless both are written
        with open(tmp, "w", encoding="utf-8") as f:
            json.dump(dict(config), f, indent=2, sort_keys=True)
        write_atomically(tensors, path, meta, before_replace=lambda: os.replace(tmp, sidecar))
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
    return path
