"""Everything the Space does between "an image and some prompts" and "what to show": models, prompts, maps, scores.

Why it is separate from ``app.py``: this is the logic that can be wrong (which model loads, how prompts are checked,
where a map lands on the photo, what the probabilities mean), so it is plain Python with unit tests; ``app.py`` only
wires it to Gradio components.

Models
    The default is the *embedded* model, found without any configuration or network: ``$CLIPVIZ_EMBEDDED_DIR/<name>``,
    else ``space/models/<name>`` (the copy a deployed Space carries), else ``<repo>/embedded/<name>`` (running from the
    repository). ``CLIPVIZ_MODEL`` (a Hub repo id or a local folder; ``CLIPVIZ_REVISION`` pins a commit) puts another
    model first. The dropdown also lists the converted OpenAI repos (``CLIPVIZ_HUB_REPOS``, comma-separated, overrides
    the list). Only listed models load: they run remote code (``trust_remote_code=True``), so the choice is never a
    free-text repo id. Loaded models stay in a small cache (``CLIPVIZ_MODEL_CACHE``, default 2).

Prompts
    One per line, blank lines ignored, at most 8, no duplicates. A prompt longer than CLIP's context (77 tokens with
    the start and end markers) is an error rather than silently truncated: the map would explain a text the user did
    not write.
"""

from __future__ import annotations

import json
import os
import sys
import threading
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import imaging
import numpy as np
from errors import UserError
from PIL import Image

SPACE_DIR = Path(__file__).resolve().parent
try:  # drawing (`clipviz.rendering`) and the method registry (`explaining_clipviz`): installed, or copied in on deploy
    import explaining_clipviz as registry
    from clipviz import rendering
except ImportError:  # running from the repository: both sit next to this folder
    sys.path.append(str(SPACE_DIR.parent))
    import explaining_clipviz as registry
    from clipviz import rendering
EMBEDDED_NAMES = ("clipviz-tiny-vit", "clipviz-tiny-resnet")
EMBEDDED_PREFIX = "embedded: "
OPENAI_ARCHITECTURES = (
    "RN50",
    "RN101",
    "RN50x4",
    "RN50x16",
    "RN50x64",
    "ViT-B/32",
    "ViT-B/16",
    "ViT-L/14",
    "ViT-L/14@336px",
)
DEFAULT_HUB_ORG = "clipviz"
OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)

MAX_PROMPTS = 8
MAX_PROMPT_CHARS = 500  # checked before tokenizing, so a pasted novel costs nothing
DISPLAY_LONGEST = 512  # overlays: long side in pixels (aspect ratio kept), small images are scaled up
GRID_LONGEST = 192  # per-head thumbnails

METHODS = tuple(registry.EXPLAIN_METHODS)  # every method, in the registry's order
METHOD_LABELS = {name: method.title for name, method in registry.EXPLAIN_METHODS.items()}
VALID_METHODS = {backbone: tuple(m.name for m in registry.methods_for(backbone)) for backbone in ("vit", "resnet")}


def _registry_option(method: str, name: str) -> registry.ExplainOption:
    return next(option for option in registry.EXPLAIN_METHODS[method].options if option.name == name)


HEAD_FUSIONS = _registry_option("attention", "head").choices  # raw attention: instead of one head
ROLLOUT_FUSIONS = _registry_option("rollout", "head_fusion").choices
DISCARD_RATIO = _registry_option("rollout", "discard_ratio")  # the UI's slider stops short of an exclusive maximum
COLORMAPS = rendering.OVERLAY_COLORMAPS

UNAVAILABLE_NOTES = {
    ("resnet", "rollout"): (
        "Rollout needs a stack of attention layers; the ResNet image tower has a single attention pool, so rollout "
        "would equal raw attention. Use raw attention, relevance or Grad-CAM."
    ),
}


class ModelLoadError(UserError):
    """A model could not be found or loaded; the message says which and why."""


class PromptError(UserError):
    """The prompts cannot be used as typed."""


# ---- model choice and loading ----


@dataclass(frozen=True)
class ModelChoice:
    """A model the dropdown offers: ``label`` is shown and passed through the API; ``source`` is what loads."""

    label: str
    source: str | None  # a folder or Hub repo id; None: an embedded model that is not present
    revision: str | None = None


def hub_repos(env: Mapping[str, str] = os.environ) -> list[str]:
    """The converted OpenAI repos offered in the dropdown (``CLIPVIZ_HUB_REPOS`` overrides the default names)."""
    if env.get("CLIPVIZ_HUB_REPOS", "").strip():
        return [repo.strip() for repo in env["CLIPVIZ_HUB_REPOS"].split(",") if repo.strip()]
    org = env.get("CLIPVIZ_HUB_ORG", DEFAULT_HUB_ORG)
    return [f"{org}/clip-{name.lower().replace('/', '-').replace('@', '-')}" for name in OPENAI_ARCHITECTURES]


def embedded_dir(name: str, env: Mapping[str, str] = os.environ) -> Path | None:
    """Where the embedded model ``name`` lives, if anywhere (see the module docstring for the search order)."""
    roots = [Path(env["CLIPVIZ_EMBEDDED_DIR"])] if env.get("CLIPVIZ_EMBEDDED_DIR") else []
    roots += [SPACE_DIR / "models", SPACE_DIR.parent / "embedded"]
    for root in roots:
        if (root / name / "config.json").is_file():
            return root / name
    return None


def model_choices(env: Mapping[str, str] = os.environ) -> list[ModelChoice]:
    """Dropdown entries, default first: ``CLIPVIZ_MODEL`` when set, then the embedded models, then the Hub repos."""
    choices = []
    custom = env.get("CLIPVIZ_MODEL", "").strip()
    if custom:
        choices.append(ModelChoice(custom, custom, env.get("CLIPVIZ_REVISION", "").strip() or None))
    for name in EMBEDDED_NAMES:
        folder = embedded_dir(name, env)
        choices.append(ModelChoice(EMBEDDED_PREFIX + name, str(folder) if folder else None))
    choices += [ModelChoice(repo, repo) for repo in hub_repos(env) if repo != custom]
    return choices


@dataclass
class LoadedModel:
    """A model ready to explain: weights, tokenizer and the preprocessing numbers it was trained with."""

    choice: ModelChoice
    model: object
    tokenizer: object
    image_size: int
    mean: tuple[float, float, float]
    std: tuple[float, float, float]
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    @property
    def config(self):
        return self.model.config

    @property
    def backbone(self) -> str:
        return self.config.vision_config.backbone

    @property
    def num_layers(self) -> int:
        """Attention layers of the image tower (1 for a ResNet: its attention pool)."""
        vision = self.config.vision_config
        return vision.num_hidden_layers if self.backbone == "vit" else 1

    @property
    def num_heads(self) -> int:
        """Heads of the image tower's attention (every one is drawn in the per-head grid)."""
        return self.config.vision_config.num_attention_heads

    @property
    def num_text_heads(self) -> int:
        return self.config.text_config.num_attention_heads

    @property
    def context_length(self) -> int:
        return self.config.text_config.max_position_embeddings

    @property
    def overlay(self) -> Callable:
        """The ``overlay`` that blends a map over a picture (``clipviz.rendering.overlay``)."""
        return rendering.overlay

    @property
    def colormaps(self) -> tuple[str, ...]:
        """Colour maps ``overlay`` knows."""
        return COLORMAPS


def load_model(choice: ModelChoice) -> LoadedModel:
    """Load weights, tokenizer and preprocessing numbers; any failure becomes a readable ModelLoadError."""
    if choice.source is None:
        name = choice.label.removeprefix(EMBEDDED_PREFIX)
        raise ModelLoadError(
            f"The embedded model {name!r} is not here. Copy `embedded/{name}` into `space/models/{name}` (or set "
            "CLIPVIZ_EMBEDDED_DIR), or choose another model with CLIPVIZ_MODEL."
        )
    from transformers import AutoModel, AutoTokenizer

    try:
        kwargs = {"revision": choice.revision} if choice.revision else {}
        model = AutoModel.from_pretrained(choice.source, trust_remote_code=True, **kwargs).eval()
        # the repo's own tokenizer (clipviz ships one giving OpenAI's exact ids); trusted like its model code, and
        # said explicitly so transformers never stops to ask on stdin
        tokenizer = AutoTokenizer.from_pretrained(choice.source, trust_remote_code=True, **kwargs)
        preprocessing = _preprocessor_config(choice.source, kwargs)
    except Exception as error:  # network, missing files, bad config: the user needs the reason, not a traceback
        raise ModelLoadError(f"Could not load the model {choice.label!r}: {_first_line(error)}") from error
    if not hasattr(model, "explain"):
        raise ModelLoadError(
            f"The model {choice.label!r} was saved with clipviz code that has no explanations (`explain`); "
            "convert it again with the current clipviz."
        )
    return LoadedModel(
        choice=choice,
        model=model,
        tokenizer=tokenizer,
        image_size=model.config.vision_config.image_size,
        mean=tuple(preprocessing.get("image_mean", OPENAI_MEAN)),
        std=tuple(preprocessing.get("image_std", OPENAI_STD)),
    )


def _preprocessor_config(source: str, kwargs: dict) -> dict:
    """The normalisation numbers saved with the model (``preprocessor_config.json``), read as plain JSON.

    Only mean and std are needed (the input size is the model's own), so the processor class is not instantiated.
    """
    from transformers.utils import cached_file

    path = cached_file(source, "preprocessor_config.json", _raise_exceptions_for_missing_entries=False, **kwargs)
    return json.loads(Path(path).read_text()) if path else {}


def _first_line(error: BaseException) -> str:
    text = str(error).strip() or type(error).__name__
    return text.splitlines()[0][:300]


class ModelCache:
    """Models by label, loaded once (even when several requests ask at the same moment), least recently used evicted."""

    def __init__(self, choices: list[ModelChoice], max_models: int = 2, loader: Callable = load_model):
        self.choices = {choice.label: choice for choice in choices}
        self.max_models = max(1, max_models)
        self._loader = loader
        self._models: OrderedDict[str, LoadedModel] = OrderedDict()
        self._lock = threading.Lock()
        self._loading: dict[str, threading.Lock] = {}

    @classmethod
    def from_env(cls, env: Mapping[str, str] = os.environ) -> ModelCache:
        """The Space's cache: the models of :func:`model_choices`, ``CLIPVIZ_MODEL_CACHE`` of them kept (default 2)."""
        return cls(model_choices(env), max_models=int(env.get("CLIPVIZ_MODEL_CACHE", "2")))

    @property
    def default_label(self) -> str:
        return next(iter(self.choices))

    def get(self, label: str | None) -> LoadedModel:
        label = label or self.default_label
        if label not in self.choices:
            raise ModelLoadError(f"Unknown model {label!r}; choose one of: {', '.join(self.choices)}.")
        with self._lock:
            if label in self._models:
                self._models.move_to_end(label)
                return self._models[label]
            loading = self._loading.setdefault(label, threading.Lock())
        with loading:  # one loader per label; the others wait and then find it cached
            with self._lock:
                if label in self._models:
                    return self._models[label]
            loaded = self._loader(self.choices[label])
            with self._lock:
                self._models[label] = loaded
                while len(self._models) > self.max_models:
                    self._models.popitem(last=False)
            return loaded


# ---- prompts ----


def parse_prompts(text: str | None) -> list[str]:
    """One prompt per line; blank lines are ignored. Raises PromptError with the reason and the limit."""
    prompts = [line.strip() for line in (text or "").splitlines() if line.strip()]
    if not prompts:
        raise PromptError("Type at least one prompt, one per line (for example “a photo of a cat”).")
    if len(prompts) > MAX_PROMPTS:
        raise PromptError(f"{len(prompts)} prompts given; the limit is {MAX_PROMPTS}. Remove some lines.")
    for index, prompt in enumerate(prompts, start=1):
        if len(prompt) > MAX_PROMPT_CHARS:
            raise PromptError(
                f"Prompt {index} is {len(prompt)} characters long; the limit is {MAX_PROMPT_CHARS}. Shorten it."
            )
    seen = set()
    for prompt in prompts:
        if prompt in seen:
            raise PromptError(f"The prompt “{prompt}” appears twice; each line must be different.")
        seen.add(prompt)
    return prompts


@dataclass
class Tokens:
    """Tokenized prompts: ``input_ids``/``attention_mask`` [num_prompts, longest] and each prompt's word pieces."""

    input_ids: object
    attention_mask: object
    pieces: list[list[str]]  # text of each token between the start and end markers


def tokenize_prompts(tokenizer, prompts: list[str], context_length: int) -> Tokens:
    """Tokenize without truncation; a prompt over the context length is a PromptError (see the module docstring)."""
    for index, prompt in enumerate(prompts, start=1):
        count = len(tokenizer(prompt, truncation=False, verbose=False)["input_ids"])
        if count > context_length:
            raise PromptError(
                f"Prompt {index} (“{_shorten(prompt)}”) is {count} tokens long; CLIP reads at most {context_length} "
                f"tokens including its start and end markers ({context_length - 2} for your text). Shorten it."
            )
    batch = tokenizer(prompts, padding=True, return_tensors="pt")
    pieces = []
    for row, mask in zip(batch["input_ids"], batch["attention_mask"], strict=True):
        ids = row[: int(mask.sum())].tolist()[1:-1]  # drop <|startoftext|> and <|endoftext|>
        pieces.append([_piece_text(tokenizer, token_id) for token_id in ids])
    return Tokens(batch["input_ids"], batch["attention_mask"], pieces)


def _piece_text(tokenizer, token_id: int) -> str:
    """Readable text of one BPE token: bytes decoded, the end-of-word marker shown as a trailing space."""
    token = tokenizer.convert_ids_to_tokens(token_id)
    text = tokenizer.convert_tokens_to_string([token.removesuffix("</w>")])
    return text + (" " if token.endswith("</w>") else "")


def _shorten(text: str, limit: int = 40) -> str:
    return text if len(text) <= limit else text[: limit - 1] + "…"


# ---- settings ----


@dataclass(frozen=True)
class Settings:
    """What the user chose. ``layer`` counts from 1 (the UI's numbering); ``head`` is "mean", "max" or a head number
    from 1. ``head_grid`` adds one raw-attention map per head of ``layer``."""

    method: str = "relevance"
    layer: int | None = None  # None: the last layer
    head: str = "mean"
    head_grid: bool = False
    alpha: float = 0.5
    colormap: str = "jet"
    head_fusion: str = "mean"  # rollout
    discard_ratio: float = 0.0  # rollout
    start_layer: int | None = None  # relevance on a ViT: first layer used, from 1; None: the model's default (last)


def settings_from_ui(
    method, layer, head, head_grid, alpha, colormap, head_fusion, discard_ratio, start_layer
) -> Settings:
    """Settings from the UI's (or the API's) values, in the order of the ``explain`` endpoint's parameters."""
    if not 0.0 <= float(alpha) <= 1.0:
        raise UserError(f"The overlay opacity must be between 0 and 1, not {alpha}.")
    return Settings(
        method=str(method),
        layer=parse_layer(layer),
        head=str(head),
        head_grid=bool(head_grid),
        alpha=float(alpha),
        colormap=str(colormap),
        head_fusion=str(head_fusion),
        discard_ratio=float(discard_ratio),
        start_layer=parse_layer(start_layer),
    )


def method_options(loaded: LoadedModel, settings: Settings) -> dict:
    """The keyword options ``model.explain`` takes for this method and backbone (invalid choices: UserError).

    The UI's numbering (layers and heads from 1) is translated here; the values are then checked by the registry
    (``explaining_clipviz.resolve_options``) against the loaded model. Methods without controls of their own run
    with the registry's defaults."""
    method, backbone = settings.method, loaded.backbone
    if settings.colormap not in loaded.colormaps:
        raise UserError(f"Unknown colour map {settings.colormap!r}; choose one of: {', '.join(loaded.colormaps)}.")
    if method not in METHODS:
        raise UserError(f"Unknown method {method!r}; choose one of: {', '.join(METHODS)}.")
    if method not in VALID_METHODS[backbone]:
        raise UserError(unavailable_note(method, backbone))
    options = {}
    if method == "attention":
        head = _head_option(settings.head, loaded.num_heads)
        # the token row uses the same head where the text tower has it, else the mean over its heads
        text_head = head if isinstance(head, str) or head < loaded.num_text_heads else "mean"
        options = {"head": head, "text_head": text_head}
        if backbone == "vit":
            options["layer"] = _layer_index(settings.layer, loaded.num_layers, "layer")
    elif method == "rollout":
        options = {"head_fusion": settings.head_fusion, "discard_ratio": settings.discard_ratio}
    elif method == "relevance" and backbone == "vit" and settings.start_layer is not None:
        options = {"start_layer": _layer_index(settings.start_layer, loaded.num_layers, "first relevance layer")}
    try:
        registry.resolve_options(method, options, loaded.config)
    except ValueError as error:
        raise UserError(f"{METHOD_LABELS[method]}: {error}") from None
    return options


def parse_layer(value: str | int | None) -> int | None:
    """The UI's layer choice: "last" (or empty) → None, otherwise a whole number counted from 1."""
    if value is None or str(value).strip().lower() in ("", "last"):
        return None
    text = str(value).strip()
    if not text.lstrip("-").isdigit():
        raise UserError(f"The layer must be 'last' or a whole number counted from 1, not {value!r}.")
    return int(text)


def _layer_index(layer: int | None, num_layers: int, what: str) -> int:
    """UI layer number (1..L, None = last) → the 0-based index ``explain`` takes."""
    if layer is None:
        return num_layers - 1
    if not 1 <= layer <= num_layers:
        raise UserError(f"The {what} must be from 1 to {num_layers} for this model, not {layer}.")
    return layer - 1


def _head_option(head: str | int, num_heads: int) -> str | int:
    """ "mean"/"max" pass through; a head number 1..H (UI numbering) becomes the 0-based index."""
    if str(head) in HEAD_FUSIONS:
        return str(head)
    try:
        number = int(str(head))
    except ValueError:
        number = 0
    if not 1 <= number <= num_heads:
        raise UserError(
            f"The head must be 'mean', 'max' or a number from 1 to {num_heads} for this model, not {head!r}."
        )
    return number - 1


@dataclass(frozen=True)
class Controls:
    """What the option controls offer for a loaded model (the UI updates its widgets from this)."""

    methods: list[tuple[str, str]]  # (label, method) valid on this backbone
    layers: list[str]  # "last", "1".."L"
    heads: list[str]  # "mean", "max", "1".."H"
    has_layers: bool  # a ViT: layer and first-relevance-layer choices apply
    status: str  # one paragraph about the model, plus why some methods are missing


def controls(loaded: LoadedModel) -> Controls:
    """Choices for the model's backbone, depth and heads, and the status text that explains them."""
    valid = VALID_METHODS[loaded.backbone]
    missing = [unavailable_note(m, loaded.backbone) for m in METHODS if m not in valid]
    vision = loaded.config.vision_config
    tower = f"ViT, {loaded.num_layers} layers" if loaded.backbone == "vit" else "ResNet with an attention pool"
    status = (
        f"**{loaded.choice.label}**: {tower}, {loaded.num_heads} heads, {vision.image_size}×{vision.image_size} input."
    )
    if loaded.num_text_heads < loaded.num_heads:
        status += (
            f" The text tower has {loaded.num_text_heads} heads: for image heads above that, the token row shows "
            "the mean over its heads."
        )
    # the registry's bounds of raw attention's layer and head options on this model, in the UI's numbering (from 1)
    first, last = registry.option_bounds(_registry_option("attention", "layer"), loaded.config)
    heads = registry.option_bounds(_registry_option("attention", "head"), loaded.config)
    return Controls(
        methods=[(METHOD_LABELS[m], m) for m in valid],
        layers=["last"] + [str(n + 1) for n in range(first, last + 1)],
        heads=[h for h in heads if isinstance(h, str)] + [str(h + 1) for h in heads if isinstance(h, int)],
        has_layers=loaded.backbone == "vit",
        status=status + "".join(f"\n\n{text}" for text in missing),
    )


def method_note(method: str, backbone: str) -> str:
    """The "how to read this" text for a method on a backbone (the registry's, or why the backbone lacks it)."""
    if method not in VALID_METHODS[backbone]:
        return unavailable_note(method, backbone)
    entry = registry.EXPLAIN_METHODS[method]
    return f"**{entry.title}**: {entry.how_to_read}"


def unavailable_note(method: str, backbone: str) -> str:
    """Why a method is not offered for a backbone."""
    if (backbone, method) in UNAVAILABLE_NOTES:
        return UNAVAILABLE_NOTES[(backbone, method)]
    others = ", ".join(METHOD_LABELS[m] for m in VALID_METHODS[backbone])
    tower = "a ViT" if backbone == "vit" else "a ResNet"
    return f"{METHOD_LABELS[method]} is not available for {tower} image tower; use one of: {others}."


# ---- examples ----


def load_examples(folder: Path = SPACE_DIR / "examples") -> list[list[str]]:
    """Example rows ``[image path, prompts (one per line), method]`` from ``examples.json`` (see make_examples.py)."""
    manifest = folder / "examples.json"
    if not manifest.is_file():
        return []
    rows = json.loads(manifest.read_text())
    return [[str(folder / row["file"]), "\n".join(row["prompts"]), row["method"]] for row in rows]


# ---- running one request ----


@dataclass
class Explanation:
    """What the UI shows for one image and its prompts."""

    overlays: list[tuple[Image.Image, str]]  # one per prompt, at the image's aspect ratio, with a caption
    probabilities: dict[str, float]  # softmax over the prompts
    token_relevance: list[tuple[str, float | None]]  # highlighted-text entries; None: separators
    head_grid: list[tuple[Image.Image, str]]  # one per head when asked, else empty
    note: str  # how to read this method


@dataclass
class Prepared:
    """An image as the model sees it (letterboxed, normalised) and as the user sees it (display size)."""

    pixel_values: object  # torch [1, 3, S, S]
    box: imaging.Letterbox
    display: Image.Image


def prepare_image(image: Image.Image, loaded: LoadedModel, longest: int = DISPLAY_LONGEST) -> Prepared:
    """Letterbox into the model's square input and make the display copy the maps are drawn on."""
    import torch

    square, box = imaging.letterbox(image, loaded.image_size, imaging.mean_fill(loaded.mean))
    pixels = torch.from_numpy(imaging.normalize(square, loaded.mean, loaded.std))[None]
    display = image.resize(imaging.display_size(image.size, longest), Image.Resampling.BICUBIC, reducing_gap=3.0)
    return Prepared(pixels, box, display)


def explain(loaded: LoadedModel, image: Image.Image, prompts: list[str], settings: Settings) -> Explanation:
    """Run ``model.explain`` once for the image and all prompts and turn its maps into what the UI shows."""
    import torch

    options = method_options(loaded, settings)
    tokens = tokenize_prompts(loaded.tokenizer, prompts, loaded.context_length)
    prepared = prepare_image(image, loaded)
    with loaded.lock:  # one explanation per model at a time: autograd state and threads are shared
        try:
            result = loaded.model.explain(
                prepared.pixel_values, tokens.input_ids, attention_mask=tokens.attention_mask,
                method=settings.method, **options,
            )  # fmt: skip
        except ValueError as error:  # an option the model rejects: its message lists the valid ones
            raise UserError(f"{METHOD_LABELS[settings.method]}: {error}") from error
        grid = head_maps(loaded, prepared.pixel_values, settings) if settings.head_grid else []
    image_maps = result.image_maps[0].detach().float().numpy()  # [num_prompts, gh, gw]
    probabilities = torch.softmax(result.logits_per_image[0].detach().float(), dim=-1).tolist()
    return Explanation(
        overlays=[
            (draw(loaded, prepared, image_maps[i], settings), f"{prompt} · {probabilities[i]:.0%}")
            for i, prompt in enumerate(prompts)
        ],
        probabilities=dict(zip(prompts, probabilities, strict=True)),
        token_relevance=token_entries(prompts, tokens.pieces, result.text_maps[0].detach().float().numpy()),
        head_grid=head_grid_images(loaded, prepared, grid, settings),
        note=method_note(settings.method, loaded.backbone),
    )


def draw(loaded: LoadedModel, prepared: Prepared, grid_map: np.ndarray, settings: Settings, display=None):
    """One overlay: the map of the letterboxed square, cropped to the image, blended onto the display copy."""
    display = display or prepared.display
    mapped = imaging.map_on_image(grid_map, prepared.box, display.size)  # [H, W] in [0, 1], the image's shape
    # the map already has the image's aspect ratio, so `overlay` blends it over the whole image, pixel for pixel
    return loaded.overlay(display, mapped, alpha=settings.alpha, colormap=settings.colormap)


def token_entries(prompts: list[str], pieces: list[list[str]], text_maps: np.ndarray) -> list[tuple[str, float | None]]:
    """HighlightedText entries: each prompt's tokens with relevance scaled to max 1 within the prompt.

    ``text_maps`` rows are laid out as the token ids ([start, pieces..., end, padding]); only the pieces are shown,
    since the markers are the same for every prompt.
    """
    entries: list[tuple[str, float | None]] = []
    for index, (prompt_pieces, row) in enumerate(zip(pieces, text_maps, strict=True)):
        scores = np.clip(np.asarray(row[1 : 1 + len(prompt_pieces)], dtype=np.float64), 0, None)
        peak = scores.max() if scores.size else 0.0
        scaled = scores / peak if peak > 0 else scores
        entries.append((f"{'   ' if index else ''}{index + 1}. ", None))
        entries += [(text, round(float(score), 3)) for text, score in zip(prompt_pieces, scaled, strict=True)]
    return entries


def head_maps(loaded: LoadedModel, pixel_values, settings: Settings) -> list[np.ndarray]:
    """Raw attention of every head of the chosen layer, from one image-tower pass: [grid, grid] each, max 1.

    Raw attention does not depend on the prompt, so the text tower is not run. ViT: the class token's row over the
    patches; ResNet: the attention pool's query row over the grid.
    """
    import torch

    layer = _layer_index(settings.layer, loaded.num_layers, "layer") if loaded.backbone == "vit" else 0
    with torch.no_grad():
        attentions = loaded.model.vision_model(pixel_values, output_attentions=True).attentions
    rows = attentions[layer][0, :, 0, 1:].float()  # [heads, grid * grid]
    grid = int(round(rows.shape[-1] ** 0.5))
    maps = rows.reshape(-1, grid, grid).clamp_min(0)
    peaks = maps.amax(dim=(1, 2), keepdim=True)
    return list((maps / torch.where(peaks > 0, peaks, torch.ones_like(peaks))).numpy())


def head_grid_images(loaded: LoadedModel, prepared: Prepared, maps: list[np.ndarray], settings: Settings):
    """Small overlays, one per head, captioned with the UI's 1-based numbering."""
    if not maps:
        return []
    thumb = prepared.display.resize(
        imaging.display_size(prepared.display.size, GRID_LONGEST), Image.Resampling.BILINEAR
    )
    layer = _layer_index(settings.layer, loaded.num_layers, "layer") + 1 if loaded.backbone == "vit" else None
    where = f"layer {layer}, " if layer else "attention pool, "
    return [(draw(loaded, prepared, m, settings, thumb), f"{where}head {h + 1}") for h, m in enumerate(maps)]


# ---- files handed to Gradio ----


class OutputFiles:
    """Writes result images as JPEG files, one fresh folder per request, and removes the oldest folders.

    Why files and not PIL images: Gradio caches a returned PIL image under its content hash and rewrites that cache
    file *in place*, so two requests with the same answer (two visitors clicking the same example) race: one client
    can be downloading the file while the other request truncates it (seen as "peer closed connection"). A returned
    *path* is copied into the cache atomically (staged, renamed, reused when already there), so each request writes
    its own files here. Gradio copies them while the request finishes; ``keep`` folders back are long gone from use.
    """

    def __init__(self, root: Path | None = None, keep: int = 64, quality: int = 90):
        import tempfile

        self.root = Path(root) if root else Path(tempfile.mkdtemp(prefix="clipviz-space-"))  # Gradio may serve it
        self.keep = keep
        self.quality = quality
        self._folders: list[Path] = []
        self._lock = threading.Lock()

    def save(self, images: list[tuple[Image.Image, str]]) -> list[tuple[str, str]]:
        """``(image, caption)`` → ``(path, caption)``, the files in a new folder of their own."""
        import tempfile

        if not images:
            return []
        folder = Path(tempfile.mkdtemp(dir=self.root))
        saved = []
        for index, (image, caption) in enumerate(images):
            path = folder / f"{index:02d}.jpeg"
            image.save(path, "JPEG", quality=self.quality)
            saved.append((str(path), caption))
        self._retire(folder)
        return saved

    def _retire(self, newest: Path) -> None:
        import shutil

        with self._lock:
            self._folders.append(newest)
            old, self._folders = self._folders[: -self.keep], self._folders[-self.keep :]
        for folder in old:
            shutil.rmtree(folder, ignore_errors=True)


# ---- the request handler (what the UI and the API call) ----


def run_request(
    cache: ModelCache,
    image_source: str | os.PathLike | bytes | None,
    prompts_text: str | None,
    model_label: str | None,
    settings: Settings,
) -> Explanation:
    """Validate everything cheap first (prompts, options), then decode the image, then run the model."""
    prompts = parse_prompts(prompts_text)
    if image_source is None:
        raise UserError("Upload, paste or capture an image first.")
    loaded = cache.get(model_label)
    method_options(loaded, settings)
    image = imaging.decode_image(image_source)
    return explain(loaded, image, prompts, settings)
