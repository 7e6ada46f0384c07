"""Test-only stand-in for torchvision.transforms (see tests/torchvision_stub/README.md)."""

from torchvision._inert import InterpolationMode, inert
from torchvision.transforms import functional

__all__ = ["InterpolationMode", "functional"]


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return inert(__name__, name)
