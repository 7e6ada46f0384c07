"""Test-only stand-in for torchvision.ops.misc (see tests/torchvision_stub/README.md)."""

from torch import nn


class FrozenBatchNorm2d(nn.Module):
    """Named in isinstance checks and freezing helpers of open_clip and timm; never built by the tests."""

    def __init__(self, *args, **kwargs):
        raise RuntimeError("torchvision.ops.misc.FrozenBatchNorm2d is a test stand-in and cannot run")
