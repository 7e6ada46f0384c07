"""Shared fixtures only; the helpers and tiny configurations they use live in ``tests/helpers.py`` (import from
there, never from this file: pytest loads conftest itself)."""

import pytest

from tests.helpers import BACKBONES


@pytest.fixture(params=BACKBONES)
def backbone(request) -> str:
    return request.param
