"""The conversion pipeline behind `clipviz-convert`: a checkpoint -> a verified Hub repo folder -> the Hub.

`convert_checkpoint` reads the source (`clipviz.sources`), brings it to OpenAI's layout and maps it onto the
architecture inferred from its shapes (`clipviz.state_dict`), writes the folder (`clipviz.hub_repo`), reloads and
checks it (`clipviz.verify`), writes its model card (`clipviz.model_card`) and optionally pushes it
(`clipviz.push`). The source tensors live only inside `_read_convert_write`, so they are freed before the folder
is reloaded (`clipviz.memory`). The command line is `convert_weights.py`.
"""

from __future__ import annotations

import dataclasses
import re
import sys
import time
from collections.abc import Mapping
from pathlib import Path

import torch

from clipviz import hub_repo, model_card, push, sources, verify
from clipviz.checkpoint_io import refuse_aliased_tensors
from clipviz.convert_options import ConvertOptions
from clipviz.memory import release_memory, return_freed_memory_promptly
from clipviz.state_dict import (
    config_from_openai_state_dict,
    is_transformers_layout,
    map_openai_state_dict,
    to_openai_layout,
)
from configuration_clipviz import CLIPVizConfig
from modeling_clipviz import CLIPVizModel


class ConversionError(ValueError):
    """The checkpoint cannot be converted as asked (e.g. its activation is unknown, a bad repo id); says why."""


@dataclasses.dataclass
class _Written:
    """What the reading/writing step hands on; holds no source tensors, so they are freed before verification."""

    config: CLIPVizConfig
    source: sources.Source  # with an emptied state_dict
    records: dict
    probe: verify.ProbeInputs
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
    report: verify.VerificationReport
    seconds: float
    push: object = None  # clipviz.push.PushResult, when pushed


def convert_checkpoint(options: ConvertOptions) -> ConversionResult:
    """Read, convert, write, verify (and push): the whole of `clipviz-convert`. Nothing is left in
    `options.output_dir` unless every step up to verification succeeded."""
    started = time.perf_counter()
    output_dir = Path(options.output_dir).expanduser().resolve()
    inputs = _input_paths(options)
    hub_repo.check_output_dir(output_dir, options.overwrite, inputs)
    if options.push_to_hub:
        _check_repo_id(options.push_to_hub)
        _status(f"Hub account: {push.check_token()}")
    dtype = hub_repo.DTYPES[options.dtype]
    return_freed_memory_promptly()
    with hub_repo.staged_folder(output_dir, options.overwrite, inputs) as staging:
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


def _input_paths(options: ConvertOptions) -> list[Path]:
    """What the conversion reads from disk and must never delete: the source file or folder, the download cache."""
    candidates = [options.source, options.cache_dir]
    if options.openai_model and not options.cache_dir:
        from clipviz.checkpoint_io import default_openai_cache_dir

        candidates.append(default_openai_cache_dir())
    return [Path(c).expanduser() for c in candidates if c and Path(c).expanduser().exists()]


def _read_convert_write(options: ConvertOptions, staging: Path, dtype: torch.dtype) -> _Written:
    """Everything that needs the source tensors, in one scope so that they are released when it returns."""
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
    refuse_aliased_tensors(openai_state_dict, source.description)
    source.state_dict = {}  # from here on `openai_state_dict` holds the only references to the source tensors
    if changes and not transformers_names and source.origin == "state_dict":
        source.origin = "open_clip"  # training-wrapper prefixes or custom-text keys: an open_clip checkpoint
    notes = [f"Source layout: {'; '.join(changes)}."] if changes else []
    facts = verify.source_facts(source, options.text_heads, options.vision_heads, options.hidden_act)
    config = config_for_source(openai_state_dict, source, options, notes, facts)
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
    references = verify.reference_outputs(openai_state_dict, config, probe, source.transformers_folder, facts)
    records = hub_repo.write_weights(staging, mapped, dtype, options.max_shard_size)
    parameters = sum(parameter.numel() for parameter in model.parameters())
    source_bytes = source.nbytes
    return _Written(
        config, dataclasses.replace(source, state_dict={}), records, probe, references, notes, parameters, source_bytes
    )


def config_for_source(
    state_dict: Mapping, source, options: ConvertOptions, notes: list[str], facts: verify.SourceFacts | None = None
) -> CLIPVizConfig:
    """The architecture from the tensors' shapes, completed by what the source's files record (activation, heads,
    LayerNorm epsilon) and the flags (`facts`, see `verify.source_facts`). What neither states is OpenAI's value:
    for a source that is not OpenAI's own checkpoint, each such assumption is printed and noted for the card."""
    facts = facts or verify.source_facts(source, options.text_heads, options.vision_heads, options.hidden_act)
    activations = _activations(source, options)
    config = config_from_openai_state_dict(
        state_dict, hidden_act=activations["text"], text_heads=facts.text_heads, vision_heads=facts.vision_heads
    )
    text, vision = config.text_config, config.vision_config
    if vision.backbone == "vit":
        vision.hidden_act = activations["vision"]
    if facts.layer_norm_eps is not None:
        text.layer_norm_eps = vision.layer_norm_eps = facts.layer_norm_eps
    text.validate_architecture()
    vision.validate_architecture()
    assumed = [] if source.openai_name else _assumptions(config, source, facts)
    if assumed:
        note = f"Assumed, as the checkpoint does not record them (OpenAI's values): {'; '.join(assumed)}."
        notes.append(note)
        _status(note)
    return config


def _assumptions(config: CLIPVizConfig, source, facts: verify.SourceFacts) -> list[str]:
    """The values of `config` that nothing read stated: each with how it was derived and the flag that sets it."""
    text, vision = config.text_config, config.vision_config
    assumed = []
    if facts.text_heads is None:
        assumed.append(
            f"text tower {model_card.count(text.num_attention_heads, 'attention head')} (width {text.hidden_size} "
            "/ 64; --text-heads N if not)"
        )
    if facts.vision_heads is None:
        assumed.append(
            f"image tower {model_card.count(vision.num_attention_heads, 'attention head')} (width "
            f"{vision.hidden_size} / 64; --vision-heads N if not)"
        )
    if not facts.hidden_act and source.origin != "openai":
        assumed.append("MLP activation QuickGELU (--hidden-act gelu if not)")
    if facts.layer_norm_eps is None and source.origin != "open_clip":  # open_clip's LayerNorms are PyTorch's: 1e-5
        assumed.append(f"LayerNorm epsilon {text.layer_norm_eps:g}")
    if not source.image.recorded:
        assumed.append("image preprocessing (OpenAI's mean, std and bicubic resizing)")
    if source.origin != "transformers":
        assumed.append(f"start/end-of-text ids {text.vocab_size - 2}/{text.vocab_size - 1} (the vocabulary's last two)")
    return assumed


def _activations(source, options: ConvertOptions) -> dict[str, str]:
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
    count = model_card.count
    text, vision = config.text_config, config.vision_config
    size = f"{vision.image_size}×{vision.image_size} px"
    if vision.backbone == "vit":
        image = (
            f"ViT, {size}, patch {vision.patch_size}, {count(vision.num_hidden_layers, 'layer')}, width "
            f"{vision.hidden_size}, {count(vision.num_attention_heads, 'head')}"
        )
    else:
        image = (
            f"ModifiedResNet, {size}, blocks {list(vision.resnet_layers)}, width {vision.resnet_width}, attention pool "
            f"with {count(vision.num_attention_heads, 'head')}"
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
            f"{count(text.num_hidden_layers, 'layer')}, width {text.hidden_size}, "
            f"{count(text.num_attention_heads, 'head')}, context "
            f"{text.max_position_embeddings}, vocabulary {text.vocab_size}",
        ),
        ("Embedding size", str(config.projection_dim)),
        ("MLP activation", activation),
        ("Parameters", f"{parameters:,}"),
    ]


def _card_info(options, output_dir, written, report, dtype, weight_files, weight_bytes):
    """What the model card says: the source's facts, the flags that override them, and this run's checks."""
    source, config = written.source, written.config
    name = architecture_name(config)
    notes = list(written.notes)
    known_openai = source.origin == "openai" or (source.base_model or "").startswith("openai/")
    openai_weights = source.openai_name is not None or (source.base_model or "").startswith("openai/")
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
        openai_weights=openai_weights,
    )


def _check_repo_id(repo_id: str) -> None:
    if not re.fullmatch(r"[A-Za-z0-9][\w.-]*/[\w.-]+", repo_id):
        raise ConversionError(f"--push-to-hub needs ORG/NAME (e.g. my-org/clipviz-vit-b-32), got {repo_id!r}.")


def _status(message: str) -> None:
    print(message, file=sys.stderr, flush=True)
