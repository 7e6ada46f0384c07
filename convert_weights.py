"""Turn CLIP checkpoints into clipviz models.

This module holds the state-dict bridge from OpenAI's `clip/model.py` layout: the architecture is inferred from
tensor shapes exactly as OpenAI's `build_model` does, and every key goes through the readable tables below.
Loading is strict: each source key is used or explicitly ignored; a missing, unknown or mis-shaped key is an
error that names it.

Other layouts are first brought to OpenAI's by the tables further down (transformers' `CLIPModel`, open_clip), and
`main()` is the `clipviz-convert` command: any of those checkpoints -> a verified Hub repo folder -> the Hub.
Run `python convert_weights.py --help` for the flags.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

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


# ---- the converter: a checkpoint -> a verified Hub repo folder -> the Hub ----

HIDDEN_ACTS = ("quick_gelu", "gelu")


class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked (e.g. its activation is unknown, a bad repo id); says why."""


@dataclasses.dataclass
class ConvertOptions:
    """What `clipviz-convert` was asked to do; the fields mirror the command-line flags."""

    output_dir: Path
    source: str | None = None
    openai_model: str | None = None
    source_format: str = "auto"
    source_revision: str | None = None
    hidden_act: str | None = None
    text_heads: int | None = None
    vision_heads: int | None = None
    cache_dir: str | None = None
    download_base_url: str | None = None
    dtype: str = "fp32"
    max_shard_size: int | None = None
    overwrite: bool = False
    license: str | None = None
    base_model: str | None = None
    tags: list[str] = dataclasses.field(default_factory=list)
    push_to_hub: str | None = None
    private: bool = False
    revision: str | None = None
    create_pr: bool = False
    commit_message: str | None = None


@dataclasses.dataclass
class _Written:
    """What the reading/writing step hands on; holds no source tensors, so they are freed before verification."""

    config: CLIPVizConfig
    source: object  # clipviz.sources.Source with an emptied state_dict
    records: dict
    probe: object
    references: dict
    notes: list[str]
    parameters: int
    source_bytes: int


@dataclasses.dataclass
class ConversionResult:
    output_dir: Path
    config: CLIPVizConfig
    architecture: str
    source_description: str
    parameters: int
    source_bytes: int
    weight_files: list[str]
    weight_bytes: int
    dtype: torch.dtype
    report: object  # clipviz.verify.VerificationReport
    seconds: float
    push: object = None  # clipviz.push.PushResult


def convert_checkpoint(options: ConvertOptions) -> ConversionResult:
    """Read, convert, write, verify (and push): the whole of `clipviz-convert`. Nothing is left in
    `options.output_dir` unless every step up to verification succeeded."""
    from clipviz import hub_repo, model_card, push, verify

    started = time.perf_counter()
    output_dir = Path(options.output_dir).expanduser().resolve()
    hub_repo.check_output_dir(output_dir, options.overwrite)
    if options.push_to_hub:
        _check_repo_id(options.push_to_hub)
        _status(f"Hub account: {push.check_token()}")
    dtype = hub_repo.DTYPES[options.dtype]
    return_freed_memory_promptly()
    with hub_repo.staged_folder(output_dir, options.overwrite) as staging:
        written = _read_convert_write(options, staging, dtype)
        release_memory()  # the source tensors are gone: the reloaded model is the only copy from here on
        _status("Verifying: reloading the folder with AutoModel.from_pretrained(trust_remote_code=True)")
        report = verify.verify_folder(staging, written.records, dtype, written.probe, written.references)
        weight_files = sorted(p.name for p in staging.glob("model*.safetensors"))
        weight_bytes = sum((staging / name).stat().st_size for name in weight_files)
        card = _card_info(options, output_dir, written, report, dtype, weight_files, weight_bytes)
        (staging / "README.md").write_text(model_card.render(card))
    result = ConversionResult(
        output_dir=output_dir,
        config=written.config,
        architecture=architecture_name(written.config),
        source_description=written.source.description,
        parameters=written.parameters,
        source_bytes=written.source_bytes,
        weight_files=weight_files,
        weight_bytes=weight_bytes,
        dtype=dtype,
        report=report,
        seconds=time.perf_counter() - started,
    )
    if options.push_to_hub:
        _status(f"Pushing {output_dir.name} to {options.push_to_hub}")
        result.push = push.push_folder(
            output_dir,
            options.push_to_hub,
            private=options.private,
            revision=options.revision,
            create_pr=options.create_pr,
            commit_message=options.commit_message,
        )
    return result


def _read_convert_write(options: ConvertOptions, staging: Path, dtype: torch.dtype) -> _Written:
    """Everything that needs the source tensors, in one scope so that they are released when it returns."""
    from clipviz import hub_repo, sources, verify

    _status(f"Reading {options.openai_model or options.source}")
    started = time.perf_counter()
    source = sources.load_source(
        options.source,
        openai_model=options.openai_model,
        source_format=options.source_format,
        cache_dir=options.cache_dir,
        download_base_url=options.download_base_url,
        revision=options.source_revision,
    )
    _status(
        f"Read {len(source.state_dict)} tensors ({source.nbytes / 1e6:,.1f} MB) in {time.perf_counter() - started:.1f} s"
    )
    transformers_names = is_transformers_layout(source.state_dict)
    openai_state_dict, changes = to_openai_layout(source.state_dict, options.source_format)
    source.state_dict = {}  # from here on `openai_state_dict` holds the only references to the source tensors
    if changes and not transformers_names and source.origin == "state_dict":
        source.origin = "open_clip"  # training-wrapper prefixes or custom-text keys: an open_clip checkpoint
    notes = [f"Source layout: {'; '.join(changes)}."] if changes else []
    config = config_for_source(openai_state_dict, source, options, notes)
    with torch.device("meta"):
        model = CLIPVizModel(config)
    map_openai_state_dict(openai_state_dict, model)  # names and shapes are checked before anything is cast
    hub_repo.cast_weights_(openai_state_dict, dtype)  # the working copy, in the output dtype, replaces the source
    mapped = map_openai_state_dict(openai_state_dict, model)
    notes += hub_repo.write_processing_files(staging, config, source.image)
    hub_repo.write_config_and_code(staging, model, dtype)
    tokenizer = staging / "tokenizer.json"
    probe = verify.probe_inputs(config, source.image, tokenizer if tokenizer.is_file() else None)
    _status(f"Running the reference implementations on the source weights in {str(dtype).removeprefix('torch.')}")
    facts = verify.source_facts(source, options.text_heads, options.vision_heads, options.hidden_act)
    references = verify.reference_outputs(openai_state_dict, config, probe, source.transformers_folder, facts)
    records = hub_repo.write_weights(staging, mapped, dtype, options.max_shard_size)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    source_bytes = source.nbytes
    return _Written(
        config, dataclasses.replace(source, state_dict={}), records, probe, references, notes, parameters, source_bytes
    )


GLIBC_M_MMAP_THRESHOLD = -3  # mallopt parameter (malloc.h)
MMAP_THRESHOLD_BYTES = 1 << 20


def _glibc():
    import ctypes

    try:
        return ctypes.CDLL("libc.so.6")
    except OSError:
        return None


def return_freed_memory_promptly() -> None:
    """Make glibc serve every allocation of 1 MiB or more (all sizeable tensors) with its own mmap, so that freeing a
    tensor returns its memory to the OS at once. By default glibc raises that threshold as blocks are freed (up to
    32 MiB), after which the source tensors released while casting stay in its arenas and the cast copies come on
    top: converting OpenAI's fp16 ViT-L/14 to fp32 peaked 0.35 GB higher. Process-wide; a no-op without glibc."""
    libc = _glibc()
    if libc is not None and hasattr(libc, "mallopt"):
        libc.mallopt(GLIBC_M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES)


def release_memory() -> None:
    """Free what is unreferenced and hand freed heap memory back to the OS, so that the model reloaded for
    verification does not come on top of the released source tensors. A no-op where there is no glibc."""
    gc.collect()
    libc = _glibc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def config_for_source(state_dict: Mapping, source, options: ConvertOptions, notes: list[str]) -> CLIPVizConfig:
    """The architecture from the tensors' shapes, completed by what the source's files record (activation, heads,
    LayerNorm epsilon) and by the command-line overrides, which win."""
    activations = _activations(source, options, notes)
    config = config_from_openai_state_dict(
        state_dict,
        hidden_act=activations["text"],
        text_heads=options.text_heads or source.text_heads,
        vision_heads=options.vision_heads or source.vision_heads,
    )
    text, vision = config.text_config, config.vision_config
    if vision.backbone == "vit":
        vision.hidden_act = activations["vision"]
    if source.layer_norm_eps is not None:
        text.layer_norm_eps = vision.layer_norm_eps = source.layer_norm_eps
    text.validate_architecture()
    vision.validate_architecture()
    return config


def _activations(source, options: ConvertOptions, notes: list[str]) -> dict[str, str]:
    """The MLP activation cannot be read from the weights: flags, then the source's config, then its origin."""
    if options.hidden_act:
        return {"text": options.hidden_act, "vision": options.hidden_act}
    if source.hidden_act:
        return dict(source.hidden_act)
    if source.origin == "open_clip":
        raise ConversionError(
            "This is an open_clip checkpoint without its open_clip_config.json, so its activation is unknown: "
            "open_clip models use GELU unless they were trained with QuickGELU (configs named *-quickgelu, and "
            "OpenAI's own weights). Pass --hidden-act gelu or --hidden-act quick_gelu."
        )
    if source.origin != "openai":
        notes.append("Activation assumed to be OpenAI's QuickGELU (the checkpoint does not record it).")
    return {"text": "quick_gelu", "vision": "quick_gelu"}


def architecture_name(config: CLIPVizConfig) -> str:
    """The OpenAI preset the config matches (e.g. "ViT-B/32"), or a short description of a custom architecture."""
    key = _architecture_key(config)
    for name in CLIPVizConfig.PRESET_NAMES:
        if _architecture_key(CLIPVizConfig.from_preset(name)) == key:
            return name
    vision = config.vision_config
    if vision.backbone == "vit":
        return f"custom ViT-{vision.hidden_size}/{vision.patch_size}@{vision.image_size}px"
    return f"custom ResNet{list(vision.resnet_layers)}x{vision.resnet_width}@{vision.image_size}px"


def _architecture_key(config: CLIPVizConfig) -> tuple:
    text, vision = config.text_config, config.vision_config
    towers = (text.vocab_size, text.hidden_size, text.num_hidden_layers, text.num_attention_heads, vision.backbone)
    if vision.backbone == "vit":
        shape = (vision.hidden_size, vision.num_hidden_layers, vision.num_attention_heads, vision.patch_size)
    else:
        shape = (tuple(vision.resnet_layers), vision.resnet_width, vision.num_attention_heads)
    return (config.projection_dim, vision.image_size, *towers, *shape)


def architecture_rows(config: CLIPVizConfig, parameters: int) -> list[tuple[str, str]]:
    text, vision = config.text_config, config.vision_config
    size = f"{vision.image_size}×{vision.image_size} px"
    if vision.backbone == "vit":
        image = (
            f"ViT, {size}, patch {vision.patch_size}, {vision.num_hidden_layers} layers, width {vision.hidden_size}, "
            f"{vision.num_attention_heads} heads"
        )
    else:
        image = (
            f"ModifiedResNet, {size}, blocks {list(vision.resnet_layers)}, width {vision.resnet_width}, attention pool "
            f"with {vision.num_attention_heads} heads"
        )
    activation = (
        text.hidden_act
        if vision.backbone != "vit" or vision.hidden_act == text.hidden_act
        else (f"text {text.hidden_act}, image {vision.hidden_act}")
    )
    return [
        ("Architecture", architecture_name(config)),
        ("Image tower", image),
        (
            "Text tower",
            f"{text.num_hidden_layers} layers, width {text.hidden_size}, {text.num_attention_heads} heads, context "
            f"{text.max_position_embeddings}, vocabulary {text.vocab_size}",
        ),
        ("Embedding size", str(config.projection_dim)),
        ("MLP activation", activation),
        ("Parameters", f"{parameters:,}"),
    ]


def _card_info(options, output_dir, written, report, dtype, weight_files, weight_bytes):
    """What the model card says: the source's facts, the flags that override them, and this run's checks."""
    from clipviz import hub_repo, model_card

    source, config = written.source, written.config
    name = architecture_name(config)
    notes = list(written.notes)
    known_openai = source.origin == "openai" or (source.base_model or "").startswith("openai/")
    license_ = options.license or source.license or ("mit" if known_openai else "other")
    if license_ == "other" and not (options.license or source.license):
        notes.append("The source does not record its license; pass --license to state it.")
    return model_card.CardInfo(
        title=f"clipviz {source.name if name.startswith('custom') else name}",
        repo_id=options.push_to_hub or output_dir.name,
        source_description=source.description,
        source_sha256=source.sha256,
        license=license_,
        base_model=options.base_model or source.base_model,
        architecture=architecture_rows(config, written.parameters),
        dtype_name=str(dtype).removeprefix("torch."),
        weight_files=weight_files,
        weight_bytes=weight_bytes,
        report=report,
        has_tokenizer=config.text_config.vocab_size == hub_repo.OPENAI_VOCAB_SIZE,
        image_size=config.vision_config.image_size,
        bos_eos=(config.text_config.vocab_size - 2, config.text_config.vocab_size - 1),
        extra_tags=list(options.tags),
        notes=notes,
    )


def _check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id):
        raise ConversionError(f"--push-to-hub needs ORG/NAME (e.g. my-org/clipviz-vit-b-32), got {repo_id!r}.")


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


# ---- command line ----

EXAMPLES = """\
examples:
  # OpenAI's published ViT-B/32: download, check its SHA-256, convert, verify
  clipviz-convert --model ViT-B/32 --output-dir clipviz-vit-b-32

  # ... and push it (token from `hf auth login` or HF_TOKEN)
  clipviz-convert --model ViT-B/32 --output-dir clipviz-vit-b-32 --push-to-hub my-org/clipviz-vit-b-32

  # a local OpenAI .pt file, in half precision, in shards of at most 500 MB
  clipviz-convert ~/.cache/clip/RN50.pt --output-dir clipviz-rn50 --dtype fp16 --max-shard-size 500MB

  # a transformers CLIP checkpoint, from the Hub or a local folder
  clipviz-convert openai/clip-vit-large-patch14 --output-dir clipviz-vit-l-14

  # an open_clip training checkpoint of an OpenAI-architecture model trained with GELU
  clipviz-convert epoch_32.pt --source-format open_clip --hidden-act gelu --license mit --output-dir my-clip

  # push to a branch, or open a pull request instead of committing to main
  clipviz-convert --model RN50 --output-dir clipviz-rn50 --push-to-hub my-org/clipviz-rn50 --revision fp32
  clipviz-convert --model RN50 --output-dir clipviz-rn50 --push-to-hub my-org/clipviz-rn50 --create-pr --overwrite

Checkpoints are never executed: OpenAI's TorchScript archives are read with a restricted unpickler, other pickles
only with torch.load(weights_only=True). The output folder appears only once the conversion has been verified.
"""


def _positive_int(text: str) -> int:
    value = int(text)
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {text}")
    return value


def _shard_size(text: str) -> int:
    from clipviz.hub_repo import parse_size

    try:
        return parse_size(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(str(error)) from None


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipviz-convert",
        description=(
            "Convert a CLIP checkpoint (OpenAI .pt, state dict, safetensors, transformers CLIPModel, open_clip) into "
            "a verified Hugging Face Hub repo folder for clipviz, and optionally push it."
        ),
        epilog=EXAMPLES,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_argument_group("source (give a SOURCE or --model)")
    source.add_argument(
        "source",
        nargs="?",
        metavar="SOURCE",
        help="checkpoint file (.pt TorchScript archive, .pt/.bin state dict, .safetensors), a folder (transformers "
        "CLIPModel or open_clip), or a Hub repo id, e.g. openai/clip-vit-base-patch32",
    )
    source.add_argument(
        "--model",
        dest="openai_model",
        metavar="NAME",
        help="download one of OpenAI's published checkpoints and verify its SHA-256, e.g. --model ViT-B/32 "
        "(RN50, RN101, RN50x4, RN50x16, RN50x64, ViT-B/32, ViT-B/16, ViT-L/14, ViT-L/14@336px)",
    )
    source.add_argument(
        "--source-format",
        choices=("auto", "openai", "open_clip", "transformers"),
        default="auto",
        help="how to read SOURCE (default: auto, decided from the files), e.g. --source-format open_clip",
    )
    source.add_argument(
        "--source-revision", metavar="REV", help="revision of a Hub repo SOURCE, e.g. --source-revision main"
    )
    source.add_argument(
        "--hidden-act",
        choices=HIDDEN_ACTS,
        help="MLP activation when the checkpoint does not record it (OpenAI: quick_gelu; most open_clip models: "
        "gelu), e.g. --hidden-act gelu",
    )
    source.add_argument(
        "--text-heads",
        type=_positive_int,
        metavar="N",
        help="text attention heads if not width/64, e.g. --text-heads 8",
    )
    source.add_argument(
        "--vision-heads",
        type=_positive_int,
        metavar="N",
        help="image attention heads if not OpenAI's rule, e.g. --vision-heads 16",
    )
    source.add_argument(
        "--cache-dir", metavar="DIR", help="download cache (default: the Hugging Face cache), e.g. --cache-dir /data/hf"
    )
    source.add_argument(
        "--download-base-url",
        metavar="URL",
        help="mirror of OpenAI's download host for --model (also CLIPVIZ_OPENAI_BASE_URL), e.g. "
        "--download-base-url http://mirror.local:8000",
    )
    output = parser.add_argument_group("output")
    output.add_argument(
        "--output-dir",
        required=True,
        type=Path,
        metavar="DIR",
        help="folder to create, e.g. --output-dir clipviz-vit-b-32",
    )
    output.add_argument(
        "--dtype",
        choices=("fp32", "fp16", "bf16"),
        default="fp32",
        help="dtype of the saved weights (default fp32; OpenAI's fp16 files convert to fp32 exactly), e.g. --dtype fp16",
    )
    output.add_argument(
        "--max-shard-size",
        type=_shard_size,
        metavar="SIZE",
        help="split the weights into shards of at most SIZE plus model.safetensors.index.json, e.g. --max-shard-size 2GB",
    )
    output.add_argument(
        "--overwrite",
        action="store_true",
        help="replace a non-empty --output-dir (only once the new folder is verified)",
    )
    card = parser.add_argument_group("model card")
    card.add_argument(
        "--license",
        metavar="ID",
        help="license of the weights (default: mit for OpenAI's, else from the source), e.g. --license mit",
    )
    card.add_argument(
        "--base-model",
        metavar="REPO",
        help="Hub repo the weights come from, e.g. --base-model openai/clip-vit-base-patch32",
    )
    card.add_argument(
        "--tag",
        dest="tags",
        action="append",
        default=[],
        metavar="TAG",
        help="extra card tag (repeatable), e.g. --tag vision",
    )
    hub = parser.add_argument_group(
        "push to the Hub (token from `hf auth login` or HF_TOKEN, endpoint from HF_ENDPOINT)"
    )
    hub.add_argument(
        "--push-to-hub",
        metavar="ORG/NAME",
        help="create the repo if needed and upload the folder in one commit, e.g. --push-to-hub my-org/clipviz-vit-b-32",
    )
    hub.add_argument(
        "--private", action="store_true", help="create the repo private (an existing repo keeps its visibility)"
    )
    hub.add_argument(
        "--revision",
        metavar="BRANCH",
        help="push to this branch (created from main when missing) or to refs/pr/N, e.g. --revision fp16",
    )
    hub.add_argument("--create-pr", action="store_true", help="open a pull request instead of committing directly")
    hub.add_argument(
        "--commit-message", metavar="TEXT", help='commit title, e.g. --commit-message "Add ViT-B/32 in fp16"'
    )
    return parser


def options_from_args(args: argparse.Namespace) -> ConvertOptions:
    fields = {field.name for field in dataclasses.fields(ConvertOptions)}
    return ConvertOptions(**{name: value for name, value in vars(args).items() if name in fields})


def print_summary(result: ConversionResult) -> None:
    from clipviz.verify import parity_table

    files = len(list(result.output_dir.iterdir()))
    report = result.report
    lines = [
        "",
        f"Converted {result.source_description}",
        f"  architecture  {result.architecture}",
        f"  parameters    {result.parameters:,}",
        f"  weights       {str(result.dtype).removeprefix('torch.')}, {len(result.weight_files)} file(s), "
        f"{result.weight_bytes / 1e6:,.1f} MB (source {result.source_bytes / 1e6:,.1f} MB)",
        f"  output        {result.output_dir} ({files} files)",
        f"  verified      {report.tensors_checked} tensors bitwise equal after reload, {report.attention_maps} attention "
        "maps with rows summing to 1, outputs finite",
        f"  time          {result.seconds:.1f} s",
        "",
        f"Parity with independent implementations on the same weights in {str(result.dtype).removeprefix('torch.')} "
        f"({report.probe}):",
        parity_table(report.parity, markdown=False),
    ]
    if result.push is not None:
        pushed = result.push
        if pushed.pull_request_url:
            lines += ["", f"Opened pull request {pushed.pull_request_url} (commit {pushed.commit_oid[:12]})"]
        elif pushed.created_commit:
            lines += ["", f"Pushed to {pushed.repo_url} ({pushed.revision}, commit {pushed.commit_oid[:12]})"]
        else:
            lines += ["", f"{pushed.repo_url} ({pushed.revision}) already holds this content: no new commit"]
    print("\n".join(lines))


def main(argv: list[str] | None = None) -> int:
    """`clipviz-convert`: returns the exit status (0 done, 1 conversion or push failed, 2 bad arguments)."""
    from clipviz.checkpoint_io import DownloadError  # CheckpointError, SourceError, ... are ValueErrors
    from clipviz.push import PushError
    from clipviz.verify import VerificationError

    parser = build_parser()
    args = parser.parse_args(argv)
    if (args.source is None) == (args.openai_model is None):
        parser.error("give either a SOURCE or --model NAME (exactly one)")
    options = options_from_args(args)
    try:
        result = convert_checkpoint(options)
    except PushError as error:
        converted = Path(options.output_dir).expanduser()
        where = (
            f" The verified conversion is in {converted}; run again with --overwrite to retry."
            if converted.is_dir()
            else ""
        )
        print(f"error: {error}{where}", file=sys.stderr)
        return 1
    except (ValueError, CheckpointKeyError, DownloadError, VerificationError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    print_summary(result)
    return 0


if __name__ == "__main__":
    sys.exit(main())
