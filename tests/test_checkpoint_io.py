"""``clipviz.checkpoint_io``: safe checkpoint reading and OpenAI checkpoint download.

The TorchScript reader is checked against ``torch.jit.load(f).state_dict()`` on archives made here by tracing
OpenAI's reference CLIP (tiny sizes, fp32 and OpenAI's fp16 conversion, ViT and ResNet) and by scripting a module
with every awkward case (views, shared storages, many dtypes, non-persistent buffers, None parameters). Only the
tests call ``torch.jit.load``; the library never does.
"""

import ast
import functools
import hashlib
import http.server
import io
import os
import pickle
import socket
import struct
import subprocess
import sys
import threading
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from clipviz import checkpoint_io
from clipviz.checkpoint_io import (
    OPENAI_BASE_URL,
    OPENAI_URLS,
    CheckpointError,
    DownloadError,
    default_openai_cache_dir,
    detect_checkpoint_format,
    download_openai_checkpoint,
    openai_checkpoint_url,
    read_state_dict,
    read_torchscript,
    read_torchscript_state_dict,
)
from clipviz.openai_clip import openai_clip_dir, openai_model_module
from tests.hostile_checkpoints import Payload

REPO_ROOT = Path(__file__).resolve().parents[1]

pytestmark = [
    pytest.mark.filterwarnings("ignore::DeprecationWarning"),  # torch.jit.* are deprecated; the tests need them
    pytest.mark.filterwarnings("ignore::torch.jit.TracerWarning"),
    pytest.mark.filterwarnings("ignore:TypedStorage is deprecated"),
]


# ----------------------------------------------------------------------------------------------------------------
# Archives
# ----------------------------------------------------------------------------------------------------------------


def _openai_vit(fp16: bool):
    torch.manual_seed(0)
    model = openai_model_module().CLIP(32, 32, 2, 64, 16, 77, 1000, 64, 2, 2).eval()
    image = torch.randn(1, 3, 32, 32)
    if fp16:
        openai_model_module().convert_weights(model)
        image = image.half()
    return model, image


def _openai_resnet(fp16: bool):
    """ResNet tower, with OpenAI's published-file extras ``input_resolution``/``context_length``/``vocab_size``
    as 0-d tensor buffers (OpenAI's ``clip.load`` calls ``model.input_resolution.item()``)."""
    torch.manual_seed(1)
    model = openai_model_module().CLIP(32, 64, (1, 1, 1, 1), 16, None, 77, 1000, 64, 2, 2).eval()
    with torch.no_grad():
        for name, buffer in model.named_buffers():  # OpenAI's init leaves BatchNorm statistics at 0/1
            if name.endswith("running_mean"):
                buffer.normal_()
            elif name.endswith("running_var"):
                buffer.uniform_(0.5, 1.5)
    del model.context_length, model.vocab_size
    for name, value in {"input_resolution": 64, "context_length": 77, "vocab_size": 1000}.items():
        model.register_buffer(name, torch.tensor(value))
    image = torch.randn(1, 3, 64, 64)
    if fp16:
        openai_model_module().convert_weights(model)
        image = image.half()
    return model, image


def _trace_and_save(model, image, path: Path) -> Path:
    text = torch.randint(0, 1000, (1, 77))
    with torch.no_grad():
        traced = torch.jit.trace(model, (image, text), check_trace=False)
    torch.jit.save(traced, str(path))
    return path


class _Awkward(nn.Module):
    """Scriptable module covering what a TorchScript archive can hold besides plain contiguous weights."""

    def __init__(self):
        super().__init__()
        big = torch.arange(20, dtype=torch.float32)
        self.register_buffer("big", big)
        self.register_buffer("tail", big[3:])  # storage offset into a shared storage
        self.register_buffer("transposed", big.view(4, 5).t())  # strides
        self.weight = nn.Parameter(torch.randn(3, 2).t())  # non-contiguous parameter
        self.frozen = nn.Parameter(torch.randn(3), requires_grad=False)
        self.register_buffer("hidden", torch.ones(2), persistent=False)  # jit.load keeps it anyway
        self.register_buffer("missing", None)
        for i, dtype in enumerate(
            [
                torch.float64,
                torch.float16,
                torch.bfloat16,
                torch.int64,
                torch.int32,
                torch.int16,
                torch.int8,
                torch.uint8,
                torch.bool,
                torch.complex64,
            ]
        ):
            values = torch.randn(3, 2).mul(50)
            tensor = values.to(dtype) if not dtype.is_complex else torch.complex(values, -values)
            self.register_buffer(f"d{i}", tensor)
        self.register_buffer("scalar", torch.tensor(3.5))
        self.register_buffer("empty", torch.zeros(0, 4))
        self.plain = torch.zeros(5)  # plain tensor attribute: not in the state dict
        self.input_resolution = 224
        self.context_length = 77
        self.name = "awkward"
        self.layers = nn.ModuleList([nn.Linear(2, 2, bias=False), nn.LayerNorm(2)])
        self.heads = nn.ModuleDict({"z": nn.Linear(2, 2), "a": nn.Identity()})

    def forward(self, x):
        for layer in self.layers:
            x = layer(x)
        return self.heads["z"](x) + self.plain.sum() + self.hidden.sum() + self.big.sum() + self.frozen.sum()


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archives")
    made = {
        "vit-fp32": _trace_and_save(*_openai_vit(False), folder / "vit32.pt"),
        "vit-fp16": _trace_and_save(*_openai_vit(True), folder / "vit16.pt"),
        "rn-fp32": _trace_and_save(*_openai_resnet(False), folder / "rn32.pt"),
        "rn-fp16": _trace_and_save(*_openai_resnet(True), folder / "rn16.pt"),
    }
    scripted = folder / "awkward_script.pt"
    torch.jit.save(torch.jit.script(_Awkward().eval()), str(scripted))
    made["awkward-script"] = scripted
    return made


def _expected(path: Path) -> dict[str, torch.Tensor]:
    return torch.jit.load(str(path), map_location="cpu").state_dict()


def _bits(tensor: torch.Tensor) -> torch.Tensor:
    flat = tensor.contiguous().reshape(-1)
    if flat.dtype.is_complex:
        flat = torch.view_as_real(flat).reshape(-1)
    return flat.view(torch.uint8)


def assert_identical(got: dict[str, torch.Tensor], expected: dict[str, torch.Tensor], *, geometry: bool = True):
    assert list(got) == list(expected)
    for key, want in expected.items():
        have = got[key]
        assert have.dtype == want.dtype and have.shape == want.shape, key
        if geometry:
            assert have.stride() == want.stride() and have.storage_offset() == want.storage_offset(), key
        assert torch.equal(_bits(have), _bits(want)), key


def _storage_groups(state_dict):
    groups: dict[int, list[str]] = {}
    for key, tensor in state_dict.items():
        groups.setdefault(tensor.untyped_storage().data_ptr(), []).append(key)
    return sorted(sorted(keys) for keys in groups.values())


# ----------------------------------------------------------------------------------------------------------------
# TorchScript reader
# ----------------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["vit-fp32", "vit-fp16", "rn-fp32", "rn-fp16", "awkward-script"])
def test_torchscript_equals_jit_load(archives, name):
    expected = _expected(archives[name])
    got = read_torchscript_state_dict(archives[name])
    assert_identical(got, expected)
    assert _storage_groups(got) == _storage_groups(expected)
    assert read_state_dict(archives[name]).keys() == expected.keys()


def test_fp16_archive_keeps_openais_mixed_dtypes(archives):
    got = read_state_dict(archives["vit-fp16"])
    assert got["visual.conv1.weight"].dtype == torch.float16
    assert got["visual.ln_pre.weight"].dtype == torch.float32  # convert_weights leaves LayerNorm in fp32


def test_openai_extras_are_buffers_or_attributes(archives):
    rn = read_torchscript(archives["rn-fp16"])
    assert list(rn.state_dict)[:6] == [
        "positional_embedding",
        "text_projection",
        "logit_scale",
        "input_resolution",
        "context_length",
        "vocab_size",
    ]
    assert rn.attributes == {"input_resolution": 64, "context_length": 77, "vocab_size": 1000}
    awkward = read_torchscript(archives["awkward-script"])
    assert awkward.attributes == {"input_resolution": 224, "context_length": 77, "name": "awkward"}
    assert "plain" not in awkward.state_dict and "input_resolution" not in awkward.state_dict
    assert "hidden" in awkward.state_dict  # non-persistent buffers survive TorchScript, as jit.load shows


def test_reader_never_uses_jit_or_torch_load(archives, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("must not be called")

    monkeypatch.setattr(torch.jit, "load", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    assert read_state_dict(archives["vit-fp16"])


def test_detect_format(archives, tmp_path):
    assert detect_checkpoint_format(archives["vit-fp32"]) == "torchscript"
    torch.save({"a": torch.ones(1)}, tmp_path / "sd.pt")
    assert detect_checkpoint_format(tmp_path / "sd.pt") == "torch-zip"
    with pytest.raises(CheckpointError, match="torch.save archive, not TorchScript"):
        read_torchscript_state_dict(tmp_path / "sd.pt")


def _storage_dtypes(data_pkl: bytes) -> dict[str, torch.dtype]:
    """Test-side helper: which dtype each storage record has, from the persistent ids in data.pkl."""

    class Anything:
        def __init__(self, *args, **kwargs):
            pass

        def __setstate__(self, state):
            pass

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            return getattr(torch, name).dtype if module == "torch" and name.endswith("Storage") else Anything

        def persistent_load(self, pid):
            found[pid[2]] = pid[1]

    found: dict[str, torch.dtype] = {}
    Recorder(io.BytesIO(data_pkl)).load()
    return found


def _rewrite_zip(src: Path, dst: Path, change) -> Path:
    """Copy a zip entry by entry; ``change(name, data)`` returns new bytes, or None to drop the entry."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w") as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info))
            if data is not None:
                zout.writestr(info, data)
    return dst


def _swap_bytes(data: bytes, dtype: torch.dtype) -> bytes:
    unit = torch.empty((), dtype=dtype).element_size() // (2 if dtype.is_complex else 1)
    if unit == 1 or not data:
        return data
    return torch.frombuffer(bytearray(data), dtype=torch.uint8).view(-1, unit).flip(1).contiguous().numpy().tobytes()


def test_big_endian_archive(archives, tmp_path):
    src = archives["awkward-script"]
    prefix = zipfile.ZipFile(src).namelist()[0].split("/")[0] + "/"
    dtypes = _storage_dtypes(zipfile.ZipFile(src).read(prefix + "data.pkl"))

    def to_big_endian(name, data):
        if name == prefix + "byteorder":
            return b"big"
        key = name.rpartition("/")[2]
        return _swap_bytes(data, dtypes[key]) if name.startswith(prefix + "data/") else data

    big = _rewrite_zip(src, tmp_path / "big.pt", to_big_endian)
    assert_identical(read_state_dict(big), _expected(src))


def test_archive_without_byteorder_is_little_endian(archives, tmp_path):
    src = archives["vit-fp16"]
    old = _rewrite_zip(src, tmp_path / "old.pt", lambda name, data: None if name.endswith("/byteorder") else data)
    assert_identical(read_state_dict(old), _expected(src))


def _flip_byte_in_member(path: Path, member_suffix: str) -> None:
    """Damage a stored (uncompressed) zip member in place, leaving its recorded CRC as it was."""
    with zipfile.ZipFile(path) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith(member_suffix))
    with open(path, "r+b") as f:
        f.seek(info.header_offset)
        local_header = f.read(30)
        name_len, extra_len = struct.unpack("<HH", local_header[26:30])
        data_start = info.header_offset + 30 + name_len + extra_len
        f.seek(data_start)
        byte = f.read(1)
        f.seek(data_start)
        f.write(bytes([byte[0] ^ 0xFF]))


def test_corrupt_storage_record(archives, tmp_path):
    bad = tmp_path / "bad.pt"
    bad.write_bytes(archives["vit-fp32"].read_bytes())
    _flip_byte_in_member(bad, "/data/0")
    with pytest.raises(CheckpointError, match="corrupt"):
        read_state_dict(bad)


def test_zip_directory_claiming_too_much_data(archives, tmp_path):
    """A central directory entry claiming gigabytes for a small record must not make the reader allocate them."""
    data = bytearray(archives["vit-fp32"].read_bytes())
    with zipfile.ZipFile(archives["vit-fp32"]) as zf:
        name = next(i.filename for i in zf.infolist() if i.filename.endswith("/data/0")).encode()
    entry = data.index(b"PK\x01\x02")
    while data[entry + 46 : entry + 46 + len(name)] != name:
        entry = data.index(b"PK\x01\x02", entry + 4)
    data[entry + 20 : entry + 28] = struct.pack("<II", 2**31, 2**31)
    bad = tmp_path / "huge.pt"
    bad.write_bytes(bytes(data))
    with pytest.raises(CheckpointError, match="claims more data than the archive holds"):
        read_state_dict(bad)


def test_short_storage_record(archives, tmp_path):
    short = _rewrite_zip(
        archives["vit-fp32"], tmp_path / "short.pt", lambda name, data: data[:-4] if name.endswith("/data/0") else data
    )
    with pytest.raises(CheckpointError, match="damaged"):
        read_state_dict(short)


def test_truncated_archive(archives, tmp_path):
    data = archives["vit-fp16"].read_bytes()
    cut = tmp_path / "cut.pt"
    cut.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(cut)


# ----------------------------------------------------------------------------------------------------------------
# Malicious pickles
# ----------------------------------------------------------------------------------------------------------------


def _payload_is_live(tmp_path: Path) -> None:
    """Prove the payload really runs code under a plain unpickler, so the refusals below mean something."""
    probe = tmp_path / "probe_canary"
    pickle.loads(pickle.dumps(Payload(probe)))
    assert probe.exists()


def _evil_torch_save(path: Path, canary: Path, legacy: bool = False) -> Path:
    torch.save({"weight": torch.ones(2), "evil": Payload(canary)}, path, _use_new_zipfile_serialization=not legacy)
    return path


def _evil_torchscript(src: Path, dst: Path, payload: bytes) -> Path:
    return _rewrite_zip(src, dst, lambda name, data: payload if name.endswith("/data.pkl") else data)


@pytest.mark.parametrize("legacy", [False, True], ids=["zip", "legacy"])
def test_malicious_torch_save_is_refused(tmp_path, legacy):
    _payload_is_live(tmp_path)
    canary = tmp_path / "canary"
    evil = _evil_torch_save(tmp_path / "evil.pt", canary, legacy)
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(evil)
    assert not canary.exists()


def test_malicious_torchscript_data_pkl_is_refused(archives, tmp_path):
    _payload_is_live(tmp_path)
    canary = tmp_path / "canary"
    evil = _evil_torchscript(archives["vit-fp32"], tmp_path / "evil.pt", pickle.dumps(Payload(canary), protocol=2))
    with pytest.raises(CheckpointError, match=r"refused.*asks for __builtin__\.exec"):
        read_state_dict(evil)
    assert not canary.exists()


def test_payload_disguised_as_archive_class_stays_inert(archives, tmp_path):
    canary = tmp_path / "canary"
    code = f"open({str(canary)!r}, 'w').close()".encode()
    data_pkl = b"\x80\x02c__torch__.builtins\nexec\nq\x00X" + struct.pack("<I", len(code)) + code + b"\x85R."
    evil = _evil_torchscript(archives["vit-fp32"], tmp_path / "evil.pt", data_pkl)
    with pytest.raises(CheckpointError):
        read_state_dict(evil)
    assert not canary.exists()


def test_payload_nested_in_module_state_is_refused(archives, tmp_path):
    """A payload hidden deep inside a genuine module tree is refused when the unpickler reaches it."""
    canary = tmp_path / "canary"
    src = archives["vit-fp32"]
    prefix = zipfile.ZipFile(src).namelist()[0].split("/")[0] + "/"
    original = zipfile.ZipFile(src).read(prefix + "data.pkl")
    marker = b"X\x08\x00\x00\x00training"
    evil_value = pickle.dumps(Payload(canary), protocol=2)[2:-1]  # the object's opcodes, without PROTO and STOP
    data_pkl = original.replace(marker, b"X\x04\x00\x00\x00evil" + evil_value + marker, 1)
    assert data_pkl != original
    with pytest.raises(CheckpointError, match="refused"):
        read_state_dict(_evil_torchscript(src, tmp_path / "evil.pt", data_pkl))
    assert not canary.exists()


def test_unsafe_env_var_is_refused_in_subprocess(archives, tmp_path):
    canary = tmp_path / "canary"
    evil_plain = _evil_torch_save(tmp_path / "evil.pt", canary)
    evil_script = _evil_torchscript(
        archives["vit-fp32"], tmp_path / "evil_script.pt", pickle.dumps(Payload(canary), protocol=2)
    )
    good_plain = tmp_path / "good.pt"
    torch.save({"w": torch.ones(1)}, good_plain)
    script = """
import sys
from clipviz.checkpoint_io import CheckpointError, read_state_dict
results = []
for path in sys.argv[1:]:
    try:
        read_state_dict(path)
        results.append("loaded")
    except CheckpointError as e:
        results.append("refused:" + ("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD" in str(e) and "env" or "other"))
print(",".join(results))
"""
    env = {**os.environ, "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD": "1", "PYTHONPATH": str(REPO_ROOT)}
    paths = [evil_plain, evil_script, good_plain, archives["vit-fp16"]]
    run = subprocess.run(
        [sys.executable, "-c", script, *map(str, paths)],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        cwd=REPO_ROOT,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip() == "refused:env,refused:other,refused:env,loaded"
    assert not canary.exists()


# ----------------------------------------------------------------------------------------------------------------
# torch.save and safetensors files, and things that are not checkpoints
# ----------------------------------------------------------------------------------------------------------------


@pytest.fixture()
def small_state_dict():
    torch.manual_seed(0)
    return {"a.weight": torch.randn(4, 3), "a.bias": torch.randn(4).half(), "steps": torch.tensor(7)}


@pytest.mark.parametrize("suffix", [".pt", ".bin", ".pth", ""])
def test_torch_save_state_dict(tmp_path, small_state_dict, suffix):
    path = tmp_path / f"model{suffix}"
    torch.save(small_state_dict, path)
    assert_identical(read_state_dict(path), small_state_dict, geometry=False)


def test_legacy_torch_save(tmp_path, small_state_dict):
    path = tmp_path / "legacy.pt"
    torch.save(small_state_dict, path, _use_new_zipfile_serialization=False)
    assert detect_checkpoint_format(path) == "torch-pickle"
    assert_identical(read_state_dict(path), small_state_dict, geometry=False)


@pytest.mark.parametrize("wrapper", ["state_dict", "model"])
def test_wrapped_state_dict_is_unwrapped(tmp_path, small_state_dict, wrapper):
    path = tmp_path / "ckpt.pt"
    torch.save({wrapper: small_state_dict, "epoch": 3}, path)
    assert_identical(read_state_dict(path), small_state_dict, geometry=False)


def test_dict_without_tensors_is_an_error(tmp_path):
    path = tmp_path / "notes.pt"
    torch.save({"epoch": 3, "lr": 0.1}, path)
    with pytest.raises(CheckpointError, match="not a state dict"):
        read_state_dict(path)


@pytest.mark.parametrize("name", ["model.safetensors", "model.bin"])
def test_safetensors(tmp_path, small_state_dict, name):
    path = tmp_path / name
    save_file(small_state_dict, path)
    got = read_state_dict(path)
    assert_identical(dict(sorted(got.items())), dict(sorted(small_state_dict.items())), geometry=False)


def _raw_safetensors(path: Path, header: bytes, data: bytes = b"", header_len: int | None = None) -> Path:
    path.write_bytes(struct.pack("<Q", len(header) if header_len is None else header_len) + header + data)
    return path


def test_safetensors_header_longer_than_file(tmp_path):
    path = _raw_safetensors(tmp_path / "x.safetensors", b"{}", header_len=10**6)
    with pytest.raises(CheckpointError, match=r"x\.safetensors.*header length 1000000 is larger than"):
        read_state_dict(path)


def test_safetensors_bad_json(tmp_path):
    path = _raw_safetensors(tmp_path / "x.safetensors", b'{"a": [1, 2')
    with pytest.raises(CheckpointError, match="not valid JSON"):
        read_state_dict(path)


def test_safetensors_truncated_data(tmp_path, small_state_dict):
    path = tmp_path / "x.safetensors"
    save_file(small_state_dict, path)
    path.write_bytes(path.read_bytes()[:-10])
    with pytest.raises(CheckpointError, match="is truncated: tensor"):
        read_state_dict(path)


def test_safetensors_inconsistent_entry(tmp_path):
    header = b'{"w": {"dtype": "F32", "shape": [2, 2], "data_offsets": [0, 12]}}'
    path = _raw_safetensors(tmp_path / "x.safetensors", header, b"\0" * 12)
    with pytest.raises(CheckpointError, match="needs 16 bytes"):
        read_state_dict(path)


@pytest.mark.parametrize(
    ("content", "message"),
    [
        (b"\x89PNG\r\n\x1a\n" + b"\0" * 64, "PNG image"),
        (b"just some notes\nnot a model\n", "text file"),
        (b"<!DOCTYPE html><html><body>404</body></html>", "HTML page"),
        (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\n", "Git LFS pointer"),
        (b"\x00\x01\x02\x03\xfe\xff\xfa", "unknown binary format"),
        (b"", "empty"),
    ],
)
def test_not_a_checkpoint(tmp_path, content, message):
    path = tmp_path / "model.pt"
    path.write_bytes(content)
    with pytest.raises(CheckpointError, match=message):
        read_state_dict(path)


def test_png_named_safetensors(tmp_path):
    path = tmp_path / "model.safetensors"
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + b"\0" * 64)
    with pytest.raises(CheckpointError, match=r"model\.safetensors is not a checkpoint: it looks like a PNG image"):
        read_state_dict(path)


def test_missing_file_and_directory(tmp_path):
    with pytest.raises(CheckpointError, match="does not exist"):
        read_state_dict(tmp_path / "nope.pt")
    with pytest.raises(CheckpointError, match="is a directory"):
        read_state_dict(tmp_path)


def test_zip_that_is_not_a_checkpoint(tmp_path):
    path = tmp_path / "model.pt"
    with zipfile.ZipFile(path, "w") as zf:
        zf.writestr("readme.txt", "hello")
    with pytest.raises(CheckpointError, match="not a PyTorch checkpoint"):
        read_state_dict(path)


def test_truncated_torch_save_zip(tmp_path, small_state_dict):
    path = tmp_path / "model.pt"
    torch.save(small_state_dict, path)
    path.write_bytes(path.read_bytes()[:-100])
    with pytest.raises(CheckpointError, match="truncated"):
        read_state_dict(path)


# ----------------------------------------------------------------------------------------------------------------
# OpenAI checkpoint download
# ----------------------------------------------------------------------------------------------------------------


def _openai_models_table() -> dict[str, str]:
    """``_MODELS`` from OpenAI's clip/clip.py, read as text (importing it needs torchvision)."""
    tree = ast.parse((openai_clip_dir() / "clip.py").read_text())
    for node in tree.body:
        if isinstance(node, ast.Assign) and any(getattr(t, "id", None) == "_MODELS" for t in node.targets):
            return ast.literal_eval(node.value)
    raise AssertionError("_MODELS not found in clip.py")


def test_url_table_is_openais():
    assert OPENAI_URLS == _openai_models_table()
    assert len(OPENAI_URLS) == 9


def test_url_lookup_and_base_url(monkeypatch):
    monkeypatch.delenv(checkpoint_io.BASE_URL_ENV, raising=False)
    assert openai_checkpoint_url("ViT-B/32") == OPENAI_URLS["ViT-B/32"]
    assert openai_checkpoint_url("vit-l-14-336px") == OPENAI_URLS["ViT-L/14@336px"]
    mirrored = openai_checkpoint_url("RN50", base_url="http://mirror.local/x/")
    assert mirrored == OPENAI_URLS["RN50"].replace(OPENAI_BASE_URL, "http://mirror.local/x")
    monkeypatch.setenv(checkpoint_io.BASE_URL_ENV, "http://env.mirror")
    assert openai_checkpoint_url("RN50").startswith("http://env.mirror/clip/models/")
    with pytest.raises(ValueError, match=r"unknown OpenAI CLIP checkpoint 'ViT-H/14'.*RN50.*ViT-L/14@336px"):
        openai_checkpoint_url("ViT-H/14")


def test_default_cache_dir_is_in_hf_cache():
    from huggingface_hub import constants

    assert default_openai_cache_dir() == Path(constants.HF_HUB_CACHE) / "clipviz-openai"


class _Server:
    def __init__(self, root: Path):
        self.requests: list[str] = []
        requests = self.requests

        class Handler(http.server.SimpleHTTPRequestHandler):
            def do_GET(self):
                requests.append(self.path)
                super().do_GET()

            def log_message(self, *args):
                pass

        self.httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), functools.partial(Handler, directory=str(root)))
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self):
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture()
def fake_openai(tmp_path, monkeypatch):
    """A local server with one published-looking file, and a URL table naming it."""
    monkeypatch.delenv(checkpoint_io.BASE_URL_ENV, raising=False)
    payload = os.urandom(3 * 1024 * 1024 + 7)
    sha = hashlib.sha256(payload).hexdigest()
    for folder in (sha, "0" * 64):  # the second one is served under a SHA-256 it does not have
        served = tmp_path / "served" / "clip" / "models" / folder
        served.mkdir(parents=True)
        (served / "Fake-B-32.pt").write_bytes(payload)
    server = _Server(tmp_path / "served")
    urls = {
        "Fake-B/32": f"{OPENAI_BASE_URL}/clip/models/{sha}/Fake-B-32.pt",
        "Wrong": f"{OPENAI_BASE_URL}/clip/models/{'0' * 64}/Fake-B-32.pt",
        "Gone": f"{OPENAI_BASE_URL}/clip/models/{sha}/missing.pt",
    }
    yield server, urls, payload
    server.close()


def test_download_verify_and_cache(fake_openai, tmp_path):
    server, urls, payload = fake_openai
    cache = tmp_path / "cache"
    path = download_openai_checkpoint("Fake-B/32", cache_dir=cache, base_url=server.url, urls=urls)
    assert path == cache / "Fake-B-32.pt" and path.read_bytes() == payload
    assert len(server.requests) == 1
    again = download_openai_checkpoint("Fake-B/32", cache_dir=cache, base_url=server.url, urls=urls)
    assert again == path and len(server.requests) == 1  # cached and valid: no request
    assert sorted(p.name for p in cache.iterdir()) == ["Fake-B-32.pt"]


def test_download_uses_env_base_url(fake_openai, tmp_path, monkeypatch):
    server, urls, payload = fake_openai
    monkeypatch.setenv(checkpoint_io.BASE_URL_ENV, server.url)
    path = download_openai_checkpoint("Fake-B/32", cache_dir=tmp_path / "cache", urls=urls)
    assert path.read_bytes() == payload


def test_damaged_cache_is_downloaded_again(fake_openai, tmp_path):
    server, urls, payload = fake_openai
    cache = tmp_path / "cache"
    cache.mkdir()
    (cache / "Fake-B-32.pt").write_bytes(b"half a file")
    with pytest.warns(UserWarning, match="does not match"):
        path = download_openai_checkpoint("Fake-B/32", cache_dir=cache, base_url=server.url, urls=urls)
    assert path.read_bytes() == payload and len(server.requests) == 1


def test_checksum_mismatch_deletes_download(fake_openai, tmp_path):
    server, urls, _ = fake_openai
    cache = tmp_path / "cache"
    with pytest.raises(DownloadError, match="SHA-256 is .* not the published 0000"):
        download_openai_checkpoint("Wrong", cache_dir=cache, base_url=server.url, urls=urls)
    assert list(cache.iterdir()) == []


def test_http_error(fake_openai, tmp_path):
    server, urls, _ = fake_openai
    with pytest.raises(DownloadError, match="HTTP 404"):
        download_openai_checkpoint("Gone", cache_dir=tmp_path / "cache", base_url=server.url, urls=urls)
    assert list((tmp_path / "cache").iterdir()) == []


def test_network_failure(fake_openai, tmp_path):
    _, urls, _ = fake_openai
    with socket.socket() as s:  # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    with pytest.raises(DownloadError, match=f"could not download http://127.0.0.1:{port}/.*Connection refused"):
        download_openai_checkpoint(
            "Fake-B/32", cache_dir=tmp_path / "cache", base_url=f"http://127.0.0.1:{port}", urls=urls, timeout=5
        )


def test_offline_mode(fake_openai, tmp_path, monkeypatch):
    server, urls, _ = fake_openai
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(DownloadError, match="HF_HUB_OFFLINE"):
        download_openai_checkpoint("Fake-B/32", cache_dir=tmp_path / "cache", base_url=server.url, urls=urls)
    assert server.requests == []


def test_unknown_name(tmp_path):
    with pytest.raises(ValueError, match="valid names: RN50, RN101"):
        download_openai_checkpoint("RN18", cache_dir=tmp_path)
