"""Turn CLIP checkpoints into clipviz models.

This module holds the state-dict bridge from OpenAI's `clip/model.py` layout: the architecture is inferred from
tensor shapes exactly as OpenAI's `build_model` does, and every key goes through the readable tables below.
Loading is strict: each source key is used or explicitly ignored; a missing, unknown or mis-shaped key is an
error that names it.
"""

from __future__ import annotations

import re
from collections.abc import Mapping

import torch

from configuration_clipviz import CLIPVizConfig
from modeling_clipviz import CLIPVizModel

# Keys of OpenAI checkpoints that are not tensors of the model (OpenAI's `build_model` drops them too).
IGNORED_OPENAI_KEYS = ("input_resolution", "context_length", "vocab_size")

_BN = r"(weight|bias|running_mean|running_var|num_batches_tracked)"

# One residual attention block, shared by the text transformer and the ViT: OpenAI suffix -> clipviz suffix.
BLOCK_KEYS = {
    "attn.in_proj_weight": "self_attn.qkv_proj.weight",
    "attn.in_proj_bias": "self_attn.qkv_proj.bias",
    "attn.out_proj.weight": "self_attn.out_proj.weight",
    "attn.out_proj.bias": "self_attn.out_proj.bias",
    "ln_1.weight": "ln_1.weight",
    "ln_1.bias": "ln_1.bias",
    "ln_2.weight": "ln_2.weight",
    "ln_2.bias": "ln_2.bias",
    "mlp.c_fc.weight": "mlp.fc1.weight",
    "mlp.c_fc.bias": "mlp.fc1.bias",
    "mlp.c_proj.weight": "mlp.fc2.weight",
    "mlp.c_proj.bias": "mlp.fc2.bias",
}
# Where the blocks live: OpenAI prefix -> clipviz prefix (the block index follows both).
BLOCK_PREFIXES = {
    "transformer.resblocks": "text_model.encoder.layers",
    "visual.transformer.resblocks": "vision_model.encoder.layers",
}

# Full-key rules, tried in order: (OpenAI key regex, clipviz key template).
TEXT_RULES = [
    (r"token_embedding\.weight", r"text_model.token_embedding.weight"),
    (r"positional_embedding", r"text_model.position_embedding"),
    (r"ln_final\.(weight|bias)", r"text_model.ln_final.\1"),
    (r"text_projection", r"text_projection"),
    (r"logit_scale", r"logit_scale"),
]
VIT_RULES = [
    (r"visual\.conv1\.weight", r"vision_model.patch_embedding.weight"),
    (r"visual\.class_embedding", r"vision_model.class_embedding"),
    (r"visual\.positional_embedding", r"vision_model.position_embedding"),
    (r"visual\.ln_(pre|post)\.(weight|bias)", r"vision_model.ln_\1.\2"),
    (r"visual\.proj", r"vision_model.proj"),
]
RESNET_RULES = [
    (r"visual\.(conv[123])\.weight", r"vision_model.\1.weight"),
    (rf"visual\.(bn[123])\.{_BN}", r"vision_model.\1.\2"),
    (r"visual\.(layer[1-4]\.\d+)\.(conv[123])\.weight", r"vision_model.\1.\2.weight"),
    (rf"visual\.(layer[1-4]\.\d+)\.(bn[123])\.{_BN}", r"vision_model.\1.\2.\3"),
    (r"visual\.(layer[1-4]\.\d+)\.downsample\.0\.weight", r"vision_model.\1.downsample.conv.weight"),
    (rf"visual\.(layer[1-4]\.\d+)\.downsample\.1\.{_BN}", r"vision_model.\1.downsample.bn.\2"),
    (r"visual\.attnpool\.positional_embedding", r"vision_model.attnpool.position_embedding"),
    (r"visual\.attnpool\.([qkv])_proj\.(weight|bias)", r"vision_model.attnpool.\1_proj.\2"),
    (r"visual\.attnpool\.c_proj\.(weight|bias)", r"vision_model.attnpool.out_proj.\1"),
]
_BLOCK_KEY = re.compile(r"(?P<prefix>(?:visual\.)?transformer\.resblocks)\.(?P<index>\d+)\.(?P<suffix>.+)")


class CheckpointKeyError(KeyError):
    """A checkpoint's keys do not match the architecture: the message names the keys."""

    def __str__(self) -> str:  # KeyError quotes its message; keep it readable
        return str(self.args[0])


def openai_to_clipviz_key(key: str, backbone: str) -> str | None:
    """The clipviz name of an OpenAI state-dict key, or None when the key belongs to no known tensor."""
    block = _BLOCK_KEY.fullmatch(key)
    if block:
        suffix = BLOCK_KEYS.get(block["suffix"])
        if suffix is None or (block["prefix"].startswith("visual") and backbone != "vit"):
            return None
        return f"{BLOCK_PREFIXES[block['prefix']]}.{block['index']}.{suffix}"
    for pattern, template in TEXT_RULES + (VIT_RULES if backbone == "vit" else RESNET_RULES):
        if re.fullmatch(pattern, key):
            return re.sub(f"^{pattern}$", template, key)
    return None


def _count_blocks(state_dict: Mapping, prefix: str) -> int:
    return len({key.split(".")[len(prefix.split("."))] for key in state_dict if key.startswith(prefix + ".")})


def _require(state_dict: Mapping, key: str) -> torch.Tensor:
    if key not in state_dict:
        raise CheckpointKeyError(f"OpenAI checkpoint is missing `{key}`, needed to infer the architecture.")
    return state_dict[key]


def config_from_openai_state_dict(
    state_dict: Mapping[str, torch.Tensor],
    hidden_act: str = "quick_gelu",
    text_heads: int | None = None,
    vision_heads: int | None = None,
    **overrides,
) -> CLIPVizConfig:
    """The architecture of an OpenAI CLIP state dict, inferred from tensor shapes as OpenAI's `build_model` does.

    `hidden_act` ("quick_gelu" as OpenAI, or "gelu" for some open_clip models) applies to both towers. Head
    counts are not stored in checkpoints: OpenAI's rule (64-wide heads) applies unless `text_heads` /
    `vision_heads` say otherwise. Other `overrides` are top-level config fields.
    """
    if "visual.proj" in state_dict:
        conv = _require(state_dict, "visual.conv1.weight")
        width, patch_size = conv.shape[0], conv.shape[-1]
        grid = round((_require(state_dict, "visual.positional_embedding").shape[0] - 1) ** 0.5)
        vision_config = {
            "backbone": "vit",
            "hidden_size": width,
            "num_hidden_layers": _count_blocks(state_dict, "visual.transformer.resblocks"),
            "num_attention_heads": vision_heads or width // 64,
            "patch_size": patch_size,
            "image_size": patch_size * grid,
            "hidden_act": hidden_act,
        }
    else:
        width = _require(state_dict, "visual.layer1.0.conv1.weight").shape[0]
        positions = _require(state_dict, "visual.attnpool.positional_embedding").shape[0]
        grid = round((positions - 1) ** 0.5)
        if grid**2 + 1 != positions:
            raise ValueError(f"`visual.attnpool.positional_embedding` has {positions} rows, not a square grid + 1.")
        vision_config = {
            "backbone": "resnet",
            "resnet_layers": [_count_blocks(state_dict, f"visual.layer{stage}") for stage in (1, 2, 3, 4)],
            "resnet_width": width,
            "num_attention_heads": vision_heads or width * 32 // 64,
            "image_size": grid * 32,
        }
    text_width = _require(state_dict, "ln_final.weight").shape[0]
    vocab_size = _require(state_dict, "token_embedding.weight").shape[0]
    text_config = {
        "vocab_size": vocab_size,
        # OpenAI's BPE vocabulary ends with <|startoftext|>, <|endoftext|>
        "bos_token_id": vocab_size - 2,
        "eos_token_id": vocab_size - 1,
        "hidden_size": text_width,
        "num_attention_heads": text_heads or text_width // 64,
        "num_hidden_layers": _count_blocks(state_dict, "transformer.resblocks"),
        "max_position_embeddings": _require(state_dict, "positional_embedding").shape[0],
        "hidden_act": hidden_act,
    }
    return CLIPVizConfig(
        text_config=text_config,
        vision_config=vision_config,
        projection_dim=_require(state_dict, "text_projection").shape[1],
        **overrides,
    )


def map_openai_state_dict(state_dict: Mapping[str, torch.Tensor], model: CLIPVizModel) -> dict[str, torch.Tensor]:
    """Rename every tensor of an OpenAI state dict to the model's keys, checking names and shapes strictly."""
    backbone = model.config.vision_config.backbone
    expected = model.state_dict()
    mapped, unknown = {}, []
    for key, tensor in state_dict.items():
        if key in IGNORED_OPENAI_KEYS:
            continue
        target = openai_to_clipviz_key(key, backbone)
        if target is None or target not in expected:
            unknown.append(key)
            continue
        if tuple(tensor.shape) != tuple(expected[target].shape):
            raise CheckpointKeyError(
                f"`{key}` has shape {tuple(tensor.shape)} but `{target}` of the inferred {backbone} architecture "
                f"needs {tuple(expected[target].shape)}."
            )
        mapped[target] = tensor
    if unknown:
        raise CheckpointKeyError(f"Unknown keys for an OpenAI CLIP {backbone} checkpoint: {sorted(unknown)}.")
    missing = sorted(set(expected) - set(mapped))
    if missing:
        raise CheckpointKeyError(f"The checkpoint lacks tensors the {backbone} model needs: {missing}.")
    return mapped


def from_openai_state_dict(
    state_dict: Mapping[str, torch.Tensor], dtype: torch.dtype = torch.float32, **config_overrides
) -> CLIPVizModel:
    """A `CLIPVizModel` (eval mode, `dtype`) holding an OpenAI CLIP state dict (fp16 or fp32 tensors).

    The model is built on the meta device and takes the checkpoint's tensors without a copy (no random
    initialization, no second copy of a large checkpoint): where their dtype already is `dtype`, the model's
    parameters share memory with `state_dict`.
    """
    config = config_from_openai_state_dict(state_dict, **config_overrides)
    with torch.device("meta"):
        model = CLIPVizModel(config)
    mapped = map_openai_state_dict(state_dict, model)
    model.load_state_dict(mapped, strict=True, assign=True)
    return model.to(dtype).eval()
