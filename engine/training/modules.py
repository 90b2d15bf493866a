"""The trainable modules of a run: the paper's init (the last SVD components of a random matrix,
`tlora_core.random_init`) or the principal SVD init of every target (through the SVD cache the loader shares; only
principal bases are cached). A resumed run replaces them by the file's (`resume.py`)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from ...tlora_core import TLoRAError
from ...tlora_core.digest import weight_digest
from ...tlora_core.random_init import PAPER, module_seed, random_last
from ...tlora_core.svd import compute_base_triplets, default_workers
from ...tlora_core.training import TrainableTLoRA
from .. import bases
from ..files import svd_cache
from ..plan import LayerTarget
from ..train_targets import TrainTarget
from ..weights import UnreadableWeight, layer_weight
from .settings import TrainSettings


def init_modules(patcher, targets: list[TrainTarget], s: TrainSettings, out: str, device,
                  progress: Callable[[int, int], None] | None, resuming: bool = False
                  ) -> tuple[dict[str, TrainableTLoRA], dict[str, str], set]:
    """Every target's module: with `s.init` the paper's, its random last components (seeded per module); else the
    principal SVD of the weight the layer computes with (dequantized; row slice and order as the trainer sees the
    module), through the SVD cache the loader shares. Plus the weights' digests (the checkpoint trained against).
    `resuming` with the paper's init: zeros of the modules' shapes, which the resumed file's modules replace (a file
    without a stored base is refused under that init), so no SVD is spent on them."""
    layer_targets = [LayerTarget(t.path, t.key, shape_only(t, s.rank), t.out_slice, t.reorder) for t in targets]
    try:
        weights = {t.key: layer_weight(patcher, t.key) for t in layer_targets}
    except UnreadableWeight as e:
        raise TLoRAError(out, str(e)) from None
    if s.init == PAPER and resuming:  # the file's factors and stored base replace them all (`resume.py`)
        triplets = {t.name: (torch.zeros(t.out_features, s.rank), torch.zeros(s.rank),
                             torch.zeros(t.in_features, s.rank)) for t in targets}
    elif s.init == PAPER:
        triplets = random_triplets(targets, s, out, progress)
    else:
        jobs = bases.jobs(patcher.model, layer_targets, weights, device)
        triplets = compute_base_triplets(jobs, svd_cache(), progress, workers=default_workers(device))
    modules = {t.name: TrainableTLoRA(t.name, *triplets[t.name], s.scale, t.conv) for t in targets}
    digests = {t.name: weight_digest(bases.with_rows(lt, weights[t.key].dequantized("cpu")))
               for t, lt in zip(targets, layer_targets, strict=True)}
    return modules, digests, {w.kind for w in weights.values()}


def random_triplets(targets: list[TrainTarget], s: TrainSettings, out: str,
                    progress: Callable[[int, int], None] | None) -> dict[str, tuple]:
    """The paper's init of every target (CPU, float32, as the official repository computes it)."""
    triplets = {}
    for i, t in enumerate(targets):
        try:
            triplets[t.name] = random_last(t.in_features, t.out_features, s.rank, module_seed(s.seed, t.name))
        except ValueError as e:
            raise TLoRAError(out, f"{t.name}: {e}: lower the rank") from None
        if progress is not None:
            progress(i + 1, len(targets))
    return triplets


def shape_only(t: TrainTarget, rank: int):
    """A stand-in adapter with a target's name, rank and shape (what the SVD jobs read)."""
    from ...tlora_core.adapter import ORTHO, ModuleAdapter

    return ModuleAdapter(name=t.name, kind=ORTHO, up=torch.empty(t.out_features, rank, device="meta"),
                         down=torch.empty(rank, t.in_features, device="meta"), svd_base=True, conv=t.conv)
