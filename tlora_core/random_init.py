"""The paper's init of a trainable T-LoRA module: the last SVD components of a random matrix.

The official repository (ControlGenAI/T-LoRA, `OrthogonalLoRALinearLayer` with `sig_type="last"`, the paper's
`--trainer_type=ortho_lora --sig_type=last`) draws M ~ N(0, std 1/r) of shape (in_features, out_features), takes its
full SVD M = U diag(S) Vh (`torch.linalg.svd`, full matrices, float32 on the CPU) and starts

    q = U[-r:, :]   (r, in)      p = Vh[:, -r:]   (out, r)      lambda = S[-r:]

with the frozen base q0, p0, lambda0 equal to them, so the delta starts at exactly 0 (updates at scale 1). The
module is not built from the layer's weight: a file trained from it must store its base.

Each module draws from its own generator, seeded with `module_seed(seed, name)`: the run's seed plus the first 8
bytes of the SHA-256 of the module's name, so a module's init does not depend on which other modules are trained.
"""

from __future__ import annotations

import hashlib

import torch

PAPER = "random, last components (paper)"
PRINCIPAL = "weights, principal (LyCORIS)"
INITS = (PAPER, PRINCIPAL)
RANDOM_BASE = "random_last"  # the `base_init` of a stored base made this way (its `tlora_base` record)


def module_seed(seed: int, name: str) -> int:
    """The seed of one module's random matrix: the run's seed plus a hash of the module's name (mod 2**63)."""
    return (int(seed) + int.from_bytes(hashlib.sha256(name.encode()).digest()[:8], "little")) % 2**63


def random_last(in_features: int, out_features: int, rank: int, seed: int
                ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(u (out, r), s (r,), v (in, r)) in the layout of `TrainableTLoRA(name, u, s, v, ...)` (q = v^T, p = u,
    lambda = s): the official `sig_type="last"` init from a generator seeded with `seed`."""
    if rank > min(in_features, out_features):
        raise ValueError(f"rank {rank} is larger than the layer ({out_features} x {in_features}) allows "
                         f"({min(in_features, out_features)})")
    g = torch.Generator().manual_seed(seed)
    with torch.inference_mode(False), torch.no_grad():
        m = torch.normal(0.0, 1.0 / rank, size=(in_features, out_features), generator=g, dtype=torch.float32)
        u, s, vh = torch.linalg.svd(m)
        q, p, lam = u[-rank:].clone(), vh[:, -rank:].clone(), s[-rank:].clone()
    return p, lam, q.T
