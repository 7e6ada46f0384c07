"""Find and read the checkpoint to convert, and everything its files say about it besides the tensors.

Sources: OpenAI's published checkpoints by name (downloaded and SHA-256 checked), any checkpoint file (TorchScript
archive, ``torch.save`` state dict, safetensors), a transformers ``CLIPModel`` folder or Hub repo id, and an open_clip
folder (``open_clip_config.json`` + weights). All tensor reading goes through :mod:`clipviz.checkpoint_io`, so no code
stored in a checkpoint ever runs. Key names are left as the files have them; ``clipviz.state_dict`` maps them.
"""

from __future__ import annotations

import json
import os
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch

from clipviz import checkpoint_io
from clipviz.checkpoint_io import CheckpointError
from clipviz.convert_options import SOURCE_FORMATS
from clipviz.openai_clip import OPENAI_MEAN, OPENAI_STD

# Hub repos holding OpenAI's own weights in transformers' layout: the `base_model` of a conversion of that file.
OPENAI_BASE_MODELS = {
    "ViT-B/32": "openai/clip-vit-base-patch32",
    "ViT-B/16": "openai/clip-vit-base-patch16",
    "ViT-L/14": "openai/clip-vit-large-patch14",
    "ViT-L/14@336px": "openai/clip-vit-large-patch14-336",
}
PIL_RESAMPLE = {"nearest": 0, "bilinear": 2, "bicubic": 3, "lanczos": 1}  # PIL.Image.Resampling values

# transformers folders: weight files in the order transformers itself prefers them.
TRANSFORMERS_WEIGHTS = (
    "model.safetensors",
    "model.safetensors.index.json",
    "pytorch_model.bin",
    "pytorch_model.bin.index.json",
)
TRANSFORMERS_METADATA = ("config.json", "preprocessor_config.json", "README.md")
OPEN_CLIP_WEIGHTS = ("open_clip_model.safetensors", "open_clip_pytorch_model.bin")
OPEN_CLIP_CONFIG = "open_clip_config.json"

# open_clip settings that change the computation in ways OpenAI's architecture has no counterpart for:
# (section, key) -> the values that keep OpenAI's behaviour (None: the key is absent).
OPEN_CLIP_REQUIRED_SETTINGS = {
    ("vision_cfg", "timm_model_name"): (None,),
    ("vision_cfg", "pool_type"): (None, "tok"),
    ("vision_cfg", "global_average_pool"): (None, False),
    ("vision_cfg", "attentional_pool"): (None, False),
    ("vision_cfg", "final_ln_after_pool"): (None, False),
    ("vision_cfg", "no_ln_pre"): (None, False),
    ("vision_cfg", "ls_init_value"): (None,),
    ("text_cfg", "hf_model_name"): (None,),
    ("text_cfg", "pool_type"): (None, "argmax"),
    ("text_cfg", "embed_cls"): (None, False),
    ("text_cfg", "no_causal_mask"): (None, False),
    ("text_cfg", "proj_bias"): (None, False),
    ("text_cfg", "ls_init_value"): (None,),
}


class SourceError(ValueError):
    """The source cannot be found or is not a CLIP checkpoint this converter understands; the message says why."""


@dataclass
class ImageSettings:
    """How images are prepared for the model (OpenAI's preprocessing unless the source says otherwise)."""

    mean: tuple[float, ...] = OPENAI_MEAN
    std: tuple[float, ...] = OPENAI_STD
    resample: int = PIL_RESAMPLE["bicubic"]
    recorded: bool = False  # read from the source's files (else OpenAI's preprocessing is assumed)


@dataclass
class Source:
    """A checkpoint as read: tensors with their file's own names, plus what its files say about the model.

    `origin` decides defaults the tensors cannot tell: "openai" (QuickGELU, MIT licence), "open_clip",
    "transformers", or "state_dict" when nothing says where a plain state dict comes from.
    `hidden_act` / heads / `layer_norm_eps` are None when the files do not record them.
    """

    state_dict: dict[str, torch.Tensor]
    origin: str
    description: str
    name: str
    files: list[Path]
    sha256: str | None = None
    openai_name: str | None = None
    hidden_act: dict[str, str] | None = None  # {"text": ..., "vision": ...}
    text_heads: int | None = None
    vision_heads: int | None = None
    layer_norm_eps: float | None = None
    image: ImageSettings = field(default_factory=ImageSettings)
    license: str | None = None
    base_model: str | None = None
    transformers_folder: Path | None = None
    notes: list[str] = field(default_factory=list)

    @property
    def nbytes(self) -> int:
        """Bytes of the checkpoint's weight files on disk."""
        return sum(path.stat().st_size for path in self.files)


def load_source(
    spec: str | None,
    *,
    openai_model: str | None = None,
    source_format: str = "auto",
    cache_dir: str | os.PathLike | None = None,
    download_base_url: str | None = None,
    revision: str | None = None,
) -> Source:
    """Read the checkpoint named by `spec` (a file, a folder or a Hub repo id) or by `openai_model` (e.g. "ViT-B/32").

    `source_format` forces how a file or folder is read ("openai", "open_clip", "transformers"); "auto" decides
    from the files. `revision` selects the revision of a Hub repo id.
    """
    if source_format not in SOURCE_FORMATS:
        raise SourceError(f"--source-format must be one of {', '.join(SOURCE_FORMATS)}, got {source_format!r}.")
    if (spec is None) == (openai_model is None):
        raise SourceError("Give exactly one source: a checkpoint path / Hub repo id, or --model NAME.")
    if openai_model is not None:
        return _from_openai_name(openai_model, cache_dir, download_base_url)
    path = Path(spec).expanduser()
    if path.is_file():
        return _from_file(path, source_format)
    if path.is_dir():
        return _from_folder(path, source_format)
    openai_name = _openai_name_like(spec)
    if openai_name:
        raise SourceError(f"{spec} is not a file; to download OpenAI's checkpoint use --model {openai_name}.")
    if _looks_like_repo_id(spec) and not spec.startswith((".", "/", "~")):
        return _from_repo_id(spec, revision, cache_dir, source_format)
    raise SourceError(f"{spec} is neither a file, a folder nor a Hub repo id (ORG/NAME); check the path.")


def _openai_name_like(spec: str) -> str | None:
    try:
        url = checkpoint_io.openai_checkpoint_url(spec)
    except ValueError:
        return None
    return _openai_name_of_file(url.rsplit("/", 1)[1])


# ---- OpenAI's published checkpoints ----


def _from_openai_name(name: str, cache_dir, base_url: str | None) -> Source:
    canonical = checkpoint_io.openai_checkpoint_url(name, base_url).rsplit("/", 1)[1]  # validates the name
    path = checkpoint_io.download_openai_checkpoint(name, cache_dir=cache_dir, base_url=base_url)
    source = _from_file(path, "openai")
    source.openai_name = source.openai_name or _openai_name_of_file(canonical)
    source.base_model = OPENAI_BASE_MODELS.get(source.openai_name)
    source.name = source.openai_name
    source.description = f"OpenAI's published checkpoint {source.openai_name} ({canonical}, SHA-256 verified)"
    return source


def _openai_name_of_file(filename: str) -> str | None:
    return next((name for name, url in checkpoint_io.OPENAI_URLS.items() if url.endswith("/" + filename)), None)


def _openai_name_of_sha256(sha256: str) -> str | None:
    return next((name for name, url in checkpoint_io.OPENAI_URLS.items() if f"/{sha256}/" in url), None)


# ---- single files ----


def _from_file(path: Path, source_format: str) -> Source:
    kind = checkpoint_io.detect_checkpoint_format(path)
    sha256 = checkpoint_io.sha256_file(path)
    recorded: dict = {}
    if kind == checkpoint_io.TORCHSCRIPT:
        archive = read_with_progress(path, checkpoint_io.read_torchscript)
        state_dict, recorded = archive.state_dict, torchscript_facts(archive.modules, path)
    else:
        state_dict = read_with_progress(path)
    openai_name = _openai_name_of_sha256(sha256)
    if source_format != "auto":
        origin = {"openai": "openai", "open_clip": "open_clip", "transformers": "transformers"}[source_format]
    else:
        origin = "openai" if kind == checkpoint_io.TORCHSCRIPT else "state_dict"
    kinds = {
        checkpoint_io.TORCHSCRIPT: "TorchScript archive",
        checkpoint_io.SAFETENSORS: "safetensors file",
        checkpoint_io.TORCH_ZIP: "torch.save state dict",
        checkpoint_io.TORCH_PICKLE: "torch.save state dict (legacy format)",
    }
    described = f"OpenAI's published {openai_name}" if openai_name else kinds[kind]
    return Source(
        state_dict=state_dict,
        origin="openai" if openai_name else origin,
        description=f"{described} {path.name} (SHA-256 {sha256[:16]}…)",
        name=openai_name or path.stem,
        files=[path],
        sha256=sha256,
        openai_name=openai_name,
        base_model=OPENAI_BASE_MODELS.get(openai_name),
        **recorded,
    )


# TorchScript module classes of OpenAI's MLP activation, by class name (TorchScript's mangling removed).
ARCHIVE_ACTIVATIONS = {"QuickGELU": "quick_gelu", "GELU": "gelu"}
_ATTENTION = {
    "text": re.compile(r"transformer\.resblocks\.\d+\.attn"),
    "vision": re.compile(r"visual\.(?:transformer\.resblocks\.\d+\.attn|attnpool)"),
}
_ACTIVATION = {
    "text": re.compile(r"transformer\.resblocks\.\d+\.mlp\.gelu"),
    "vision": re.compile(r"visual\.transformer\.resblocks\.\d+\.mlp\.gelu"),
}


def torchscript_facts(modules: dict[str, checkpoint_io.ArchiveModule], path: Path) -> dict:
    """What a TorchScript archive records beyond tensor shapes, as `Source` fields: each tower's head count (every
    attention module records its own) and MLP activation (the class of each block's `mlp.gelu`). Fields the archive
    does not record are left out; towers whose blocks disagree are refused (clipviz has one value per tower)."""
    facts: dict = {}
    activations: dict[str, str] = {}
    for tower in ("text", "vision"):
        heads = {m.num_heads for name, m in modules.items() if _ATTENTION[tower].fullmatch(name) and m.num_heads}
        if len(heads) > 1:
            raise SourceError(
                f"{path}: the {tower} tower's attention modules record different head counts {sorted(heads)}; "
                "clipviz uses one head count per tower."
            )
        if heads:
            facts[f"{tower}_heads"] = heads.pop()
        kinds = {m.kind for name, m in modules.items() if _ACTIVATION[tower].fullmatch(name)}
        if len(kinds) == 1 and kinds <= ARCHIVE_ACTIVATIONS.keys():
            activations[tower] = ARCHIVE_ACTIVATIONS[kinds.pop()]
    if activations.keys() == {"text", "vision"} or (activations.keys() == {"text"} and "visual.attnpool" in modules):
        facts["hidden_act"] = {"text": activations["text"], "vision": activations.get("vision", activations["text"])}
    return facts


def read_with_progress(path: Path, reader=checkpoint_io.read_state_dict):
    """`reader(path, progress=...)` (by default `checkpoint_io.read_state_dict`) with a progress bar over the
    file's bytes."""
    from huggingface_hub.utils import tqdm

    with tqdm(
        total=path.stat().st_size, unit="B", unit_scale=True, unit_divisor=1024, desc=f"Reading {path.name}"
    ) as bar:
        result = reader(path, progress=bar.update)
        bar.update(bar.total - bar.n)  # the file also holds headers and code, which are not tensor bytes
        return result


# ---- folders ----


def _from_folder(path: Path, source_format: str) -> Source:
    is_open_clip = (path / OPEN_CLIP_CONFIG).is_file()
    is_transformers = (path / "config.json").is_file() and not is_open_clip
    if source_format == "open_clip" or (source_format == "auto" and is_open_clip):
        return _from_open_clip_folder(path)
    if source_format == "transformers" or (source_format == "auto" and is_transformers):
        return _from_transformers_folder(path)
    checkpoints = sorted(p for p in path.iterdir() if p.suffix in (".pt", ".pth", ".bin", ".safetensors"))
    if len(checkpoints) == 1:
        return _from_file(checkpoints[0], source_format)
    raise SourceError(
        f"{path} is a folder without config.json (transformers CLIP) or {OPEN_CLIP_CONFIG} (open_clip), and it holds "
        f"{len(checkpoints)} checkpoint files where one was expected; pass the checkpoint file itself."
    )


def _read_files(files: list[Path]) -> dict[str, torch.Tensor]:
    state_dict: dict[str, torch.Tensor] = {}
    for file in files:
        part = read_with_progress(file)
        clash = sorted(set(part) & set(state_dict))
        if clash:
            raise SourceError(f"{file.name} repeats tensors of another shard: {clash[:5]}.")
        state_dict.update(part)
    return state_dict


def _transformers_weight_files(path: Path) -> list[Path]:
    for name in TRANSFORMERS_WEIGHTS:
        if not (path / name).is_file():
            continue
        if not name.endswith(".index.json"):
            return [path / name]
        weight_map = json.loads((path / name).read_text()).get("weight_map", {})
        shards = sorted({path / shard for shard in weight_map.values()})
        missing = [shard.name for shard in shards if not shard.is_file()]
        if missing:
            raise SourceError(f"{path / name} lists shards that are missing: {missing}.")
        return shards
    raise SourceError(f"{path} has a config.json but none of {', '.join(TRANSFORMERS_WEIGHTS)}.")


def _from_transformers_folder(path: Path) -> Source:
    from transformers import CLIPConfig  # reads JSON only; transformers' defaults fill fields the file omits

    model_type = json.loads((path / "config.json").read_text()).get("model_type")
    if model_type != "clip":
        raise SourceError(
            f"{path}/config.json has model_type {model_type!r}; only transformers `CLIPModel` checkpoints "
            "(model_type 'clip', both towers) can be converted."
        )
    config = CLIPConfig.from_pretrained(path)
    text, vision = config.text_config, config.vision_config
    if text.layer_norm_eps != vision.layer_norm_eps:
        raise SourceError(f"{path}: the towers use different layer_norm_eps; clipviz uses one value for both.")
    files = _transformers_weight_files(path)
    return Source(
        state_dict=_read_files(files),
        origin="transformers",
        description=f"transformers CLIPModel checkpoint {path.name}",
        name=path.name,
        files=files,
        sha256=checkpoint_io.sha256_file(files[0]) if len(files) == 1 else None,
        hidden_act={"text": text.hidden_act, "vision": vision.hidden_act},
        text_heads=text.num_attention_heads,
        vision_heads=vision.num_attention_heads,
        layer_norm_eps=text.layer_norm_eps,
        image=_transformers_image_settings(path),
        license=_card_license(path / "README.md"),
        transformers_folder=path,
    )


def _transformers_image_settings(path: Path) -> ImageSettings:
    file = path / "preprocessor_config.json"
    if not file.is_file():
        return ImageSettings()
    settings = json.loads(file.read_text())
    return ImageSettings(
        mean=tuple(settings.get("image_mean", OPENAI_MEAN)),
        std=tuple(settings.get("image_std", OPENAI_STD)),
        resample=int(settings.get("resample", PIL_RESAMPLE["bicubic"])),
        recorded=True,
    )


def _card_license(readme: Path) -> str | None:
    if not readme.is_file():
        return None
    from huggingface_hub import metadata_load

    license_ = (metadata_load(readme) or {}).get("license")
    return license_ if isinstance(license_, str) else None


def _from_open_clip_folder(path: Path) -> Source:
    config_file = path / OPEN_CLIP_CONFIG
    if not config_file.is_file():
        raise SourceError(f"{path} has no {OPEN_CLIP_CONFIG}; pass the checkpoint file with --hidden-act instead.")
    config = _json_object(config_file)
    model_cfg = config.get("model_cfg", config)  # Hub repos nest it; a bare model config is accepted too
    vision, text = (_section(model_cfg, key, config_file) for key in ("vision_cfg", "text_cfg"))
    check_open_clip_settings(model_cfg, config_file)
    weights = [path / name for name in OPEN_CLIP_WEIGHTS if (path / name).is_file()]
    if not weights:
        raise SourceError(f"{path} has {OPEN_CLIP_CONFIG} but none of {', '.join(OPEN_CLIP_WEIGHTS)}.")
    activation = "quick_gelu" if model_cfg.get("quick_gelu") else "gelu"
    head_width = _positive_int(vision, "head_width", 64, config_file)
    width = _positive_int(vision, "width", 768, config_file)
    text_heads = _positive_int(text, "heads", 8, config_file)
    resnet = isinstance(vision.get("layers"), list | tuple)
    vision_heads = _open_clip_vision_heads(width * 32 if resnet else width, head_width, config_file)
    preprocess = _section(config, "preprocess_cfg", config_file)
    image = ImageSettings(
        mean=tuple(preprocess.get("mean", OPENAI_MEAN)),
        std=tuple(preprocess.get("std", OPENAI_STD)),
        resample=PIL_RESAMPLE.get(preprocess.get("interpolation", "bicubic"), PIL_RESAMPLE["bicubic"]),
        recorded=bool(preprocess),
    )
    return Source(
        state_dict=_read_files(weights[:1]),
        origin="open_clip",
        description=f"open_clip checkpoint {path.name} ({weights[0].name})",
        name=path.name,
        files=weights[:1],
        sha256=checkpoint_io.sha256_file(weights[0]),
        hidden_act={"text": activation, "vision": activation},
        text_heads=text_heads,
        vision_heads=vision_heads,
        image=image,
        license=_card_license(path / "README.md"),
    )


def _json_object(file: Path) -> dict:
    try:
        value = json.loads(file.read_text())
    except (UnicodeDecodeError, json.JSONDecodeError) as error:
        raise SourceError(f"{file} is not valid JSON ({error}).") from None
    if not isinstance(value, dict):
        raise SourceError(f"{file} holds a JSON {type(value).__name__}, not an object.")
    return value


def _section(config: dict, key: str, where: Path) -> dict:
    """A nested section of an open_clip config (`model_cfg`, `vision_cfg`, ...): absent means empty."""
    if not isinstance(config, dict):
        raise SourceError(f"{where}: `model_cfg` must be a JSON object, got {type(config).__name__}.")
    value = config.get(key, {})
    if not isinstance(value, dict):
        raise SourceError(f"{where}: `{key}` must be a JSON object, got {type(value).__name__} {value!r:.40}.")
    return value


def _positive_int(section: dict, key: str, default: int, where: Path) -> int:
    value = section.get(key, default)
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise SourceError(f"{where}: `{key}` must be a positive integer, got {value!r:.40}.")
    return value


def _open_clip_vision_heads(width: int, head_width: int, where: Path) -> int:
    if width % head_width:
        raise SourceError(f"{where}: the image tower's width {width} is not a multiple of `head_width` {head_width}.")
    return width // head_width


def check_open_clip_settings(model_cfg: dict, where: Path) -> None:
    """Refuse open_clip configs that change the computation away from OpenAI's CLIP (see the table above)."""
    wrong = []
    for (section, key), allowed in OPEN_CLIP_REQUIRED_SETTINGS.items():
        value = _section(model_cfg, section, where).get(key)
        if value not in allowed:
            wrong.append(f"{section}.{key}={value!r}")
    if wrong:
        raise SourceError(
            f"{where} describes an open_clip model that is not OpenAI's CLIP architecture ({', '.join(wrong)}); "
            "clipviz reproduces OpenAI's architecture only."
        )


# ---- Hub repo ids ----

_REPO_ID = re.compile(r"[A-Za-z0-9][\w.-]*/[\w.-]+")


def _looks_like_repo_id(spec: str) -> bool:
    return bool(_REPO_ID.fullmatch(spec))


def _from_repo_id(repo_id: str, revision: str | None, cache_dir, source_format: str) -> Source:
    """Download only what the conversion reads (config, weights in one format, preprocessor, card), then read the
    snapshot folder like a local one."""
    from huggingface_hub import HfApi, snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, RepositoryNotFoundError, RevisionNotFoundError

    from clipviz.push import is_network_error

    try:
        files = set(HfApi().list_repo_files(repo_id, revision=revision))
        patterns = _repo_patterns(repo_id, files)
        folder = Path(snapshot_download(repo_id, revision=revision, allow_patterns=patterns, cache_dir=cache_dir))
    except RepositoryNotFoundError:
        raise SourceError(
            f"Hub repo {repo_id} was not found (or is private and no token with access was given); check the name, "
            "or pass a local path. Log in with `hf auth login` for private repos."
        ) from None
    except RevisionNotFoundError:
        raise SourceError(f"Hub repo {repo_id} has no revision {revision!r}.") from None
    except HfHubHTTPError as error:
        raise SourceError(f"Could not download {repo_id}: {error}") from None
    except Exception as error:
        if not is_network_error(error):
            raise
        raise SourceError(
            f"Could not reach the Hub to download {repo_id} ({type(error).__name__}: {error}); check the connection "
            "and HF_ENDPOINT, or pass a local folder (HF_HUB_OFFLINE=1 uses only what is cached)."
        ) from None
    source = _from_folder(folder, source_format)
    source.name = repo_id.split("/")[-1]
    source.description = source.description.replace(folder.name, repo_id, 1)
    source.base_model = repo_id
    return source


def _repo_patterns(repo_id: str, files: set[str]) -> list[str]:
    if OPEN_CLIP_CONFIG in files:
        weights = [name for name in OPEN_CLIP_WEIGHTS if name in files][:1]
        return [OPEN_CLIP_CONFIG, "README.md", *weights]
    for name in TRANSFORMERS_WEIGHTS:
        if name in files:
            stem = name.split(".")[0]  # model / pytorch_model: the shards share the stem
            suffix = ".safetensors" if "safetensors" in name else ".bin"
            return [*TRANSFORMERS_METADATA, name, f"{stem}-*{suffix}"]
    raise SourceError(
        f"Hub repo {repo_id} holds neither transformers CLIP weights ({', '.join(TRANSFORMERS_WEIGHTS)}) nor an "
        f"open_clip model ({OPEN_CLIP_CONFIG}); files: {sorted(files)[:20]}."
    )


__all__ = [
    "CheckpointError",
    "ImageSettings",
    "OPENAI_BASE_MODELS",
    "Source",
    "SourceError",
    "check_open_clip_settings",
    "load_source",
]
