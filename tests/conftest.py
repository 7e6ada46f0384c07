"""Shared fixtures only; the helpers and tiny configurations they use live in ``tests/helpers.py`` (import from
there, never from this file: pytest loads conftest itself)."""

import pytest

from tests.helpers import BACKBONES
from tests.openai_reference import openai_tokenizer_module


@pytest.fixture(params=BACKBONES)
def backbone(request) -> str:
    return request.param


@pytest.fixture(scope="session")
def simple_tokenizer():
    """OpenAI's own ``SimpleTokenizer`` (clip/simple_tokenizer.py), the tokenizers' oracle."""
    return openai_tokenizer_module().SimpleTokenizer()
