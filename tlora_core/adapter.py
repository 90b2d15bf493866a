"""One T-LoRA module as prefix-sliceable factors.

Every format reduces to delta(r) = sum over the first r ranks of rank-one terms:
  ortho (LyCORIS tlora, official Ortho):
      scale * (lambda_i p_i q_i^T - lambda0_i p0_i q0_i^T)
    = scale * ((lambda_i p_i)(q_i - q0_i)^T + (lambda_i p_i - lambda0_i p0_i) q0_i^T)  (stored this way)
  vanilla (official vanilla, standard LoRA layouts):
      scale * up_i down_i^T
`prefix_factors` interleaves each rank's terms as rows of `down` (k*R, in) and `up_t` (k*R, out),
k = 2 for ortho and 1 for vanilla, so the first r ranks are the views down[:k*r] and up_t[:k*r]:
    delta(r) = up_t[:k*r].T @ down[:k*r]   and   y += (x @ down[:k*r].T) @ up_t[:k*r]

Adapters are immutable: `with_base` / `with_rows` return new ones, so an adapter held in a cache is never
changed by a caller.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace

import torch

ORTHO = "ortho"
VANILLA = "vanilla"

Factors = tuple[torch.Tensor, torch.Tensor, int]


@dataclass(frozen=True)
class ModuleAdapter:
    name: str  # the module's name as the file spells it (without the tensor suffix)
    kind: str  # ORTHO or VANILLA
    up: torch.Tensor  # (out, R): p or up
    down: torch.Tensor  # (R, in): q or down
    scale: float = 1.0  # alpha / rank for LyCORIS and kohya layouts, 1 for the official repo
    lam: torch.Tensor | None = None  # (R,) ortho only
    base_up: torch.Tensor | None = None  # (out, R) p0
    base_down: torch.Tensor | None = None  # (R, in) q0
    base_lam: torch.Tensor | None = None  # (R,) lambda0
    svd_base: bool = False  # LyCORIS: the base is the top-R SVD of the model's weight (stored or rebuilt at load)
    conv: bool = False  # 1x1 convolution (weight (out, in, 1, 1))
    tap: bool = False  # conv factors that also run on a k x k conv: at the tap of index `padding`, on its stride
    kernel: tuple[int, int] | None = None  # a LoCon's k x k down kernel (vanilla only): `down` is (R, in * kh * kw)

    @property
    def rank(self) -> int:
        return int(self.down.shape[0])

    @property
    def in_features(self) -> int:
        taps = 1 if self.kernel is None else self.kernel[0] * self.kernel[1]
        return int(self.down.shape[1]) // taps

    @property
    def out_features(self) -> int:
        return int(self.up.shape[0])

    @property
    def weight_shape(self) -> tuple[int, ...]:
        shape = (self.out_features, self.in_features)
        if self.kernel is not None:
            return shape + self.kernel
        return shape + (1, 1) if self.conv else shape

    @property
    def has_base(self) -> bool:
        return self.kind == VANILLA or self.base_down is not None

    @property
    def needs_svd_base(self) -> bool:
        """A LyCORIS module whose base must be rebuilt from the model's weight."""
        return self.svd_base and self.base_down is None

    def with_base(self, u: torch.Tensor, s: torch.Tensor, v: torch.Tensor) -> ModuleAdapter:
        """A copy with the base triplets (u (out, R), s (R,), v (in, R)) of the SVD of the model's weight."""
        if tuple(u.shape) != tuple(self.up.shape) or tuple(v.shape) != (self.in_features, self.rank):
            raise ValueError(f"{self.name}: SVD base of shape {tuple(u.shape)}/{tuple(v.shape)} "
                             f"does not fit factors {tuple(self.up.shape)}/{tuple(self.down.shape)}")
        return replace(self, base_up=u.float(), base_lam=s.float().reshape(-1), base_down=v.T.float())

    def base_triplets(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(u, s, v) of the installed base, as `with_base` takes them."""
        if self.base_up is None or self.base_lam is None or self.base_down is None:
            raise ValueError(f"{self.name}: no base installed")
        return self.base_up, self.base_lam, self.base_down.T

    def fit_error(self, weight_shape: tuple[int, ...] | torch.Size) -> str | None:
        """Why this module cannot patch a layer whose weight has `weight_shape`; None when it can.

        LyCORIS `tlora` writes 1x1 factors for a k x k convolution too (and cannot run them itself), so
        only the layer's weight shape tells such a module from a 1x1 conv's.
        """
        shape = tuple(int(d) for d in weight_shape)
        if self.kernel is not None:
            if shape != self.weight_shape:
                return f"layer weight of shape {shape} does not fit a LoCon module for {self.weight_shape}"
            return None
        if len(shape) > 2 and any(k != 1 for k in shape[2:]) and not self.tap:
            return (f"convolution with kernel {'x'.join(map(str, shape[2:]))} > 1 is not supported "
                    "(LyCORIS tlora saves 1x1 factors for it and cannot run these either)")
        if shape[:2] != (self.out_features, self.in_features):
            return f"layer weight of shape {shape} does not fit factors for {self.weight_shape}"
        return None

    def with_rows(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> ModuleAdapter:
        """A copy whose output rows are transformed by `fn` (a row permutation of an (out, ...) tensor)."""
        return replace(self, up=fn(self.up), base_up=None if self.base_up is None else fn(self.base_up))

    def prefix_factors(self, dtype: torch.dtype | None = None, device: torch.device | str | None = None,
                       strength: float = 1.0) -> Factors:
        """(down (k*R, in), up_t (k*R, out), k) with scale and strength folded into up_t."""
        scale = self.scale * strength
        if self.kind == ORTHO:
            down, up_t = self._ortho_rows(scale)
            k = 2
        else:
            down, up_t, k = self.down.float(), scale * self.up.float().T, 1
        dtype = dtype or torch.float32
        return (down.to(device=device, dtype=dtype).contiguous(), up_t.to(device=device, dtype=dtype).contiguous(), k)

    def _ortho_rows(self, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        if self.base_down is None or self.base_up is None or self.base_lam is None or self.lam is None:
            raise ValueError(f"{self.name}: SVD base not built yet")
        return ortho_rows(self.down.float(), self.up.float(), self.lam.float(), self.base_down.float(),
                          self.base_up.float(), self.base_lam.float(), scale)

    def delta_weight(self, rank: int) -> torch.Tensor:
        """Weight change with the first `rank` ranks active, float32, shaped like the layer's weight."""
        if not 0 <= rank <= self.rank:
            raise ValueError(f"{self.name}: rank must be in [0, {self.rank}], got {rank}")
        down, up_t, k = self.prefix_factors()
        delta = up_t[: k * rank].T @ down[: k * rank]
        return delta.reshape(self.weight_shape)


def align_base_signs(q: torch.Tensor, q0: torch.Tensor, p0: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(q0, p0) with each base rank's sign chosen to agree with the trained q (q_i . q0_i >= 0).

    A rebuilt SVD base may carry the opposite sign per rank to the one the factors were trained against (each term
    lambda0_i p0_i q0_i^T is the same either way), and then q - q0 is large where it should be small: in bf16/fp16
    the difference form loses its precision. The loader and the trainer align the base with this one rule."""
    sgn = torch.where((q.detach() * q0).sum(1) < 0, -1.0, 1.0).to(q0.dtype)
    return q0 * sgn[:, None], p0 * sgn[None, :]


def ortho_rows(q: torch.Tensor, p: torch.Tensor, lam: torch.Tensor, q0: torch.Tensor, p0: torch.Tensor,
               lam0: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(down (2R, in), up_t (2R, out)) of a LyCORIS tlora module, interleaved per rank, base signs aligned:

        lam p q^T - lam0 p0 q0^T  ==  (lam p)(q - q0)^T + (lam p - lam0 p0) q0^T

    the same two rows per rank, but in bf16/fp16 the large trained and base terms never cancel each other.
    Differentiable in q, p and lam (the trainer's forward)."""
    q0, p0 = align_base_signs(q, q0, p0)
    lp = lam[None, :] * p
    lp0 = lam0[None, :] * p0
    down = torch.stack([q - q0, q0], dim=1).flatten(0, 1)
    up_t = scale * torch.stack([lp.T, (lp - lp0).T], dim=1).flatten(0, 1)
    return down, up_t
