"""OpenAI's own ``clip/model.py`` (PyPI ``openai-clip``), loaded by file path: the parity oracle for the tests.

The ``clip`` package ``__init__`` imports torchvision, which has no CPU build here, so only ``model.py`` is loaded.
"""

import importlib.util
import sys
from functools import cache
from pathlib import Path


@cache
def openai_clip_dir() -> Path:
    """The folder of the installed ``clip`` package, found without importing it."""
    spec = importlib.util.find_spec("clip")
    if spec is None or spec.submodule_search_locations is None:
        raise ImportError("OpenAI's CLIP code is missing: `pip install --no-deps openai-clip` (test-only dependency)")
    return Path(next(iter(spec.submodule_search_locations)))


@cache
def openai_model_module():
    """OpenAI's ``clip/model.py`` as a module named ``openai_clip_model``."""
    path = openai_clip_dir() / "model.py"
    spec = importlib.util.spec_from_file_location("openai_clip_model", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@cache
def openai_tokenizer_module():
    """OpenAI's ``clip/simple_tokenizer.py`` as a module named ``openai_clip_tokenizer``."""
    path = openai_clip_dir() / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("openai_clip_tokenizer", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module
