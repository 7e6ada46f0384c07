"""Test-only stand-in for torchvision: import-time names only (see tests/torchvision_stub/README.md)."""

__version__ = "0.0.0+stub"
