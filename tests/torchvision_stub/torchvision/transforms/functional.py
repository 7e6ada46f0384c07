"""Test-only stand-in for torchvision.transforms.functional (see tests/torchvision_stub/README.md)."""

from torchvision._inert import InterpolationMode, inert

__all__ = ["InterpolationMode"]


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return inert(__name__, name)
