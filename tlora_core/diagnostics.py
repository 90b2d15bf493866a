"""Does a LyCORIS T-LoRA fit the checkpoint it is applied to? (base-mismatch detection)

A LyCORIS `tlora` file stores the trained factors (q_layer rows, p_layer columns) but not the SVD
base they started from: that base is rebuilt from the checkpoint at load. Training starts every
q_i / p_i at the base weight's i-th singular vectors v_i / u_i and moves them a little; on the right
checkpoint each trained factor still points mostly along its own partner. On another checkpoint of
the same architecture the rebuilt vectors are different ones, the rebuilt base P0 diag(lambda0) Q0 is
not the one training subtracted, and the delta silently changes.

Figure (`alignment`): for every factor row f_i (q_i, and p_i as a row of p^T), the share of its
energy inside the rebuilt top-r subspace that lies on its own partner,

    c_ij = |cos(f_i, b_j)|,   share_i = c_ii^2 / sum_j c_ij^2,

median over the ranks of a layer (q and p together), then median over layers. Training drift barely
moves it (isotropic drift leaves the top-r span almost untouched, so the share stays near 1 even when
cos(f_i, b_i) is 0.7), while unrelated singular vectors give about 1/r. Measured on the tiny SDXL test
model (110 layers, rank 8, trained factors perturbed with relative strength 0.2 / 0.5 / 1.0, i.e. median
cos(q_i, v_i) 0.98 / 0.89 / 0.71; "delta off" = relative change of the full-rank delta, strength 0.5):

    right base                        0.999 / 0.996 / 0.984
    right base rounded to bf16        0.999 / 0.996 / 0.984   (delta off 2.5%)
    base + 1% noise (light fine-tune) 0.998 / 0.993 / 0.981   (delta off 7%: indistinguishable, near harmless)
    base + 3% noise                   0.985 / 0.981 / 0.965   (delta off 15%)
    base + rank-4 merge, 3% of norm   0.981 / 0.977 / 0.961   (delta off 16%)
    base + 10% noise                  0.824 / 0.822 / 0.812   (delta off 36%)
    base + rank-4 merge, 10% of norm  0.107 / 0.113 / 0.112   (delta off 78%)
    another seed                      0.065 / 0.066 / 0.067   (delta off 142%)

DIFFERENT_BELOW = 0.5 separates another checkpoint (<= 0.12) from the right base (>= 0.98) with a wide
margin on both sides; RELATED_BELOW = 0.9 also flags a heavily changed relative (fine-tune / merge).
Changes small enough to stay above 0.9 move the delta by up to ~15% and are not reported.
"""

from __future__ import annotations

import statistics
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch

from .adapter import ModuleAdapter

DIFFERENT_BELOW = 0.5
RELATED_BELOW = 0.9
_EPS = 1e-12


@dataclass
class Alignment:
    figure: float  # median over layers of the per-layer median share (1 = right base)
    layers: int  # layers measured
    per_layer: dict[str, float] = field(default_factory=dict)

    @property
    def verdict(self) -> str:
        """'ok', 'related' (a changed relative of the training checkpoint) or 'different'."""
        if self.layers == 0 or self.figure >= RELATED_BELOW:
            return "ok"
        return "related" if self.figure >= DIFFERENT_BELOW else "different"


def _shares(factors: torch.Tensor, basis: torch.Tensor) -> list[float]:
    """share_i for the rows of `factors` (r, n) against the rows of `basis` (r, n); zero rows skipped."""
    f, b = factors.double(), basis.double()
    fn, bn = f.norm(dim=1), b.norm(dim=1)
    keep = (fn > _EPS) & (bn > _EPS)  # LyCORIS pads ranks beyond min(out, in) with zero vectors
    if not bool(keep.any()):
        return []
    f, b = f[keep] / fn[keep, None], b[keep] / bn[keep, None]
    c2 = (f @ b.T) ** 2
    share = c2.diagonal() / c2.sum(dim=1).clamp_min(_EPS)
    return [float(x) for x in share.tolist()]


def layer_alignment(adapter: ModuleAdapter, u: torch.Tensor, v: torch.Tensor) -> float | None:
    """Median share of one layer: trained q rows against v (in, r), p columns against u (out, r)."""
    r = min(adapter.rank, u.shape[1], v.shape[1])
    shares = _shares(adapter.down[:r].float(), v[:, :r].T.float().to(adapter.down.device))
    shares += _shares(adapter.up[:, :r].T.float(), u[:, :r].T.float().to(adapter.up.device))
    return statistics.median(shares) if shares else None


def alignment(adapters: Mapping[str, ModuleAdapter],
              triplets: Mapping[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]) -> Alignment:
    """How well a LyCORIS T-LoRA's trained factors sit on the SVD base rebuilt from this checkpoint.

    adapters: module name -> adapter (trained factors); triplets: module name -> (u (out, r), s (r,),
    v (in, r)) as `svd.base_triplets` returns them. Modules without triplets are ignored."""
    per_layer = {}
    for name, (u, _s, v) in triplets.items():
        a = adapters.get(name)
        if a is None or a.lam is None:
            continue
        fig = layer_alignment(a, u, v)
        if fig is not None:
            per_layer[name] = fig
    figure = statistics.median(per_layer.values()) if per_layer else 1.0
    return Alignment(float(figure), len(per_layer), per_layer)


# A self-contained file stores the base it was trained against. On the loaded checkpoint, the relative residual
# |W v_i - s_i u_i| of those triplets is the storage's rounding (bf16 ~0.003, fp8 ~0.03, measured on the tiny test
# models) for the right checkpoint and ~1 or more for another one.
FIT_RELATED_ABOVE = 0.15
FIT_DIFFERENT_ABOVE = 0.5


def base_fit(adapter: ModuleAdapter, weight: torch.Tensor) -> float:
    """How far the stored base triplets of `adapter` are from being singular triplets of `weight`:
    |W V - U diag(s)|_F / |U diag(s)|_F (0 = exactly this weight's, ~1 = unrelated)."""
    u, s, v = (t.double() for t in adapter.base_triplets())
    w = weight.detach().reshape(weight.shape[0], -1).double().to(u.device)
    us = u * s[None, :]
    return float((w @ v - us).norm() / us.norm().clamp_min(_EPS))


def fit_message(file_name: str, figure: float, layers: int) -> str | None:
    """The one warning line when a stored base does not fit the loaded checkpoint."""
    if figure > FIT_DIFFERENT_ABOVE:
        return (f"T-LoRA {file_name}: the SVD base stored in this file is not this checkpoint's "
                f"(residual {figure:.2f} > {FIT_DIFFERENT_ABOVE} over {layers} layers): it was made for a different "
                "base checkpoint, so the result here is not what it was trained to do")
    if figure > FIT_RELATED_ABOVE:
        return (f"T-LoRA {file_name}: the SVD base stored in this file fits this checkpoint only "
                f"roughly (residual {figure:.2f} > {FIT_RELATED_ABOVE} over {layers} layers; a fine-tune or merge "
                "of the one it was made for?)")
    return None


def mismatch_message(file_name: str, al: Alignment) -> str | None:
    """The one warning line for a mismatched base, or None when the base fits."""
    if al.verdict == "different":
        return (f"T-LoRA {file_name}: this T-LoRA was trained on a different base checkpoint "
                f"(alignment {al.figure:.2f} < {DIFFERENT_BELOW} over {al.layers} layers): its delta is defined "
                "against the exact base weights it was trained on, so here it gives a different, unintended "
                "result; load the checkpoint it was trained on")
    if al.verdict == "related":
        return (f"T-LoRA {file_name}: this T-LoRA was trained on a different version of this checkpoint "
                f"(alignment {al.figure:.2f} < {RELATED_BELOW} over {al.layers} layers; a fine-tune or merge?): "
                "results will drift from what it was trained to do; load the checkpoint it was trained on")
    return None
