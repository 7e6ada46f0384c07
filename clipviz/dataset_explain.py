"""Explain a whole Hugging Face ``datasets`` dataset: ``clipviz-explain`` and :func:`explain_dataset`.

Rows are cut into fixed shards of ``shard_rows`` rows (shard ``k`` = rows ``k*shard_rows ..``); each process of an
``accelerate launch`` takes the shards ``k % num_processes == process_index`` (one device each; the same code runs
as one plain process on CPU). A shard goes through ``datasets.Dataset.map(batched=True)`` with the model's own
processor, is written as ``shard-KKKKK.parquet`` under a temporary name and renamed when complete, so an interrupted
run (Ctrl-C, SIGKILL, a lost node) resumes by skipping the finished shards: no row is done twice or dropped, and
memory holds one shard at a time whatever the dataset size.

Output folder::

    manifest.json            model (id, revision, resolved commit or SHA-256 of a local folder's config and
                             weights), settings, methods and options, clipviz version, dataset (source, split,
                             revision, fingerprint, rows), and when complete: shards and counts; a resumed run
                             must match its settings, model and dataset
    shard-00000.parquet ...  one row per (dataset row, prompt, method): row, prompt_index, prompt, method,
                             image_map [gh][gw] float16, text_map [tokens] float16, logit, image_height, image_width

Read it back with :func:`load_explanations` (a ``datasets.Dataset``) and put a map on its image with
:func:`upsample_map`. Usage::

    clipviz-explain scenes/ out/ --model embedded/clipviz-tiny-vit --prompt-column captions \\
        --method attention --method relevance:start_layer=0 --batch-size 32
    accelerate launch --num_processes 8 -m clipviz.dataset_explain imagenet-val/ out/ --model ... (same arguments)
"""

from __future__ import annotations

import argparse
import io
import json
import os
import sys
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

MANIFEST = "manifest.json"
SHARD_NAME = "shard-{:05d}.parquet"
FORMAT_VERSION = 1
GRADIENT_METHODS = ("relevance", "gradcam")  # for models whose code has no method registry yet


class ExplainError(ValueError):
    """Bad input or settings: the message says what was wrong and how to fix it."""


@dataclass(frozen=True)
class MethodSpec:
    """One method with its options; ``label`` names it in the output (``relevance:start_layer=0``)."""

    name: str
    options: dict = field(default_factory=dict)

    @property
    def label(self) -> str:
        if not self.options:
            return self.name
        shown = (
            f"{key}={value if isinstance(value, str) else json.dumps(value)}"
            for key, value in sorted(self.options.items())
        )
        return self.name + ":" + ",".join(shown)


def parse_method(text: str) -> MethodSpec:
    """``"relevance:start_layer=0,start_layer_text=-1"`` -> MethodSpec; values are JSON (``0``, ``"max"``, ``0.5``)
    or bare strings (``head=max``)."""
    name, _, rest = text.strip().partition(":")
    if not name:
        raise ExplainError(f"empty method in {text!r}: write NAME or NAME:option=value,...")
    options = {}
    for item in filter(None, (part.strip() for part in rest.split(","))):
        key, eq, value = item.partition("=")
        if not eq or not key:
            raise ExplainError(f"method option {item!r} in {text!r} is not option=value")
        try:
            options[key.strip()] = json.loads(value)
        except json.JSONDecodeError:
            options[key.strip()] = value.strip()
    return MethodSpec(name, options)


# ---- the model's methods


def explaining_module(model):
    """The module of the model's own code that holds ``EXPLAIN_METHODS`` (its modeling module, or
    ``explaining_clipviz`` next to it), or None when its code has no registry."""
    module_name = type(model).__module__
    package = module_name.rpartition(".")[0]
    for name in (module_name, f"{package}.explaining_clipviz" if package else "explaining_clipviz"):
        module = sys.modules.get(name)
        if getattr(module, "EXPLAIN_METHODS", None) is not None:
            return module
    return None


def method_registry(model) -> dict[str, Any] | tuple[str, ...]:
    """``EXPLAIN_METHODS`` of the model's own code (see ``explaining_module``): a dict of method entries
    (``needs_grad``, ...) or, in older code, a tuple of names; ``()`` when there is none."""
    module = explaining_module(model)
    return () if module is None else module.EXPLAIN_METHODS


def needs_grad(model, method: str) -> bool:
    entry = method_registry(model)
    if isinstance(entry, dict) and method in entry and hasattr(entry[method], "needs_grad"):
        return bool(entry[method].needs_grad)
    return method in GRADIENT_METHODS


def check_methods(model, processor, methods: Sequence[MethodSpec]) -> None:
    """Unknown methods, options or values fail here, before any row is processed, with the model's own message:
    from its registry's ``resolve_options`` (no forward pass), or, for code without one, from an ``explain`` call on
    a blank image."""
    registry = method_registry(model)
    names = list(registry) if registry else []
    resolve = getattr(explaining_module(model), "resolve_options", None)
    for spec in methods:
        if names and spec.name not in names:
            raise ExplainError(f"unknown method {spec.name!r}; this model's methods: {', '.join(names)}")
        try:
            if resolve is not None:
                resolve(spec.name, spec.options, model.config)
            else:
                _explain_blank(model, processor, spec)
        except ValueError as error:
            raise ExplainError(f"method {spec.label!r}: {error}") from None


def _explain_blank(model, processor, spec: MethodSpec) -> None:
    """One ``explain`` call on a blank image and the prompt "a photo" (raises what the model raises)."""
    size = processor.image_processor.crop_size
    blank = np.zeros((size["height"], size["width"], 3), dtype=np.uint8)
    pixel_values = processor.image_processor(images=[blank], return_tensors="pt")["pixel_values"]
    text = processor.tokenizer(["a photo"], padding="longest", return_tensors="pt")
    device, dtype = next(model.parameters()).device, next(model.parameters()).dtype
    model.explain(
        pixel_values.to(device, dtype),
        text["input_ids"].to(device),
        text["attention_mask"].to(device),
        method=spec.name,
        **spec.options,
    )


# ---- inputs


def load_input(
    source: str, split: str | None = None, revision: str | None = None, name: str | None = None, streaming: bool = False
):
    """A dataset from a ``save_to_disk`` folder, an image folder, Parquet file(s) (a glob works) or a Hub id."""
    import datasets

    path = Path(source)
    try:
        if path.is_dir() and ((path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists()):
            loaded = datasets.load_from_disk(str(path))
            if isinstance(loaded, datasets.DatasetDict):
                split = split or ("train" if "train" in loaded else None)
                if split not in loaded:
                    raise ExplainError(f"{source} holds splits {list(loaded)}: pass --split with one of them")
                loaded = loaded[split]
            return loaded.to_iterable_dataset() if streaming else loaded
        if path.is_dir():
            return datasets.load_dataset("imagefolder", data_dir=str(path), split=split or "train", streaming=streaming)
        if source.endswith(".parquet"):
            return datasets.load_dataset("parquet", data_files=source, split=split or "train", streaming=streaming)
        if path.exists():
            raise ExplainError(f"{source} is a file but not Parquet: pass a folder, *.parquet files or a Hub id")
        return datasets.load_dataset(source, name, split=split or "train", revision=revision, streaming=streaming)
    except ExplainError:
        raise
    except (OSError, ValueError, datasets.exceptions.DatasetNotFoundError) as error:  # OSError: ConnectionError too
        raise ExplainError(f"cannot load dataset {source!r}: {str(error).splitlines()[0]}") from None


def check_columns(dataset, image_column: str, prompt_column: str | None) -> None:
    import datasets

    features = dataset.features
    if features is None:
        raise ExplainError("the dataset does not declare its columns (streaming without features): cast it first")
    images = [name for name, feature in features.items() if isinstance(feature, datasets.Image)]
    if image_column not in features:
        raise ExplainError(
            f"no column {image_column!r} in the dataset; columns: {', '.join(features)}"
            + (f"; image columns: {', '.join(images)}" if images else "")
        )
    if not isinstance(features[image_column], datasets.Image):
        hint = f"image columns: {', '.join(images)}" if images else "the dataset has no image column"
        raise ExplainError(f"column {image_column!r} holds {features[image_column]}, not images ({hint})")
    if prompt_column is not None:
        if prompt_column not in features:
            raise ExplainError(f"no prompt column {prompt_column!r} in the dataset; columns: {', '.join(features)}")
        feature = features[prompt_column]
        inner = getattr(feature, "feature", feature)
        if not (isinstance(inner, datasets.Value) and inner.dtype in ("string", "large_string")) and not isinstance(
            inner, datasets.ClassLabel
        ):
            raise ExplainError(
                f"prompt column {prompt_column!r} holds {feature}: it must hold a string, a list of strings or "
                "class labels"
            )


def decode_image(value: dict):
    """An undecoded image cell (``{"bytes", "path"}``) -> RGB PIL image; raises on unreadable data."""
    from PIL import Image

    if value is None:
        raise ValueError("empty image cell")
    source = io.BytesIO(value["bytes"]) if value.get("bytes") else value.get("path")
    if source is None:
        raise ValueError("image cell has neither bytes nor a path")
    with Image.open(source) as image:
        image.load()
        return image.convert("RGB")


# ---- the run


@dataclass
class Settings:
    """Everything that decides the output's values: a resumed run must use the same."""

    model: str
    revision: str | None
    methods: list[MethodSpec]
    image_column: str = "image"
    prompts: list[str] | None = None
    prompt_column: str | None = None
    template: str = "{}"
    batch_size: int = 32
    shard_rows: int = 1024
    dtype: str = "float32"

    def as_json(self) -> dict:
        return {
            "model": self.model,
            "revision": self.revision,
            "methods": [{"label": m.label, "name": m.name, "options": m.options} for m in self.methods],
            "image_column": self.image_column,
            "prompts": self.prompts,
            "prompt_column": self.prompt_column,
            "template": self.template,
            "batch_size": self.batch_size,
            "shard_rows": self.shard_rows,
            "dtype": self.dtype,
        }


def output_features():
    import datasets

    half = datasets.Value("float16")
    return datasets.Features(
        {
            "row": datasets.Value("int64"),
            "prompt_index": datasets.Value("int32"),
            "prompt": datasets.Value("string"),
            "method": datasets.Value("string"),
            "image_map": datasets.List(datasets.List(half)),
            "text_map": datasets.List(half),
            "logit": datasets.Value("float32"),
            "image_height": datasets.Value("int32"),
            "image_width": datasets.Value("int32"),
        }
    )


class _Explainer:
    """The ``Dataset.map`` function of one shard: decodes, processes and explains one batch of rows at a time.

    Rows whose image cannot be decoded, that have no prompt (None or empty) or whose class label is not a label
    name (-1: none) are skipped and listed in ``skipped``."""

    def __init__(self, model, processor, settings: Settings, label_names, first_row: int, progress):
        self.model, self.processor, self.settings = model, processor, settings
        self.label_names = label_names
        self.progress = progress
        self.device = next(model.parameters()).device
        self.dtype = next(model.parameters()).dtype
        self.grads = {m.label: needs_grad(model, m.name) for m in settings.methods}
        self.next_row = first_row  # batches arrive in order: the map runs in this process
        self.skipped: list[dict] = []

    def row_prompts(self, value) -> list[str]:
        """The row's prompts; raises ValueError (the row is skipped) for a missing or empty prompt or a class label
        outside the label names (-1 is ``datasets``' "no label")."""
        settings = self.settings
        if settings.prompt_column is None:
            return list(settings.prompts)
        values = value if isinstance(value, (list, tuple)) else [value]
        for v in values:
            if v is None or (isinstance(v, str) and not v.strip()):
                raise ValueError(f"no prompt in this row ({settings.prompt_column!r} holds {value!r})")
        if self.label_names is not None:
            count = len(self.label_names)
            for v in values:
                if not 0 <= v < count:
                    raise ValueError(f"class label {v} is not one of the {count} label names (-1: no label)")
            values = [self.label_names[v] for v in values]
        return [settings.template.format(v) for v in values]

    def __call__(self, batch: dict) -> dict:
        settings = self.settings
        size = len(batch[settings.image_column])
        rows = range(self.next_row, self.next_row + size)
        self.next_row += size
        kept, images, prompts = [], [], []
        for i, row in enumerate(rows):
            try:
                image = decode_image(batch[settings.image_column][i])
                row_prompts = self.row_prompts(batch[settings.prompt_column][i] if settings.prompt_column else None)
                if not row_prompts:
                    raise ValueError("no prompt in this row")
            except Exception as error:  # noqa: BLE001 - any unreadable row is reported and skipped, never a crash
                message = f"{type(error).__name__}: {error}".splitlines()[0][:300]
                self.skipped.append({"row": row, "error": message})
                continue
            kept.append(row)
            images.append(image)
            prompts.append(row_prompts)
        out = {name: [] for name in output_features()}
        if kept:
            pixel_values = self.processor.image_processor(images=images, return_tensors="pt")["pixel_values"]
            pixel_values = pixel_values.to(self.device, self.dtype)  # [B, 3, H, W]
            sizes = [image.size for image in images]  # (width, height)
            for spec in settings.methods:
                for positions, maps in self._explain(spec, pixel_values, prompts):
                    for i, position in enumerate(positions):
                        width, height = sizes[position]
                        for prompt_index, prompt in enumerate(prompts[position]):
                            t = maps["index"][prompt]
                            out["row"].append(kept[position])
                            out["prompt_index"].append(prompt_index)
                            out["prompt"].append(prompt)
                            out["method"].append(spec.label)
                            out["image_map"].append(maps["image_maps"][i, t])  # [gh, gw]
                            out["text_map"].append(maps["text_maps"][i, t, : maps["lengths"][t]])  # [tokens]
                            out["logit"].append(float(maps["logits"][i, t]))
                            out["image_height"].append(height)
                            out["image_width"].append(width)
        if self.progress is not None:
            self.progress.update(size)
        return out

    def _explain(self, spec: MethodSpec, pixel_values, prompts: list[list[str]]):
        """Yield (batch positions, maps) per model call.

        Fixed prompts, or a method without gradients: one call for the whole batch with every distinct prompt (the
        towers run once; unused pairs cost little). A gradient method with per-row prompts: one call per distinct
        prompt list, since its cost grows with images x prompts."""
        if self.settings.prompt_column is None or not self.grads[spec.label]:
            distinct = list(dict.fromkeys(p for row in prompts for p in row))
            yield list(range(len(prompts))), self._call(spec, pixel_values, distinct)
            return
        groups: dict[tuple[str, ...], list[int]] = {}
        for position, row in enumerate(prompts):
            groups.setdefault(tuple(row), []).append(position)
        for texts, positions in groups.items():
            yield positions, self._call(spec, pixel_values[positions], list(texts))

    def _call(self, spec: MethodSpec, pixel_values, texts: list[str]) -> dict:
        import torch

        tokens = self.processor.tokenizer(texts, padding="longest", return_tensors="pt")
        ids, mask = tokens["input_ids"].to(self.device), tokens["attention_mask"].to(self.device)
        with torch.enable_grad() if self.grads[spec.label] else torch.no_grad():
            explained = self.model.explain(pixel_values, ids, mask, method=spec.name, **spec.options)
        return {
            "image_maps": explained.image_maps.to(torch.float16).cpu().numpy(),  # [I, T, gh, gw]
            "text_maps": explained.text_maps.to(torch.float16).cpu().numpy(),  # [I, T, L]
            "logits": explained.logits_per_image.float().cpu().numpy(),  # [I, T]
            "lengths": mask.sum(dim=1).tolist(),  # [T]: the prompt's tokens, padding left out
            "index": {text: t for t, text in enumerate(texts)},
        }


# ---- model, manifest, shards


def load_model(model: str, revision: str | None, device, dtype):
    """The clipviz model (remote code) in eval mode on ``device`` and its processor."""
    from transformers import AutoModel, AutoProcessor

    try:
        loaded = AutoModel.from_pretrained(model, revision=revision, trust_remote_code=True)
        processor = AutoProcessor.from_pretrained(model, revision=revision, trust_remote_code=True)
    except (OSError, ValueError) as error:
        raise ExplainError(f"cannot load model {model!r}: {str(error).splitlines()[0]}") from None
    if not hasattr(loaded, "explain"):
        raise ExplainError(f"model {model!r} ({type(loaded).__name__}) has no explain(): pass a clipviz model")
    return loaded.to(device=device, dtype=dtype).eval(), processor


MODEL_FILES = ("config.json", "*.safetensors", "*.safetensors.index.json", "pytorch_model*.bin")


def model_files(name: str) -> dict[str, str] | None:
    """SHA-256 of a local model folder's config and weight files (its identity); None for a Hub id."""
    from clipviz.checkpoint_io import sha256_file

    folder = Path(name)
    if not folder.is_dir():
        return None
    paths = sorted({path for pattern in MODEL_FILES for path in folder.glob(pattern) if path.is_file()})
    return {path.name: sha256_file(path) for path in paths}


def model_info(model, name: str, revision: str | None) -> dict:
    return {
        "id": name,
        "revision": revision,
        "commit": getattr(model.config, "_commit_hash", None),  # the resolved Hub commit
        "files": model_files(name),
        "config": model.config.to_diff_dict(),
    }


def clipviz_version() -> str:
    from clipviz import __version__

    return __version__


def describe_dataset(dataset, source: dict | None) -> dict:
    import datasets

    return {
        "source": source,
        "fingerprint": getattr(dataset, "_fingerprint", None),
        "num_rows": dataset.num_rows if isinstance(dataset, datasets.Dataset) else None,
        "columns": list(dataset.features or {}),
    }


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=2, default=str) + "\n")
    os.replace(tmp, path)


def check_resume(output: Path, settings: Settings, dataset_info: dict) -> dict | None:
    """The existing manifest if ``output`` holds a run with the same settings on the same dataset (to resume);
    None for an empty or missing folder; an error for anything else."""
    path = output / MANIFEST
    if not path.exists():
        if output.exists() and any(output.glob(SHARD_NAME.replace("{:05d}", "*"))):
            raise ExplainError(f"{output} holds shards but no {MANIFEST}: use an empty output folder")
        return None
    try:
        manifest = json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise ExplainError(f"{path} is not valid JSON ({error}): use a new output folder") from None
    if manifest.get("settings") != json.loads(json.dumps(settings.as_json())):
        raise ExplainError(f"{output} holds a run with other settings (see its {MANIFEST}): use a new output folder")
    recorded = manifest.get("dataset", {})
    current = json.loads(json.dumps(dataset_info, default=str))
    for key in ("source", "fingerprint", "num_rows"):
        if recorded.get(key) is not None and current.get(key) is not None and recorded[key] != current[key]:
            raise ExplainError(
                f"{output} holds a run on another dataset ({key} {recorded[key]} != {current[key]}): "
                "use a new output folder"
            )
    return manifest


def check_resume_model(output: Path, manifest: dict, model: dict) -> None:
    """A resumed run must use the same model: the same resolved Hub commit, or the same local config and weight
    files (SHA-256)."""
    recorded = manifest.get("model", {})
    for key, what in (("commit", "model commit"), ("files", "model files (config.json and weights, SHA-256)")):
        if recorded.get(key) is not None and model.get(key) is not None and recorded[key] != model[key]:
            raise ExplainError(
                f"{output} holds a run of another model ({what} differ from those of {model['id']}): "
                "use a new output folder"
            )


def check_output(output: Path) -> None:
    """The output folder can be created and written, checked before any work."""
    if output.exists() and not output.is_dir():
        raise ExplainError(f"output {output} is a file, not a folder: pass a folder path")
    folder = output
    while not folder.exists():
        folder = folder.parent
    if not folder.is_dir():
        raise ExplainError(f"cannot create output folder {output}: {folder} is a file")
    try:
        with tempfile.TemporaryFile(dir=folder):
            pass
    except OSError as error:
        raise ExplainError(
            f"cannot write output folder {output}: {folder} is not writable ({error.strerror}): pass another folder"
        ) from None


def _num_shards(total: int, shard_rows: int) -> int:
    return -(-total // shard_rows)


def _todo(total: int, shard_rows: int, output: Path) -> list[int]:
    """The shards of a map-style dataset not written yet."""
    return [k for k in range(_num_shards(total, shard_rows)) if not (output / SHARD_NAME.format(k)).exists()]


def _my_shards(dataset, shard_rows: int, rank: int, world: int, output: Path, todo: list[int] | None):
    """Yield (shard index, its rows as a ``Dataset``) for this process.

    Map-style: this process's share of the shards still to do (``todo``, listed by every process before any
    writes, so a resumed run spreads the rest evenly). Streaming (``todo`` None): one pass over the stream, shards
    ``k % world == rank``, finished ones skipped, one shard in memory."""
    import datasets

    if todo is not None:
        total = dataset.num_rows
        for shard in todo[rank::world]:
            yield shard, dataset.select(range(shard * shard_rows, min((shard + 1) * shard_rows, total)))
        return
    for shard, rows in enumerate(dataset.iter(batch_size=shard_rows)):
        if shard % world == rank and not (output / SHARD_NAME.format(shard)).exists():
            yield shard, datasets.Dataset.from_dict(rows, features=dataset.features)


def _stream_shards(output: Path) -> int:
    """Shards of a finished streaming run: one past the highest written (every process read the whole stream)."""
    written = [int(path.stem.split("-")[1]) for path in output.glob("shard-*.parquet")]
    return max(written, default=-1) + 1


def _write_shard(output: Path, shard: int, part, explainer: _Explainer, settings: Settings) -> None:
    """Explain one shard through ``Dataset.map`` and write it to a temporary name, renamed when complete."""
    import pyarrow.parquet as pq

    first = explainer.next_row
    mapped = part.map(
        explainer,
        batched=True,
        batch_size=settings.batch_size,
        remove_columns=part.column_names,
        features=output_features(),
        keep_in_memory=True,
        load_from_cache_file=False,
        new_fingerprint=f"clipviz-explain-shard-{shard}",  # no hashing of the model-holding function
    )
    table = mapped.data.table
    meta = {"shard": shard, "first_row": first, "rows": part.num_rows, "skipped": explainer.skipped}
    table = table.replace_schema_metadata({**(table.schema.metadata or {}), b"clipviz": json.dumps(meta).encode()})
    final = output / SHARD_NAME.format(shard)
    tmp = output / f".{final.name}.tmp"
    try:
        with open(tmp, "wb") as handle:
            pq.write_table(table, handle)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, final)
    except BaseException:  # Ctrl-C or a write error: no half shard left behind (SIGKILL's is overwritten on resume)
        tmp.unlink(missing_ok=True)
        raise


def shard_meta(path: Path) -> dict:
    import pyarrow.parquet as pq

    metadata = pq.read_schema(path).metadata or {}
    return json.loads(metadata.get(b"clipviz", b"{}"))


def finish_manifest(output: Path, manifest: dict, num_shards: int) -> dict:
    """Count the shards; the manifest says ``complete`` when all of them are there."""
    import pyarrow.parquet as pq

    present = [k for k in range(num_shards) if (output / SHARD_NAME.format(k)).exists()]
    rows = skipped = pairs = 0
    skipped_rows: list[dict] = []
    for shard in present:
        path = output / SHARD_NAME.format(shard)
        meta = shard_meta(path)
        rows += meta.get("rows", 0)
        skipped += len(meta.get("skipped", []))
        skipped_rows += meta.get("skipped", [])[: max(0, 100 - len(skipped_rows))]
        pairs += pq.read_metadata(path).num_rows
    manifest.update(
        complete=len(present) == num_shards,
        num_shards=num_shards,
        shards=[SHARD_NAME.format(k) for k in present],
        rows_seen=rows,
        rows_skipped=skipped,
        skipped=skipped_rows,  # the first 100; every shard's footer lists its own
        output_rows=pairs,
    )
    _write_json(output / MANIFEST, manifest)
    for stale in output.glob(".shard-*.tmp"):
        stale.unlink()
    return manifest


def check_template(template: str) -> None:
    """``template`` formats one value (``{}`` or ``{0}``, format specs allowed) and uses it."""
    marker = "clipviz_value"
    try:
        used = marker in template.format(marker)
    except (IndexError, KeyError, ValueError, AttributeError) as error:
        raise ExplainError(
            f"template {template!r} is not a format for one value ({type(error).__name__}: {error}): "
            'write it with {} for the prompt value, e.g. "a photo of a {}" (a literal brace is {{ or }})'
        ) from None
    if not used:
        raise ExplainError(
            f'template {template!r} does not put the prompt value in: write {{}}, e.g. "a photo of a {{}}"'
        )


def explain_dataset(
    dataset,
    output_dir: str | os.PathLike,
    model: str,
    methods: Sequence[str | MethodSpec],
    image_column: str = "image",
    prompts: Sequence[str] | None = None,
    prompt_column: str | None = None,
    template: str = "{}",
    revision: str | None = None,
    batch_size: int = 32,
    shard_rows: int = 1024,
    dtype: str = "float32",
    source: dict | None = None,
    progress: bool = True,
    processor=None,
) -> dict:
    """Explain every row of ``dataset`` (a ``datasets.Dataset`` or ``IterableDataset``) into ``output_dir``.

    Args:
        model: a model folder or Hub repo id (clipviz remote code), loaded at ``revision``; or a loaded clipviz model
            (used on its device and dtype as it is) together with its ``processor``.
        methods: method names or ``NAME:option=value,...`` strings (or :class:`MethodSpec`).
        prompts / prompt_column: a fixed prompt list for every row, or a column with each row's prompt(s) or class
            label(s), formatted with ``template`` (e.g. ``"a photo of a {}"``).
        batch_size: rows per model call; shard_rows: rows per output shard (a multiple of ``batch_size``).
        source: how the dataset was loaded (recorded in the manifest; ``clipviz-eval`` reloads it from there).

    Runs as one process or as one of an ``accelerate launch``; re-running on the same folder resumes. Returns the
    manifest (on the main process: with the shard counts and ``complete``). Raises :class:`ExplainError` for bad
    input or settings, before any row is written.
    """
    import datasets
    import torch
    from accelerate import PartialState

    specs = [m if isinstance(m, MethodSpec) else parse_method(m) for m in methods]
    if not specs:
        raise ExplainError("no method given: pass at least one --method")
    if len({s.label for s in specs}) != len(specs):
        raise ExplainError("a method is given twice with the same options")
    if (prompts is None) == (prompt_column is None):
        raise ExplainError("give either fixed prompts (--prompt) or a prompt column (--prompt-column), one of them")
    if prompts is not None and not list(prompts):
        raise ExplainError("the prompt list is empty")
    if prompts is not None and not all(isinstance(p, str) and p.strip() for p in prompts):
        raise ExplainError(f"the prompts {list(prompts)!r} hold an empty one: every --prompt needs text")
    if batch_size < 1 or shard_rows < batch_size or shard_rows % batch_size:
        raise ExplainError(f"shard rows ({shard_rows}) must be a positive multiple of the batch size ({batch_size})")
    check_template(template)
    if dtype not in ("float32", "bfloat16", "float16"):
        raise ExplainError(f"dtype must be float32, bfloat16 or float16, got {dtype!r}")
    check_columns(dataset, image_column, prompt_column)
    preloaded = not isinstance(model, (str, os.PathLike))
    if preloaded and processor is None:
        raise ExplainError("a loaded model needs its processor: pass processor=AutoProcessor.from_pretrained(...)")
    name = model.name_or_path if preloaded else str(model)
    if preloaded:
        dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    settings = Settings(
        model=name,
        revision=revision,
        methods=specs,
        image_column=image_column,
        prompts=list(prompts) if prompts is not None else None,
        prompt_column=prompt_column,
        template=template,
        batch_size=batch_size,
        shard_rows=shard_rows,
        dtype=dtype,
    )
    output = Path(output_dir)
    check_output(output)
    dataset_info = describe_dataset(dataset, source)
    previous = check_resume(output, settings, dataset_info)
    state = PartialState()
    if preloaded:
        loaded_model = model.eval()
    else:
        loaded_model, processor = load_model(name, revision, state.device, getattr(torch, dtype))
    check_methods(loaded_model, processor, specs)
    model_record = model_info(loaded_model, name, revision)
    if previous is not None:
        check_resume_model(output, previous, model_record)
    manifest = previous or {
        "format": FORMAT_VERSION,
        "clipviz_version": clipviz_version(),
        "model": model_record,
        "settings": settings.as_json(),
        "dataset": dataset_info,
        "complete": False,
    }
    output.mkdir(parents=True, exist_ok=True)
    if state.is_main_process and previous is None:
        _write_json(output / MANIFEST, manifest)

    inner = (
        getattr(dataset.features[prompt_column], "feature", dataset.features[prompt_column]) if prompt_column else None
    )
    label_names = inner.names if isinstance(inner, datasets.ClassLabel) else None
    columns = [image_column] + ([prompt_column] if prompt_column and prompt_column != image_column else [])
    dataset = dataset.select_columns(columns).cast_column(image_column, datasets.Image(decode=False))
    total = dataset.num_rows if isinstance(dataset, datasets.Dataset) else None
    todo = _todo(total, shard_rows, output) if total is not None else None
    state.wait_for_everyone()  # every process has listed the shards to do before any is written
    bar = None
    if progress and state.is_main_process:
        from tqdm.auto import tqdm

        mine = (
            None if todo is None else sum(min(shard_rows, total - k * shard_rows) for k in todo[:: state.num_processes])
        )
        bar = tqdm(total=mine, unit="row", desc=f"explain (process 1 of {state.num_processes})", dynamic_ncols=True)
    bars_were_on = datasets.is_progress_bar_enabled()
    datasets.disable_progress_bars()
    try:
        for shard, part in _my_shards(dataset, shard_rows, state.process_index, state.num_processes, output, todo):
            explainer = _Explainer(loaded_model, processor, settings, label_names, shard * shard_rows, bar)
            _write_shard(output, shard, part, explainer, settings)
            if explainer.skipped:
                first = explainer.skipped[0]
                print(
                    f"warning: shard {shard}: skipped {len(explainer.skipped)} row(s) (unreadable image or no prompt), first: row "
                    f"{first['row']}: {first['error']}",
                    file=sys.stderr,
                )
    finally:
        if bars_were_on:
            datasets.enable_progress_bars()
        if bar is not None:
            bar.close()
    state.wait_for_everyone()
    if state.is_main_process:
        shards = _num_shards(total, shard_rows) if total is not None else _stream_shards(output)
        manifest = finish_manifest(output, manifest, shards)
    return manifest


# ---- reading back


def load_explanations(output_dir: str | os.PathLike, cache_dir: str | None = None):
    """The explanations of a finished run as a ``datasets.Dataset`` (memory-mapped), in shard order."""
    import datasets

    output = Path(output_dir)
    path = output / MANIFEST
    if not path.exists():
        raise ExplainError(f"{output} has no {MANIFEST}: not a clipviz-explain output folder")
    manifest = json.loads(path.read_text())
    if not manifest.get("complete"):
        raise ExplainError(f"the run in {output} is not complete: run clipviz-explain again with the same arguments")
    files = [str(output / name) for name in manifest["shards"]]
    if not files:
        return datasets.Dataset.from_dict({name: [] for name in output_features()}, features=output_features())
    return datasets.load_dataset("parquet", data_files=files, split="train", cache_dir=cache_dir)


def upsample_map(image_map, height: int, width: int) -> np.ndarray:
    """A grid map ``[gh, gw]`` on its original image ``[height, width]`` (float32): bilinear over the centred
    region the processor's resize-and-crop kept, zero outside it. Pass a row's ``image_map``, ``image_height``,
    ``image_width``."""
    from clipviz.metrics import place_on_image

    return place_on_image(np.asarray(image_map, dtype=np.float32), height, width)


# ---- command line


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="clipviz-explain",
        description="Explain every row of a Hugging Face dataset with a clipviz model; writes Parquet shards and a "
        "manifest. Run it again to resume; run it under `accelerate launch` to use several processes or GPUs.",
    )
    parser.add_argument("dataset", help="a save_to_disk folder, an image folder, Parquet file(s) or a Hub dataset id")
    parser.add_argument("output", help="output folder (created; an existing run there is resumed)")
    parser.add_argument("--model", required=True, help="clipviz model folder or Hub repo id")
    parser.add_argument("--model-revision", help="model revision (branch, tag or commit)")
    parser.add_argument("--split", help="dataset split (default: train)")
    parser.add_argument("--name", help="dataset configuration name (Hub datasets)")
    parser.add_argument("--revision", help="dataset revision (Hub datasets)")
    parser.add_argument("--streaming", action="store_true", help="stream the dataset instead of preparing it")
    parser.add_argument("--image-column", default="image", help="the dataset's image column (default: image)")
    prompts = parser.add_mutually_exclusive_group(required=True)
    prompts.add_argument("--prompt", action="append", dest="prompts", help="a fixed prompt (repeat for several)")
    prompts.add_argument("--prompt-column", help="column with each row's prompt(s) or class label(s)")
    parser.add_argument("--template", default="{}", help='format for --prompt-column values, e.g. "a photo of a {}"')
    parser.add_argument(
        "--method",
        action="append",
        dest="methods",
        required=True,
        help="NAME or NAME:option=value,... (repeat for several), e.g. relevance:start_layer=0",
    )
    parser.add_argument(
        "--batch-size",
        type=int,
        default=32,
        help="images per explain call, every prompt of the batch at once (default 32)",
    )
    parser.add_argument("--shard-rows", type=int, default=1024, help="rows per output shard (multiple of batch size)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "bfloat16", "float16"))
    parser.add_argument("--threads", type=int, help="torch CPU threads per process")
    parser.add_argument("--no-progress", action="store_true")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.no_progress:
        from transformers.utils import logging as transformers_logging

        transformers_logging.disable_progress_bar()  # the weight-loading bar too
    if args.threads:
        import torch

        torch.set_num_threads(args.threads)
    path = str(Path(args.dataset).resolve()) if Path(args.dataset).exists() else args.dataset  # clipviz-eval: any cwd
    source = {"path": path, "split": args.split, "name": args.name, "revision": args.revision}
    try:
        dataset = load_input(args.dataset, args.split, args.revision, args.name, args.streaming)
        manifest = explain_dataset(
            dataset,
            args.output,
            args.model,
            args.methods,
            image_column=args.image_column,
            prompts=args.prompts,
            prompt_column=args.prompt_column,
            template=args.template,
            revision=args.model_revision,
            batch_size=args.batch_size,
            shard_rows=args.shard_rows,
            dtype=args.dtype,
            source=source,
            progress=not args.no_progress,
        )
    except (ExplainError, OSError) as error:  # OSError: a disk full or a folder made read-only mid-run
        print(f"error: {error}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(
            f"interrupted: the finished shards in {args.output} are kept; run the same command to resume",
            file=sys.stderr,
        )
        return 130
    if "num_shards" in manifest:  # the main process
        print(
            f"{manifest['rows_seen']} rows ({manifest['rows_skipped']} skipped: unreadable image or no prompt), "
            f"{manifest['output_rows']} maps in {len(manifest['shards'])} shard(s) -> {args.output}"
            + ("" if manifest["complete"] else " (incomplete: run again to finish)")
        )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
