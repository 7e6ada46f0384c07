"""What clipviz knows about CLIP state dicts: every key name, in readable tables, and the architecture behind them.

* OpenAI's `clip/model.py` layout -> clipviz: the architecture is inferred from tensor shapes exactly as OpenAI's
  `build_model` does (`config_from_openai_state_dict`), and every key goes through the tables below
  (`openai_to_clipviz_key`, `map_openai_state_dict`). Loading is strict: each source key is used or explicitly
  ignored; a missing, unknown or mis-shaped key is a `CheckpointKeyError` that names it.
* Other layouts -> OpenAI's (`to_openai_layout`): transformers' `CLIPModel` (and back, for the parity reference)
  and open_clip checkpoints of OpenAI's architecture.
* `transformers_clip_config`: transformers' `CLIPConfig` of the same ViT architecture as a `CLIPVizConfig`.
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
    counts are not in a state dict's shapes: OpenAI's rule (64-wide heads) applies unless `text_heads` /
    `vision_heads` say otherwise (the converter passes what a TorchScript archive or a config records). Other `overrides` are top-level config fields.
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
        if tensor.is_floating_point() != expected[target].is_floating_point() or tensor.is_complex():
            kind = "floating-point" if expected[target].is_floating_point() else "integer"
            raise CheckpointKeyError(
                f"`{key}` holds {str(tensor.dtype).removeprefix('torch.')} values but `{target}` needs {kind} "
                "values: the checkpoint is damaged or not a CLIP model."
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


# ---- transformers' CLIPModel <-> OpenAI layout (ViT image towers: transformers' CLIP has no ModifiedResNet) ----

# Whole tensors that only change their name: transformers key -> OpenAI key.
TRANSFORMERS_KEYS = {
    "text_model.embeddings.token_embedding.weight": "token_embedding.weight",
    "text_model.embeddings.position_embedding.weight": "positional_embedding",
    "text_model.final_layer_norm.weight": "ln_final.weight",
    "text_model.final_layer_norm.bias": "ln_final.bias",
    "vision_model.embeddings.class_embedding": "visual.class_embedding",
    "vision_model.embeddings.patch_embedding.weight": "visual.conv1.weight",
    "vision_model.embeddings.position_embedding.weight": "visual.positional_embedding",
    "vision_model.pre_layrnorm.weight": "visual.ln_pre.weight",  # sic: transformers spells it "layrnorm"
    "vision_model.pre_layrnorm.bias": "visual.ln_pre.bias",
    "vision_model.post_layernorm.weight": "visual.ln_post.weight",
    "vision_model.post_layernorm.bias": "visual.ln_post.bias",
    "logit_scale": "logit_scale",
}
# nn.Linear stores [out, in]; OpenAI's projections are plain [in, out] matrices, so these are transposed.
TRANSFORMERS_TRANSPOSED_KEYS = {
    "text_projection.weight": "text_projection",
    "visual_projection.weight": "visual.proj",
}
# One encoder layer: transformers suffix -> OpenAI suffix (q/k/v projections: see TRANSFORMERS_QKV).
TRANSFORMERS_BLOCK_KEYS = {
    "self_attn.out_proj.weight": "attn.out_proj.weight",
    "self_attn.out_proj.bias": "attn.out_proj.bias",
    "layer_norm1.weight": "ln_1.weight",
    "layer_norm1.bias": "ln_1.bias",
    "layer_norm2.weight": "ln_2.weight",
    "layer_norm2.bias": "ln_2.bias",
    "mlp.fc1.weight": "mlp.c_fc.weight",
    "mlp.fc1.bias": "mlp.c_fc.bias",
    "mlp.fc2.weight": "mlp.c_proj.weight",
    "mlp.fc2.bias": "mlp.c_proj.bias",
}
# transformers splits OpenAI's fused input projection in three; OpenAI stacks q, k, v in this order along dim 0.
QKV_ORDER = ("q", "k", "v")
TRANSFORMERS_QKV = {"weight": "attn.in_proj_weight", "bias": "attn.in_proj_bias"}
TRANSFORMERS_BLOCK_PREFIXES = {
    "text_model.encoder.layers": "transformer.resblocks",
    "vision_model.encoder.layers": "visual.transformer.resblocks",
}
# Buffers that older transformers versions saved; they are recomputed at load time, never weights.
IGNORED_TRANSFORMERS_KEYS = ("text_model.embeddings.position_ids", "vision_model.embeddings.position_ids")

_TRANSFORMERS_BLOCK_KEY = re.compile(
    r"(?P<prefix>(?:text|vision)_model\.encoder\.layers)\.(?P<index>\d+)\.(?P<suffix>.+)"
)
_TRANSFORMERS_QKV_KEY = re.compile(r"self_attn\.(?P<part>[qkv])_proj\.(?P<kind>weight|bias)")


def is_transformers_layout(state_dict: Mapping) -> bool:
    """Whether a state dict uses transformers' CLIPModel names rather than OpenAI's (`text_model.*`, `vision_model.*`)."""
    return any(key.startswith(("text_model.", "vision_model.", "visual_projection.")) for key in state_dict)


def transformers_to_openai_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A transformers `CLIPModel` state dict in OpenAI's layout, via the tables above.

    Renamed tensors are the same objects; the two projections become transposed views; each layer's q/k/v
    projections are concatenated (a new tensor) into OpenAI's `in_proj_weight` / `in_proj_bias`. Unknown keys and
    incomplete q/k/v triples raise `CheckpointKeyError` naming them.
    """
    converted, unknown, fused = {}, [], {}
    for key, tensor in state_dict.items():
        if key in IGNORED_TRANSFORMERS_KEYS:
            continue
        if key in TRANSFORMERS_KEYS:
            converted[TRANSFORMERS_KEYS[key]] = tensor
            continue
        if key in TRANSFORMERS_TRANSPOSED_KEYS:
            converted[TRANSFORMERS_TRANSPOSED_KEYS[key]] = tensor.t()
            continue
        block = _TRANSFORMERS_BLOCK_KEY.fullmatch(key)
        if block:
            prefix = f"{TRANSFORMERS_BLOCK_PREFIXES[block['prefix']]}.{block['index']}"
            part = _TRANSFORMERS_QKV_KEY.fullmatch(block["suffix"])
            if part:
                fused.setdefault(f"{prefix}.{TRANSFORMERS_QKV[part['kind']]}", {})[part["part"]] = tensor
                continue
            if block["suffix"] in TRANSFORMERS_BLOCK_KEYS:
                converted[f"{prefix}.{TRANSFORMERS_BLOCK_KEYS[block['suffix']]}"] = tensor
                continue
        unknown.append(key)
    if unknown:
        raise CheckpointKeyError(
            f"Keys that a transformers CLIPModel (ViT) checkpoint does not have: {sorted(unknown)}. Only "
            "`CLIPModel` checkpoints in the layout of openai/clip-vit-base-patch32 can be converted."
        )
    for target, parts in fused.items():
        missing = [f"{p}_proj" for p in QKV_ORDER if p not in parts]
        if missing:
            raise CheckpointKeyError(f"`{target}` needs the q, k and v projections, but {missing} are missing.")
        converted[target] = torch.cat([parts[p] for p in QKV_ORDER], dim=0)
    return converted


def openai_to_transformers_state_dict(state_dict: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The inverse of `transformers_to_openai_state_dict` (ViT only): views of the OpenAI tensors, for building
    transformers' own `CLIPModel` as an independent reference without copying weights."""
    names = {openai: hf for hf, openai in TRANSFORMERS_KEYS.items()}
    transposed = {openai: hf for hf, openai in TRANSFORMERS_TRANSPOSED_KEYS.items()}
    block_names = {openai: hf for hf, openai in TRANSFORMERS_BLOCK_KEYS.items()}
    fused_names = {openai: kind for kind, openai in TRANSFORMERS_QKV.items()}
    prefixes = {openai: hf for hf, openai in TRANSFORMERS_BLOCK_PREFIXES.items()}
    converted, unknown = {}, []
    for key, tensor in state_dict.items():
        block = _BLOCK_KEY.fullmatch(key)
        if key in IGNORED_OPENAI_KEYS:
            continue
        if key in names:
            converted[names[key]] = tensor
        elif key in transposed:
            converted[transposed[key]] = tensor.t()
        elif block and block["suffix"] in fused_names:
            prefix = f"{prefixes[block['prefix']]}.{block['index']}.self_attn"
            for part, chunk in zip(QKV_ORDER, tensor.chunk(3, dim=0), strict=True):
                converted[f"{prefix}.{part}_proj.{fused_names[block['suffix']]}"] = chunk
        elif block and block["suffix"] in block_names:
            converted[f"{prefixes[block['prefix']]}.{block['index']}.{block_names[block['suffix']]}"] = tensor
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointKeyError(f"No transformers CLIPModel name for {sorted(unknown)} (a ResNet image tower?).")
    return converted


def transformers_clip_config(config: CLIPVizConfig):
    """transformers' `CLIPConfig` of the same architecture (ViT image towers only: transformers' CLIP has no
    ModifiedResNet), for building its `CLIPModel` as a reference or a speed baseline."""
    from transformers import CLIPConfig

    text, vision = config.text_config, config.vision_config
    if vision.backbone != "vit":
        raise ValueError("transformers' CLIPModel has no ResNet image tower; only ViT configs have a CLIPConfig.")
    return CLIPConfig(
        text_config={
            "vocab_size": text.vocab_size,
            "hidden_size": text.hidden_size,
            "intermediate_size": text.intermediate_size,
            "num_hidden_layers": text.num_hidden_layers,
            "num_attention_heads": text.num_attention_heads,
            "max_position_embeddings": text.max_position_embeddings,
            "hidden_act": text.hidden_act,
            "layer_norm_eps": text.layer_norm_eps,
            "bos_token_id": text.bos_token_id,
            "eos_token_id": text.eos_token_id,
            "pad_token_id": text.pad_token_id,
        },
        vision_config={
            "image_size": vision.image_size,
            "patch_size": vision.patch_size,
            "hidden_size": vision.hidden_size,
            "intermediate_size": vision.intermediate_size,
            "num_hidden_layers": vision.num_hidden_layers,
            "num_attention_heads": vision.num_attention_heads,
            "hidden_act": vision.hidden_act,
            "layer_norm_eps": vision.layer_norm_eps,
        },
        projection_dim=config.projection_dim,
    )


# ---- open_clip checkpoints of OpenAI's architecture ----

# Prefixes that training wrappers put in front of every key: DistributedDataParallel, torch.compile.
OPEN_CLIP_WRAPPER_PREFIXES = ("module.", "_orig_mod.")
# open_clip's CustomTextCLIP keeps the text tower under `text.`; OpenAI's CLIP keeps it at the top level.
OPEN_CLIP_RULES = [
    (r"text\.(token_embedding\.weight|positional_embedding|ln_final\.(?:weight|bias)|text_projection)", r"\1"),
    (r"text\.(transformer\.resblocks\..+)", r"\1"),
]
# Keys of open_clip architectures that are not OpenAI's, so that the error can say what is unsupported.
OPEN_CLIP_UNSUPPORTED_KEYS = [
    (r"logit_bias", "a SigLIP logit bias"),
    (r".*\.ls_[12]\.gamma", "LayerScale in the residual blocks"),
    (r".*\.(?:attn|mlp)\.ln\.(?:weight|bias)", "extra LayerNorms inside attention/MLP (scale_attn, scale_fc)"),
    (r"visual\.trunk\..*", "a timm image tower"),
    (r"text\.transformer\.(?:embeddings|encoder)\..*", "a Hugging Face text tower"),
    (r"text_decoder\..*", "CoCa's caption decoder"),
    (r"visual\.attn_pool\..*", "an attentional pooler (CoCa)"),
    (r"text\.text_projection\.(?:weight|bias)", "a linear-layer text projection"),
    (r"text\.cls_emb", "a text class token"),
]


def open_clip_to_openai_state_dict(state_dict: Mapping[str, torch.Tensor]) -> tuple[dict[str, torch.Tensor], list[str]]:
    """An open_clip `CLIP`/`CustomTextCLIP` state dict in OpenAI's layout, and the list of changes that were needed.

    open_clip's OpenAI-architecture models use OpenAI's names already; training wrappers add prefixes, the
    custom-text variant moves the text tower under `text.`, and some versions store `logit_scale` as `[1]`. An
    empty change list means the dict was in OpenAI's layout already. Keys of other open_clip architectures raise
    `CheckpointKeyError` saying which feature they belong to.
    """
    changes = []
    keys = list(state_dict)
    for prefix in OPEN_CLIP_WRAPPER_PREFIXES:
        if keys and all(key.startswith(prefix) for key in keys):
            keys = [key[len(prefix) :] for key in keys]
            changes.append(f"stripped the `{prefix}` prefix")
    unsupported = sorted(
        {what for key in keys for pattern, what in OPEN_CLIP_UNSUPPORTED_KEYS if re.fullmatch(pattern, key)}
    )
    if unsupported:
        raise CheckpointKeyError(
            f"This open_clip checkpoint uses {', '.join(unsupported)}: not part of OpenAI's CLIP architecture, "
            "which is the only one clipviz reproduces."
        )
    converted = {}
    for key, tensor in zip(keys, state_dict.values(), strict=True):
        for pattern, template in OPEN_CLIP_RULES:
            if re.fullmatch(pattern, key):
                key = re.sub(f"^{pattern}$", template, key)
                if "moved the text tower out of `text.`" not in changes:
                    changes.append("moved the text tower out of `text.`")
                break
        if key == "logit_scale" and tensor.ndim == 1 and tensor.numel() == 1:
            tensor = tensor.reshape(())
            changes.append("made `logit_scale` a scalar")
        converted[key] = tensor
    return converted, changes


def to_openai_layout(state_dict: Mapping[str, torch.Tensor], source_format: str = "auto") -> tuple[dict, list[str]]:
    """Any supported layout -> OpenAI's, and the changes made (empty for a checkpoint in OpenAI's layout already).

    `source_format` "transformers" insists on transformers' names; "openai" and "open_clip" insist on OpenAI's.
    """
    transformers_names = is_transformers_layout(state_dict)
    if source_format == "transformers" and not transformers_names:
        raise CheckpointKeyError("--source-format transformers, but the keys are not transformers' CLIPModel names.")
    if source_format in ("openai", "open_clip") and transformers_names:
        raise CheckpointKeyError(f"--source-format {source_format}, but the keys are transformers' CLIPModel names.")
    changes = []
    if transformers_names:
        state_dict = transformers_to_openai_state_dict(state_dict)
        changes.append("renamed transformers' CLIPModel keys and fused q/k/v")
    state_dict, open_clip_changes = open_clip_to_openai_state_dict(state_dict)
    return state_dict, changes + open_clip_changes
