"""OpenAI's CLIP release where clipviz meets it: its image normalization, and its own model code as a reference.

OpenAI's ``clip/model.py`` (PyPI ``openai-clip``) is the independent implementation every conversion is checked
against (``clipviz.verify``) and the tests' oracle. It is loaded by file path: the ``clip`` package's ``__init__``
imports torchvision, which the model code does not need and clipviz never depends on.
"""

from __future__ import annotations

import importlib.util
import sys
from functools import cache
from pathlib import Path

# The per-channel pixel mean and standard deviation of OpenAI's preprocessing (clip.py `_transform`).
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@cache
def openai_clip_dir() -> Path:
    """The folder of the installed ``clip`` package, found without importing it."""
    spec = importlib.util.find_spec("clip")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError("OpenAI's clip package is not installed (`pip install --no-deps openai-clip`)")
    return Path(next(iter(spec.submodule_search_locations)))


def load_openai_clip_file(filename: str, module_name: str):
    """One file of the ``clip`` package (e.g. ``"model.py"``) as a module registered as ``module_name``."""
    if module_name in sys.modules:
        return sys.modules[module_name]
    spec = importlib.util.spec_from_file_location(module_name, openai_clip_dir() / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[module_name] = module
    spec.loader.exec_module(module)
    return module


def openai_model_module():
    """OpenAI's ``clip/model.py`` as a module named ``openai_clip_model``."""
    return load_openai_clip_file("model.py", "openai_clip_model")


def openai_clip_args(config) -> tuple:
    """Positional arguments of OpenAI's ``CLIP(...)`` for the architecture of a ``CLIPVizConfig``."""
    text, vision = config.text_config, config.vision_config
    if vision.backbone == "vit":
        vision_args = (vision.image_size, vision.num_hidden_layers, vision.hidden_size, vision.patch_size)
    else:
        vision_args = (vision.image_size, tuple(vision.resnet_layers), vision.resnet_width, None)
    text_args = (text.max_position_embeddings, text.vocab_size, text.hidden_size, text.num_attention_heads)
    return (config.projection_dim, *vision_args, *text_args, text.num_hidden_layers)


def set_vision_heads(model, heads: int) -> None:
    """OpenAI derives the image tower's head count from its width (64-wide heads, or width * 32 // 64 for the
    ResNet's attention pool); other head counts (tiny test configs, some open_clip models) are set here. A no-op
    for the 9 published architectures."""
    visual = model.visual
    if hasattr(visual, "attnpool"):
        visual.attnpool.num_heads = heads
        return
    for block in visual.transformer.resblocks:
        block.attn.num_heads, block.attn.head_dim = heads, block.attn.embed_dim // heads
