"""Checks of a converted folder, run on every conversion, and the parity figures that go into its model card.

* The folder is reloaded the way users load it, ``AutoModel.from_pretrained(folder, trust_remote_code=True)``, and
  every tensor of the reloaded model must equal, bit for bit, the source tensor it was written from (compared by
  digest, so the source need not stay in memory while the reloaded copy exists).
* On probe inputs (procedural scenes and their captions) every output is finite and every attention row sums to 1.
* Where an independent implementation of the source is importable, OpenAI's ``clip/model.py`` and transformers'
  ``CLIPModel``, its embeddings and logits are computed *from the source tensors* before they are released, and
  compared with the reloaded model's. In float32 a difference above ``FP32_LIMITS`` is an error; in half precision
  the figures are only reported.
  The references take what tensor shapes cannot say (head counts, activation, LayerNorm epsilon) from
  :class:`SourceFacts`, what the source and the user's flags state, and otherwise from OpenAI's own rules, never
  from the converted config: an assumption the converter got wrong is not repeated by the reference.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipviz.hub_repo import TensorRecord, tensor_digest
from clipviz.openai_clip import openai_clip_args, openai_model_module, set_vision_heads
from clipviz.sources import ImageSettings, Source
from clipviz.state_dict import IGNORED_OPENAI_KEYS, openai_to_transformers_state_dict, transformers_clip_config

PROBE_IMAGES = 2
PROBE_EXTRA_CAPTIONS = ("a photo of a cat", "a diagram with text")
# Largest differences from a reference that a float32 conversion may show. They are far above float32 rounding, which
# gives ~1e-7 on the unit-length embeddings and ~1e-6 on the logits (OpenAI's code on ViT-L/14, and on tiny models),
# so that another BLAS or summation order never fails a correct conversion; one tensor mapped wrongly in a tiny random
# model moved the embeddings by 0.04-0.5 and the logits by 0.25-6, beyond them.
FP32_LIMITS = {"image_embeds": 1e-3, "text_embeds": 1e-3, "logits_per_image": 0.1}
ATTENTION_ROW_TOLERANCE = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 5e-2}
OPENAI_REFERENCE = "OpenAI clip/model.py"
TRANSFORMERS_REFERENCE = "transformers CLIPModel"


class VerificationError(RuntimeError):
    """The converted folder does not reload into exactly the converted model; the message says what differs."""


@dataclass(frozen=True)
class SourceFacts:
    """What the source records, or the user states about it, beyond tensor shapes; None where nothing does.

    `hidden_act` is {"text": ..., "vision": ...}. The references use OpenAI's rules for what is None: 64-wide heads
    (what OpenAI's `build_model` computes), QuickGELU, LayerNorm epsilon 1e-5."""

    text_heads: int | None = None
    vision_heads: int | None = None
    hidden_act: Mapping[str, str] | None = None
    layer_norm_eps: float | None = None


def source_facts(
    source: Source, text_heads: int | None = None, vision_heads: int | None = None, hidden_act: str | None = None
) -> SourceFacts:
    """The facts of `source` (what its files record) completed by the user's flags about it; a flag that
    contradicts what the files record is refused (ValueError naming both)."""
    stated = {"text heads": (text_heads, source.text_heads), "image heads": (vision_heads, source.vision_heads)}
    if hidden_act and source.hidden_act:
        stated["activation"] = (hidden_act, "/".join(sorted(set(source.hidden_act.values()))))
    for what, (flag, recorded) in stated.items():
        if flag is not None and recorded is not None and flag != recorded:
            raise ValueError(
                f"the flags say {what} = {flag}, but {source.description} records {recorded}; drop the flag "
                "(the checkpoint's own value is used) or check the source."
            )
    return SourceFacts(
        text_heads=text_heads or source.text_heads,
        vision_heads=vision_heads or source.vision_heads,
        hidden_act={"text": hidden_act, "vision": hidden_act} if hidden_act else source.hidden_act,
        layer_norm_eps=source.layer_norm_eps,
    )


OPENAI_HEAD_WIDTH = 64
OPENAI_ACTIVATION = "quick_gelu"
OPENAI_LAYER_NORM_EPS = 1e-5


def reference_config(config, facts: SourceFacts):
    """A copy of `config` whose head counts, activations and LayerNorm epsilon come from `facts` (or OpenAI's rules)
    instead of from the converter: the sizes stay (the references load the source tensors strictly, so a wrong
    size fails there), everything the tensors cannot tell is decided independently."""
    reference = copy.deepcopy(config)
    text, vision = reference.text_config, reference.vision_config
    text.num_attention_heads = facts.text_heads or text.hidden_size // OPENAI_HEAD_WIDTH
    vision.num_attention_heads = facts.vision_heads or vision.hidden_size // OPENAI_HEAD_WIDTH
    activations = facts.hidden_act or {}
    text.hidden_act = activations.get("text", OPENAI_ACTIVATION)
    vision.hidden_act = activations.get("vision", OPENAI_ACTIVATION)
    text.layer_norm_eps = vision.layer_norm_eps = facts.layer_norm_eps or OPENAI_LAYER_NORM_EPS
    return reference


@dataclass
class ProbeInputs:
    """Inputs every model is run on: OpenAI-style token ids (zero padded) and normalized pixels."""

    input_ids: torch.Tensor  # [T, L] int64
    pixel_values: torch.Tensor  # [N, 3, S, S] float32
    texts: list[str]


@dataclass
class Outputs:
    image_embeds: torch.Tensor  # [N, D] float32, L2-normalized
    text_embeds: torch.Tensor  # [T, D] float32, L2-normalized
    logits_per_image: torch.Tensor  # [N, T] float32


@dataclass
class ParityRow:
    reference: str
    max_abs_diff: dict[str, float] = field(default_factory=dict)
    same_top1: str = ""
    skipped: str | None = None


@dataclass
class VerificationReport:
    tensors_checked: int
    attention_maps: int
    attention_row_error: float
    parity: list[ParityRow]
    probe: str


# ---- probe inputs ----


def probe_inputs(config, image: ImageSettings, tokenizer_file: Path | None) -> ProbeInputs:
    """Two procedural scenes at the model's resolution and their captions, plus two unrelated captions."""
    from clipviz.scenes import make_scenes, to_pixel_values

    size = config.vision_config.image_size
    scenes = make_scenes("eval", 0, PROBE_IMAGES, size=size)
    pixel_values = to_pixel_values([scene.image for scene in scenes], image.mean, image.std)
    texts = [scene.captions[0] for scene in scenes] + list(PROBE_EXTRA_CAPTIONS)
    return ProbeInputs(_token_ids(texts, config.text_config, tokenizer_file), pixel_values, texts)


def _token_ids(texts: list[str], text_config, tokenizer_file: Path | None) -> torch.Tensor:
    """Ids as OpenAI's `clip.tokenize` lays them out (start, tokens, end, zero padding). Without OpenAI's tokenizer
    (another vocabulary), seeded random ids in the same layout stand in for the texts."""
    length, vocab = text_config.max_position_embeddings, text_config.vocab_size
    ids = torch.zeros(len(texts), length, dtype=torch.long)
    if tokenizer_file is not None:
        from tokenizers import Tokenizer

        tokenizer = Tokenizer.from_file(str(tokenizer_file))
        for row, text in enumerate(texts):
            tokens = tokenizer.encode(text).ids[:length]
            tokens[-1] = vocab - 1  # a truncated text still ends with <|endoftext|>, as clip.tokenize(truncate=True)
            ids[row, : len(tokens)] = torch.tensor(tokens)
        return ids
    generator = torch.Generator().manual_seed(0)
    for row in range(len(texts)):
        words = min(3 + 4 * row, length - 2)
        ids[row, 0] = vocab - 2
        ids[row, 1 : words + 1] = torch.randint(1, vocab - 2, (words,), generator=generator)
        ids[row, words + 1] = vocab - 1
    return ids


# ---- references, computed from the source tensors (in the output dtype) ----


def reference_outputs(
    openai_state_dict: Mapping[str, torch.Tensor],
    config,
    probe: ProbeInputs,
    transformers_folder: Path | None,
    facts: SourceFacts,
) -> dict[str, Outputs | str]:
    """Outputs of each independent implementation on the probe, or the reason it was skipped.

    `config` gives the sizes only; heads, activations and epsilon come from `facts` (see `reference_config`).

    The references run on the very tensors that are about to be written (the source, cast to the output dtype),
    in that dtype: no second copy of the model is made. For a float32 conversion that is the source model in
    float32 exactly (float16/bfloat16 -> float32 is lossless); for half precision the references run in half
    precision too, so the figures compare implementations at that precision.
    """
    config = reference_config(config, facts)
    results: dict[str, Outputs | str] = {}
    try:
        results[OPENAI_REFERENCE] = _openai_reference(openai_state_dict, config, probe)
    except ImportError as error:
        results[OPENAI_REFERENCE] = f"skipped: {error}"
    if config.vision_config.backbone != "vit":
        results[TRANSFORMERS_REFERENCE] = "skipped: transformers' CLIPModel has no ResNet image tower"
    else:
        results[TRANSFORMERS_REFERENCE] = _transformers_reference(openai_state_dict, config, probe, transformers_folder)
    return results


def _openai_reference(weights, config, probe: ProbeInputs) -> Outputs:
    module = openai_model_module()
    with torch.device("meta"):
        model = module.CLIP(*openai_clip_args(config))
    own = {key: value for key, value in weights.items() if key not in IGNORED_OPENAI_KEYS}
    model.load_state_dict(own, strict=True, assign=True)
    _adapt_openai_model(model, config, module)
    for layer in model.modules():  # OpenAI's LayerNorm computes in float32 and, on CPU, needs float32 weights
        if isinstance(layer, torch.nn.LayerNorm):  # (OpenAI's own fp16 files keep them so): tiny copies
            layer.float()
    model.eval()
    with torch.no_grad():  # what CLIP.forward computes, with the embeddings kept
        image = model.encode_image(probe.pixel_values).float()  # OpenAI casts the pixels to the weights' dtype
        text = model.encode_text(probe.input_ids).float()
        image, text = image / image.norm(dim=-1, keepdim=True), text / text.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp().float() * image @ text.t()
    return Outputs(image, text, logits)


def _adapt_openai_model(model, config, module) -> None:
    """What OpenAI's constructor cannot be told: image head counts other than width // 64, GELU instead of
    QuickGELU, another LayerNorm epsilon; and the causal mask, which is a plain attribute and was built on the meta
    device."""
    mask = torch.full((config.text_config.max_position_embeddings,) * 2, float("-inf")).triu_(1)
    for block in model.transformer.resblocks:
        block.attn_mask = mask
    set_vision_heads(model, config.vision_config.num_attention_heads)
    visual = model.visual
    towers = [(model.transformer, config.text_config.hidden_act)]
    if not hasattr(visual, "attnpool"):
        towers.append((visual.transformer, config.vision_config.hidden_act))
    for transformer, activation in towers:
        if activation == "gelu":
            for block in transformer.resblocks:
                block.mlp.gelu = torch.nn.GELU()
    for layer in model.modules():
        if isinstance(layer, torch.nn.LayerNorm):
            layer.eps = config.text_config.layer_norm_eps


def _transformers_reference(weights, config, probe: ProbeInputs, folder: Path | None) -> Outputs | str:
    """transformers' `CLIPModel`: loaded from the source folder when the source is a transformers checkpoint,
    otherwise built from the OpenAI-layout tensors through the inverse key table."""
    from transformers import CLIPModel

    dtype = weights["ln_final.weight"].dtype
    if folder is not None:  # transformers reads its own checkpoint: an independent check of the key tables too
        model = CLIPModel.from_pretrained(folder, **_dtype_kwarg(dtype), attn_implementation="eager")
    else:
        hf_config = transformers_clip_config(config)
        hf_config._attn_implementation = "eager"
        with torch.device("meta"):
            model = CLIPModel(hf_config)
        model.load_state_dict(openai_to_transformers_state_dict(weights), strict=False, assign=True)
        _rebuild_position_ids(model)
        leftover = [name for name, tensor in model.state_dict().items() if tensor.is_meta]
        if leftover:
            return f"skipped: could not build CLIPModel on the source tensors ({leftover[:3]} not set)"
    model.eval()
    with torch.no_grad():
        out = model(input_ids=probe.input_ids, pixel_values=probe.pixel_values.to(dtype))
    return Outputs(out.image_embeds.float(), out.text_embeds.float(), out.logits_per_image.float())


def _rebuild_position_ids(model) -> None:
    """`position_ids` are non-persistent buffers (an arange); building on the meta device left them empty."""
    for module in model.modules():
        buffer = getattr(module, "position_ids", None)
        if isinstance(buffer, torch.Tensor) and buffer.is_meta:
            module.register_buffer(
                "position_ids", torch.arange(buffer.shape[-1]).expand(buffer.shape), persistent=False
            )


def _dtype_kwarg(dtype: torch.dtype) -> dict:
    """transformers 5 calls the loading dtype `dtype`, transformers 4 `torch_dtype`."""
    import transformers

    return {"dtype": dtype} if int(transformers.__version__.split(".")[0]) >= 5 else {"torch_dtype": dtype}


# ---- the checks ----


def verify_folder(
    folder: Path,
    records: Mapping[str, TensorRecord],
    dtype: torch.dtype,
    probe: ProbeInputs,
    references: Mapping[str, Outputs | str],
) -> VerificationReport:
    """Reload `folder` through transformers' remote-code path and run every check; raise `VerificationError`."""
    from transformers import AutoModel

    model, info = AutoModel.from_pretrained(
        folder, trust_remote_code=True, output_loading_info=True, **_dtype_kwarg(dtype)
    )
    model.eval()
    problems = {name: sorted(map(str, keys)) for name, keys in info.items() if keys and name != "error_msgs"}
    if problems or info.get("error_msgs"):
        raise VerificationError(f"Reloading {folder.name} reported {problems or info['error_msgs']}.")
    checked = _check_tensors(model, records)
    with torch.no_grad():
        out = model(input_ids=probe.input_ids, pixel_values=probe.pixel_values)
        # every layer's attention, for the first image and text (the maps of a large model are large)
        maps = model(input_ids=probe.input_ids[:1], pixel_values=probe.pixel_values[:1], output_attentions=True)
    attentions = tuple(maps.vision_model_output.attentions) + tuple(maps.text_model_output.attentions)
    row_error = _check_outputs(out, attentions, model.config, dtype)
    converted = Outputs(out.image_embeds.float(), out.text_embeds.float(), out.logits_per_image.float())
    del model, maps
    parity = [_parity_row(name, converted, reference, dtype) for name, reference in references.items()]
    probe_text = f"{probe.pixel_values.shape[0]} procedural scenes × {len(probe.texts)} captions"
    return VerificationReport(checked, len(attentions), row_error, parity, probe_text)


def _check_tensors(model, records: Mapping[str, TensorRecord]) -> int:
    state = model.state_dict()
    if set(state) != set(records):
        raise VerificationError(
            f"The reloaded model's tensors differ from those written: missing {sorted(set(records) - set(state))}, "
            f"extra {sorted(set(state) - set(records))}."
        )
    wrong = []
    for name, record in records.items():
        tensor = state[name]
        if (
            tensor.dtype != record.dtype
            or tuple(tensor.shape) != record.shape
            or tensor_digest(tensor) != record.digest
        ):
            wrong.append(name)
    if wrong:
        raise VerificationError(f"Reloaded tensors differ from the converted source tensors: {wrong[:10]}.")
    return len(records)


def _check_outputs(out, attentions, config, dtype: torch.dtype) -> float:
    """Finite outputs, one attention map per layer, each row a probability distribution; returns the largest
    deviation of a row sum from 1."""
    for name in ("logits_per_image", "image_embeds", "text_embeds"):
        if not torch.isfinite(getattr(out, name)).all():
            raise VerificationError(f"The reloaded model's `{name}` are not all finite on the probe inputs.")
    vision = config.vision_config
    expected = (vision.num_hidden_layers if vision.backbone == "vit" else 1) + config.text_config.num_hidden_layers
    if len(attentions) != expected:
        raise VerificationError(
            f"Expected {expected} attention maps with output_attentions=True, got {len(attentions)}."
        )
    worst = 0.0
    for index, attention in enumerate(attentions):
        weights = attention.float()
        if not torch.isfinite(weights).all():
            raise VerificationError(f"Attention map {index} has non-finite weights.")
        worst = max(worst, (weights.sum(dim=-1) - 1).abs().max().item())
    if worst > ATTENTION_ROW_TOLERANCE[dtype]:
        raise VerificationError(f"Attention rows do not sum to 1 (largest deviation {worst:.3g}).")
    return worst


def _parity_row(name: str, converted: Outputs, reference: Outputs | str, dtype: torch.dtype) -> ParityRow:
    if isinstance(reference, str):
        return ParityRow(name, skipped=reference.removeprefix("skipped: "))
    diffs = {
        key: (getattr(converted, key) - getattr(reference, key)).abs().max().item()
        for key in ("image_embeds", "text_embeds", "logits_per_image")
    }
    agree = (converted.logits_per_image.argmax(-1) == reference.logits_per_image.argmax(-1)).sum().item()
    row = ParityRow(name, diffs, f"{agree}/{converted.logits_per_image.shape[0]}")
    if dtype == torch.float32:
        bad = {key: value for key, value in diffs.items() if not value <= FP32_LIMITS[key]}
        if bad:
            shown = ", ".join(f"{key} {value:.3g} (limit {FP32_LIMITS[key]:g})" for key, value in bad.items())
            raise VerificationError(f"The converted model disagrees with {name}: max abs differences {shown}.")
    return row


# ---- tables ----

PARITY_COLUMNS = (
    ("image_embeds", "image embeds"),
    ("text_embeds", "text embeds"),
    ("logits_per_image", "logits"),
)


def format_figure(value: float) -> str:
    """Two significant digits; exact zeros stay "0" (a bitwise match is worth seeing)."""
    return "0" if value == 0 else f"{value:.1e}" if math.isfinite(value) else str(value)


def parity_table(rows: list[ParityRow], markdown: bool) -> str:
    """The parity figures as a Markdown table (model card) or an aligned text table (console); references that were
    not run are listed below the table with the reason."""
    header = ["reference", *(f"{label} max abs diff" for _, label in PARITY_COLUMNS), "same top-1"]
    body = [
        [row.reference, *(format_figure(row.max_abs_diff[key]) for key, _ in PARITY_COLUMNS), row.same_top1]
        for row in rows
        if not row.skipped
    ]
    skipped = [f"not compared with {row.reference}: {row.skipped}" for row in rows if row.skipped]
    if markdown:
        lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)] if body else []
        lines += ["| " + " | ".join(cells) + " |" for cells in body]
        return "\n".join(lines + [""] * bool(lines and skipped) + [f"- {line}" for line in skipped])
    widths = [max(len(cells[i]) for cells in [header, *body]) for i in range(len(header))]
    lines = [
        "  ".join(cell.ljust(width) for cell, width in zip(cells, widths, strict=True)).rstrip()
        for cells in [header, *body]
    ]
    return "\n".join(lines + skipped)


__all__ = [
    "SourceFacts",
    "Outputs",
    "ParityRow",
    "ProbeInputs",
    "VerificationError",
    "VerificationReport",
    "parity_table",
    "probe_inputs",
    "reference_config",
    "source_facts",
    "reference_outputs",
    "verify_folder",
]
