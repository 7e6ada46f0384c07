"""The explanation methods' authors' code as test oracles, and the open_clip models they run on.

`legrad-torch` 1.1 (LeGrad) and `gem-torch` 1.0.1 (GEM) are wrappers around `open_clip_torch` 2.23; all three import
torchvision at module level for image transforms only. The tests feed tensors, so a stand-in torchvision
(`tests/torchvision_stub`) is registered as `torchvision` in `sys.modules` just for the import (its submodules load
through the package's own `__path__`; `sys.path` is never touched) and unregistered again. The open_clip model (random
weights) goes through `clipviz-convert`'s open_clip path, so the clipviz side is exactly what a user converts.
"""

import importlib.machinery
import importlib.util
import json
import sys
import warnings
from functools import cache
from pathlib import Path
from types import SimpleNamespace

import torch
from safetensors.torch import save_file

STUB = Path(__file__).resolve().parent / "torchvision_stub"
TEXT_CFG = {"context_length": 77, "vocab_size": 1000, "width": 64, "heads": 4, "layers": 2}
# three blocks, so that "the last two" (LeGrad's default) and GEM's depth are not simply "all of them"
VISION_CFG = {"image_size": 96, "layers": 3, "width": 64, "patch_size": 16, "head_width": 16}
EMBED_DIM = 32


@cache
def authors_packages() -> SimpleNamespace:
    """`open_clip`, `legrad` and `gem`, imported with the torchvision stand-in (unregistered again afterwards)."""
    spec = importlib.machinery.PathFinder.find_spec("torchvision", [str(STUB)])
    sys.modules["torchvision"] = stand_in = importlib.util.module_from_spec(spec)
    try:
        spec.loader.exec_module(stand_in)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")  # deprecation notices of timm and open_clip
            try:
                import gem
                import legrad
                import open_clip
            except ImportError as error:
                raise ImportError(
                    f"{error}: the oracle tests need the authors' packages (test-only): "
                    "`pip install --no-deps legrad-torch==1.1 gem-torch==1.0.1 open_clip_torch==2.23.0 timm==1.0.31` "
                    "plus einops, matplotlib, opencv-python-headless (see .ci/run)"
                ) from error
    finally:
        for name, module in list(sys.modules.items()):
            if str(getattr(module, "__file__", "") or "").startswith(str(STUB)):
                del sys.modules[name]  # open_clip keeps its references; nothing else sees the stand-in
    return SimpleNamespace(open_clip=open_clip, legrad=legrad, gem=gem)


def random_open_clip(seed: int = 0):
    """A tiny open_clip ViT `CLIP` (GELU, as open_clip's own models) with every parameter random: biases and
    LayerNorms get offsets (open_clip zeroes / unit-initializes them) and queries/keys are doubled so that
    attention is far from uniform."""
    open_clip = authors_packages().open_clip
    torch.manual_seed(seed)
    model = open_clip.model.CLIP(EMBED_DIM, VISION_CFG, TEXT_CFG, quick_gelu=False).eval()
    with torch.no_grad():
        for name, parameter in model.named_parameters():
            if parameter.ndim == 1 and "class_embedding" not in name:
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
        for block in model.visual.transformer.resblocks:
            width = block.attn.embed_dim
            block.attn.in_proj_weight[: 2 * width].mul_(2.0)
    return model


def convert_open_clip(model, folder: Path):
    """`model` saved as an open_clip folder, converted by `clipviz-convert`, loaded as a `CLIPVizModel`."""
    import convert_weights
    from modeling_clipviz import CLIPVizModel

    source = folder / "open-clip"
    source.mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, source / "open_clip_model.safetensors")
    model_cfg = {"embed_dim": EMBED_DIM, "quick_gelu": False, "vision_cfg": VISION_CFG, "text_cfg": TEXT_CFG}
    (source / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    output = folder / "converted"
    code = convert_weights.main([str(source), "--output-dir", str(output), "--license", "mit"])
    assert code == 0, "clipviz-convert failed on the open_clip folder"
    return CLIPVizModel.from_pretrained(output).eval()
