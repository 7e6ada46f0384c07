"""Test-only stand-in for torchvision.ops (see tests/torchvision_stub/README.md)."""
