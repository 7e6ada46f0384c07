"""Small hostile checkpoints for the hardening tests, written opcode by opcode (a Python pickler would recurse on
deep trees and could not name the archive's ``__torch__`` classes).

An archive is TorchScript-shaped: ``<name>/data.pkl`` (a tree of ``__torch__.m.Block`` modules holding tensors),
``<name>/code/__torch__/m.py`` (the class header saying which attributes are parameters), ``<name>/byteorder`` and
one ``<name>/data/<key>`` record per storage. Members can be written compressed and streamed, so a member that
inflates to many megabytes costs the test a few kilobytes on disk and no large object in memory.
"""

from __future__ import annotations

import struct
import zipfile
from dataclasses import dataclass, field
from pathlib import Path

CLASS = "__torch__.m.Block"


class Payload:
    """A malicious pickle object: unpickling it runs code that creates the ``canary`` file (the tests assert the
    file never appears)."""

    def __init__(self, canary: Path):
        self.canary = canary

    def __reduce__(self):
        return exec, (f"open({str(self.canary)!r}, 'w').close()",)


CODE = "class Block(Module):\n  __parameters__ = [{names}]\n  __buffers__ = []\n  training : bool\n"


@dataclass
class Tensor:
    """A float32 tensor record: a view of storage `key` (holding `numel` floats) at `offset` with `size`/`stride`."""

    key: str
    numel: int
    size: tuple[int, ...]
    stride: tuple[int, ...]
    offset: int = 0


@dataclass
class Module:
    tensors: dict[str, Tensor] = field(default_factory=dict)
    children: dict[str, Module] = field(default_factory=dict)


def _str(text: str) -> bytes:
    raw = text.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw  # BINUNICODE


def _int(value: int) -> bytes:
    return b"J" + struct.pack("<i", value)  # BININT


def _global(module: str, name: str) -> bytes:
    return b"c" + f"{module}\n{name}\n".encode()


def _tuple(items: list[bytes]) -> bytes:
    return b"(" + b"".join(items) + b"t"  # MARK ... TUPLE


def _tensor(t: Tensor) -> bytes:
    storage = _tuple([_str("storage"), _global("torch", "FloatStorage"), _str(t.key), _str("cpu"), _int(t.numel)])
    args = [
        storage + b"Q",  # BINPERSID
        _int(t.offset),
        _tuple([_int(n) for n in t.size]),
        _tuple([_int(n) for n in t.stride]),
        b"\x89",  # NEWFALSE: requires_grad
        _global("collections", "OrderedDict") + b")R",  # OrderedDict(): backward hooks
    ]
    return _global("torch._utils", "_rebuild_tensor_v2") + _tuple(args) + b"R"


def _module_open() -> bytes:
    """A module object and its state dict under construction: `Block()`, then `{` with `training: False`."""
    module, qualname = CLASS.rsplit(".", 1)
    return _global(module, qualname) + b")R" + b"}" + _str("training") + b"\x89s"


def module_pickle(root: Module) -> bytes:
    """data.pkl of a module tree (recursion only over `children`, which the hostile trees keep shallow)."""

    def emit(module: Module) -> bytes:
        body = [_str(name) + _tensor(t) + b"s" for name, t in module.tensors.items()]
        body += [_str(name) + emit(child) + b"s" for name, child in module.children.items()]
        return _module_open() + b"".join(body) + b"b"  # SETITEM each, then BUILD

    return b"\x80\x02" + emit(root) + b"."


def nested_pickle(depth: int) -> bytes:
    """data.pkl of `depth` modules, each the only child `m` of the one before: built without recursion."""
    return b"\x80\x02" + (_module_open() + _str("m")) * depth + _module_open() + b"b" + b"sb" * depth + b"."


def write_archive(
    path: Path,
    data_pkl: bytes | tuple[bytes, int],
    storages: dict[str, int | bytes],
    *,
    parameters: tuple[str, ...] = ("weight",),
    byteorder: bytes = b"little",
    code_padding: int = 0,
    compressed: tuple[str, ...] = (),
    extra: dict[str, bytes | int] | None = None,
) -> Path:
    """A TorchScript-shaped zip. `storages` maps a key to its bytes, or to a length of zero bytes that is streamed
    (never held in memory). Members whose name (relative to the archive folder) is in `compressed` are deflated;
    `code_padding` appends that many bytes of comment lines to the class file; `extra` adds members."""
    prefix = "archive/"
    code = CODE.format(names=", ".join(f'"{name}"' for name in parameters)).encode()
    members: dict[str, bytes | int | tuple] = {"data.pkl": data_pkl, "byteorder": byteorder, "version": b"1\n"}
    members.update(extra or {})
    members["code/__torch__/m.py"] = code
    for key, content in storages.items():
        members[f"data/{key}"] = content
    with zipfile.ZipFile(path, "w") as zf:
        for name, content in members.items():
            kind = zipfile.ZIP_DEFLATED if name in compressed else zipfile.ZIP_STORED
            info = zipfile.ZipInfo(prefix + name)
            info.compress_type = kind
            with zf.open(info, "w", force_zip64=True) as f:
                _stream(f, content)
                if name.startswith("code/") and code_padding:
                    _stream(f, code_padding, fill=b"#" * 63 + b"\n")
    return path


def _stream(f, content: bytes | int | tuple[bytes, int], fill: bytes = b"\0" * 64) -> None:
    """Write bytes, or that many zero bytes, or bytes followed by that many zero bytes."""
    if isinstance(content, tuple):
        f.write(content[0])
        content = content[1]
    if isinstance(content, bytes):
        f.write(content)
        return
    chunk = fill * (1 << 14)  # 1 MiB
    left = content
    while left > 0:
        f.write(chunk[:left])
        left -= len(chunk)


def weight_archive(path: Path, tensor: Tensor, **kwargs) -> Path:
    """One module holding one parameter `weight`, with its storage written as zeros of the declared size."""
    storages = kwargs.pop("storages", {tensor.key: tensor.numel * 4})
    return write_archive(path, module_pickle(Module({"weight": tensor})), storages, **kwargs)
