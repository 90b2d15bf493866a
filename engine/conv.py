"""How factors run on a convolution layer: one rule for the loader and the trainer."""

from __future__ import annotations

import torch


def conv_args(module, kernel: tuple[int, int] | None = None) -> dict | None:
    """The `F.conv2d` arguments of a layer's factors (None: not a convolution, the factors run as a linear).

      1x1 factors on a 1x1 conv, or a LoCon's k x k down kernel (`kernel`):  the layer's own stride, padding,
                                                                             dilation and groups
      1x1 factors on a k x k conv:  the layer's stride, no padding, no dilation: the factors act as the k x k
                                    kernel's tap of index `padding` (zero elsewhere), as the trainers that write
                                    such files run them (Enferlain's sd-scripts, the LyCORIS fork that stores bases)
    Train T-LoRA targets 1x1 convs only today; a k x k target would train by the same rule the loader runs it with.
    """
    if not isinstance(module, torch.nn.Conv2d):
        return None
    if any(k != 1 for k in module.kernel_size) and kernel is None:
        return {"stride": module.stride, "padding": 0, "dilation": 1, "groups": 1}
    return {"stride": module.stride, "padding": module.padding, "dilation": module.dilation, "groups": module.groups}
