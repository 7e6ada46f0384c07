"""Test-only stand-in for torchvision.datasets (see tests/torchvision_stub/README.md)."""

from torchvision._inert import inert


def __getattr__(name: str):
    if name.startswith("__"):
        raise AttributeError(name)
    return inert(__name__, name)
