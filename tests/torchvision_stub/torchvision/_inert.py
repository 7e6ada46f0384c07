"""Inert stand-ins: any attribute of a stub module is a class that refuses to run."""

import enum


class InterpolationMode(enum.Enum):
    NEAREST = "nearest"
    NEAREST_EXACT = "nearest-exact"
    BILINEAR = "bilinear"
    BICUBIC = "bicubic"
    BOX = "box"
    HAMMING = "hamming"
    LANCZOS = "lanczos"


def inert(module: str, name: str) -> type:
    """A class named `name` whose instances (and calls) fail loudly: the tests never use torchvision's code."""

    def refuse(*args, **kwargs):
        raise RuntimeError(f"{module}.{name} is a test stand-in for torchvision and cannot run")

    return type(name, (), {"__init__": refuse, "__call__": refuse, "__module__": module})
