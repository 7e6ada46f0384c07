"""Read CLIP checkpoints into flat state dicts without running any code stored in them.

Checkpoints come from strangers on the internet, and a pickle can run arbitrary code when it is loaded. So:

* OpenAI's published ``.pt`` files are TorchScript archives. ``torch.jit.load`` would compile and run the Python-like
  code inside them, and ``torch.load(weights_only=True)`` refuses them. :func:`read_torchscript_state_dict` reads
  them with a restricted unpickler that can only rebuild tensors; the archive's own classes (``__torch__.*``)
  become inert attribute holders, and which attributes are parameters or buffers is read from the class headers
  in ``code/`` as text. The result is exactly ``torch.jit.load(f).state_dict()``.
* Plain ``torch.save`` files go through ``torch.load(weights_only=True)`` only, and are refused outright while
  ``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` is set. (torch 2.6+ still honours an explicit ``weights_only=True`` under
  that variable, but its purpose is to switch safe loading off, so clipviz does not bet on that detail.)
* ``.safetensors`` files hold no code; their header is checked first so a damaged file gives a clear message.

Memory is bounded by what a checkpoint declares. A TorchScript archive is read member by member: only ``data.pkl``,
``byteorder``, the storage records ``data.pkl`` refers to, the ``code/`` files of the classes it names and, when
a head count lives there, ``constants.pkl`` are ever decompressed; each is checked against its zip directory entry
before a byte is inflated. ``data.pkl``/``constants.pkl`` may hold at most :data:`MAX_PICKLE_BYTES`, a ``code/``
file :data:`MAX_CODE_BYTES`, ``byteorder`` :data:`MAX_BYTEORDER_BYTES`; a storage record must be exactly as large
as the tensors ``data.pkl`` declares in it; and a compressed member larger than :data:`COMPRESSION_CHECK_BYTES`
may expand at most :data:`MAX_COMPRESSION_RATIO` times (``torch.jit.save`` and ``torch.save`` never compress, and
weights do not compress well). The peak is therefore the declared tensor bytes plus :data:`MAX_PICKLE_BYTES`.
``torch.save`` zip archives, which ``torch.load`` reads, must hold uncompressed members only, as ``torch.save``
writes them. Every reader refuses a tensor that repeats elements of its storage (a stride-0 or overlapping view):
written out, such a view would turn a small file into a huge one.

:func:`read_state_dict` picks the reader from the file's content, not its name.
:func:`download_openai_checkpoint` fetches OpenAI's published files by name and checks their SHA-256.
"""

from __future__ import annotations

import collections
import hashlib
import io
import json
import os
import pickle
import pickletools
import re
import struct
import sys
import urllib.error
import urllib.parse
import urllib.request
import warnings
import zipfile
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, BinaryIO
from zlib import error as zlib_error

import torch

__all__ = [
    "ArchiveModule",
    "COMPRESSION_CHECK_BYTES",
    "CheckpointError",
    "MAX_BYTEORDER_BYTES",
    "MAX_CODE_BYTES",
    "MAX_COMPRESSION_RATIO",
    "MAX_MODULE_DEPTH",
    "MAX_PICKLE_BYTES",
    "DownloadError",
    "OPENAI_BASE_URL",
    "OPENAI_URLS",
    "BASE_URL_ENV",
    "TorchScriptCheckpoint",
    "default_openai_cache_dir",
    "detect_checkpoint_format",
    "download_openai_checkpoint",
    "openai_checkpoint_url",
    "read_safetensors_state_dict",
    "read_state_dict",
    "read_torch_pickle_state_dict",
    "read_torchscript",
    "read_torchscript_state_dict",
    "refuse_aliased_tensors",
    "refuse_repeating_views",
    "sha256_file",
    "validate_safetensors_header",
]


class CheckpointError(ValueError):
    """A checkpoint file is damaged, of an unknown kind, or asks for code to be run; the message says which."""


class DownloadError(OSError):
    """Downloading a published checkpoint failed (network, HTTP status, size or SHA-256 mismatch, offline mode)."""


# Limits on what an archive may make the reader inflate (see the module docstring). Published CLIP archives stay
# far below them: OpenAI's ViT-L/14 has a data.pkl of well under 1 MB and code/ files of a few hundred KB.
MAX_PICKLE_BYTES = 64 << 20
MAX_CODE_BYTES = 16 << 20
MAX_BYTEORDER_BYTES = 16
MAX_COMPRESSION_RATIO = 100
COMPRESSION_CHECK_BYTES = 1 << 20
# CLIP's module tree is 6 levels deep; anything near this is not a model but an attempt to exhaust the reader.
MAX_MODULE_DEPTH = 256


def _checked_member(zf: zipfile.ZipFile, name: str, limit: int | None, path: Path, what: str) -> zipfile.ZipInfo:
    """The directory entry of member ``name``, refused before anything is inflated when it declares more than
    ``limit`` bytes, more data than the archive holds, or a compression ratio beyond ``MAX_COMPRESSION_RATIO``."""
    info = zf.getinfo(name)
    if limit is not None and info.file_size > limit:
        raise CheckpointError(
            f"{path}: {name} ({what}) declares {info.file_size:,} bytes, more than the {limit:,} such a record can "
            "need; refusing to read it (the archive is damaged or built to exhaust memory)"
        )
    if info.compress_size > path.stat().st_size or (
        info.compress_type == zipfile.ZIP_STORED and info.compress_size != info.file_size
    ):
        raise CheckpointError(
            f"{path}: the zip directory entry of {name} claims more data than the archive holds: the archive is damaged"
        )
    if (
        info.compress_type != zipfile.ZIP_STORED
        and info.file_size > COMPRESSION_CHECK_BYTES
        and info.file_size > MAX_COMPRESSION_RATIO * info.compress_size
    ):
        raise CheckpointError(
            f"{path}: {name} ({what}) expands from {info.compress_size:,} to {info.file_size:,} bytes, a compression "
            f"ratio above the {MAX_COMPRESSION_RATIO}:1 that real checkpoints stay far below (PyTorch stores its "
            "records uncompressed); refusing a likely decompression bomb"
        )
    return info


def _read_member(zf: zipfile.ZipFile, name: str, limit: int, path: Path, what: str) -> bytes:
    info = _checked_member(zf, name, limit, path, what)
    try:
        with zf.open(info) as f:
            return f.read(limit + 1)  # the zip module also stops at the declared size; this bound does not rely on it
    except (zipfile.BadZipFile, OSError, EOFError, zlib_error) as e:  # CRC mismatch, truncated or bad deflate data
        raise CheckpointError(f"{path}: {name} ({what}) is corrupt ({e})") from None


# --------------------------------------------------------------------------------------------------------------
# Format detection
# --------------------------------------------------------------------------------------------------------------

TORCHSCRIPT = "torchscript"
TORCH_ZIP = "torch-zip"
TORCH_PICKLE = "torch-pickle"
SAFETENSORS = "safetensors"

_SAFETENSORS_MAX_HEADER = 100 * 1024 * 1024  # the limit the safetensors library itself enforces

_KNOWN_MAGIC = [
    (b"\x89PNG\r\n\x1a\n", "a PNG image"),
    (b"\xff\xd8\xff", "a JPEG image"),
    (b"GIF8", "a GIF image"),
    (b"\x1f\x8b", "a gzip-compressed file (decompress it first)"),
    (b"version https://git-lfs", "a Git LFS pointer, not the file itself (run `git lfs pull`)"),
    (b"\x93NUMPY", "a NumPy .npy array"),
    (b"\x89HDF", "an HDF5 file (e.g. a Keras/TensorFlow checkpoint)"),
]


def detect_checkpoint_format(path: str | os.PathLike) -> str:
    """Name the kind of checkpoint at ``path`` from its bytes: ``"torchscript"``, ``"torch-zip"``, ``"torch-pickle"``
    or ``"safetensors"``. Anything else raises :class:`CheckpointError` describing what the file looks like."""
    path = Path(path)
    head = _read_head(path, 64)
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):
        with _open_zip(path) as zf:
            prefix = _archive_prefix(zf, path)
            return TORCHSCRIPT if _is_torchscript(zf, prefix) else TORCH_ZIP
    if _looks_like_safetensors(head):
        return SAFETENSORS
    if head[:1] == b"\x80":  # pickle PROTO opcode: legacy (pre-1.6, non-zip) torch.save format
        return TORCH_PICKLE
    raise CheckpointError(
        f"{path} is not a checkpoint: it looks like {_describe_bytes(head)}. "
        "Expected a PyTorch .pt/.bin/.pth file, a TorchScript archive or a .safetensors file."
    )


def _read_head(path: Path, n: int) -> bytes:
    try:
        with open(path, "rb") as f:
            head = f.read(n)
    except FileNotFoundError:
        raise CheckpointError(f"checkpoint file {path} does not exist") from None
    except IsADirectoryError:
        raise CheckpointError(f"{path} is a directory; pass the checkpoint file inside it") from None
    if not head:
        raise CheckpointError(f"{path} is empty (0 bytes): an interrupted download or copy?")
    return head


def _looks_like_safetensors(head: bytes) -> bool:
    """safetensors = 8-byte little-endian header length, then a JSON object."""
    return len(head) >= 9 and head[8:9] == b"{"


def _describe_bytes(head: bytes) -> str:
    for magic, what in _KNOWN_MAGIC:
        if head.startswith(magic):
            return what
    text = head.lstrip().lower()
    if text.startswith((b"<!doctype html", b"<html")):
        return "an HTML page (a failed download or an error page?)"
    if text.startswith((b"{", b"[")):
        return "a JSON file"
    try:
        head.decode("utf-8")
    except UnicodeDecodeError:
        return f"an unknown binary format (first bytes {head[:8]!r})"
    return f"a text file (starts with {head[:40]!r})"


def _open_zip(path: Path) -> zipfile.ZipFile:
    try:
        return zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise CheckpointError(
            f"{path} is not a complete zip archive ({e}): the download or copy was probably "
            "truncated; fetch the file again"
        ) from None


def _archive_prefix(zf: zipfile.ZipFile, path: Path) -> str:
    """PyTorch archives keep everything under one top folder ``<name>/`` holding ``data.pkl``."""
    prefixes = [n[: -len("data.pkl")] for n in zf.namelist() if n.endswith("data.pkl") and n.count("/") <= 1]
    prefixes = [p for p in prefixes if p == "" or p.endswith("/")]
    if len(prefixes) != 1:
        found = "no" if not prefixes else f"{len(prefixes)}"
        raise CheckpointError(
            f"{path} is a zip archive but not a PyTorch checkpoint: it has {found} "
            "'<name>/data.pkl' records where exactly one is expected"
        )
    return prefixes[0]


def _is_torchscript(zf: zipfile.ZipFile, prefix: str) -> bool:
    return any(n.startswith(prefix + "code/") for n in zf.namelist())


# --------------------------------------------------------------------------------------------------------------
# Dispatch
# --------------------------------------------------------------------------------------------------------------


Progress = Callable[[int], Any]  # called with the number of bytes just read, e.g. a tqdm bar's ``update``


def read_state_dict(path: str | os.PathLike, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Read any supported checkpoint into a flat ``{name: tensor}`` dict on the CPU, never running code from it.

    TorchScript archives (OpenAI's ``.pt``) → :func:`read_torchscript_state_dict`; ``torch.save`` files →
    :func:`read_torch_pickle_state_dict`; safetensors → :func:`read_safetensors_state_dict`. ``progress``, when
    given, is called with byte counts as the tensors are read (in one call at the end for ``torch.save`` files).
    """
    kind = detect_checkpoint_format(path)
    if kind == TORCHSCRIPT:
        return read_torchscript_state_dict(path, progress)
    if kind == SAFETENSORS:
        return read_safetensors_state_dict(path, progress)
    state_dict = read_torch_pickle_state_dict(path)
    if progress is not None:
        progress(Path(path).stat().st_size)
    return state_dict


# --------------------------------------------------------------------------------------------------------------
# torch.save files: torch.load(weights_only=True) and nothing else
# --------------------------------------------------------------------------------------------------------------

_UNSAFE_LOAD_ENV = "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"
_TORCH_TRUE_VALUES = ("1", "y", "yes", "true")  # what torch.serialization accepts as "set"


def read_torch_pickle_state_dict(path: str | os.PathLike) -> dict[str, torch.Tensor]:
    """Load a ``torch.save`` checkpoint with ``torch.load(weights_only=True)`` and return its state dict.

    A top-level ``{"state_dict": {...}}`` or ``{"model": {...}}`` wrapper (training checkpoints) is unwrapped.
    """
    path = Path(path)
    _refuse_unsafe_torch_load_env(path)
    mmap = _read_head(path, 4).startswith(b"PK\x03\x04")  # only the zip format can be memory-mapped
    if mmap:
        _check_torch_zip(path)
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except pickle.UnpicklingError as e:
        first_line = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"refused to load {path}: it contains more than tensors and plain containers, and "
            "clipviz only loads pickles in torch's weights-only mode. "
            f"torch said: {first_line}. Convert it to safetensors in a trusted environment "
            "if you know where it comes from."
        ) from None
    except (RuntimeError, EOFError, OSError, ValueError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} could not be read as a PyTorch checkpoint: {e}") from e
    state_dict = _unwrap_state_dict(obj, path)
    refuse_repeating_views(state_dict, path)
    return state_dict


def _check_torch_zip(path: Path) -> None:
    """``torch.load`` reads compressed records whole, with no bound; ``torch.save`` never compresses them. So a
    ``torch.save`` archive must hold only stored members, and a ``data.pkl`` of at most ``MAX_PICKLE_BYTES``."""
    with _open_zip(path) as zf:
        prefix = _archive_prefix(zf, path)
        _checked_member(zf, prefix + "data.pkl", MAX_PICKLE_BYTES, path, "the pickled state dict")
        compressed = [info.filename for info in zf.infolist() if info.compress_type != zipfile.ZIP_STORED]
        if compressed:
            raise CheckpointError(
                f"{path}: {len(compressed)} members of this torch.save archive are compressed ({compressed[0]}, ...); "
                "torch.save never compresses them and torch.load would inflate them whole without a bound, so they "
                "are refused. Re-save the state dict with torch.save, or as safetensors."
            )


def refuse_repeating_views(state_dict: Mapping[str, torch.Tensor], path: str | os.PathLike) -> None:
    """Refuse tensors whose elements overlap in their storage (a stride-0 ``expand``, overlapping strides): their
    logical size exceeds the bytes they are made of, so a small file could be written out as a huge one."""
    for name, tensor in state_dict.items():
        if _repeats_elements(tensor):
            raise CheckpointError(
                f"{path}: tensor {name!r} of shape {tuple(tensor.shape)} has strides {tensor.stride()}, which reuse "
                f"the same storage elements ({tensor.numel() * tensor.element_size():,} bytes of values from "
                f"{tensor.untyped_storage().nbytes():,} bytes of storage); refusing a view larger than its data. "
                "Save each tensor with .contiguous() (or .clone()) if the repetition is intended."
            )


def refuse_aliased_tensors(state_dict: Mapping[str, torch.Tensor], where: str) -> None:
    """Refuse two entries whose bytes overlap in one storage. CLIP has no tied weights, so in a CLIP checkpoint
    such entries can only serve to multiply the data when each is written out on its own."""
    spans: dict[int, list[tuple[int, int, str]]] = {}
    for name, tensor in state_dict.items():
        if tensor.numel() == 0:
            continue
        size = tensor.element_size()
        start = tensor.storage_offset() * size
        end = start + (sum((n - 1) * st for n, st in zip(tensor.shape, tensor.stride(), strict=True)) + 1) * size
        spans.setdefault(tensor.untyped_storage().data_ptr(), []).append((start, end, name))
    for entries in spans.values():
        entries.sort()
        for (_, end, first), (start, _, second) in zip(entries, entries[1:], strict=False):
            if start < end:
                raise CheckpointError(
                    f"{where}: tensors {first!r} and {second!r} overlap in one storage; CLIP has no tied "
                    "weights, and writing each out would multiply the data. Save each tensor with .clone() if intended."
                )


def _repeats_elements(tensor: torch.Tensor) -> bool:
    """Whether two indices of ``tensor`` address the same storage element. Dimensions sorted by stride must each
    step past everything the smaller ones span (sufficient for no overlap; what every dense layout satisfies)."""
    if tensor.numel() <= 1:
        return False
    if tensor.numel() * tensor.element_size() > tensor.untyped_storage().nbytes():
        return True
    span = 0  # the largest offset reachable with the dimensions seen so far
    for stride, size in sorted((st, n) for st, n in zip(tensor.stride(), tensor.shape, strict=True) if n > 1):
        if stride <= span:
            return True
        span += stride * (size - 1)
    return False


def _refuse_unsafe_torch_load_env(path: Path) -> None:
    """``TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD`` exists to switch torch.load's safe unpickler off. torch 2.6+ only
    applies it to calls that do not pass ``weights_only``, but a checkpoint reader should not depend on that
    (nor on every wrapper of torch.load in the process respecting it), so loading pickles is refused while it is set.
    """
    if os.getenv(_UNSAFE_LOAD_ENV, "0").lower() in _TORCH_TRUE_VALUES:
        raise CheckpointError(
            f"refusing to load {path} while {_UNSAFE_LOAD_ENV} is set: it can make torch.load "
            "run code stored in the file. Unset it (e.g. `env -u "
            f"{_UNSAFE_LOAD_ENV} ...`) and try again."
        )


def _is_tensor_mapping(obj: Any) -> bool:
    return (
        isinstance(obj, Mapping)
        and bool(obj)
        and all(isinstance(k, str) and isinstance(v, torch.Tensor) for k, v in obj.items())
    )


def _unwrap_state_dict(obj: Any, path: Path) -> dict[str, torch.Tensor]:
    if _is_tensor_mapping(obj):
        return dict(obj)
    if isinstance(obj, Mapping):
        for key in ("state_dict", "model"):
            if _is_tensor_mapping(obj.get(key)):
                return dict(obj[key])
        keys = ", ".join(repr(k) for k in list(obj)[:10])
        raise CheckpointError(
            f"{path} holds a dict that is not a state dict (keys: {keys}); expected "
            "{name: tensor}, or such a dict under 'state_dict' or 'model'"
        )
    raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict of tensors")


# --------------------------------------------------------------------------------------------------------------
# safetensors
# --------------------------------------------------------------------------------------------------------------

_SAFETENSORS_ITEMSIZE = {
    "BOOL": 1,
    "U8": 1,
    "I8": 1,
    "F8_E4M3": 1,
    "F8_E5M2": 1,
    "F8_E8M0": 1,
    "I16": 2,
    "U16": 2,
    "F16": 2,
    "BF16": 2,
    "I32": 4,
    "U32": 4,
    "F32": 4,
    "C64": 8,
    "I64": 8,
    "U64": 8,
    "F64": 8,
}


def read_safetensors_state_dict(path: str | os.PathLike, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """Read a ``.safetensors`` file tensor by tensor (memory-mapped), after checking its header is consistent."""
    from safetensors import SafetensorError, safe_open

    path = Path(path)
    validate_safetensors_header(path)
    try:
        state_dict = {}
        with safe_open(str(path), framework="pt", device="cpu") as f:
            for key in f.keys():
                state_dict[key] = tensor = f.get_tensor(key)
                if progress is not None:
                    progress(tensor.numel() * tensor.element_size())
        refuse_repeating_views(state_dict, path)
        return state_dict
    except SafetensorError as e:
        raise CheckpointError(f"{path} is not a valid safetensors file: {e}") from e


def validate_safetensors_header(path: str | os.PathLike) -> dict[str, Any]:
    """Check the header of a safetensors file against the file's size and return the parsed header.

    The safetensors library reports damage with terse errors; this names the file, the tensor and what is off.
    """
    path = Path(path)
    size = path.stat().st_size
    if size < 8:
        raise CheckpointError(f"{path} is too small ({size} bytes) to be a safetensors file")
    with open(path, "rb") as f:
        (header_len,) = struct.unpack("<Q", f.read(8))
        if header_len > size - 8:
            raise CheckpointError(
                f"{path}: safetensors header length {header_len} is larger than the rest of the "
                f"file ({size - 8} bytes): the file is truncated or not a safetensors file"
            )
        if header_len > _SAFETENSORS_MAX_HEADER:
            raise CheckpointError(f"{path}: safetensors header length {header_len} exceeds the 100 MB limit")
        raw = f.read(header_len)
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{path}: safetensors header is not valid JSON ({e})") from None
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: safetensors header is a JSON {type(header).__name__}, expected an object")
    data_size = size - 8 - header_len
    for name, info in header.items():
        if name != "__metadata__":
            _check_safetensors_entry(path, name, info, data_size)
    return header


def _check_safetensors_entry(path: Path, name: str, info: Any, data_size: int) -> None:
    if not isinstance(info, dict) or not {"dtype", "shape", "data_offsets"} <= info.keys():
        raise CheckpointError(f"{path}: safetensors entry {name!r} lacks dtype/shape/data_offsets")
    shape, offsets = info["shape"], info["data_offsets"]
    if not (isinstance(shape, list) and all(isinstance(d, int) and d >= 0 for d in shape)):
        raise CheckpointError(f"{path}: tensor {name!r} has an invalid shape {shape!r}")
    if not (
        isinstance(offsets, list)
        and len(offsets) == 2
        and all(isinstance(o, int) for o in offsets)
        and 0 <= offsets[0] <= offsets[1]
    ):
        raise CheckpointError(f"{path}: tensor {name!r} has invalid data_offsets {offsets!r}")
    if offsets[1] > data_size:
        raise CheckpointError(
            f"{path} is truncated: tensor {name!r} needs data bytes up to {offsets[1]}, but the "
            f"file holds only {data_size} bytes of tensor data; download it again"
        )
    itemsize = _SAFETENSORS_ITEMSIZE.get(info["dtype"])
    if itemsize is not None:
        numel = 1
        for d in shape:
            numel *= d
        if offsets[1] - offsets[0] != numel * itemsize:
            raise CheckpointError(
                f"{path}: tensor {name!r} ({info['dtype']}, shape {shape}) needs "
                f"{numel * itemsize} bytes but its data_offsets span {offsets[1] - offsets[0]}"
            )


# --------------------------------------------------------------------------------------------------------------
# TorchScript archives, read without torch.jit
# --------------------------------------------------------------------------------------------------------------

# Storage class names the TorchScript pickler writes (``torch.<ScalarType>Storage``) and their dtypes.
_STORAGE_DTYPES: dict[str, torch.dtype] = {
    "DoubleStorage": torch.float64,
    "FloatStorage": torch.float32,
    "HalfStorage": torch.float16,
    "BFloat16Storage": torch.bfloat16,
    "LongStorage": torch.int64,
    "IntStorage": torch.int32,
    "ShortStorage": torch.int16,
    "CharStorage": torch.int8,
    "ByteStorage": torch.uint8,
    "BoolStorage": torch.bool,
    "ComplexFloatStorage": torch.complex64,
    "ComplexDoubleStorage": torch.complex128,
}
for _name in ("float8_e4m3fn", "float8_e5m2"):
    if hasattr(torch, _name):
        _STORAGE_DTYPES["Float8_" + _name.split("_", 1)[1] + "Storage"] = getattr(torch, _name)

# Scalar attributes of OpenAI's top module that describe the model rather than hold weights.
_OPENAI_INFO_ATTRIBUTES = ("input_resolution", "context_length", "vocab_size")


@dataclass(frozen=True)
class ArchiveModule:
    """One module of a TorchScript archive: its class name (``MultiheadAttention``, ``QuickGELU``, ``GELU``, ...;
    without TorchScript's ``___torch_mangle_N`` part) and, for attention modules, the head count the archive
    records (an attribute of a scripted module, or the constant its traced ``forward`` divides the width by)."""

    kind: str
    num_heads: int | None = None


@dataclass(frozen=True)
class TorchScriptCheckpoint:
    """What :func:`read_torchscript` found: the state dict, the top module's plain scalar attributes
    (e.g. ``input_resolution``/``context_length``/``vocab_size`` when they are stored as ints, which
    ``state_dict()`` leaves out), and every module by its state-dict prefix (``"transformer.resblocks.0.attn"``;
    ``""`` is the top module)."""

    state_dict: dict[str, torch.Tensor]
    attributes: dict[str, Any] = field(default_factory=dict)
    modules: dict[str, ArchiveModule] = field(default_factory=dict)


def read_torchscript_state_dict(path: str | os.PathLike, progress: Progress | None = None) -> dict[str, torch.Tensor]:
    """The state dict of a TorchScript archive, equal to ``torch.jit.load(path).state_dict()`` (same keys in the
    same order, same dtypes, shapes, strides and bits), obtained without compiling or running the archive's code."""
    return read_torchscript(path, progress).state_dict


def read_torchscript(path: str | os.PathLike, progress: Progress | None = None) -> TorchScriptCheckpoint:
    """Read a TorchScript archive's weights and its top module's scalar attributes. See the module docstring."""
    path = Path(path)
    _read_head(path, 1)
    with _open_zip(path) as zf:
        prefix = _archive_prefix(zf, path)
        if not _is_torchscript(zf, prefix):
            raise CheckpointError(
                f"{path} is a torch.save archive, not TorchScript (no {prefix}code/ folder); use read_state_dict()"
            )
        byteorder = _archive_byteorder(zf, prefix, path)
        storages = _StorageReader(zf, prefix, byteorder, path, progress)
        root = _unpickle_data(zf, prefix + "data.pkl", storages, path)
        if not isinstance(root, _InertObject):
            raise CheckpointError(f"{path}: data.pkl holds a {type(root).__name__}, not a TorchScript module")
        classes = _ClassHeaders(zf, prefix, path)
        state_dict: dict[str, torch.Tensor] = {}
        objects = _collect_modules(root, classes, state_dict, path)
        refuse_repeating_views(state_dict, path)
        constants = _Constants(zf, prefix, byteorder, path)
        modules = {name: _archive_module(obj, classes, constants, name, path) for name, obj in objects.items()}
        return TorchScriptCheckpoint(state_dict, _top_level_attributes(root), modules)


def _archive_byteorder(zf: zipfile.ZipFile, prefix: str, path: Path) -> str:
    """Archives record the writer's byte order in ``byteorder``; older ones have none and are little-endian."""
    name = prefix + "byteorder"
    if name not in zf.NameToInfo:
        return "little"
    raw = _read_member(zf, name, MAX_BYTEORDER_BYTES, path, "the byte order")
    order = raw.decode("ascii", errors="replace").strip()
    if order not in ("little", "big"):
        raise CheckpointError(f"{path}: unknown byte order {order[:20]!r} in {name}")
    return order


def _unpickle_data(zf: zipfile.ZipFile, name: str, storages: _StorageReader, path: Path) -> Any:
    """Unpickle ``data.pkl`` (or ``constants.pkl``) from memory: read whole (it is small and bounded), a pickle
    that announces more bytes than it holds fails at once instead of asking the zip stream for them."""
    raw = _read_member(zf, name, MAX_PICKLE_BYTES, path, "the pickled module tree")
    try:
        for _ in pickletools.genops(raw):  # every opcode's announced length is checked against the bytes present
            pass  # (the C unpickler would allocate what a BINBYTES8 announces before finding the data short)
    except ValueError as e:
        raise CheckpointError(f"{path}: {name} is truncated or malformed ({e})") from None
    try:
        return _RestrictedUnpickler(io.BytesIO(raw), storages, path).load()
    except CheckpointError:
        raise
    except Exception as e:  # anything else a hostile or damaged pickle can provoke
        raise CheckpointError(f"{path}: {name} could not be read safely: {type(e).__name__}: {e}") from e


class _InertObject:
    """Stand-in for a class defined in the archive's ``code/``: it records the pickled state and runs nothing."""

    _clipviz_qualname = "__torch__"

    def __new__(cls, *args: Any, **kwargs: Any) -> _InertObject:
        return object.__new__(cls)

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.__dict__["_clipviz_args"] = args

    def __setstate__(self, state: Any) -> None:
        self.__dict__["_clipviz_state"] = state

    @property
    def state(self) -> Any:
        return self.__dict__.get("_clipviz_state")


class _StorageType:
    """What ``torch.FloatStorage`` etc. resolve to inside the restricted unpickler: just a dtype."""

    def __init__(self, name: str, dtype: torch.dtype) -> None:
        self.name, self.dtype = name, dtype


def _rebuild_tensor_v2(
    storage: Any,
    storage_offset: Any,
    size: Any,
    stride: Any,
    requires_grad: Any = False,
    backward_hooks: Any = None,
    metadata: Any = None,
) -> torch.Tensor:
    """Safe version of ``torch._utils._rebuild_tensor_v2``: a strided view of a storage read from the archive."""
    if not isinstance(storage, torch.Tensor) or storage.dim() != 1:
        raise CheckpointError(f"tensor record refers to {type(storage).__name__}, not a storage")
    if (
        not _int_tuple(size)
        or not _int_tuple(stride)
        or len(size) != len(stride)
        or not isinstance(storage_offset, int)
    ):
        raise CheckpointError(f"invalid tensor geometry: offset {storage_offset!r}, size {size!r}, stride {stride!r}")
    if storage_offset < 0 or any(s < 0 for s in size) or any(s < 0 for s in stride):
        raise CheckpointError(f"invalid tensor geometry: offset {storage_offset}, size {size}, stride {stride}")
    last = storage_offset + sum((n - 1) * s for n, s in zip(size, stride, strict=True)) if all(size) else -1
    if last >= storage.numel():
        raise CheckpointError(
            f"tensor of size {tuple(size)} at offset {storage_offset} reaches element {last}, "
            f"beyond its storage of {storage.numel()} elements"
        )
    return torch.as_strided(storage, tuple(size), tuple(stride), storage_offset)


def _int_tuple(value: Any) -> bool:
    return isinstance(value, tuple | list) and all(isinstance(v, int) and not isinstance(v, bool) for v in value)


def _rebuild_parameter(data: Any, requires_grad: Any = False, backward_hooks: Any = None) -> torch.Tensor:
    if not isinstance(data, torch.Tensor):
        raise CheckpointError(f"parameter record holds {type(data).__name__}, not a tensor")
    return data


def _identity(value: Any, *_: Any) -> Any:
    return value


# Everything data.pkl may name besides the archive's own classes and storage types. All of these only build data.
_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("torch.jit._pickle", "build_intlist"): _identity,
    ("torch.jit._pickle", "build_tensorlist"): _identity,
    ("torch.jit._pickle", "build_doublelist"): _identity,
    ("torch.jit._pickle", "build_boollist"): _identity,
    ("torch.jit._pickle", "restore_type_tag"): _identity,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Unpickler for TorchScript ``data.pkl``: tensors, containers and inert ``__torch__`` objects, nothing else."""

    def __init__(self, file: BinaryIO, storages: _StorageReader, path: Path) -> None:
        super().__init__(file)
        self._storages, self._path = storages, path
        self._inert_classes: dict[str, type] = {}

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[module, name]
        if module == "torch" and name in _STORAGE_DTYPES:
            return _StorageType(name, _STORAGE_DTYPES[name])
        if module == "__torch__" or module.startswith("__torch__."):
            return self._inert_class(f"{module}.{name}")
        raise CheckpointError(
            f"refused to load {self._path}: its data.pkl asks for {module}.{name}, which is not a "
            "tensor-rebuilding function. A genuine TorchScript checkpoint never needs that; the file "
            "may be malicious."
        )

    def _inert_class(self, qualname: str) -> type:
        if qualname not in self._inert_classes:
            attrs = {"_clipviz_qualname": qualname, "__module__": __name__}
            self._inert_classes[qualname] = type(qualname.rpartition(".")[2], (_InertObject,), attrs)
        return self._inert_classes[qualname]

    def persistent_load(self, pid: Any) -> torch.Tensor:
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"):
            raise CheckpointError(f"{self._path}: unexpected persistent reference {pid!r:.200} in data.pkl")
        _, storage_type, key, _location, numel = pid
        if not isinstance(storage_type, _StorageType) or not isinstance(key, str) or not isinstance(numel, int):
            raise CheckpointError(f"{self._path}: malformed storage reference {pid!r:.200} in data.pkl")
        return self._storages.get(key, storage_type.dtype, numel)


class _StorageReader:
    """Reads ``<prefix>data/<key>`` records into CPU tensors, one record at a time and each only once."""

    def __init__(
        self,
        zf: zipfile.ZipFile,
        prefix: str,
        byteorder: str,
        path: Path,
        progress: Progress | None = None,
        folder: str = "data",
    ) -> None:
        self._zf, self._prefix, self._path, self._progress = zf, prefix, path, progress
        self._folder = folder
        self._swap = byteorder != sys.byteorder
        self._loaded: dict[str, torch.Tensor] = {}

    def get(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        if key in self._loaded:
            storage = self._loaded[key]
            if storage.dtype != dtype or storage.numel() != numel:
                raise CheckpointError(f"{self._path}: storage {key} is referenced with two different types/sizes")
            return storage
        storage = self._read(key, dtype, numel)
        self._loaded[key] = storage
        return storage

    def _read(self, key: str, dtype: torch.dtype, numel: int) -> torch.Tensor:
        name = f"{self._prefix}{self._folder}/{key}"
        if name not in self._zf.NameToInfo:
            raise CheckpointError(f"{self._path}: storage record {name} is missing from the archive")
        itemsize = torch.empty((), dtype=dtype).element_size()
        nbytes = numel * itemsize
        info = _checked_member(self._zf, name, None, self._path, "a storage record")
        if numel < 0 or info.file_size != nbytes:
            raise CheckpointError(
                f"{self._path}: storage record {name} has {info.file_size:,} bytes but data.pkl declares "
                f"{numel:,} x {dtype} = {nbytes:,} bytes in it: the archive is damaged (or built to make the "
                "reader inflate more than it uses)"
            )
        buffer = torch.empty(nbytes, dtype=torch.uint8)
        try:
            with self._zf.open(info) as f:
                _read_exactly(f, memoryview(buffer.numpy()).cast("B"), name)
        except (zipfile.BadZipFile, EOFError, zlib_error) as e:  # e.g. CRC mismatch, bad deflate data
            raise CheckpointError(f"{self._path}: storage record {name} is corrupt ({e})") from None
        if self._progress is not None:
            self._progress(nbytes)
        if self._swap and itemsize > 1:
            unit = itemsize // 2 if dtype.is_complex else itemsize  # complex numbers: swap each component
            buffer = buffer.view(-1, unit).flip(1).reshape(-1)
        return buffer.view(dtype)


_READ_CHUNK = 8 << 20  # zipfile's readinto reads into a temporary bytes object first: keep that one small


def _read_exactly(f: BinaryIO, out: memoryview, name: str) -> None:
    done = 0
    while done < len(out):
        n = f.readinto(out[done : done + _READ_CHUNK])
        if not n:
            raise CheckpointError(f"storage record {name} ended after {done} of {len(out)} bytes")
        done += n


@dataclass
class _ClassHeader:
    is_module: bool
    parameters: frozenset[str]
    buffers: frozenset[str]
    heads: str | None = None  # what the traced forward divides the width by: "7" or "CONSTANTS.c0"


_CLASS_LINE = re.compile(r"^class\s+(\w+)\s*\(\s*([\w.]*)\s*\)\s*:")
_DECL_LINE = re.compile(r"^\s+(__parameters__|__buffers__)\s*=\s*(\[.*\])\s*$")
# multi_head_attention_forward's `head_dim = embed_dim // num_heads`, as traced by torch 1.7 to 2.x: num_heads is a
# literal or an entry of constants.pkl.
_HEAD_DIM_LINE = re.compile(
    r"^\s+head_dim\w*\s*=\s*(?:torch|ops\.aten)\.(?:div|floor_divide|floordiv)\(\s*embed_dim\w*\s*,\s*"
    r"(CONSTANTS\.c\d+|\d+)\s*[,)]"
)


class _ClassHeaders:
    """Which attributes of each archive class are parameters and buffers, read from the class headers in
    ``code/`` as text (``__parameters__ = [...]``, ``__buffers__ = [...]``); the code itself is never run."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, path: Path) -> None:
        self._zf, self._prefix, self._path = zf, prefix, path
        self._names = set(zf.namelist())
        self._files: dict[str, dict[str, _ClassHeader]] = {}

    def get(self, qualname: str) -> _ClassHeader | None:
        module, _, name = qualname.rpartition(".")
        file = f"{self._prefix}code/{module.replace('.', '/')}.py"
        if file not in self._files:
            self._files[file] = self._parse(file) if file in self._names else {}
        return self._files[file].get(name)

    def _parse(self, file: str) -> dict[str, _ClassHeader]:

        headers: dict[str, _ClassHeader] = {}
        current: str | None = None
        info = _checked_member(self._zf, file, MAX_CODE_BYTES, self._path, "TorchScript code")
        try:
            with self._zf.open(info) as raw:  # line by line: no more than one line is held at a time
                for line in io.TextIOWrapper(raw, encoding="utf-8", errors="replace"):
                    current = self._parse_line(line.rstrip("\r\n"), headers, current)
        except (zipfile.BadZipFile, EOFError, zlib_error) as e:
            raise CheckpointError(f"{self._path}: {file} (TorchScript code) is corrupt ({e})") from None
        return headers

    @staticmethod
    def _parse_line(line: str, headers: dict[str, _ClassHeader], current: str | None) -> str | None:
        """Note what ``line`` declares for the class being read; return the class being read after it."""
        import ast

        if m := _CLASS_LINE.match(line):
            headers[m.group(1)] = _ClassHeader(m.group(2).rpartition(".")[2] == "Module", frozenset(), frozenset())
            return m.group(1)
        if current and (m := _DECL_LINE.match(line)):
            try:
                names = frozenset(ast.literal_eval(m.group(2)))
            except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                return current
            kind = "parameters" if m.group(1) == "__parameters__" else "buffers"
            setattr(headers[current], kind, names)
        elif current and (m := _HEAD_DIM_LINE.match(line)):
            headers[current].heads = headers[current].heads or m.group(1)
        elif line and not line[0].isspace():
            return None
        return current


def _collect_modules(
    root: _InertObject, classes: _ClassHeaders, out: dict[str, torch.Tensor], path: Path
) -> dict[str, _InertObject]:
    """Add each module's parameters, then its buffers, then its submodules' entries to ``out``, as
    ``nn.Module.state_dict`` does for a loaded ScriptModule (attributes in slot order, which is the order the pickle
    records them in); return every module by its prefix without the final dot. Iterative, with a depth limit, so
    that a module tree nested thousands deep gives a clear error instead of exhausting the stack."""
    modules: dict[str, _InertObject] = {}
    stack: list[tuple[_InertObject, str, frozenset[int]]] = [(root, "", frozenset())]
    while stack:
        obj, prefix, ancestors = stack.pop()
        where = prefix[:-1] or "<root>"
        if id(obj) in ancestors:
            raise CheckpointError(f"{path}: the module tree loops back on itself at {where}")
        if len(ancestors) >= MAX_MODULE_DEPTH:
            raise CheckpointError(
                f"{path}: the module tree is nested more than {MAX_MODULE_DEPTH} levels deep (CLIP's is 6); "
                "this is not a model checkpoint"
            )
        state = obj.state
        if not isinstance(state, dict):
            raise CheckpointError(f"{path}: module {where} has no attribute dict in data.pkl")
        modules[prefix[:-1]] = obj
        header = classes.get(type(obj)._clipviz_qualname)
        if header is None:
            header = _guess_header(obj, state, path)
        tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
        for name in (n for n in tensors if n in header.parameters):
            out[prefix + name] = tensors[name].detach()  # detached, as state_dict() returns them
        for name in (n for n in tensors if n in header.buffers):
            out[prefix + name] = tensors[name].detach()
        children = [
            (value, f"{prefix}{name}.", ancestors | {id(obj)})
            for name, value in state.items()
            if isinstance(value, _InertObject) and _is_module(value, classes)
        ]
        stack.extend(reversed(children))  # depth first, in attribute order
    return modules


def _is_module(obj: _InertObject, classes: _ClassHeaders) -> bool:
    header = classes.get(type(obj)._clipviz_qualname)
    return header.is_module if header is not None else isinstance(obj.state, dict)


def _guess_header(obj: _InertObject, state: dict[str, Any], path: Path) -> _ClassHeader:
    """Without a class header, call tensors that require grad parameters and the other tensors buffers."""
    warnings.warn(
        f"{path}: no class header for {type(obj)._clipviz_qualname} in code/; guessing which tensors "
        "are parameters and buffers (key order may differ from torch.jit.load)",
        stacklevel=4,
    )
    tensors = {k: v for k, v in state.items() if isinstance(v, torch.Tensor)}
    return _ClassHeader(
        True,
        frozenset(k for k, v in tensors.items() if v.requires_grad),
        frozenset(k for k, v in tensors.items() if not v.requires_grad),
    )


class _Constants:
    """``constants.pkl``: the tensors a traced ``forward`` refers to as ``CONSTANTS.c<N>``, read only when asked."""

    def __init__(self, zf: zipfile.ZipFile, prefix: str, byteorder: str, path: Path) -> None:
        self._zf, self._prefix, self._byteorder, self._path = zf, prefix, byteorder, path
        self._values: tuple | None = None

    def get(self, index: int) -> Any:
        if self._values is None:
            name = self._prefix + "constants.pkl"
            if name not in self._zf.NameToInfo:
                self._values = ()
            else:
                storages = _StorageReader(self._zf, self._prefix, self._byteorder, self._path, folder="constants")
                values = _unpickle_data(self._zf, name, storages, self._path)
                self._values = tuple(values) if isinstance(values, tuple | list) else ()
        return self._values[index] if index < len(self._values) else None


def _archive_module(
    obj: _InertObject, classes: _ClassHeaders, constants: _Constants, name: str, path: Path
) -> ArchiveModule:
    """The class name of one module and the head count it records, if it records one."""
    qualname = type(obj)._clipviz_qualname
    heads: Any = obj.state.get("num_heads")  # a scripted MultiheadAttention keeps it as an attribute
    header = classes.get(qualname)
    if heads is None and header is not None and header.heads is not None:
        reference = header.heads
        heads = int(reference) if reference.isdigit() else constants.get(int(reference.removeprefix("CONSTANTS.c")))
    if isinstance(heads, torch.Tensor) and heads.numel() == 1 and not heads.is_floating_point():
        heads = int(heads.item())
    if heads is not None and (isinstance(heads, bool) or not isinstance(heads, int) or heads <= 0):
        raise CheckpointError(f"{path}: attention module {name or '<root>'} records {heads!r:.40} heads")
    return ArchiveModule(qualname.rpartition(".")[2], heads)


def _top_level_attributes(root: _InertObject) -> dict[str, Any]:
    """Plain scalar attributes of the top module, plus OpenAI's size attributes when stored as 0-d tensors."""
    attributes: dict[str, Any] = {}
    for name, value in root.state.items():
        if name == "training" or name.startswith("_"):
            continue
        if isinstance(value, bool | int | float | str):
            attributes[name] = value
        elif name in _OPENAI_INFO_ATTRIBUTES and isinstance(value, torch.Tensor) and value.numel() == 1:
            attributes[name] = value.item()
    return attributes


# --------------------------------------------------------------------------------------------------------------
# OpenAI's published checkpoints
# --------------------------------------------------------------------------------------------------------------

OPENAI_BASE_URL = "https://openaipublic.azureedge.net"
BASE_URL_ENV = "CLIPVIZ_OPENAI_BASE_URL"

# From OpenAI's clip/clip.py (_MODELS). The second-to-last path component of each URL is the file's SHA-256.
OPENAI_URLS: dict[str, str] = {
    "RN50": f"{OPENAI_BASE_URL}/clip/models/afeb0e10f9e5a86da6080e35cf09123aca3b358a0c3e3b6c78a7b63bc04b6762/RN50.pt",
    "RN101": f"{OPENAI_BASE_URL}/clip/models/8fa8567bab74a42d41c5915025a8e4538c3bdbe8804a470a72f30b0d94fab599/RN101.pt",
    "RN50x4": f"{OPENAI_BASE_URL}/clip/models/7e526bd135e493cef0776de27d5f42653e6b4c8bf9e0f653bb11773263205fdd/RN50x4.pt",
    "RN50x16": f"{OPENAI_BASE_URL}/clip/models/52378b407f34354e150460fe41077663dd5b39c54cd0bfd2b27167a4a06ec9aa/RN50x16.pt",
    "RN50x64": f"{OPENAI_BASE_URL}/clip/models/be1cfb55d75a9666199fb2206c106743da0f6468c9d327f3e0d0a543a9919d9c/RN50x64.pt",
    "ViT-B/32": f"{OPENAI_BASE_URL}/clip/models/40d365715913c9da98579312b702a82c18be219cc2a73407c4526f58eba950af/ViT-B-32.pt",
    "ViT-B/16": f"{OPENAI_BASE_URL}/clip/models/5806e77cd80f8b59890b7e101eabd078d9fb84e6937f9e85e4ecb61988df416f/ViT-B-16.pt",
    "ViT-L/14": f"{OPENAI_BASE_URL}/clip/models/b8cca3fd41ae0c99ba7e8951adf17d267cdb84cd88be6f7c2e0eca1737a03836/ViT-L-14.pt",
    "ViT-L/14@336px": f"{OPENAI_BASE_URL}/clip/models/3035c92b350959924f9f00213499208652fc7ea050643e8b385c2dac08641f02/ViT-L-14-336px.pt",
}


def default_openai_cache_dir() -> Path:
    """``<HF hub cache>/clipviz-openai``: next to the Hub downloads, so the usual cache tooling finds it."""
    from huggingface_hub import constants

    return Path(constants.HF_HUB_CACHE) / "clipviz-openai"


def openai_checkpoint_url(name: str, base_url: str | None = None, urls: Mapping[str, str] | None = None) -> str:
    """The download URL of OpenAI checkpoint ``name``, with OpenAI's host replaced by ``base_url`` or by the
    ``CLIPVIZ_OPENAI_BASE_URL`` environment variable (for mirrors and tests)."""
    table = OPENAI_URLS if urls is None else urls
    url = table.get(name) or table.get(_canonical_name(name, table))
    if url is None:
        raise ValueError(f"unknown OpenAI CLIP checkpoint {name!r}; valid names: {', '.join(table)}")
    base = base_url or os.getenv(BASE_URL_ENV)
    if base and url.startswith(OPENAI_BASE_URL + "/"):
        url = base.rstrip("/") + url[len(OPENAI_BASE_URL) :]
    return url


def _canonical_name(name: str, table: Mapping[str, str]) -> str:
    """Accept ``vit-b-32`` or ``ViT-L-14-336px`` for ``ViT-B/32`` / ``ViT-L/14@336px``."""

    def key(s: str) -> str:
        return re.sub(r"[/@_-]", "-", s.lower())

    return next((k for k in table if key(k) == key(name)), name)


def download_openai_checkpoint(
    name: str,
    cache_dir: str | os.PathLike | None = None,
    base_url: str | None = None,
    *,
    urls: Mapping[str, str] | None = None,
    timeout: float = 60.0,
) -> Path:
    """Download OpenAI's published checkpoint ``name`` (e.g. ``"ViT-B/32"``) once and return its local path.

    The file goes to ``cache_dir`` (default :func:`default_openai_cache_dir`), is streamed with a progress bar and
    must match the SHA-256 published in its URL: a mismatching download is deleted and raises
    :class:`DownloadError`. A cached file that still matches is returned without any network access.
    """
    url = openai_checkpoint_url(name, base_url, urls)
    expected = url.rstrip("/").split("/")[-2].lower()
    if not re.fullmatch(r"[0-9a-f]{64}", expected):
        raise ValueError(f"URL {url} does not carry a SHA-256 as its second-to-last path component")
    folder = Path(cache_dir) if cache_dir is not None else default_openai_cache_dir()
    target = folder / url.rstrip("/").split("/")[-1]
    if target.is_file():
        if sha256_file(target) == expected:
            return target
        warnings.warn(f"{target} exists but its SHA-256 does not match {expected}; downloading it again", stacklevel=2)
    elif target.exists():
        raise DownloadError(f"{target} exists and is not a regular file; move it away")
    _refuse_if_offline(name, target)
    folder.mkdir(parents=True, exist_ok=True)
    _download(url, target, expected, timeout)
    return target


def _refuse_if_offline(name: str, target: Path) -> None:
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        raise DownloadError(f"OpenAI checkpoint {name!r} is not cached at {target} and HF_HUB_OFFLINE is set")


def sha256_file(path: Path) -> str:
    """SHA-256 of a file, read in 1 MiB blocks (checks a cached download; a model card's record of its source)."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(1 << 20):
            digest.update(chunk)
    return digest.hexdigest()


def _download(url: str, target: Path, expected_sha256: str, timeout: float) -> None:
    """Stream ``url`` into a temporary file next to ``target``, check size and SHA-256, then move it into place."""
    from huggingface_hub.utils import tqdm

    if urllib.parse.urlsplit(url).scheme not in ("http", "https", "file"):
        raise DownloadError(f"refusing to download {url}: only http, https and file URLs are supported")
    partial = target.with_name(f"{target.name}.{os.getpid()}.incomplete")
    digest, received = hashlib.sha256(), 0
    try:
        request = urllib.request.Request(url, headers={"User-Agent": "clipviz"})
        with urllib.request.urlopen(request, timeout=timeout) as response, open(partial, "wb") as out:
            length = response.headers.get("Content-Length")
            total = int(length) if length and length.isdigit() else None
            with tqdm(total=total, unit="B", unit_scale=True, unit_divisor=1024, desc=target.name) as bar:
                while chunk := response.read(1 << 20):
                    out.write(chunk)
                    digest.update(chunk)
                    received += len(chunk)
                    bar.update(len(chunk))
        if total is not None and received != total:
            raise DownloadError(f"download of {url} stopped after {received} of {total} bytes; try again")
        if digest.hexdigest() != expected_sha256:
            raise DownloadError(
                f"downloaded {url} but its SHA-256 is {digest.hexdigest()}, not the published "
                f"{expected_sha256}; the file was deleted. Check the mirror ({BASE_URL_ENV}) or retry."
            )
        os.replace(partial, target)
    except urllib.error.HTTPError as e:
        raise DownloadError(
            f"could not download {url}: HTTP {e.code} {e.reason}. If OpenAI's host no longer serves "
            f"it, point {BASE_URL_ENV} (or base_url=) at a mirror with the same paths."
        ) from None
    except (urllib.error.URLError, TimeoutError, ConnectionError) as e:
        reason = getattr(e, "reason", e)
        raise DownloadError(
            f"could not download {url}: {reason}. Check the network connection, or set "
            f"{BASE_URL_ENV} to a reachable mirror."
        ) from None
    finally:
        partial.unlink(missing_ok=True)
