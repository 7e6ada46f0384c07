"""Write a converted model as a folder that *is* a complete Hub model repo, and only ever a complete one.

Everything is written into a temporary sibling of the output folder and moved into place when conversion and
verification have succeeded (:func:`staged_folder`); on any error the temporary folder is deleted, so the output
folder is either absent, untouched, or complete.

Weights are streamed: each tensor is cast, written and hashed on its own, so converting never holds a second full
copy of the model (``safetensors.torch.save_file`` would first turn every tensor into a ``bytes`` object).
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import tempfile
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

from clipviz.convert_options import parse_size
from clipviz.sources import ImageSettings

WEIGHTS_NAME = "model.safetensors"
WEIGHTS_INDEX_NAME = "model.safetensors.index.json"
OPENAI_VOCAB_SIZE = 49408  # the tokenizer files are OpenAI's BPE: only models with this vocabulary get them

DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}
SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.float64: "F64",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.int16: "I16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.bool: "BOOL",
}
# Every name a conversion writes: `--overwrite` replaces only a folder holding nothing else.
CONVERSION_FILE = re.compile(
    r"model(-\d{5}-of-\d{5})?\.safetensors|model\.safetensors\.index\.json|\w+_clipviz\.py|README\.md|merges\.txt"
    r"|(config|preprocessor_config|processor_config|tokenizer|tokenizer_config|special_tokens_map|vocab)\.json"
)


class OutputFolderError(ValueError):
    """The output folder cannot be used as it is (exists and is not empty, or is a file)."""


class NonFiniteWeightsError(ValueError):
    """Weights hold NaN or infinite values (in the source, or after casting to a narrower dtype)."""


# ---- staging: nothing half-written ----


def check_output_dir(output_dir: Path, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> None:
    """Fail before any work when the output folder cannot be created, would have to be overwritten without
    `--overwrite`, holds anything a conversion does not write, or holds one of the `inputs` (the source, the
    download cache): `--overwrite` only ever replaces a previous clipviz conversion."""
    output_dir = Path(output_dir).expanduser().resolve()
    for item in inputs:
        item = Path(item).expanduser().resolve()
        if item == output_dir or output_dir in item.parents:
            raise OutputFolderError(
                f"{item} lies inside --output-dir {output_dir}, which the conversion creates or replaces; "
                "choose an output folder that does not contain the source or the download cache."
            )
    if output_dir.exists() and not output_dir.is_dir():
        raise OutputFolderError(f"--output-dir {output_dir} is a file; choose a folder path.")
    _check_parent_writable(output_dir)
    if output_dir.is_dir() and any(output_dir.iterdir()):
        if not overwrite:
            raise OutputFolderError(
                f"--output-dir {output_dir} exists and is not empty; choose another folder or pass --overwrite to "
                "replace a previous conversion (it is replaced only after the new conversion has been verified)."
            )
        check_replaceable(output_dir)


def check_replaceable(output_dir: Path) -> None:
    """`--overwrite` replaces a folder only when it holds a previous clipviz conversion and nothing else."""
    try:
        model_type = json.loads((output_dir / "config.json").read_text()).get("model_type")
    except (OSError, ValueError, AttributeError):
        model_type = None
    if model_type != "clipviz":
        raise OutputFolderError(
            f"--overwrite refused: {output_dir} does not hold a previous clipviz conversion (no config.json with "
            "model_type 'clipviz'), and --overwrite never deletes what the converter did not write; choose another "
            "folder or empty this one yourself."
        )
    foreign = sorted(p.name for p in output_dir.iterdir() if not (p.is_file() and CONVERSION_FILE.fullmatch(p.name)))
    if foreign:
        raise OutputFolderError(
            f"--overwrite refused: {output_dir} holds a clipviz conversion but also {len(foreign)} entries a "
            f"conversion does not write ({', '.join(foreign[:5])}); move them out or choose another folder."
        )


def _check_parent_writable(output_dir: Path) -> None:
    """The first existing folder above `output_dir` must be a folder this process can create entries in."""
    parent = output_dir.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not parent.is_dir():
        raise OutputFolderError(
            f"cannot create --output-dir {output_dir}: {parent} is a file, not a folder; choose another path."
        )
    if not os.access(parent, os.W_OK | os.X_OK):
        raise OutputFolderError(
            f"cannot create --output-dir {output_dir}: no permission to write in {parent}; choose a folder you "
            "can write to."
        )


def staging_path(output_dir: Path) -> Path:
    """`<output>.partial`, next to the output folder. A fixed name on purpose: transformers copies the code of every
    folder it loads with trust_remote_code into its module cache under the folder's name, so random names would
    leave a new copy there on each conversion."""
    return output_dir.with_name(f"{output_dir.name}.partial")


@contextmanager
def staged_folder(output_dir: Path, overwrite: bool, inputs: Iterable[str | os.PathLike] = ()) -> Iterator[Path]:
    """Yield an empty folder next to `output_dir`; move it to `output_dir` when the block succeeds, delete it when
    the block raises. `inputs` (see `check_output_dir`) must not lie inside `output_dir`."""
    output_dir = output_dir.resolve()
    check_output_dir(output_dir, overwrite, inputs)
    staging = staging_path(output_dir)
    try:
        output_dir.parent.mkdir(parents=True, exist_ok=True)
        staging.mkdir()
    except FileExistsError:
        if not output_dir.parent.is_dir():
            raise OutputFolderError(f"cannot create --output-dir {output_dir}: a file is in the way.") from None
        raise OutputFolderError(
            f"{staging} exists: another conversion into {output_dir} is running, or one was killed. If none is "
            "running, delete that folder and try again."
        ) from None
    except OSError as error:  # permissions, a read-only file system, a file where a folder should be, ...
        raise OutputFolderError(f"cannot create --output-dir {output_dir}: {error.strerror or error}.") from None
    try:
        yield staging
        _publish(staging, output_dir)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def _publish(staging: Path, output_dir: Path) -> None:
    """Replace `output_dir` by `staging` with renames only (same parent, so same file system)."""
    if output_dir.is_dir() and not any(output_dir.iterdir()):
        output_dir.rmdir()
    if not output_dir.exists():
        staging.rename(output_dir)
        return
    check_replaceable(output_dir)  # again: something may have been added while converting
    old = Path(tempfile.mkdtemp(prefix=f"{output_dir.name}.old-", dir=output_dir.parent))
    old.rmdir()
    output_dir.rename(old)
    staging.rename(output_dir)
    shutil.rmtree(old, ignore_errors=True)


# ---- weights ----


@dataclass(frozen=True)
class TensorRecord:
    """What was written for one tensor: enough to check a reloaded tensor bit for bit without keeping the source."""

    dtype: torch.dtype
    shape: tuple[int, ...]
    digest: str  # BLAKE2b of the raw bytes


def cast_for_saving(tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """Floating tensors take the output dtype; integer buffers (BatchNorm's `num_batches_tracked`) keep theirs."""
    return tensor.to(dtype) if tensor.is_floating_point() else tensor


def cast_weights_(state_dict: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Cast every floating tensor of `state_dict` to `dtype` in place, one at a time, so that each source tensor is
    released as soon as its copy exists (the peak stays near one copy of the model, whichever dtype is larger).

    Raises `NonFiniteWeightsError` naming the tensors that hold NaN/inf in the source, or that overflow in `dtype`.
    """
    from huggingface_hub.utils import tqdm

    in_source, overflow = [], []
    for name in tqdm(list(state_dict), desc=f"Converting to {str(dtype).removeprefix('torch.')}", unit="tensor"):
        tensor = state_dict[name]
        if not tensor.is_floating_point():
            continue
        if not all_finite(tensor):
            in_source.append(name)
        state_dict[name] = tensor = tensor.to(dtype)
        if name not in in_source and not all_finite(tensor):
            overflow.append(name)
    if in_source or overflow:
        parts = [f"the checkpoint has NaN or infinite values in {len(in_source)} tensors: {in_source[:10]}"] * bool(
            in_source
        )
        if overflow:
            parts.append(
                f"{len(overflow)} tensors overflow when cast to {str(dtype).removeprefix('torch.')}: {overflow[:10]} "
                "(choose a wider --dtype)"
            )
        raise NonFiniteWeightsError("Refusing to convert non-finite weights: " + "; ".join(parts) + ".")


def all_finite(tensor: torch.Tensor, chunk: int = 1 << 22) -> bool:
    """`torch.isfinite(tensor).all()`, a few million elements at a time (no full-size boolean temporary)."""
    flat = tensor.reshape(-1)
    return all(bool(torch.isfinite(part).all()) for part in flat.split(chunk))


def tensor_bytes(tensor: torch.Tensor) -> memoryview:
    """The raw little-endian bytes of a tensor, without copying when it is already contiguous."""
    flat = tensor.detach().contiguous().reshape(-1)
    return memoryview(flat.view(torch.uint8).numpy()).cast("B")


def tensor_digest(tensor: torch.Tensor) -> str:
    return hashlib.blake2b(tensor_bytes(tensor)).hexdigest()


def plan_shards(nbytes: Mapping[str, int], max_shard_size: int | None) -> list[list[str]]:
    """Group tensor names (in sorted order) into shards of at most `max_shard_size` bytes, as transformers does: a
    tensor larger than the limit gets a shard of its own."""
    shards: list[list[str]] = [[]]
    used = 0
    for name in sorted(nbytes):
        if max_shard_size is not None and shards[-1] and used + nbytes[name] > max_shard_size:
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes[name]
    return shards


def write_weights(
    folder: Path, tensors: Mapping[str, torch.Tensor], dtype: torch.dtype, max_shard_size: int | None = None
) -> dict[str, TensorRecord]:
    """Write `tensors` (cast to `dtype` where they are not yet) as `model.safetensors`, or as shards plus
    `model.safetensors.index.json` when they exceed `max_shard_size` bytes; return a record of every tensor
    written. Tensors are streamed one at a time: nothing is copied beyond the tensor being written."""
    from huggingface_hub.utils import tqdm

    layout = {name: _saved_layout(tensor, dtype) for name, tensor in tensors.items()}
    sizes = {name: entry[2] for name, entry in layout.items()}
    shards = plan_shards(sizes, max_shard_size)
    names = (
        [WEIGHTS_NAME]
        if len(shards) == 1
        else [f"model-{i:05d}-of-{len(shards):05d}.safetensors" for i in range(1, len(shards) + 1)]
    )
    records = {}
    with tqdm(total=sum(sizes.values()), unit="B", unit_scale=True, unit_divisor=1024, desc="Writing weights") as bar:
        for filename, shard in zip(names, shards, strict=True):
            records.update(_write_shard(folder / filename, shard, tensors, layout, dtype, bar))
    if len(shards) > 1:
        index = {
            "metadata": {"total_size": sum(sizes.values())},
            "weight_map": {name: filename for filename, shard in zip(names, shards, strict=True) for name in shard},
        }
        (folder / WEIGHTS_INDEX_NAME).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return records


def _saved_layout(tensor: torch.Tensor, dtype: torch.dtype) -> tuple[torch.dtype, tuple[int, ...], int]:
    saved_dtype = dtype if tensor.is_floating_point() else tensor.dtype
    if saved_dtype not in SAFETENSORS_DTYPES:
        raise ValueError(f"Cannot save a tensor of dtype {saved_dtype} in safetensors.")
    nbytes = tensor.numel() * torch.empty((), dtype=saved_dtype).element_size()
    return saved_dtype, tuple(tensor.shape), nbytes


def _write_shard(path, names, tensors, layout, dtype, bar) -> dict[str, TensorRecord]:
    """One safetensors file: 8-byte header length, JSON header (space-padded to 8 bytes), then the tensors' bytes
    back to back in header order."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for name in names:
        saved_dtype, shape, nbytes = layout[name]
        header[name] = {
            "dtype": SAFETENSORS_DTYPES[saved_dtype],
            "shape": list(shape),
            "data_offsets": [offset, offset + nbytes],
        }
        offset += nbytes
    encoded = json.dumps(header, separators=(",", ":")).encode()
    encoded += b" " * (-len(encoded) % 8)
    records = {}
    with open(path, "wb") as f:
        f.write(len(encoded).to_bytes(8, "little"))
        f.write(encoded)
        for name in names:
            data = tensor_bytes(cast_for_saving(tensors[name], dtype))
            f.write(data)
            saved_dtype, shape, _ = layout[name]
            records[name] = TensorRecord(saved_dtype, shape, hashlib.blake2b(data).hexdigest())
            bar.update(len(data))
    return records


# ---- config, code, tokenizer and image processor ----


def write_config_and_code(folder: Path, model, dtype: torch.dtype) -> None:
    """`config.json` (with `auto_map`) and the remote-code files (modeling, configuration, explanations), exactly as
    `model.save_pretrained` writes them (minus the weights, which `write_weights` streams)."""
    from transformers.dynamic_module_utils import custom_object_save

    config = model.config
    config.architectures = [type(model).__name__]
    config.dtype = dtype
    custom_object_save(model, folder, config=config)  # modeling file + its relative imports, auto_map["AutoModel"]
    config.save_pretrained(folder)  # configuration file, auto_map["AutoConfig"], config.json


def image_processor_config(image_size: int, image: ImageSettings, with_processor: bool) -> dict:
    """`preprocessor_config.json` of transformers' `CLIPImageProcessor`: OpenAI's preprocessing (resize the short
    side, center crop, rescale, normalize) at the model's resolution."""
    config = {
        "image_processor_type": "CLIPImageProcessor",
        "do_convert_rgb": True,
        "do_resize": True,
        "size": {"shortest_edge": image_size},
        "resample": image.resample,
        "do_center_crop": True,
        "crop_size": {"height": image_size, "width": image_size},
        "do_rescale": True,
        "rescale_factor": 1 / 255,
        "do_normalize": True,
        "image_mean": list(image.mean),
        "image_std": list(image.std),
    }
    if with_processor:
        config["processor_class"] = "CLIPProcessor"
    return config


def write_processing_files(folder: Path, config, image: ImageSettings) -> list[str]:
    """Tokenizer files (OpenAI's BPE, when the vocabulary is OpenAI's), the image processor config and, with both,
    `processor_config.json` so that `AutoProcessor` returns a `CLIPProcessor`. Returns the notes for the card."""
    from clipviz.tokenizer_files import write_tokenizer_files

    text = config.text_config
    with_tokenizer = text.vocab_size == OPENAI_VOCAB_SIZE
    notes = []
    if with_tokenizer:
        write_tokenizer_files(folder, context_length=text.max_position_embeddings)
    else:
        notes.append(
            f"No tokenizer files: the text tower's vocabulary has {text.vocab_size} entries, not the {OPENAI_VOCAB_SIZE} "
            "of OpenAI's BPE tokenizer."
        )
    processor = image_processor_config(config.vision_config.image_size, image, with_tokenizer)
    _write_json(folder / "preprocessor_config.json", processor)
    if with_tokenizer:
        _write_json(folder / "processor_config.json", {"processor_class": "CLIPProcessor"})
    return notes


def _write_json(path: Path, payload: dict) -> None:
    path.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")


def folder_bytes(folder: Path) -> int:
    return sum(path.stat().st_size for path in folder.rglob("*") if path.is_file())


__all__ = [
    "DTYPES",
    "NonFiniteWeightsError",
    "OutputFolderError",
    "TensorRecord",
    "WEIGHTS_INDEX_NAME",
    "WEIGHTS_NAME",
    "cast_for_saving",
    "cast_weights_",
    "check_output_dir",
    "check_replaceable",
    "folder_bytes",
    "image_processor_config",
    "parse_size",
    "plan_shards",
    "staged_folder",
    "tensor_digest",
    "write_config_and_code",
    "write_processing_files",
    "write_weights",
]
