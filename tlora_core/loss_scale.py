"""Dynamic loss scaling for training with an fp16 model: the rule of `torch.amp.GradScaler`, for any device.

fp16 keeps 10 bits of mantissa and nothing below 6e-8: the gradients that flow back through an fp16 model are the
loss's per-element gradient (about 1 / the number of latent elements) times the layers' Jacobians, and a large
latent or batch pushes them into fp16's subnormal range, where they lose their precision or vanish. The loss is
multiplied by `scale` before the backward pass, the trained (fp32) gradients are divided by it before clipping and
the optimizer step, and a step whose gradients overflowed (inf / nan) is skipped (parameters and optimizer state
unchanged) while the scale is halved; after `growth_interval` good steps in a row the scale doubles. Torch only.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

INIT_SCALE, GROWTH, BACKOFF, INTERVAL = 2.0**16, 2.0, 0.5, 2000  # torch.amp.GradScaler's defaults


class LossScaler:
    """Off (`enabled` False): every method is the identity and no step is ever skipped."""

    def __init__(self, enabled: bool, init_scale: float = INIT_SCALE, growth_factor: float = GROWTH,
                 backoff_factor: float = BACKOFF, growth_interval: int = INTERVAL):
        self.enabled = enabled
        self.scale, self.growth_factor, self.backoff_factor = float(init_scale), growth_factor, backoff_factor
        self.growth_interval, self.growth_tracker = growth_interval, 0
        self.skipped = 0  # steps skipped for gradients that overflowed

    def scale_loss(self, loss: torch.Tensor) -> torch.Tensor:
        return loss * self.scale if self.enabled else loss

    def unscale(self, params: Iterable[torch.Tensor]) -> bool:
        """Divide the gradients by the scale in place; True when they are all finite (the step may be taken)."""
        if not self.enabled:
            return True
        grads: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for p in params:
            if p.grad is not None:
                grads.setdefault((p.grad.device, p.grad.dtype), []).append(p.grad)
        found = []
        for (device, _), group in grads.items():
            inf = torch.zeros(1, device=device)
            try:  # GradScaler's own fused kernel where the device has it
                torch._amp_foreach_non_finite_check_and_unscale_(group, inf, torch.full((1,), 1.0 / self.scale,
                                                                                         device=device))
            except (RuntimeError, NotImplementedError):
                for g in group:
                    g.mul_(1.0 / self.scale)
                    inf += (~torch.isfinite(g)).any().float()
            found.append(inf)
        return not any(bool(f.item()) for f in found)

    def update(self, finite: bool) -> None:
        """After a step: back off (and count the skip) on an overflow, grow after `growth_interval` good steps."""
        if not self.enabled:
            return
        if not finite:
            self.scale *= self.backoff_factor
            self.growth_tracker = 0
            self.skipped += 1
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            self.scale *= self.growth_factor
            self.growth_tracker = 0

    def state_dict(self) -> dict[str, Any]:
        return {"enabled": self.enabled, "scale": self.scale, "growth_tracker": self.growth_tracker,
                "skipped": self.skipped}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue a run: its scale and growth count when it scaled too (a run that did not starts afresh)."""
        if self.enabled and state.get("enabled"):
            self.scale, self.growth_tracker = float(state["scale"]), int(state["growth_tracker"])
        self.skipped = int(state.get("skipped", 0))
