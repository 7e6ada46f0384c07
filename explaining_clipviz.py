"""clipviz explanations: where CLIP looks in each image, and at which prompt tokens, for every image x prompt pair.

`CLIPVizModel.explain` (from `CLIPVizExplainMixin`) validates its options and dispatches through one registry,
`EXPLAIN_METHODS`: each entry names a method, its options (kinds, defaults, ranges, the backbones where they exist),
what it costs, how to read its maps and where it comes from. Adding a method is one function and one `register(...)`.

A method function takes `(model, inputs, options)`: `inputs` an [`ExplainInputs`] holding the raw inputs, `options`
the dict `resolve_options` returned (every option filled in, layer indices non-negative). It runs the towers itself
through [`encode`] (choosing attentions, hidden states and which towers keep an autograd graph), which fills the
tower fields of `inputs` in place, and returns `(image_maps [I, T, grid_h, grid_w], text_maps [I, T, L])` unscaled;
`explain` masks, scales and detaches them. Methods that need a different forward can call the model's modules and
`modeling_module()`'s helpers (e.g. `multi_head_attention`) directly, but still call `encode` for the logits.

Gradient methods ask autograd only for the tensors they read (attention weights from `start_layer` on, or one
layer's tokens), with one vmapped backward per side whose batch is the other side's count, never a full
`backward()` per prompt.

This file ships to the Hub as remote code next to `modeling_clipviz.py`, which imports it: it imports only torch,
transformers and the standard library, and reaches the modeling file only lazily (`modeling_module`), never at
import time.
"""

import importlib
from collections.abc import Callable
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

import torch
from transformers.utils import ModelOutput

# ---- Registry ----

OPTION_KINDS = ("int", "float", "choice", "image_layer", "text_layer", "image_head", "text_head")
BACKBONES = ("vit", "resnet")
COSTS = (
    "forward only",
    "one backward",
    "per-layer backward",
    "one image-tower pass per window position, one text-tower pass per prompt token",
)


@dataclass(frozen=True)
class ExplainOption:
    """One keyword option of an explanation method.

    `kind` says how it is checked: "int"/"float" against `minimum`/`maximum` (inclusive, except a float's maximum
    when `maximum_exclusive`), "choice" against `choices`, "image_layer"/"text_layer" as a Python-style layer index
    of that tower (negative counts from the end), "image_head"/"text_head" as a head index of that tower or one of
    `choices` (named fusions such as "mean"). A "text_head" whose value is None takes the method's "image_head"
    value (which must then exist in the text tower too). An "int"/"float" option whose default is None accepts None
    (the method then computes the value, as its `help` says).
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple = ()
    minimum: float | None = None
    maximum: float | None = None
    backbones: tuple[str, ...] = BACKBONES
    maximum_exclusive: bool = False


@dataclass(frozen=True)
class ExplainMethod:
    """One explanation method: the `method=` string and everything a caller or a UI needs to offer it.

    `function(model, inputs, options)` returns `(image_maps [I, T, grid_h, grid_w], text_maps [I, T, L])`, unscaled
    (see the module docstring). `prompt_dependent`: whether the image map changes with the prompt. `cost`: one of
    `COSTS`, what it takes beyond one forward of each tower. `needs_grad`: `explain` runs the function with autograd
    enabled (otherwise under `torch.no_grad()`).
    """

    name: str
    title: str
    function: Callable
    backbones: tuple[str, ...]
    options: tuple[ExplainOption, ...]
    prompt_dependent: bool
    cost: str
    needs_grad: bool
    how_to_read: str
    reference: str


EXPLAIN_METHODS: dict[str, ExplainMethod] = {}  # in registration order


def register(method: ExplainMethod) -> ExplainMethod:
    """Add `method` to `EXPLAIN_METHODS` (its name must be new); returns it."""
    if method.name in EXPLAIN_METHODS:
        raise ValueError(f"An explanation method named {method.name!r} is already registered.")
    if method.cost not in COSTS:
        raise ValueError(f"Method {method.name!r}: `cost` must be one of {', '.join(map(repr, COSTS))}.")
    unknown = [b for b in method.backbones if b not in BACKBONES]
    unknown += [f"{o.name}: {o.kind}" for o in method.options if o.kind not in OPTION_KINDS]
    if unknown:
        raise ValueError(f"Method {method.name!r}: unknown backbone(s) or option kind(s) {unknown}.")
    EXPLAIN_METHODS[method.name] = method
    return method


def methods_for(backbone: str) -> list[ExplainMethod]:
    """The registered methods available for an image tower ("vit" or "resnet"), in registry order."""
    return [method for method in EXPLAIN_METHODS.values() if backbone in method.backbones]


def _image_layers(config) -> int:
    """Attention layers of the image tower: the ViT's blocks, or the ResNet's one attention pool."""
    vision = config.vision_config
    return vision.num_hidden_layers if vision.backbone == "vit" else 1


def _tower_size(kind: str, config) -> int:
    """Layers or heads of the tower an option of this kind indexes."""
    if kind == "image_layer":
        return _image_layers(config)
    if kind == "text_layer":
        return config.text_config.num_hidden_layers
    return (config.vision_config if kind == "image_head" else config.text_config).num_attention_heads


def option_bounds(option: ExplainOption, config) -> tuple:
    """What `option` accepts on this model, for UIs: layers `(0, num_layers - 1)` (negative indices are also
    accepted, counted from the end), heads the valid values `(0, ..., num_heads - 1, *choices)`, "choice" its
    `choices`, "int"/"float" `(minimum, maximum)` (see `maximum_exclusive`)."""
    if option.kind in ("image_layer", "text_layer"):
        return 0, _tower_size(option.kind, config) - 1
    if option.kind in ("image_head", "text_head"):
        return tuple(range(_tower_size(option.kind, config))) + tuple(option.choices)
    if option.kind == "choice":
        return tuple(option.choices)
    return option.minimum, option.maximum


def _check_layer(name: str, value, num_layers: int) -> int:
    """A Python-style layer index (negative counts from the end), returned non-negative."""
    valid = list(range(-num_layers, num_layers))
    if isinstance(value, bool) or not isinstance(value, int) or value not in valid:
        raise ValueError(f"`{name}`={value!r} is out of range; valid values: {valid[0]} .. {valid[-1]}.")
    return value % num_layers


def _check_head(name: str, head, valid: tuple) -> None:
    is_head = isinstance(head, str) or (isinstance(head, int) and not isinstance(head, bool))  # not 1.0 / True
    if not is_head or head not in valid:
        raise ValueError(f"`{name}`={head!r} is not valid here; valid values: {', '.join(map(repr, valid))}.")


def _check_number(option: ExplainOption, value):
    """An "int"/"float" option's value within `minimum`/`maximum`; floats are returned as `float`."""
    low, high = option.minimum, option.maximum
    valid = isinstance(value, int if option.kind == "int" else (int, float)) and not isinstance(value, bool)
    if valid and low is not None:
        valid = value >= low
    if valid and high is not None:
        valid = value < high if option.maximum_exclusive else value <= high
    if not valid:
        what = "a whole number" if option.kind == "int" else "a number"
        low_text, high_text = ("-inf" if low is None else f"{low:g}"), ("inf" if high is None else f"{high:g}")
        closing = ")" if option.maximum_exclusive or high is None else "]"
        raise ValueError(f"`{option.name}`={value!r} must be {what} in [{low_text}, {high_text}{closing}.")
    return float(value) if option.kind == "float" else value


def resolve_options(method_name: str, options: dict, config) -> dict:
    """Validate `options` for `method_name` on the model `config` describes (a `CLIPVizConfig`) and return every
    option of the method, defaults filled in and layer indices made non-negative.

    Raises:
        ValueError: an unknown method, a method or option the backbone lacks, or a bad value; the message lists the
            valid methods, options or values.
    """
    backbone = config.vision_config.backbone
    if method_name not in EXPLAIN_METHODS:
        raise ValueError(f"Unknown explanation method {method_name!r}; valid methods: {', '.join(EXPLAIN_METHODS)}.")
    method = EXPLAIN_METHODS[method_name]
    if backbone not in method.backbones:
        valid = ", ".join(m.name for m in methods_for(backbone))
        raise ValueError(
            f"Method {method_name!r} is not available for the {backbone} backbone; valid methods: {valid}."
        )
    if not isinstance(options, dict):
        raise ValueError(f"Explanation options must be a dict of option names to values, got {options!r}.")
    declared = [option for option in method.options if backbone in option.backbones]
    unknown = sorted(set(options) - {option.name for option in declared})
    if unknown:
        valid = ", ".join(option.name for option in declared) or "none"
        raise ValueError(
            f"Unknown option(s) {unknown} for method {method_name!r} on {backbone}; valid options: {valid}."
        )
    resolved = {option.name: options.get(option.name, option.default) for option in declared}
    for option in declared:
        value = resolved[option.name]
        if option.kind in ("image_layer", "text_layer"):
            resolved[option.name] = _check_layer(option.name, value, _tower_size(option.kind, config))
        elif option.kind in ("image_head", "text_head"):
            if value is None and option.kind == "text_head":
                value = resolved[option.name] = _image_head_for_text(declared, resolved, option, config)
            _check_head(option.name, value, option_bounds(option, config))
        elif option.kind == "choice":
            if value not in option.choices:
                valid = ", ".join(map(repr, option.choices))
                raise ValueError(f"`{option.name}`={value!r} is not valid here; valid values: {valid}.")
        elif value is not None or option.default is not None:  # a None default: the method computes it
            resolved[option.name] = _check_number(option, value)
    return resolved


def _image_head_for_text(declared, resolved: dict, option: ExplainOption, config):
    """The value of the method's image-head option, for a text-head option left at None."""
    image = next((o for o in declared if o.kind == "image_head"), None)
    if image is None:
        raise ValueError(f"`{option.name}` must be a text head index or one of {option.choices}, not None.")
    head, text_heads = resolved[image.name], config.text_config.num_attention_heads
    if isinstance(head, int) and not isinstance(head, bool) and head >= text_heads:
        raise ValueError(
            f"`{image.name}`={head!r} exists in the image tower ({config.vision_config.num_attention_heads} heads) "
            f"but not in the text tower ({text_heads} heads): also pass `{option.name}` (a text head index, "
            f"{' or '.join(map(repr, option.choices))})."
        )
    return head


# ---- Inputs: one pass of each tower for every pair ----


def modeling_module():
    """`modeling_clipviz`, wherever it was loaded from (a Hub remote-code package, or a top-level module).

    Imported on first use: the modeling file imports this one, so it cannot be imported at import time here.
    Methods reach shared model helpers through it, e.g. `modeling_module().multi_head_attention`.
    """
    try:  # Hub remote code: the sibling module of the same package
        from . import modeling_clipviz
    except ImportError:  # a plain top-level module (pip install / repository checkout)
        modeling_clipviz = importlib.import_module("modeling_clipviz")
    return modeling_clipviz


@dataclass
class ExplainInputs:
    """What a method works from: the raw inputs, and the towers' outputs once [`encode`] has run.

    Shapes: `pixel_values` `[I, 3, S, S]` (detached), `input_ids`/`attention_mask` `[T, L]`, `text_valid` `[T, L]`
    (bool: tokens up to and including the first end-of-text token, minus padding), `grid` `(grid_h, grid_w)`,
    `vision`/`text` the towers' `BaseModelOutputWithPooling`, `image_features` `[I, P]`, `text_features` `[T, P]`
    (projected), `image_unit`/`text_unit` (L2-normalized), `logits` `[I, T]` (scaled cosine similarities).
    """

    pixel_values: torch.Tensor
    input_ids: torch.Tensor
    attention_mask: torch.Tensor | None
    text_valid: torch.Tensor
    grid: tuple[int, int] | None = None
    vision: Any = None
    text: Any = None
    image_features: torch.Tensor | None = None
    text_features: torch.Tensor | None = None
    image_unit: torch.Tensor | None = None
    text_unit: torch.Tensor | None = None
    logits: torch.Tensor | None = None

    @classmethod
    def from_inputs(cls, pixel_values, input_ids, attention_mask=None) -> "ExplainInputs":
        return cls(pixel_values.detach(), input_ids, attention_mask, _text_valid_mask(input_ids, attention_mask))


def encode(
    model,
    inputs: ExplainInputs,
    *,
    image_attentions: bool = True,
    image_hidden_states: bool = True,
    image_graph: bool = False,
    text_attentions: bool = True,
    text_hidden_states: bool = False,
    text_graph: bool = False,
) -> ExplainInputs:
    """Run each tower once on `inputs` and fill its tower fields in place (returned for convenience): the towers'
    outputs, projected and normalized features, the logits of every pair and the grid.

    `image_attentions`/`text_attentions` and `*_hidden_states` choose what the towers return. `image_graph` /
    `text_graph`: that tower builds an autograd graph (when grad is enabled, as `explain` does for methods with
    `needs_grad`), so that attentions, hidden states and features can be differentiated; the graph reaches them
    even when the model's parameters are frozen (the image side through `pixel_values.requires_grad_`, the text
    side through a temporary hook on the token embedding). Without a graph a tower runs under `no_grad`; with
    attentions off, ViT attention runs on the fast SDPA path.
    """
    grad = torch.is_grad_enabled()
    pixel_values = inputs.pixel_values.detach().requires_grad_(image_graph and grad)
    with torch.set_grad_enabled(image_graph and grad):
        vision = model.vision_model(
            pixel_values, output_attentions=image_attentions, output_hidden_states=image_hidden_states
        )
    embedding = model.text_model.token_embedding
    hook = embedding.register_forward_hook(_require_grad) if text_graph and grad else None
    try:
        with torch.set_grad_enabled(text_graph and grad):
            text = model.text_model(
                inputs.input_ids,
                inputs.attention_mask,
                output_attentions=text_attentions,
                output_hidden_states=text_hidden_states,
            )
    finally:
        if hook is not None:
            hook.remove()
    with torch.set_grad_enabled((image_graph or text_graph) and grad):
        image_features = model.vision_model.project(vision.pooler_output)  # [I, P]
        text_features = text.pooler_output @ model.text_projection.to(text.pooler_output.dtype)  # [T, P]
        image_unit = image_features / image_features.norm(dim=-1, keepdim=True)
        text_unit = text_features / text_features.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp().to(image_unit.dtype) * image_unit @ text_unit.t()  # [I, T]
    if model.config.vision_config.backbone == "resnet":
        grid = tuple(vision.last_hidden_state.shape[-2:])
    else:
        patch = model.config.vision_config.patch_size
        grid = (pixel_values.shape[-2] // patch, pixel_values.shape[-1] // patch)
    inputs.grid, inputs.vision, inputs.text = grid, vision, text
    inputs.image_features, inputs.text_features = image_features, text_features
    inputs.image_unit, inputs.text_unit, inputs.logits = image_unit, text_unit, logits
    return inputs


def _require_grad(module, args, output):
    """Forward hook: an output computed without grad (frozen parameters) becomes a leaf that requires grad."""
    return output if output.requires_grad else output.detach().requires_grad_(True)


def _text_valid_mask(input_ids: torch.Tensor, attention_mask: torch.Tensor | None) -> torch.Tensor:
    """`[T, L]` bool: tokens up to and including the first end-of-text token (OpenAI's argmax), minus padding."""
    positions = torch.arange(input_ids.shape[1], device=input_ids.device)
    valid = positions[None, :] <= input_ids.argmax(dim=-1)[:, None]  # [T, L]
    if attention_mask is not None:
        valid = valid & attention_mask.bool()
    return valid


# ---- Shared pieces ----


def _fuse_heads(weights: torch.Tensor, head) -> torch.Tensor:
    """Select one head or fuse them: `[..., heads, q, k]` -> `[..., q, k]`."""
    if head == "mean":
        return weights.mean(dim=-3)
    if head == "max":
        return weights.amax(dim=-3)
    if head == "min":
        return weights.amin(dim=-3)
    return weights[..., head, :, :]


def _scale_to_max_one(maps: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Clamp at 0 and divide each map (over `dims`) by its maximum; all-zero maps stay zero."""
    maps = maps.clamp(min=0)
    peak = maps.amax(dim=dims, keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


def _to_grid(maps: torch.Tensor, inputs: ExplainInputs) -> torch.Tensor:
    """`[I, T, gh*gw]` -> `[I, T, gh, gw]` (row-major, as the towers flatten their grids)."""
    grid_h, grid_w = inputs.grid
    return maps.reshape(*maps.shape[:2], grid_h, grid_w)  # [I, T, gh, gw]


def _per_pair(image: torch.Tensor, text: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Prompt-independent image maps `[I, N]` and image-independent text maps `[T, L]` -> `[I, T, N]`, `[I, T, L]`."""
    num_images, num_texts = image.shape[0], text.shape[0]
    return image[:, None].expand(num_images, num_texts, -1), text[None].expand(num_images, num_texts, -1)


def _eot_rows(matrices: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
    """Row of each prompt's end-of-text token: `[..., T, L, L]` -> `[..., T, L]` (the prompt axis is dim -3)."""
    eot = input_ids.argmax(dim=-1)  # [T]
    index = eot.view(-1, 1, 1).expand(*matrices.shape[:-2], 1, matrices.shape[-1])  # [..., T, 1, L]
    return matrices.gather(-2, index).squeeze(-2)  # [..., T, L]


def _batched_grads(target: torch.Tensor, inputs: list[torch.Tensor], cotangents: torch.Tensor) -> list[torch.Tensor]:
    """d(cotangents[k] . target)/d(inputs) for every k, as one vmapped backward: `[K, *input.shape]` each.

    Only the graph between `target` and `inputs` is run (autograd prunes the rest, and parameter gradients are
    never computed), which is what keeps explanations cheap.
    """
    return list(torch.autograd.grad(target, inputs, grad_outputs=cotangents, retain_graph=True, is_grads_batched=True))


def _one_hot_cotangents(num_images: int, num_texts: int, per: str, like: torch.Tensor) -> torch.Tensor:
    """Cotangents selecting one logit per (image, text) pair, batched along one side.

    `per="text"`: `[T, I, T]`, entry k picks column k, so the image tower's gradient for image i is that of
    logit (i, k) (images are independent rows). `per="image"`: `[I, I, T]`, entry k picks row k, likewise for
    the text tower.
    """
    if per == "text":
        eye = torch.eye(num_texts, dtype=like.dtype, device=like.device)
        return eye[:, None, :].expand(num_texts, num_images, num_texts)  # [T, I, T]
    eye = torch.eye(num_images, dtype=like.dtype, device=like.device)
    return eye[:, :, None].expand(num_images, num_images, num_texts)  # [I, I, T]


def _image_cotangents(logits: torch.Tensor, target: str) -> torch.Tensor:
    """Cotangents `[T, I, T]` for the image tower's backward, one per prompt k, on a per-pair score `[I, T]`.

    `logits` `[I, T]`: the model's logits of the call. `target="logit"`: entry k picks column k (see
    `_one_hot_cotangents`). `target="contrast"`: entry k is `e_k - softmax_{j != k}(logits[i, j])` on row i, the
    gradient of the contrastive target `y_ik - logsumexp_{j != k} y_ij` ("why this prompt rather than the others
    given", after Gu, Yang & Tresp 2018): a method whose score is the logit explains that target exactly, one with
    another score (Grad-CAM's, LeGrad's per-layer ones) its score minus the other prompts' scores weighted by that
    softmax. The contrast depends on the other prompts of the call; with one prompt there is nothing to contrast
    and it is the logit's.
    """
    num_images, num_texts = logits.shape
    cotangents = _one_hot_cotangents(num_images, num_texts, "text", logits)  # [T, I, T]
    if target == "logit" or num_texts == 1:
        return cotangents
    eye = torch.eye(num_texts, dtype=torch.bool, device=logits.device)
    others = logits.detach().float()[None].masked_fill(eye[:, None, :], float("-inf"))  # [T, I, T]: k left out
    return cotangents - others.softmax(dim=-1).to(logits.dtype)


def _chefer_relevance(attentions: list[torch.Tensor], grads: list[torch.Tensor]) -> torch.Tensor:
    """Chefer et al. 2021: `R <- R + mean_h ReLU(dy/dA * A) @ R`, from the identity, over the given layers.

    attentions: per layer `[B, heads, N, N]`; grads: per layer `[K, B, heads, N, N]` (K targets).
    Returns `R`: `[K, B, N, N]`.
    """
    size = attentions[0].shape[-1]
    batch = (grads[0].shape[0], attentions[0].shape[0])
    relevance = torch.eye(size, dtype=torch.float32, device=attentions[0].device).expand(*batch, size, size)
    for weights, grad in zip(attentions, grads, strict=True):
        cam = (grad.float() * weights.detach().float()[None]).clamp(min=0).mean(dim=2)  # [K, B, N, N]
        relevance = relevance + cam @ relevance  # [K, B, N, N]
    return relevance


def _rollout(attentions: list[torch.Tensor], head_fusion: str, discard_ratio: float) -> torch.Tensor:
    """Abnar & Zuidema 2020: fuse heads, drop the weakest links, add the residual, renormalize rows, multiply.

    attentions: per layer `[B, heads, N, N]`. Returns `[B, N, N]` = a_last @ ... @ a_first.
    """
    size = attentions[0].shape[-1]
    eye = torch.eye(size, dtype=torch.float32, device=attentions[0].device)
    result = eye.expand(attentions[0].shape[0], size, size)  # [B, N, N]
    for weights in attentions:
        fused = _fuse_heads(weights.float(), head_fusion)  # [B, N, N]
        fused = _discard_lowest(fused, discard_ratio)
        mixed = (fused + eye) / 2
        mixed = mixed / mixed.sum(dim=-1, keepdim=True)  # each row sums to 1
        result = mixed @ result  # [B, N, N]
    return result


def _discard_lowest(fused: torch.Tensor, ratio: float) -> torch.Tensor:
    """Zero the lowest `ratio` of each `[N, N]` map's entries, per sample, never the class->class entry."""
    batch, size, _ = fused.shape
    count = int(size * size * ratio)
    if count == 0:
        return fused
    flat = fused.reshape(batch, size * size)  # [B, N*N]
    ranked = flat.clone()
    ranked[:, 0] = float("inf")  # the class token's attention to itself is never discarded
    lowest = ranked.topk(min(count, size * size - 1), dim=-1, largest=False).indices  # [B, count]
    return flat.scatter(1, lowest, 0.0).reshape(batch, size, size)  # [B, N, N]


# ---- Methods: each returns (image_maps [I, T, gh, gw], text_maps [I, T, L]) before scaling ----


def attention_maps(model, inputs: ExplainInputs, options: dict):
    """Raw attention of the class token (ViT) or the attention pool's query (ResNet), and of the end-of-text
    token over its prompt, in one layer: one head or a fusion of them."""
    encode(model, inputs)
    weights = inputs.vision.attentions[options["layer"]]  # [I, heads, q, 1 + gh*gw]
    image = _fuse_heads(weights[:, :, :1, 1:], options["head"])[:, 0]  # [I, gh*gw]
    text_weights = inputs.text.attentions[options["text_layer"]]  # [T, heads, L, L]
    text = _eot_rows(_fuse_heads(text_weights, options["text_head"]), inputs.input_ids)  # [T, L]
    image_maps, text_maps = _per_pair(image, text)
    return _to_grid(image_maps, inputs), text_maps


def rollout_maps(model, inputs: ExplainInputs, options: dict):
    """Attention rollout over every layer of both towers (the text tower without discarding)."""
    encode(model, inputs)
    image = _rollout(list(inputs.vision.attentions), options["head_fusion"], options["discard_ratio"])
    image = image[:, 0, 1:]  # [I, gh*gw]: the class token's row, without itself
    text = _eot_rows(_rollout(list(inputs.text.attentions), options["head_fusion"], 0.0), inputs.input_ids)  # [T, L]
    image_maps, text_maps = _per_pair(image, text)
    return _to_grid(image_maps, inputs), text_maps


def relevance_maps(model, inputs: ExplainInputs, options: dict):
    """Chefer's gradient x attention relevance of the image-prompt logit, for both towers."""
    vision_config = model.config.vision_config
    # relevance from the last ViT layer only is recomputed from the class token's row (see
    # `_last_layer_relevance`): the image tower then runs without a graph, on the fast attention path
    shortcut = vision_config.backbone == "vit" and options["start_layer"] == vision_config.num_hidden_layers - 1
    encode(model, inputs, image_attentions=not shortcut, image_graph=not shortcut, text_graph=True)
    logits = inputs.logits
    if shortcut:
        image = _last_layer_relevance(model, inputs, options["target"])  # [T, I, gh*gw]
    else:
        image_weights = list(inputs.vision.attentions[options.get("start_layer", 0) :])  # ResNet: the pool
        cotangents = _image_cotangents(logits, options["target"])  # [T, I, T]
        grads = _batched_grads(logits, image_weights, cotangents)  # each [T, I, heads, q, k]
        if vision_config.backbone == "resnet":
            cam = (grads[0].float() * image_weights[0].detach().float()[None]).clamp(min=0).mean(dim=2)
            image = cam[:, :, 0, 1:]  # [T, I, h*w]: the mean token's query row, grid keys only
        else:
            image = _chefer_relevance(image_weights, grads)[:, :, 0, 1:]  # [T, I, gh*gw]
    return _to_grid(image.transpose(0, 1), inputs), _text_relevance(inputs, options["start_layer_text"])


def _text_relevance(inputs: ExplainInputs, start_layer: int) -> torch.Tensor:
    """Chefer's relevance of each prompt token for each image: `[I, T, L]`."""
    logits = inputs.logits
    num_images, num_texts = logits.shape
    text_weights = list(inputs.text.attentions[start_layer:])
    text_grads = _batched_grads(logits, text_weights, _one_hot_cotangents(num_images, num_texts, "image", logits))
    relevance = _chefer_relevance(text_weights, text_grads)  # [I, T, L, L]
    eye = torch.eye(relevance.shape[-1], dtype=relevance.dtype, device=relevance.device)
    return _eot_rows(relevance - eye, inputs.input_ids)  # [I, T, L]


def _last_layer_relevance(model, inputs: ExplainInputs, target: str) -> torch.Tensor:
    """Chefer's image relevance over the last ViT layer alone: there `R = I + cam`, so the map is the class
    token's row of `mean_h ReLU(dy/dA * A)`, and only that row of `A` reaches the logit.

    The tower ran without attentions (on SDPA); the last block is rerun here for the class token alone
    (`num_queries=1`) from its detached input, so each prompt's backward costs one token instead of all of them
    (autograd would push zero rows through every token's MLP). Returns `[T, I, gh*gw]`.
    """
    vision, block = model.vision_model, model.vision_model.encoder.layers[-1]
    # requires grad so that the row is in the graph even with frozen parameters; only the row's gradient is asked for
    hidden = inputs.vision.hidden_states[-2].detach().requires_grad_(True)  # [I, N, D]: the last block's input
    with torch.enable_grad():
        token, weights = block(hidden, output_attentions=True, num_queries=1)  # [I, 1, D], [I, heads, 1, N]
        pooled = vision.ln_post(token[:, 0])  # [I, D]
        features = vision.project(pooled)  # [I, P]
        unit = features / features.norm(dim=-1, keepdim=True)
        logits = model.logit_scale.exp().to(unit.dtype) * unit @ inputs.text_unit.detach().t()  # [I, T]
        (grad,) = _batched_grads(logits, [weights], _image_cotangents(logits, target))  # [T, I, heads, 1, N]
    cam = (grad.float() * weights.detach().float()[None]).clamp(min=0).mean(dim=2)  # [T, I, 1, N]
    return cam[:, :, 0, 1:]


def gradcam_maps(model, inputs: ExplainInputs, options: dict):
    """Grad-CAM of the image-prompt similarity on the last image stage or tokens, and on the text tokens."""
    encode(model, inputs, image_graph=True, text_graph=True, text_hidden_states=True)
    image_features, text_features = inputs.image_features, inputs.text_features
    num_images, num_texts = image_features.shape[0], text_features.shape[0]
    image_target = image_features @ inputs.text_unit.detach().t()  # [I, T]
    per_text = _image_cotangents(inputs.logits, options["target"]).to(image_target.dtype)  # [T, I, T]
    if model.config.vision_config.backbone == "resnet":
        features = inputs.vision.last_hidden_state  # [I, C, h, w]: the last stage
        (grad,) = _batched_grads(image_target, [features], per_text)  # [T, I, C, h, w]
        weights = grad.float().mean(dim=(-2, -1))  # [T, I, C]
        image = (weights[..., None, None] * features.detach().float()[None]).sum(dim=2)  # [T, I, h, w]
        image = image.flatten(2).clamp(min=0)  # [T, I, h*w]
    else:
        tokens = inputs.vision.hidden_states[-2]  # [I, 1 + gh*gw, D]: the tokens entering the last block
        (grad,) = _batched_grads(image_target, [tokens], per_text)  # [T, I, 1 + gh*gw, D]
        weights = grad.float()[:, :, 1:].mean(dim=2)  # [T, I, D]
        image = (tokens.detach().float()[None, :, 1:] * weights[:, :, None]).sum(-1).clamp(min=0)  # [T, I, gh*gw]
    text_target = inputs.image_unit.detach() @ text_features.t()  # [I, T]
    per_image = _one_hot_cotangents(num_images, num_texts, "image", text_target)
    text_tokens = inputs.text.hidden_states[-2]  # [T, L, D]: the tokens entering the last text block
    (text_grad,) = _batched_grads(text_target, [text_tokens], per_image)  # [I, T, L, D]
    valid = inputs.text_valid.to(text_grad.dtype)  # [T, L]
    text_weights = (text_grad.float() * valid[..., None]).sum(2) / valid.sum(1)[:, None]  # [I, T, D]
    text = (text_tokens.detach().float()[None] * text_weights[:, :, None]).sum(-1).clamp(min=0)  # [I, T, L]
    return _to_grid(image.transpose(0, 1), inputs), text


# ---- Shared pieces of LeGrad, GEM, MaskCLIP and ClearCLIP ----


def _unit(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=-1, keepdim=True)


def _cosines(features: torch.Tensor, other_unit: torch.Tensor) -> torch.Tensor:
    """Cosines `[B, K]` of features `[B, P]` with unit vectors `[K, P]`, in float32 (differences of a few 1e-3, as
    occlusion's drops, would vanish in fp16/bf16 rounding)."""
    return _unit(features.float()) @ other_unit.float().t()


def _min_max(maps: torch.Tensor, dims: tuple[int, ...]) -> torch.Tensor:
    """Each map (over `dims`) shifted and scaled to [0, 1], as the methods' authors show them; flat maps become 0."""
    low, high = maps.amin(dim=dims, keepdim=True), maps.amax(dim=dims, keepdim=True)
    spread = high - low
    return (maps - low) / torch.where(spread > 0, spread, torch.ones_like(spread))


@contextmanager
def _kept_projections(blocks, first: int):
    """While active, the blocks from `first` on record what their attention is fed, in block order: a list of
    (the LayerNorm'ed block input `[B, N, D]`, its fused q/k/v projection `[B, N, 3D]`). The rewired paths start
    from these, so the tower's own pass is not repeated."""
    kept = []
    hooks = [
        block.self_attn.qkv_proj.register_forward_hook(lambda module, args, output: kept.append((args[0], output)))
        for block in blocks[first:]
    ]
    try:
        yield kept
    finally:
        for hook in hooks:
            hook.remove()


def _split_qkv(qkv: torch.Tensor, num_heads: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """A fused projection `[B, N, 3D]` -> query, key, value, each `[B, heads, N, head_dim]` (views)."""
    batch, length, _ = qkv.shape
    qkv = qkv.view(batch, length, 3, num_heads, -1)  # [B, N, 3, heads, head_dim]
    return qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x [B, heads, N, head_dim]


def _encode_for_dense_maps(model, inputs: ExplainInputs, first: int) -> list:
    """One graph-free pass of each tower for the gradient-free methods: the image tower on the fast attention path
    with its hidden states, keeping its blocks' attention inputs from `first` on (`_kept_projections`); the text
    tower with its attentions (for `_eot_text_maps`)."""
    with _kept_projections(model.vision_model.encoder.layers, first) as kept:
        encode(model, inputs, image_attentions=False, image_hidden_states=True)
    return kept


def _dense_maps(features: torch.Tensor, inputs: ExplainInputs) -> torch.Tensor:
    """Cosine of each grid cell's projected feature `[I, gh*gw, P]` with each prompt, min-max scaled per map:
    `[I, T, gh, gw]`."""
    similarity = _cosines(features, inputs.text_unit)  # [I, gh*gw, T]
    return _to_grid(_min_max(similarity.transpose(1, 2), dims=(-1,)), inputs)


def _projected_patches(model, tokens: torch.Tensor) -> torch.Tensor:
    """ViT tokens `[I, 1 + gh*gw, D]` -> the patches' features in the joint space `[I, gh*gw, P]`."""
    vision = model.vision_model
    return vision.project(vision.ln_post(tokens[:, 1:]))


def _eot_text_maps(inputs: ExplainInputs) -> torch.Tensor:
    """The gradient-free methods' text map: the end-of-text token's last-layer attention over its prompt, mean
    over heads, the same for every image: `[I, T, L]`."""
    text = _eot_rows(_fuse_heads(inputs.text.attentions[-1], "mean"), inputs.input_ids)  # [T, L]
    return text[None].expand(inputs.pixel_values.shape[0], -1, -1)


# ---- MaskCLIP ----


def maskclip_maps(model, inputs: ExplainInputs, options: dict):
    """MaskCLIP: the last attention layer's value path applied to every token / grid cell, compared with the
    prompt. ViT: as the authors' code, each token attends to itself alone (the value and output projections),
    then the block's residual and MLP, `ln_post` and the projection. ResNet: the attention pool's value and output
    projections as 1x1 convolutions on the last feature map (no positional embedding, as the authors')."""
    vision = model.vision_model
    if model.config.vision_config.backbone == "resnet":
        encode(model, inputs, image_attentions=False, image_hidden_states=False)
        pool = vision.attnpool
        cells = inputs.vision.last_hidden_state.flatten(2).transpose(1, 2)  # [I, h*w, C]
        return _dense_maps(pool.out_proj(pool.v_proj(cells)), inputs), _eot_text_maps(inputs)
    block = vision.encoder.layers[-1]
    ((_, qkv),) = _encode_for_dense_maps(model, inputs, len(vision.encoder.layers) - 1)
    hidden = inputs.vision.hidden_states[-2]  # [I, N, D]: the last block's input
    value = qkv[..., 2 * hidden.shape[-1] :]  # [I, N, D]
    tokens = hidden + block.self_attn.out_proj(value)  # [I, N, D]
    tokens = tokens + block.mlp(block.ln_2(tokens))
    return _dense_maps(_projected_patches(model, tokens), inputs), _eot_text_maps(inputs)


# ---- ClearCLIP ----


def clearclip_maps(model, inputs: ExplainInputs, options: dict):
    """ClearCLIP: the last block with query-query attention, without the residual and without the MLP."""
    modeling, block = modeling_module(), model.vision_model.encoder.layers[-1]
    ((normed, qkv),) = _encode_for_dense_maps(model, inputs, len(model.vision_model.encoder.layers) - 1)
    query, _, value = _split_qkv(qkv, block.self_attn.num_heads)  # [I, heads, N, head_dim] each
    use_sdpa = modeling._uses_sdpa(model.config.vision_config, normed)
    context = modeling.multi_head_attention(query, query, value, use_sdpa=use_sdpa)[0]  # [I, heads, N, head_dim]
    tokens = block.self_attn.out_proj(modeling._merge_heads(context))  # [I, N, D]
    return _dense_maps(_projected_patches(model, tokens), inputs), _eot_text_maps(inputs)


# ---- GEM ----


def _self_self_attention(query, key, value, inverse_temperature, iterations: int, use_sdpa: bool) -> torch.Tensor:
    """GEM's self-self attention: q, k and v each attend to themselves by cosine x `inverse_temperature`
    (`iterations` rounds, each replacing the path by its attended self), then each path's own attention is applied
    to v and the three are averaged: `[B, heads, N, head_dim]`. `multi_head_attention` divides scores by
    sqrt(head_dim), so the queries carry that factor back."""
    attention = modeling_module().multi_head_attention
    query_scale = inverse_temperature * query.shape[-1] ** 0.5

    def attend(x_unit, values):
        return attention(x_unit * query_scale, x_unit, values, use_sdpa=use_sdpa)[0]  # [B, heads, N, head_dim]

    context = 0
    for x in (query, key, value):
        for _ in range(iterations):
            x_unit = _unit(x)
            x = attend(x_unit, x_unit)
        context = context + attend(_unit(x), value)
    return context / 3


def gem_maps(model, inputs: ExplainInputs, options: dict):
    """GEM: a parallel path through the last `depth - 1` blocks that adds self-self attention (fed by the
    ordinary path's tokens) and skips the MLP; its projected patches are compared with the prompt."""
    modeling, blocks = modeling_module(), model.vision_model.encoder.layers
    first = len(blocks) - min(options["depth"] - 1, len(blocks))
    kept = _encode_for_dense_maps(model, inputs, first)
    tokens = inputs.vision.hidden_states[first]  # [I, N, D]: the first rewired block's input
    use_sdpa = modeling._uses_sdpa(model.config.vision_config, tokens)
    for block, (normed, qkv) in zip(blocks[first:], kept, strict=True):
        query, key, value = _split_qkv(qkv, block.self_attn.num_heads)  # [I, heads, N, head_dim] each
        temperature = options["ss_attn_temp"]
        if temperature is None:  # the authors' default: mean token norm of the attention input x the head scale
            norms = normed.float().norm(dim=-1).mean(dim=-1)  # [I]
            temperature = (norms * query.shape[-1] ** -0.5).to(query.dtype)[:, None, None, None]  # [I, 1, 1, 1]
        context = _self_self_attention(query, key, value, temperature, options["ss_attn_iter"], use_sdpa)
        tokens = tokens + block.self_attn.out_proj(modeling._merge_heads(context))  # [I, N, D]
    return _dense_maps(_projected_patches(model, tokens), inputs), _eot_text_maps(inputs)


# ---- LeGrad ----


def _legrad_block(block, hidden: torch.Tensor, qkv: torch.Tensor, attn_mask=None):
    """A block recomputed from its input `[B, N, D]` and its kept q/k/v projection, with its attention weights as
    a leaf that requires grad: returns (the block's output `[B, N, D]`, the weights `[B, heads, N, N]`). The
    backward then runs only the paths from the weights to the output (weights times values, output projection,
    MLP)."""
    modeling = modeling_module()
    query, key, value = _split_qkv(qkv, block.self_attn.num_heads)
    with torch.no_grad():
        weights = modeling.multi_head_attention(query, key, value, attn_mask, need_weights=True, use_sdpa=False)[1]
    weights = weights.requires_grad_(True)  # [B, heads, N, N]
    x = hidden + block.self_attn.out_proj(modeling._merge_heads(weights @ value))  # [B, N, D]
    return x + block.mlp(block.ln_2(x)), weights


def legrad_maps(model, inputs: ExplainInputs, options: dict):
    """LeGrad: for each layer l from `start_layer` on, s_l = the cosine of that block's output (mean over all
    tokens, through `ln_post` and the projection) with the prompt; the map sums, over l, the mean over heads and
    query rows of ReLU(ds_l/dA_l), without the class token's column. The text side mirrors it: s_l from the
    end-of-text token of text block l (through `ln_final` and the text projection) against the image. Each block
    is recomputed from its detached input, so s_l reaches only A_l, and all layers share one vmapped backward."""
    vision, text_model = model.vision_model, model.text_model
    start, text_start = options["start_layer"], options["start_layer_text"]
    with (
        _kept_projections(vision.encoder.layers, start) as kept,
        _kept_projections(text_model.encoder.layers, text_start) as text_kept,
    ):
        encode(model, inputs, image_attentions=False, text_attentions=False, text_hidden_states=True)
    image = _legrad_image(model, inputs, start, kept, options["target"])
    return image, _legrad_text(model, inputs, text_start, text_kept)


def _legrad_image(model, inputs: ExplainInputs, start: int, kept: list, target: str) -> torch.Tensor:
    """LeGrad's image maps `[I, T, gh, gw]`, min-max scaled, from the image blocks' kept projections."""
    vision = model.vision_model
    scores, weights = 0, []
    for index, (block, (_, qkv)) in enumerate(zip(vision.encoder.layers[start:], kept, strict=True), start):
        out, layer_weights = _legrad_block(block, inputs.vision.hidden_states[index], qkv)
        scores = scores + _unit(vision.project(vision.ln_post(out.mean(dim=1)))) @ inputs.text_unit.t()  # [I, T]
        weights.append(layer_weights)
    cotangents = _image_cotangents(inputs.logits, target).to(scores.dtype)  # [T, I, T]
    grads = _batched_grads(scores, weights, cotangents)  # each [T, I, heads, N, N]
    image = sum(grad.float().clamp(min=0).mean(dim=(2, 3)) for grad in grads)[..., 1:]  # [T, I, gh*gw]
    return _to_grid(_min_max(image.transpose(0, 1), dims=(-1,)), inputs)  # [I, T, gh, gw]


def _legrad_text(model, inputs: ExplainInputs, start: int, kept: list) -> torch.Tensor:
    """LeGrad's text maps `[I, T, L]` (unscaled), from the text blocks' kept projections."""
    text_model, hidden_states, input_ids = model.text_model, inputs.text.hidden_states, inputs.input_ids
    mask = text_model.attention_mask(input_ids, inputs.attention_mask, hidden_states[0].dtype)
    rows, eot = torch.arange(input_ids.shape[0], device=input_ids.device), input_ids.argmax(dim=-1)
    scores, weights = 0, []
    for index, (block, (_, qkv)) in enumerate(zip(text_model.encoder.layers[start:], kept, strict=True), start):
        out, layer_weights = _legrad_block(block, hidden_states[index], qkv, mask)
        pooled = text_model.ln_final(out[rows, eot])  # [T, D]: each prompt's end-of-text token
        features = pooled @ model.text_projection.to(pooled.dtype)  # [T, P]
        scores = scores + inputs.image_unit @ _unit(features).t()  # [I, T]
        weights.append(layer_weights)
    grads = _batched_grads(scores, weights, _one_hot_cotangents(*scores.shape, "image", scores))  # [I, T, h, L, L]
    return sum(_text_query_mean(grad.float().clamp(min=0), inputs) for grad in grads)  # [I, T, L]


def _text_query_mean(grads: torch.Tensor, inputs: ExplainInputs) -> torch.Tensor:
    """LeGrad's mean over heads and query rows on the causal text side, `[I, T, heads, L, L]` -> `[I, T, L]`: over
    the entries the attention has (query and key both prompt tokens, the key not after the query)."""
    valid = inputs.text_valid  # [T, L]
    length = valid.shape[-1]
    causal = torch.ones(length, length, dtype=torch.bool, device=valid.device).tril()  # [L, L]
    allowed = (valid[:, :, None] & valid[:, None, :] & causal).to(grads.dtype)  # [T, L, L]
    summed = (grads.mean(dim=2) * allowed).sum(dim=-2)  # [I, T, L]
    return summed / valid.sum(dim=-1, keepdim=True).to(grads.dtype)


# ---- Occlusion ----

OCCLUSION_CHUNK = 64  # sequences per pass of a tower (occluded images, or prompts with a token deleted)


def occlusion_maps(model, inputs: ExplainInputs, options: dict):
    """Occlusion: the drop of each image-prompt cosine when a window of grid cells is set to the dataset mean
    (zero after normalization), and when one prompt token is deleted."""
    encode(model, inputs, image_attentions=False, image_hidden_states=False, text_attentions=False)
    base = _cosines(inputs.image_features, inputs.text_unit)  # [I, T]: the intact pairs
    return _occlusion_image(model, inputs, base, options["window"]), _occlusion_text(model, inputs, base)


def _cell_edges(size: int, cells: int) -> list[int]:
    """Pixel boundaries of `cells` grid cells along a side of `size` pixels (the last cell takes any remainder)."""
    return [index * size // cells for index in range(cells + 1)]


def _occlusion_image(model, inputs: ExplainInputs, base: torch.Tensor, window: int) -> torch.Tensor:
    """`[I, T, gh, gw]`: each cell's mean drop from the intact cosines `base` `[I, T]` over the square windows of
    `window` cells (slid one cell at a time, at most the grid's side minus one cell) that cover it."""
    images, (grid_h, grid_w) = inputs.pixel_values, inputs.grid
    win_h, win_w = min(window, max(1, grid_h - 1)), min(window, max(1, grid_w - 1))
    rows, cols = _cell_edges(images.shape[-2], grid_h), _cell_edges(images.shape[-1], grid_w)
    corners = [(y, x) for y in range(grid_h - win_h + 1) for x in range(grid_w - win_w + 1)]
    pairs = [(i, y, x) for y, x in corners for i in range(images.shape[0])]  # every image x window position
    drops = base.new_zeros(*base.shape, grid_h, grid_w)  # [I, T, gh, gw]
    covered = base.new_zeros(grid_h, grid_w)  # [gh, gw]
    for y, x in corners:
        covered[y : y + win_h, x : x + win_w] += 1
    for begin in range(0, len(pairs), OCCLUSION_CHUNK):
        chunk = pairs[begin : begin + OCCLUSION_CHUNK]
        occluded = images[[i for i, _, _ in chunk]].clone()  # [C, 3, S, S]
        for k, (_, y, x) in enumerate(chunk):
            occluded[k, :, rows[y] : rows[y + win_h], cols[x] : cols[x + win_w]] = 0
        features = model.vision_model.project(model.vision_model(occluded).pooler_output)  # [C, P]
        scores = _cosines(features, inputs.text_unit)  # [C, T]
        for k, (i, y, x) in enumerate(chunk):
            drops[i, :, y : y + win_h, x : x + win_w] += (base[i] - scores[k])[:, None, None]  # [T, 1, 1]
    return drops / covered


def _occlusion_text(model, inputs: ExplainInputs, base: torch.Tensor) -> torch.Tensor:
    """`[I, T, L]`: the drop from the intact cosines `base` `[I, T]` when one token between the start and the end-of-text token is deleted (the
    rest shifts left and the last position repeats, masked out; the length stays); start, end-of-text and padding
    stay 0."""
    ids = inputs.input_ids
    mask = torch.ones_like(ids) if inputs.attention_mask is None else inputs.attention_mask
    eot = ids.argmax(dim=-1).tolist()  # OpenAI's rule: the end-of-text token has the largest id
    pairs = [(t, j) for t in range(ids.shape[0]) for j in range(1, eot[t])]  # every word of every prompt
    maps = torch.zeros(inputs.image_unit.shape[0], *ids.shape, dtype=torch.float32, device=ids.device)  # [I, T, L]
    positions = torch.arange(ids.shape[1], device=ids.device)  # [L]
    for begin in range(0, len(pairs), OCCLUSION_CHUNK):
        texts, deleted = torch.tensor(pairs[begin : begin + OCCLUSION_CHUNK], device=ids.device).unbind(dim=1)  # [V]
        source = (positions[None] + (positions[None] >= deleted[:, None])).clamp(max=ids.shape[1] - 1)  # [V, L]
        shifted_mask = mask[texts].gather(1, source) * (positions[None] < ids.shape[1] - 1)  # [V, L]
        pooled = model.text_model(ids[texts].gather(1, source), shifted_mask).pooler_output  # [V, D]
        features = pooled @ model.text_projection.to(pooled.dtype)  # [V, P]
        scores = _cosines(inputs.image_features, _unit(features.float()))  # [I, V]
        maps[:, texts, deleted] = base[:, texts] - scores
    return maps


HEAD_CHOICES = ("mean", "max")
TARGET_OPTION = ExplainOption(
    "target",
    "choice",
    "logit",
    "image side: the prompt's own score, or contrast = it minus the other given prompts' (softmax-weighted)",
    ("logit", "contrast"),
)

register(
    ExplainMethod(
        name="attention",
        title="Raw attention",
        function=attention_maps,
        backbones=("vit", "resnet"),
        options=(
            ExplainOption("layer", "image_layer", -1, "image attention layer (ResNet: its one attention pool)"),
            ExplainOption("head", "image_head", "mean", "image head index, or the mean/max over heads", HEAD_CHOICES),
            ExplainOption("text_layer", "text_layer", -1, "text attention layer"),
            ExplainOption(
                "text_head", "text_head", None, "text head index, or mean/max; None: the same as `head`", HEAD_CHOICES
            ),
        ),
        prompt_dependent=False,
        cost="forward only",
        needs_grad=False,
        how_to_read=(
            "Raw attention shows how much the image's summary token attends to each region in one layer (and one "
            "head, or their mean/max): for a ViT the class token's attention over the patch grid, for a ResNet the "
            "attention pool's query over the last feature map (the tower's only attention). It does not depend on "
            "the prompt, so every prompt shows the same map; it tells you what the layer gathers, not why a prompt "
            "matched. The token colours are the end-of-text token's attention over the prompt."
        ),
        reference="Abnar & Zuidema 2020, Quantifying Attention Flow in Transformers (ACL), raw attention baseline.",
    )
)

register(
    ExplainMethod(
        name="rollout",
        title="Attention rollout",
        function=rollout_maps,
        backbones=("vit",),
        options=(
            ExplainOption("head_fusion", "choice", "mean", "how each layer's heads are fused", ("mean", "max", "min")),
            ExplainOption(
                "discard_ratio",
                "float",
                0.0,
                "fraction of each fused image attention map zeroed (lowest first), in [0, 1)",
                minimum=0.0,
                maximum=1.0,
                maximum_exclusive=True,
            ),
        ),
        prompt_dependent=False,
        cost="forward only",
        needs_grad=False,
        how_to_read=(
            "Attention rollout multiplies the attention of all layers (with the residual path), following how "
            "information flows from the patches to the summary token. Like raw attention it ignores the prompt. "
            "Discarding the weakest links sharpens the map. It needs a stack of attention layers, so a ResNet image "
            "tower (a single attention pool, where rollout would equal raw attention) does not offer it."
        ),
        reference="Abnar & Zuidema 2020, Quantifying Attention Flow in Transformers (ACL).",
    )
)

register(
    ExplainMethod(
        name="relevance",
        title="Relevance (Chefer et al.)",
        function=relevance_maps,
        backbones=("vit", "resnet"),
        options=(
            ExplainOption(
                "start_layer",
                "image_layer",
                -1,
                "first image layer accumulated (-1: the last only, as Chefer's CLIP code; earlier: sharper, slower)",
                backbones=("vit",),
            ),
            ExplainOption("start_layer_text", "text_layer", -1, "first text layer accumulated"),
            TARGET_OPTION,
        ),
        prompt_dependent=True,
        cost="one backward",
        needs_grad=True,
        how_to_read=(
            "Relevance weights attention by its gradient with respect to this prompt's image-text score: bright "
            "regions raised the match with the prompt. Compare prompts side by side; the token colours show which "
            "words carried the match. For a ViT only the last layer is used by default, as in Chefer's CLIP code; "
            "an earlier first layer accumulates more layers (sharper, slower). For a ResNet it is the "
            "gradient-weighted attention of the attention pool over the last feature map."
        ),
        reference=(
            "Chefer, Gur & Wolf 2021, Generic Attention-model Explainability for Interpreting Bi-Modal and "
            "Encoder-Decoder Transformers (ICCV)."
        ),
    )
)

register(
    ExplainMethod(
        name="gradcam",
        title="Grad-CAM",
        function=gradcam_maps,
        backbones=("vit", "resnet"),
        options=(TARGET_OPTION,),
        prompt_dependent=True,
        cost="one backward",
        needs_grad=True,
        how_to_read=(
            "Grad-CAM weights the last image features by the gradient of the image-text similarity: bright regions "
            "are where features pushed the score for this prompt up. It is coarse (one feature map) but "
            "prompt-specific."
        ),
        reference=(
            "Selvaraju et al. 2017, Grad-CAM: Visual Explanations from Deep Networks via Gradient-based "
            "Localization (ICCV)."
        ),
    )
)


register(
    ExplainMethod(
        name="legrad",
        title="LeGrad",
        function=legrad_maps,
        backbones=("vit",),
        options=(
            ExplainOption(
                "start_layer",
                "image_layer",
                -2,
                "first image layer whose attention gradient is summed (-2: the last two, as the authors' wrapper)",
            ),
            ExplainOption("start_layer_text", "text_layer", -2, "first text layer whose attention gradient is summed"),
            TARGET_OPTION,
        ),
        prompt_dependent=True,
        cost="one backward",
        needs_grad=True,
        how_to_read=(
            "LeGrad asks every late layer on its own how well the image, as that layer sees it (its tokens "
            "averaged and projected into the joint space), matches the prompt, and marks the patches whose "
            "attention would raise that match: the positive gradient of each layer's score with respect to its "
            "attention, averaged over heads and over the tokens that attend, summed over layers. Bright: patches "
            "that pull the image towards the prompt. The map is scaled from its lowest to its highest value, as the "
            "authors show it. The token colours are the same construction on the text tower (each late text "
            "layer's end-of-text token against the image)."
        ),
        reference=(
            "Bousselham, Boggust, Chaybouti, Strobelt & Kuehne 2024, LeGrad: An Explainability Method for Vision "
            "Transformers via Feature Formation Sensitivity (arXiv 2404.03214); code: legrad-torch."
        ),
    )
)

register(
    ExplainMethod(
        name="gem",
        title="GEM (Grounding Everything)",
        function=gem_maps,
        backbones=("vit",),
        options=(
            ExplainOption(
                "depth",
                "int",
                7,
                "the self-self attention path runs through the last depth - 1 blocks (all of them if fewer)",
                minimum=2,
            ),
            ExplainOption(
                "ss_attn_iter",
                "int",
                1,
                "rounds of self-self attention before the last one, which is applied to the values (0: that one only)",
                minimum=0,
            ),
            ExplainOption(
                "ss_attn_temp",
                "float",
                None,
                "inverse temperature of the self-self attention; None: mean token norm x head_dim^-0.5 (authors')",
                minimum=0.0,
            ),
        ),
        prompt_dependent=True,
        cost="forward only",
        needs_grad=False,
        how_to_read=(
            "GEM adds a second path through the last blocks where every token attends to tokens similar to itself "
            "(queries to queries, keys to keys, values to values) instead of to what the class token needs; the "
            "patch features it yields stay local, so comparing each patch with the prompt gives a dense map. "
            "Bright: patches whose feature is closest to the prompt, scaled from the lowest to the highest "
            "similarity in the image (so some region is always bright: compare prompts, and read the logits). No "
            "gradients. The token colours are the end-of-text token's last-layer attention over the prompt."
        ),
        reference=(
            "Bousselham, Petersen, Ferrari & Kuehne 2024, Grounding Everything: Emerging Localization Properties "
            "in Vision-Language Transformers (CVPR); code: gem-torch."
        ),
    )
)

register(
    ExplainMethod(
        name="maskclip",
        title="MaskCLIP",
        function=maskclip_maps,
        backbones=("vit", "resnet"),
        options=(),
        prompt_dependent=True,
        cost="forward only",
        needs_grad=False,
        how_to_read=(
            "MaskCLIP reads a feature for every patch (ViT) or grid cell (ResNet) from the value path of the last "
            "attention layer, which CLIP trained to carry what the image shows, and compares it with the prompt. "
            "Bright: cells whose feature is closest to the prompt, scaled from the lowest to the highest similarity "
            "in the image (some region is always bright: compare prompts). No gradients; for a ResNet this is the "
            "dense, prompt-specific map of its last feature map. The token colours are the end-of-text token's "
            "last-layer attention over the prompt."
        ),
        reference="Zhou, Loy & Dai 2022, Extract Free Dense Labels from CLIP (ECCV).",
    )
)

register(
    ExplainMethod(
        name="clearclip",
        title="ClearCLIP",
        function=clearclip_maps,
        backbones=("vit",),
        options=(),
        prompt_dependent=True,
        cost="forward only",
        needs_grad=False,
        how_to_read=(
            "ClearCLIP rewires the last block: each patch attends to patches with similar queries, and the "
            "residual connection and the MLP, which add noise to the patch features, are left out; each patch's "
            "resulting feature is compared with the prompt. Bright: patches closest to the prompt, scaled from the "
            "lowest to the highest similarity in the image (some region is always bright: compare prompts). No "
            "gradients. The token colours are the end-of-text token's last-layer attention over the prompt."
        ),
        reference=(
            "Lan, Zhang, Yue, Li & Li 2024, ClearCLIP: Decomposing CLIP Representations for Dense "
            "Vision-Language Inference (ECCV)."
        ),
    )
)


register(
    ExplainMethod(
        name="occlusion",
        title="Occlusion",
        function=occlusion_maps,
        backbones=("vit", "resnet"),
        options=(
            ExplainOption(
                "window",
                "int",
                2,
                "side of the square occluder in grid cells (a ViT patch or a ResNet grid cell), slid one cell at a "
                "time; larger values are clipped to the grid's side minus one, so some cells stay visible",
                minimum=1,
            ),
        ),
        prompt_dependent=True,
        cost="one image-tower pass per window position, one text-tower pass per prompt token",
        needs_grad=False,
        how_to_read=(
            "Occlusion hides part of the image and watches the score: a square of grid cells is set to the "
            "dataset's mean colour, the image tower runs again, and the drop of the image-prompt similarity is "
            "credited to the hidden cells; the square slides one cell at a time and each cell gets the mean drop "
            "of the squares that covered it. Bright: regions the model needs to match this prompt. It asks the "
            "model itself rather than reading its internals, so it is the slowest method (one image-tower pass per "
            "position: 49 on the embedded ViT, 169 on ViT-B/16 with the default 2-cell square) and the reference "
            "the others can be checked against. The token colours: the drop when that one token is deleted from "
            "the prompt."
        ),
        reference=(
            "Zeiler & Fergus 2014, Visualizing and Understanding Convolutional Networks (ECCV), occlusion "
            "sensitivity; for CLIP with deletion of prompt tokens as the text side."
        ),
    )
)


# ---- The model's `explain` ----


@dataclass
class CLIPVizExplanationOutput(ModelOutput):
    """Output of [`CLIPVizExplainMixin.explain`]: one map per image x prompt pair.

    Args:
        image_maps (`torch.FloatTensor` of shape `[num_images, num_texts, grid_h, grid_w]`): where the image tower
            looks, on its token grid (ViT patches, or the ResNet attention-pool grid), row-major as in the image.
            Non-negative, each map scaled to a maximum of 1 (an all-zero map stays zero). Upsample and blend it with
            `clipviz.rendering.overlay`.
        text_maps (`torch.FloatTensor` of shape `[num_images, num_texts, seq_len]`): how much each token of each
            prompt matters, on the same scale (maximum 1 per map); 0 on padding and after the first end-of-text
            token. The start and end-of-text tokens are included; drop them for display if you like.
        logits_per_image (`torch.FloatTensor` of shape `[num_images, num_texts]`): the model's scaled cosine
            similarities for the same pairs, as in [`CLIPVizModel.forward`].
    """

    image_maps: torch.FloatTensor | None = None
    text_maps: torch.FloatTensor | None = None
    logits_per_image: torch.FloatTensor | None = None


class CLIPVizExplainMixin:
    """Adds `explain` (every method of `EXPLAIN_METHODS`) and `overlay` to [`CLIPVizModel`]."""

    def explain(
        self,
        pixel_values: torch.FloatTensor,
        input_ids: torch.LongTensor,
        attention_mask: torch.Tensor | None = None,
        method: str | None = None,
        **options,
    ) -> CLIPVizExplanationOutput:
        """Maps of where the model looks in each image, and at which tokens, for each prompt.

        Every image is paired with every prompt: both towers run once, whatever the number of pairs. Call it on a
        model in eval mode (BatchNorm of the ResNet tower uses its running statistics then).

        Not thread-safe on one model instance: it attaches forward hooks to the model while it runs, so concurrent
        calls on the same model see each other's hooks. Use one model per thread, or hold a lock around the call.

        Args:
            pixel_values (`torch.FloatTensor` of shape `[num_images, 3, size, size]`): processed images.
            input_ids (`torch.LongTensor` of shape `[num_texts, length]`): tokenized prompts.
            attention_mask (`torch.Tensor` of shape `[num_texts, length]`, *optional*): 1 for tokens, 0 for padding.
            method (`str`, *optional*): a name in `EXPLAIN_METHODS` (`methods_for(backbone)` lists those of a
                backbone). None: the model's default, `config.explain_method` with `config.explain_options` (the
                keyword options given here override them). The methods:
                - `"attention"`: raw attention of the class token (ViT) or of the attention pool's mean-token query
                  (ResNet) over the grid, and of the end-of-text token over the prompt. Prompt-independent on the
                  image side. Options: `layer` (image layer index, default -1; ResNet: its one pool, -1 or 0),
                  `text_layer` (default -1), `head` (an image head index, `"mean"` or `"max"`, default `"mean"`),
                  `text_head` (the same for the text tower; default: `head`, which must then exist there too).
                - `"rollout"` (ViT only): attention rollout (Abnar & Zuidema 2020) over all layers, for both towers.
                  Options: `head_fusion` (`"mean"`, `"max"`, `"min"`), `discard_ratio` (in [0, 1): the lowest
                  fraction of each fused image attention map is zeroed, never the class->class entry; the text
                  tower is rolled out without discarding). Rows are renormalized after adding the identity.
                - `"relevance"` (the default unless the config names another, `config.explain_method`): Chefer et
                  al. 2021 gradient x attention, `R <- R + mean_h ReLU(dy/dA * A) R` from the identity, with `y`
                  the image-prompt logit; the image map is the class token's row, the text map the end-of-text
                  token's row minus the identity.
                  Options: `start_layer` (ViT, first image layer used, default -1 = the last one, as Chefer's CLIP
                  code, and about the cost of a forward whatever the number of prompts; 0 uses every layer: sharper
                  on small models, but a backward through the whole image tower, batched over the prompts in one
                  vmapped pass, so its cost grows with their number) and `start_layer_text` (default -1).
                  ResNet: the attention pool's gradient-weighted attention `mean_h ReLU(dy/dA * A)` of the mean
                  token over the grid.
                  `target` (relevance, gradcam, legrad): `"logit"` (default) explains each prompt's own score;
                  `"contrast"` explains `y_k - logsumexp_{j != k} y_j` over the prompts of the call ("why this
                  prompt rather than the others", Gu et al. 2018): with a method whose score is not the logit, its
                  score minus the others' weighted by the softmax of the logits without k. The image map then
                  depends on which other prompts are given (the same prompt set gives the same maps batched or one
                  image at a time); with one prompt it is the logit's map. The text maps do not change (the other
                  prompts' logits do not depend on this prompt's tokens).
                - `"gradcam"`: Grad-CAM with `y` = image embedding . unit text embedding, on the last ResNet stage
                  (channel weights = mean gradient over the grid) or on the tokens entering the last ViT block
                  (token features weighted by their mean gradient); the text side likewise on the tokens entering
                  the last text block, with `y` = unit image embedding . text embedding.
                - `"legrad"` (ViT only): LeGrad (Bousselham et al. 2024). For each layer from `start_layer` on, the
                  cosine of that block's output (mean over tokens, through `ln_post` and the projection) with the
                  prompt is differentiated w.r.t. that layer's attention; ReLU, mean over heads and query rows, sum
                  over layers, min-max scaled. Options: `start_layer` (default -2: the last two layers, as the
                  authors' wrapper), `start_layer_text` (default -2; the text side takes each text layer's
                  end-of-text token against the image).
                - `"gem"` (ViT only): GEM (Bousselham et al. 2024), no gradients: a parallel self-self attention
                  path (q-q, k-k, v-v, averaged, applied to v, no MLP) through the last `depth - 1` blocks; each
                  patch's projected feature against the prompt, min-max scaled. Options: `depth` (default 7, the
                  authors'; all blocks if the model has fewer), `ss_attn_iter` (default 1), `ss_attn_temp` (default
                  None: mean token norm x head_dim^-0.5).
                - `"maskclip"`: MaskCLIP (Zhou et al. 2022), no gradients: ViT, the last block's value path (value
                  and output projections, residual, MLP) for every token; ResNet, the attention pool's value and
                  output projections on every grid cell; each against the prompt, min-max scaled.
                - `"clearclip"` (ViT only): ClearCLIP (Lan et al. 2024), no gradients: the last block with q-q
                  attention, no residual, no MLP; each patch against the prompt, min-max scaled.
                  The three gradient-free methods' text map is the end-of-text token's last-layer attention over
                  the prompt (mean over heads).
                - `"occlusion"`: occlusion sensitivity (Zeiler & Fergus 2014), no gradients: a square of `window`
                  x `window` grid cells (default 2) set to zero (the dataset mean after normalization) slides one
                  cell at a time; each cell's value is the mean drop of the image-prompt cosine over the squares
                  covering it, clamped at 0. Text map: the drop when that token is deleted (the start and
                  end-of-text tokens stay 0). Costs one image-tower pass per image and square position and one
                  text-tower pass per prompt token, in chunks of `OCCLUSION_CHUNK` sequences; squares larger than
                  the grid's side minus one cell are clipped to it.
            options: the method's options (`EXPLAIN_METHODS[method].options`).

        Returns:
            [`CLIPVizExplanationOutput`] with `image_maps` `[num_images, num_texts, grid_h, grid_w]`, `text_maps`
            `[num_images, num_texts, length]` and `logits_per_image` `[num_images, num_texts]`, all detached.

        Raises:
            ValueError: for an unknown method, a method or option the backbone does not support (the message lists
                the valid ones), an option value out of range, or an invalid default in the config.
        """
        if method is None:
            method, options = self.config.explain_method, self._default_explain_options(options)
        resolved = resolve_options(method, options, self.config)
        entry = EXPLAIN_METHODS[method]
        self._check_text(input_ids, attention_mask)
        modeling_module()._check_image_size(pixel_values, self.config.vision_config, False, can_interpolate=False)
        inputs = ExplainInputs.from_inputs(pixel_values, input_ids, attention_mask)
        with torch.enable_grad() if entry.needs_grad else torch.no_grad():
            image_maps, text_maps = entry.function(self, inputs, resolved)
        if inputs.logits is None:
            raise RuntimeError(f"Explanation method {method!r} returned without calling `encode` for the logits.")
        text_maps = text_maps.float() * inputs.text_valid[None].to(text_maps.dtype)  # [I, T, L]
        return CLIPVizExplanationOutput(
            image_maps=_scale_to_max_one(image_maps.float(), dims=(-2, -1)).detach(),
            text_maps=_scale_to_max_one(text_maps, dims=(-1,)).detach(),
            logits_per_image=inputs.logits.detach(),
        )

    def _default_explain_options(self, options: dict) -> dict:
        """`config.explain_options` overridden by `options`, after checking the config's defaults on their own (so
        that a bad `config.json` is named as such)."""
        method, defaults = self.config.explain_method, self.config.explain_options
        try:
            resolve_options(method, defaults, self.config)
        except ValueError as error:
            raise ValueError(
                f"The model's default explanation is invalid (config.explain_method={method!r}, "
                f"config.explain_options={defaults!r}): {error} Fix them in config.json, or pass `method=`."
            ) from error
        return {**defaults, **options}

    @staticmethod
    def overlay(image, map, alpha: float = 0.5, colormap: str = "jet"):
        """`clipviz.rendering.overlay`: blend a map over the image (a PIL image). Needs the clipviz package (and
        Pillow, numpy); the model itself does not."""
        try:
            from clipviz.rendering import overlay
        except ImportError as error:
            raise ImportError(
                "`model.overlay` draws with the clipviz package's `clipviz.rendering` (which needs Pillow and numpy): "
                f"install clipviz, or blend `explain(...).image_maps` yourself ({error})."
            ) from error
        return overlay(image, map, alpha=alpha, colormap=colormap)


__all__ = [
    "CLIPVizExplainMixin",
    "CLIPVizExplanationOutput",
    "EXPLAIN_METHODS",
    "ExplainInputs",
    "ExplainMethod",
    "ExplainOption",
    "encode",
    "methods_for",
    "option_bounds",
    "register",
    "resolve_options",
]
