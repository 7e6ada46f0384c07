"""Everything the Space does between "an image and some prompts" and "what to show": models, prompts, maps, scores.

Why it is separate from ``app.py``: this is the logic that can be wrong (which model loads, how prompts are checked,
where a map lands on the photo, what the probabilities mean), so it is plain Python with unit tests; ``app.py`` only
wires it to Gradio components.

Models
    The default is the *embedded* model, found without any configuration or network: ``$CLIPVIZ_EMBEDDED_DIR/<name>``,
    else ``space/models/<name>`` (the copy a deployed Space carries), else ``<repo>/embedded/<name>`` (running from the
    repository). ``CLIPVIZ_MODEL`` (a Hub repo id or a local folder; ``CLIPVIZ_REVISION`` pins a commit) puts another
    model first; model folders shipped in ``space/models/`` besides the embedded ones (``clipviz.publish_space
    --model``) come next. The dropdown lists only what can load: Hub repos (the converted OpenAI ones, or
    ``CLIPVIZ_HUB_REPOS``, comma-separated) appear when they are configured (``CLIPVIZ_HUB_REPOS``/``CLIPVIZ_HUB_ORG``)
    or when the Hub answered at start-up (checked once, in 2 s at most; never with ``HF_HUB_OFFLINE=1``). Loading a
    Hub repo while the Hub does not answer uses the local cache only, so it fails at once instead of after the
    download retries. Only listed models load: they run remote code (``trust_remote_code=True``), so the choice is
    never a free-text repo id. Loaded models stay in a small cache (``CLIPVIZ_MODEL_CACHE``, default 2).

Methods
    Nothing here names a method: the page offers the loaded model's explanation registry (``EXPLAIN_METHODS`` of its
    own ``explaining_clipviz`` code, ``methods_for`` its backbone), one control per registry option (layers and heads
    counted from 1, ranges from ``option_bounds``), the method's ``how_to_read`` and ``reference`` as the note, and,
    when the user chose none, the model's default (``config.explain_method``/``explain_options``).

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
import time
from collections import OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path

import imaging
import numpy as np
from errors import UserError
from PIL import Image

SPACE_DIR = Path(__file__).resolve().parent
try:  # drawing is library code (`clipviz.rendering`), not the models' remote code: installed, or copied in on deploy
    from clipviz import rendering
except ImportError:  # running from the repository: the package sits next to this folder
    sys.path.append(str(SPACE_DIR.parent))
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

COLORMAPS = rendering.OVERLAY_COLORMAPS
OVERLAY_STYLES = rendering.OVERLAY_STYLES  # "full" colour map, or "fade": low values leave the image as it is


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
    knows_photos: bool = True  # False for the embedded models: trained on synthetic shape scenes only


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


def deployed_models(space_dir: Path | None = None) -> list[Path]:
    """Model folders shipped in ``space/models/`` other than the embedded ones (a published Space's own models)."""
    root = (space_dir or SPACE_DIR) / "models"
    if not root.is_dir():
        return []
    return sorted(p for p in root.iterdir() if p.name not in EMBEDDED_NAMES and (p / "config.json").is_file())


_TRUTHY = ("1", "true", "yes", "on")
_reachability: dict[str, tuple[float, bool]] = {}


def hub_reachable(endpoint: str | None = None, timeout: float = 2.0, ttl: float = 60.0) -> bool:
    """Whether the Hub answers HTTP at all (any status), asked at most once per ``ttl`` seconds; never asked (False)
    under ``HF_HUB_OFFLINE=1``."""
    import httpx
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return False
    url = endpoint or constants.ENDPOINT
    checked = _reachability.get(url)
    if checked is not None and time.monotonic() - checked[0] < ttl:
        return checked[1]
    try:
        httpx.head(url, timeout=timeout)
        answer = True
    except httpx.HTTPError:
        answer = False
    _reachability[url] = (time.monotonic(), answer)
    return answer


def hub_listed(env: Mapping[str, str] = os.environ, reachable: Callable[[], bool] = hub_reachable) -> bool:
    """Whether the dropdown lists Hub repos: configured ones always, the default list only when the Hub answers."""
    if env.get("CLIPVIZ_HUB_REPOS", "").strip() or env.get("CLIPVIZ_HUB_ORG", "").strip():
        return True
    if env.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUTHY:
        return False
    return reachable()


def model_choices(
    env: Mapping[str, str] = os.environ, reachable: Callable[[], bool] = hub_reachable
) -> list[ModelChoice]:
    """Dropdown entries, default first: ``CLIPVIZ_MODEL`` when set, then the models shipped in ``space/models``,
    then the embedded models that are present, then the Hub repos when listed (see :func:`hub_listed`).

    Only models that can load are offered; when no local model is present at all, the embedded entries stay (their
    error says how to provide them) so the page never starts with an empty dropdown."""
    choices = []
    custom = env.get("CLIPVIZ_MODEL", "").strip()
    if custom:
        choices.append(ModelChoice(custom, custom, env.get("CLIPVIZ_REVISION", "").strip() or None))
    choices += [ModelChoice(folder.name, str(folder)) for folder in deployed_models()]
    embedded = []
    for name in EMBEDDED_NAMES:
        folder = embedded_dir(name, env)
        embedded.append(ModelChoice(EMBEDDED_PREFIX + name, str(folder) if folder else None, knows_photos=False))
    present = [choice for choice in embedded if choice.source is not None]
    choices += present if present or choices else embedded
    if hub_listed(env, reachable):
        choices += [ModelChoice(repo, repo) for repo in hub_repos(env) if repo != custom]
    return choices


def is_hub_id(source: str) -> bool:
    """A Hub repo id ("name" or "org/name") rather than a folder on this machine."""
    relative = not (os.path.isabs(source) or source.startswith((".", "~")))
    return relative and source.count("/") <= 1 and not Path(source).exists()


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
    def registry(self):
        """The explanation registry of the model's own code (see :func:`registry_of`)."""
        return registry_of(self.model)


def load_model(choice: ModelChoice) -> LoadedModel:
    """Load weights, tokenizer and preprocessing numbers; any failure becomes a readable ModelLoadError."""
    if choice.source is None:
        name = choice.label.removeprefix(EMBEDDED_PREFIX)
        raise ModelLoadError(
            f"The embedded model {name!r} is not here. Copy `embedded/{name}` into `space/models/{name}` (or set "
            "CLIPVIZ_EMBEDDED_DIR), or choose another model with CLIPVIZ_MODEL."
        )
    from transformers import AutoModel, AutoTokenizer

    kwargs = {"revision": choice.revision} if choice.revision else {}
    offline = is_hub_id(choice.source) and not hub_reachable()
    if offline:  # the local cache only: an answer now rather than after the download retries (about 24 s)
        kwargs["local_files_only"] = True
    try:
        model = AutoModel.from_pretrained(choice.source, trust_remote_code=True, **kwargs).eval()
        # the repo's own tokenizer (clipviz ships one giving OpenAI's exact ids); trusted like its model code, and
        # said explicitly so transformers never stops to ask on stdin
        tokenizer = AutoTokenizer.from_pretrained(choice.source, trust_remote_code=True, **kwargs)
        preprocessing = _preprocessor_config(choice.source, kwargs)
    except Exception as error:  # network, missing files, bad config: the user needs the reason, not a traceback
        if offline:
            from huggingface_hub import constants

            why = (
                "HF_HUB_OFFLINE is set"
                if constants.HF_HUB_OFFLINE
                else f"the Hub ({constants.ENDPOINT}) does not answer"
            )
            raise ModelLoadError(
                f"Could not load the model {choice.label!r}: {why} and the model is not in the local cache. Choose "
                "a local model, or run with network access."
            ) from error
        raise ModelLoadError(f"Could not load the model {choice.label!r}: {_first_line(error)}") from error
    if not hasattr(model, "explain") or registry_of(model) is None:
        raise ModelLoadError(
            f"The model {choice.label!r} was saved with clipviz code that has no explanation registry "
            "(`explain`, `EXPLAIN_METHODS`); convert it again with the current clipviz."
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

    def knows_photos(self, label: str | None) -> bool:
        """Whether the model behind ``label`` was trained on photographs (the embedded models were not)."""
        choice = self.choices.get(label or self.default_label)
        return choice is not None and choice.knows_photos

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
    """What the user chose. ``method`` is a registry method name or "default" (the model's own default method and
    options); ``options`` are the option controls' values by field key (UI terms: layers and heads count from 1;
    missing or None: the method's default). ``head_grid`` adds one raw-attention map per head of the method's image
    layer (the last one when it has none)."""

    method: str = "default"
    options: Mapping[str, object] = field(default_factory=dict)
    head_grid: bool = False
    alpha: float = 0.5
    colormap: str = "jet"
    style: str = "full"


def settings_from_ui(method, head_grid, alpha, colormap, style, options: Mapping[str, object]) -> Settings:
    """Settings from the UI's (or the API's) values.

    API clients can send anything (``opacity="abc"``), so numbers and flags are parsed here with a message naming the
    option, instead of letting ``float()`` fail with an error the UI would only show as a generic one."""
    alpha = parse_number(alpha, "overlay opacity (opacity)")
    if not 0.0 <= alpha <= 1.0:
        raise UserError(f"The overlay opacity must be between 0 and 1, not {alpha}.")
    return Settings(
        method=str(method or DEFAULT_METHOD),
        options=dict(options),
        head_grid=parse_flag(head_grid, "head_grid"),
        alpha=alpha,
        colormap=str(colormap),
        style=str(style or "full"),
    )


def parse_number(value, what: str) -> float:
    """A finite number from a slider or an API value (a number or its text); anything else is a UserError."""
    import math

    try:
        number = float(value) if not isinstance(value, bool) else math.nan
    except (TypeError, ValueError):
        number = math.nan
    if not math.isfinite(number):
        raise UserError(f"The {what} must be a number, not {value!r}.")
    return number


def parse_flag(value, what: str) -> bool:
    """A checkbox value: a bool, or its text ("true"/"false") from an API client; anything else is a UserError."""
    if isinstance(value, bool) or value is None:
        return bool(value)
    text = str(value).strip().lower()
    if text in ("true", "1", "yes"):
        return True
    if text in ("false", "0", "no", ""):
        return False
    raise UserError(f"The {what} option must be true or false, not {value!r}.")


# ---- methods and their options: read from the model's explanation registry ----

DEFAULT_METHOD = "default"  # the model's own choice: config.explain_method with config.explain_options
LAST = "last"  # a layer option's "the last layer"
SAME_HEAD = "same"  # a text-head option's None: the same head as the image side
BACKBONE_NAMES = {"vit": "ViT", "resnet": "ResNet"}
PAGE_KEYS = ("image", "prompts", "model", "method", "head_grid", "opacity", "colormap", "style")  # not option keys


def registry_of(model):
    """The explanation registry the model's own code uses (its ``explaining_clipviz`` module: Hub remote code or the
    repository's), or None for a model saved before explanations had a registry."""
    for cls in type(model).__mro__:
        module = sys.modules.get(cls.__module__)
        if module is not None and hasattr(module, "EXPLAIN_METHODS") and hasattr(module, "resolve_options"):
            return module
    return None


def page_registry(cache: ModelCache):
    """The registry the page's option controls are laid out from: the default model's, else the repository's
    module when it can be imported, else None (then the page offers no method options, only the model's default)."""
    try:
        return cache.get(cache.default_label).registry
    except UserError:
        pass
    try:
        import explaining_clipviz
    except ImportError:
        return None
    return explaining_clipviz


@dataclass(frozen=True)
class Field:
    """One option control on the page: an option name shared by the methods that declare it (with one kind)."""

    key: str  # the control's API parameter; the option's name unless that clashes
    name: str  # the keyword of ``model.explain``
    kind: str  # the registry's option kind
    label: str
    help: str
    choices: tuple = ()  # "choice" options: the values
    minimum: float | None = None
    maximum: float | None = None  # numbers: the largest value the control offers (below an exclusive maximum)
    default: object = None  # numbers: the first declaring method's default (the slider's starting value)
    methods: tuple[str, ...] = ()


def option_fields(registry) -> list[Field]:
    """The page's option controls, in registry order: one per option name; a name declared again with another kind
    gets its own control, keyed ``<method>_<name>``."""
    fields: dict[str, Field] = {}
    for method in registry.EXPLAIN_METHODS.values() if registry else ():
        for option in method.options:
            key = option.name if option.name not in PAGE_KEYS else f"{method.name}_{option.name}"
            if key in fields and fields[key].kind != option.kind:
                key = f"{method.name}_{option.name}"
            if key in fields:
                fields[key] = replace(fields[key], methods=fields[key].methods + (method.name,))
                continue
            maximum = option.maximum
            if maximum is not None and option.maximum_exclusive:
                maximum = maximum - (0.01 if option.kind == "float" else 1)
            label = option.name.replace("_", " ").capitalize()
            default = option.default if option.kind in ("int", "float") else None
            fields[key] = Field(
                key, option.name, option.kind, label, option.help, tuple(option.choices), option.minimum, maximum,
                default, (method.name,),
            )  # fmt: skip
    return list(fields.values())


def _field_key(fields: list[Field], method: str, name: str) -> str | None:
    return next((f.key for f in fields if f.name == name and method in f.methods), None)


@dataclass(frozen=True)
class FieldView:
    """How one option control looks for a model and a method: shown or not, its choices and its starting value."""

    visible: bool
    choices: tuple = ()  # dropdowns: the values in UI terms ("last", "1".., "mean", ...)
    value: object = None


def _layer_count(registry, option, config) -> int:
    return registry.option_bounds(option, config)[1] + 1


def _head_count(registry, option, config) -> int:
    return sum(isinstance(v, int) for v in registry.option_bounds(option, config))


def ui_choices(registry, option, config) -> tuple:
    """A layer or head option's dropdown values in the page's 1-based terms; other kinds: the option's choices."""
    if option.kind in ("image_layer", "text_layer"):
        return (LAST,) + tuple(str(n) for n in range(1, _layer_count(registry, option, config) + 1))
    if option.kind in ("image_head", "text_head"):
        same = (SAME_HEAD,) if option.kind == "text_head" and option.default is None else ()
        heads = tuple(str(h) for h in range(1, _head_count(registry, option, config) + 1))
        return same + tuple(option.choices) + heads
    return tuple(option.choices)


def ui_value(registry, option, value, config):
    """An option value of ``model.explain`` (0-based, negative from the end, None) in the page's terms."""
    if option.kind in ("image_layer", "text_layer"):
        count = _layer_count(registry, option, config)
        return LAST if value in (-1, count - 1) else str(value % count + 1)
    if option.kind in ("image_head", "text_head"):
        return SAME_HEAD if value is None else value if isinstance(value, str) else str(value + 1)
    return value


def field_views(loaded: LoadedModel, fields: list[Field], method: str) -> list[FieldView]:
    """Each option control for ``method`` on this model (hidden for the model's default and for other methods)."""
    registry, config = loaded.registry, loaded.config
    entry = registry.EXPLAIN_METHODS.get(method)
    declared = {o.name: o for o in entry.options if loaded.backbone in o.backbones} if entry else {}
    views = []
    for f in fields:
        option = declared.get(f.name) if method in f.methods else None
        if option is None:
            views.append(FieldView(False))
            continue
        views.append(
            FieldView(True, ui_choices(registry, option, config), ui_value(registry, option, option.default, config))
        )
    return views


def to_option_value(registry, option, value, config, label: str):
    """A control's value (what the page or an API client sent) as ``model.explain`` takes it; the page counts layers
    and heads from 1, so its range errors are said here rather than in the registry's 0-based terms."""
    text = "" if value is None else str(value).strip()
    if option.kind in ("image_layer", "text_layer"):
        count = _layer_count(registry, option, config)
        if text.lower() in ("", LAST):
            return -1
        if not text.isdigit() or not 1 <= int(text) <= count:
            raise UserError(
                f"The {label.lower()} must be '{LAST}' or a number from 1 to {count} for this model, not {value!r}."
            )
        return int(text) - 1
    if option.kind in ("image_head", "text_head"):
        if text in option.choices:
            return text
        if option.kind == "text_head" and option.default is None and text.lower() in ("", SAME_HEAD):
            return None
        count = _head_count(registry, option, config)
        if not text.isdigit() or not 1 <= int(text) <= count:
            named = ", ".join(f"'{c}'" for c in ui_choices(registry, option, config) if not c.isdigit())
            raise UserError(
                f"The {label.lower()} must be {named} or a number from 1 to {count} for this model, not {value!r}."
            )
        return int(text) - 1
    if option.kind in ("int", "float"):
        number = parse_number(value, label.lower())
        if option.kind == "int":
            if number != int(number):
                raise UserError(f"The {label.lower()} must be a whole number, not {value!r}.")
            return int(number)
        return number
    return text


@dataclass(frozen=True)
class Plan:
    """What one request runs: the method (the model's default resolved) and its options."""

    method: str  # the method that runs
    call_method: str | None  # what ``model.explain`` gets: None lets the model use its own default
    options: dict  # keyword options for ``model.explain``
    resolved: dict  # every option of the method with its value (defaults filled in)
    is_default: bool


def plan(loaded: LoadedModel, settings: Settings) -> Plan:
    """Check the settings against the model's registry and decide the ``model.explain`` call (UserError if not)."""
    registry, config, backbone = loaded.registry, loaded.config, loaded.backbone
    if settings.colormap not in COLORMAPS:
        raise UserError(f"Unknown colour map {settings.colormap!r}; choose one of: {', '.join(COLORMAPS)}.")
    if settings.style not in OVERLAY_STYLES:
        raise UserError(f"Unknown overlay style {settings.style!r}; choose one of: {', '.join(OVERLAY_STYLES)}.")
    available = registry.methods_for(backbone)
    if settings.method == DEFAULT_METHOD:
        name, options = config.explain_method, dict(config.explain_options)
        try:
            resolved = registry.resolve_options(name, options, config)
        except ValueError as error:
            raise UserError(f"This model's default explanation is invalid ({error}); choose a method.") from error
        return Plan(name, None, {}, resolved, True)
    if settings.method not in registry.EXPLAIN_METHODS:
        names = ", ".join([DEFAULT_METHOD] + [m.name for m in available])
        raise UserError(f"Unknown method {settings.method!r}; choose one of: {names}.")
    entry = registry.EXPLAIN_METHODS[settings.method]
    if entry not in available:
        titles = ", ".join(m.title for m in available)
        raise UserError(
            f"{entry.title} is not available for this model's {BACKBONE_NAMES.get(backbone, backbone)} image tower "
            f"(available: {titles}). {entry.how_to_read}"
        )
    fields = option_fields(registry)
    options = {}
    for option in entry.options:
        key = _field_key(fields, entry.name, option.name)
        if backbone not in option.backbones or key is None or settings.options.get(key) in (None, ""):
            continue  # not given: the method's default
        label = next(f.label for f in fields if f.key == key)
        options[option.name] = to_option_value(registry, option, settings.options[key], config, label)
    try:
        resolved = registry.resolve_options(entry.name, options, config)
    except ValueError as error:  # the registry's message lists the valid values
        raise UserError(f"{entry.title}: {error}") from error
    return Plan(entry.name, entry.name, options, resolved, False)


def page_methods(registry) -> list[tuple[str, str]]:
    """The method radio before a model is known: the model's default, then every registered method (the server
    accepts only these; :func:`method_choices` narrows the page to the loaded model's backbone)."""
    methods = registry.EXPLAIN_METHODS.values() if registry else ()
    return [("Model's default", DEFAULT_METHOD)] + [(m.title, m.name) for m in methods]


def method_choices(loaded: LoadedModel) -> list[tuple[str, str]]:
    """The method radio for a model: its default first (named), then every method its backbone offers."""
    registry = loaded.registry
    default = registry.EXPLAIN_METHODS.get(loaded.config.explain_method)
    title = default.title if default else loaded.config.explain_method
    return [(f"Model's default: {title}", DEFAULT_METHOD)] + [
        (m.title, m.name) for m in registry.methods_for(loaded.backbone)
    ]


def method_note(loaded: LoadedModel, method: str, resolved: dict | None = None, is_default: bool = False) -> str:
    """The "how to read this" text for a method on this model, from the registry (with its reference)."""
    registry = loaded.registry
    if method == DEFAULT_METHOD:
        method, is_default = loaded.config.explain_method, True
    entry = registry.EXPLAIN_METHODS.get(method)
    if entry is None:
        return ""
    note = f"**{entry.title}**: {entry.how_to_read}\n\nCost: {entry.cost}.\n\n*{entry.reference}*"
    if is_default:
        declared = {o.name: o for o in entry.options}
        settings = ", ".join(
            f"{name.replace('_', ' ')}: {ui_value(registry, declared[name], value, loaded.config)}"
            for name, value in (resolved or {}).items()
            if name in declared
        )
        note = f"This model's default method{f' ({settings})' if settings else ''}. " + note
    return note


@dataclass(frozen=True)
class Controls:
    """What the page offers for a loaded model (the UI updates its widgets from this)."""

    methods: list[tuple[str, str]]  # (label, method): the model's default, then the backbone's methods
    heads: list[str]  # image heads, 1-based, for the status text
    status: str  # one paragraph about the model


def controls(loaded: LoadedModel) -> Controls:
    """The method choices for the model's backbone and the status text about the model."""
    vision = loaded.config.vision_config
    tower = f"ViT, {loaded.num_layers} layers" if loaded.backbone == "vit" else "ResNet with an attention pool"
    status = (
        f"**{loaded.choice.label}**: {tower}, {loaded.num_heads} heads, {vision.image_size}×{vision.image_size} input."
    )
    if not loaded.choice.knows_photos:
        status += (
            " It was trained on synthetic shape scenes only: on a photograph its scores and maps mean little (try the "
            "scene examples)."
        )
    registry = loaded.registry
    missing = [m for m in registry.EXPLAIN_METHODS.values() if m not in registry.methods_for(loaded.backbone)]
    if missing:
        names = ", ".join(m.title for m in missing)
        status += f" Not offered for this image tower: {names} (see the method's note for why)."
    return Controls(
        methods=method_choices(loaded),
        heads=[str(h) for h in range(1, loaded.num_heads + 1)],
        status=status,
    )


# ---- examples ----


EXAMPLE_KINDS = ("scene", "photo")


def example_kind(entry: Mapping) -> str:
    """ "scene" for the project's synthetic shape scenes (they carry their generator ``seed``), else "photo"."""
    return "scene" if "seed" in entry else "photo"


def load_examples(folder: Path = SPACE_DIR / "examples", kind: str | None = None) -> list[list[str]]:
    """Example rows ``[image path, prompts (one per line), method]`` from ``examples.json`` (see make_examples.py),
    all of them or only one ``kind`` (photos are offered only with a model that knows photos)."""
    manifest = folder / "examples.json"
    if not manifest.is_file():
        return []
    rows = [row for row in json.loads(manifest.read_text()) if kind is None or example_kind(row) == kind]
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

    chosen = plan(loaded, settings)
    tokens = tokenize_prompts(loaded.tokenizer, prompts, loaded.context_length)
    prepared = prepare_image(image, loaded)
    with loaded.lock:  # one explanation per model at a time: autograd state and threads are shared
        try:
            result = loaded.model.explain(
                prepared.pixel_values, tokens.input_ids, attention_mask=tokens.attention_mask,
                method=chosen.call_method, **chosen.options,
            )  # fmt: skip
        except ValueError as error:  # an option the model rejects: its message lists the valid ones
            title = loaded.registry.EXPLAIN_METHODS[chosen.method].title
            raise UserError(f"{title}: {error}") from error
        layer = grid_layer(loaded, chosen)
        grid = head_maps(loaded, prepared.pixel_values, layer) if settings.head_grid else []
    image_maps = result.image_maps[0].detach().float().numpy()  # [num_prompts, gh, gw]
    probabilities = torch.softmax(result.logits_per_image[0].detach().float(), dim=-1).tolist()
    scores = token_scores(tokens.pieces, result.text_maps[0].detach().float().numpy())
    note = method_note(loaded, chosen.method, chosen.resolved, chosen.is_default)
    silent = silent_words_note(loaded.registry.EXPLAIN_METHODS[chosen.method].title, prompts, scores)
    return Explanation(
        overlays=[
            (draw(prepared, image_maps[i], settings), f"{prompt} · {probabilities[i]:.0%}")
            for i, prompt in enumerate(prompts)
        ],
        probabilities=dict(zip(prompts, probabilities, strict=True)),
        token_relevance=token_entries(tokens.pieces, scores),
        head_grid=head_grid_images(loaded, prepared, grid, layer, settings),
        note=f"{silent}\n\n{note}" if silent else note,
    )


def draw(prepared: Prepared, grid_map: np.ndarray, settings: Settings, display=None):
    """One overlay: the map of the letterboxed square, cropped to the image, blended onto the display copy."""
    display = display or prepared.display
    mapped = imaging.map_on_image(grid_map, prepared.box, display.size)  # [H, W] in [0, 1], the image's shape
    # the map already has the image's aspect ratio, so `overlay` blends it over the whole image, pixel for pixel
    return rendering.overlay(display, mapped, alpha=settings.alpha, colormap=settings.colormap, style=settings.style)


def token_scores(pieces: list[list[str]], text_maps: np.ndarray) -> list[np.ndarray | None]:
    """Each prompt's token relevance scaled to max 1 within the prompt; None where the map is zero on every word.

    ``text_maps`` rows are laid out as the token ids ([start, pieces..., end, padding]); only the pieces count,
    since the markers are the same for every prompt.
    """
    scores = []
    for prompt_pieces, row in zip(pieces, text_maps, strict=True):
        values = np.clip(np.asarray(row[1 : 1 + len(prompt_pieces)], dtype=np.float64), 0, None)
        peak = values.max() if values.size else 0.0
        scores.append(values / peak if peak > 0 else None)
    return scores


def token_entries(pieces: list[list[str]], scores: list[np.ndarray | None]) -> list[tuple[str, float | None]]:
    """HighlightedText entries: each prompt's number, then its tokens with their scores (see :func:`token_scores`).

    A prompt whose scores are None is shown as plain text (every entry None): an all-zero row would otherwise look
    like a highlight that failed to render; :func:`silent_words_note` says why it is plain.
    """
    entries: list[tuple[str, float | None]] = []
    for index, (prompt_pieces, prompt_scores) in enumerate(zip(pieces, scores, strict=True)):
        entries.append((f"{'   ' if index else ''}{index + 1}. ", None))
        if prompt_scores is None:
            entries += [(text, None) for text in prompt_pieces]
        else:
            entries += [
                (text, round(float(score), 3)) for text, score in zip(prompt_pieces, prompt_scores, strict=True)
            ]
    return entries


def silent_words_note(title: str, prompts: list[str], scores: list[np.ndarray | None]) -> str:
    """A sentence for prompts whose token map is zero everywhere ("" when every prompt has one)."""
    silent = [
        f"{index} (“{_shorten(prompt)}”)"
        for index, (prompt, row) in enumerate(zip(prompts, scores, strict=True), start=1)
        if row is None
    ]
    if not silent:
        return ""
    which, them = (f"prompt {silent[0]}", "it") if len(silent) == 1 else (f"prompts {', '.join(silent)}", "them")
    return (
        f"**No word relevance for {which}**: {title} gave every word of {them} a score "
        f"of zero (no word raised the image–text score through what this method measures), so the words are shown "
        "uncoloured. Another method (e.g. relevance) may still attribute the match to words."
    )


def grid_layer(loaded: LoadedModel, chosen: Plan) -> int:
    """The image layer the per-head grid shows: the method's image-layer option when it has one, else the last
    (a ResNet: its attention pool, 0)."""
    registry = loaded.registry
    entry = registry.EXPLAIN_METHODS[chosen.method]
    option = next((o for o in entry.options if o.kind == "image_layer" and o.name in chosen.resolved), None)
    return chosen.resolved[option.name] if option else loaded.num_layers - 1


def head_maps(loaded: LoadedModel, pixel_values, layer: int) -> list[np.ndarray]:
    """Raw attention of every head of image layer ``layer`` (0-based), from one image-tower pass: [grid, grid]
    each, max 1.

    Raw attention does not depend on the prompt, so the text tower is not run. ViT: the class token's row over the
    patches; ResNet: the attention pool's query row over the grid.
    """
    import torch

    with torch.no_grad():
        attentions = loaded.model.vision_model(pixel_values, output_attentions=True).attentions
    rows = attentions[layer][0, :, 0, 1:].float()  # [heads, grid * grid]
    grid = int(round(rows.shape[-1] ** 0.5))
    maps = rows.reshape(-1, grid, grid).clamp_min(0)  # [heads, grid, grid]
    peaks = maps.amax(dim=(1, 2), keepdim=True)
    return list((maps / torch.where(peaks > 0, peaks, torch.ones_like(peaks))).numpy())


def head_grid_images(loaded: LoadedModel, prepared: Prepared, maps: list[np.ndarray], layer: int, settings: Settings):
    """Small overlays, one per head, captioned with the UI's 1-based numbering."""
    if not maps:
        return []
    thumb = prepared.display.resize(
        imaging.display_size(prepared.display.size, GRID_LONGEST), Image.Resampling.BILINEAR
    )
    where = f"layer {layer + 1}, " if loaded.backbone == "vit" else "attention pool, "
    return [(draw(prepared, m, settings, thumb), f"{where}head {h + 1}") for h, m in enumerate(maps)]


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
    plan(loaded, settings)
    image = imaging.decode_image(image_source)
    return explain(loaded, image, prompts, settings)
