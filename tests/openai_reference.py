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


def _load_by_path(filename: str, module_name: str):
    spec = importlib.util.spec_from_file_location(module_name, openai_clip_dir() / filename)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@cache
def openai_model_module():
    """OpenAI's ``clip/model.py`` as a module named ``openai_clip_model``."""
    return _load_by_path("model.py", "openai_clip_model")


@cache
def openai_tokenizer_module():
    """OpenAI's ``clip/simple_tokenizer.py`` as a module named ``openai_clip_tokenizer``."""
    return _load_by_path("simple_tokenizer.py", "openai_clip_tokenizer")


def openai_clip_args(config) -> tuple:
    """Positional arguments of OpenAI's `CLIP(...)` for the architecture of a `CLIPVizConfig`."""
    text, vision = config.text_config, config.vision_config
    if vision.backbone == "vit":
        vision_args = (vision.image_size, vision.num_hidden_layers, vision.hidden_size, vision.patch_size)
    else:
        vision_args = (vision.image_size, tuple(vision.resnet_layers), vision.resnet_width, None)
    text_args = (
        text.max_position_embeddings,
        text.vocab_size,
        text.hidden_size,
        text.num_attention_heads,
        text.num_hidden_layers,
    )
    return (config.projection_dim, *vision_args, *text_args)


def randomized_openai_clip(config, seed: int = 0):
    """OpenAI's CLIP for this architecture, eval mode, with every parameter and BatchNorm statistic random.

    OpenAI's own initialization zeroes biases and the last BatchNorm of every ResNet block, which would hide
    mistakes in those paths; small random offsets make every tensor matter.
    """
    import torch

    torch.manual_seed(seed)
    model = openai_model_module().CLIP(*openai_clip_args(config)).eval()
    _set_vision_heads(model, config.vision_config.num_attention_heads)
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and name != "visual.class_embedding":
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
        for name, buffer in model.named_buffers():
            if name.endswith("running_mean"):
                buffer.normal_(0.0, 0.1)
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    return model


def _set_vision_heads(model, heads: int) -> None:
    """OpenAI derives the image tower's head count from its width (64-wide heads); tiny test configs use
    narrower heads, so the reference takes the config's count (a no-op for the 9 published architectures)."""
    visual = model.visual
    if hasattr(visual, "attnpool"):
        visual.attnpool.num_heads = heads
        return
    for block in visual.transformer.resblocks:
        block.attn.num_heads = heads
        block.attn.head_dim = block.attn.embed_dim // heads
