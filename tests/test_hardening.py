"""Hostile and careless inputs to the converter, the config and the model: each gets a clear error, never a
traceback, never a half-written or destroyed folder, and memory bounded by what the checkpoint declares.

Every hostile file is built here, small, by ``tests/hostile_checkpoints.py``."""

import math
import re
import struct
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch

from clipviz import checkpoint_io
from clipviz.checkpoint_io import CheckpointError, read_state_dict
from configuration_clipviz import CLIPVizConfig
from tests import hostile_checkpoints as hostile
from tests.conftest import TINY_TEXT, TINY_VISION, pixels, tiny_config, tiny_model, token_ids

# ---- config values that can only produce NaN/inf are refused when the config is built ----


@pytest.mark.parametrize("value", [0, -1e-5, 0.0, math.inf, math.nan, True, "1e-5"])
@pytest.mark.parametrize("tower", ["text_config", "vision_config"])
def test_layer_norm_eps_must_be_positive_and_finite(tower, value):
    configs = {"text_config": dict(TINY_TEXT), "vision_config": dict(TINY_VISION["vit"])}
    configs[tower]["layer_norm_eps"] = value
    with pytest.raises(ValueError, match="`layer_norm_eps` must be a finite number above 0"):
        CLIPVizConfig(**configs, projection_dim=32)


@pytest.mark.parametrize("field", ["logit_scale_init_value", "initializer_factor"])
@pytest.mark.parametrize("value", [math.inf, -math.inf, math.nan])
def test_non_finite_top_level_values_are_refused(field, value):
    with pytest.raises(ValueError, match=f"`{field}` must be a finite number"):
        tiny_config("vit", **{field: value})


def test_valid_epsilon_still_builds():
    config = tiny_config("vit")
    config.text_config.layer_norm_eps = 1e-6
    config.text_config.validate_architecture()


# ---- the model: empty texts, explain() on a wrong-size image ----


def test_zero_length_input_ids_get_a_clear_error():
    model = tiny_model("vit")
    empty = torch.zeros(2, 0, dtype=torch.long)
    with pytest.raises(ValueError, match="no tokens"):
        model.get_text_features(empty)
    with pytest.raises(ValueError, match="no tokens"):
        model(input_ids=empty, pixel_values=pixels(1, 32))


def test_explain_wrong_image_size_suggests_resizing_only():
    model = tiny_model("vit")
    with pytest.raises(ValueError, match="image processor") as error:
        model.explain(pixels(1, 48), token_ids(1))
    assert "interpolate_pos_encoding" not in str(error.value)
    with pytest.raises(ValueError, match="interpolate_pos_encoding=True"):  # forward() does accept it
        model(input_ids=token_ids(1), pixel_values=pixels(1, 48))


# ---- decompression bombs: every member is checked against its zip entry before a byte is inflated ----


def _refused_cheaply(path: Path, match: str, python_peak: int = 4 << 20) -> None:
    """Reading `path` raises CheckpointError matching `match`, and Python-side memory (zip buffers, pickles, code
    text) stays below `python_peak` bytes: the member was refused before it was inflated."""
    tracemalloc.start()
    try:
        with pytest.raises(CheckpointError, match=match):
            read_state_dict(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < python_peak, f"{peak:,} bytes of Python memory while refusing {path.name}"


WEIGHT = hostile.Tensor("0", 6, (2, 3), (3, 1))


def test_deflated_storage_record_beyond_the_ratio_limit(tmp_path):
    numel = 4 << 20  # 16 MiB of zeros deflate to ~16 KiB
    archive = hostile.weight_archive(
        tmp_path / "bomb.pt", hostile.Tensor("0", numel, (numel,), (1,)), compressed=("data/0",)
    )
    assert archive.stat().st_size < 100_000
    _refused_cheaply(archive, f"compression ratio above the {checkpoint_io.MAX_COMPRESSION_RATIO}:1")


def test_storage_record_larger_than_its_declared_use(tmp_path):
    archive = hostile.weight_archive(tmp_path / "big.pt", WEIGHT, storages={"0": 2 << 20})
    _refused_cheaply(archive, "data.pkl declares 6 x torch.float32 = 24 bytes")


def test_huge_code_member(tmp_path):
    archive = hostile.weight_archive(
        tmp_path / "code.pt", WEIGHT, code_padding=checkpoint_io.MAX_CODE_BYTES, compressed=("code/__torch__/m.py",)
    )
    _refused_cheaply(archive, r"code/__torch__/m.py \(TorchScript code\) declares 16,777,3\d\d bytes")


def test_code_member_with_a_bomb_ratio(tmp_path):
    archive = hostile.weight_archive(
        tmp_path / "code.pt", WEIGHT, code_padding=4 << 20, compressed=("code/__torch__/m.py",)
    )
    _refused_cheaply(archive, "compression ratio")


def test_huge_byteorder(tmp_path):
    archive = hostile.weight_archive(
        tmp_path / "order.pt", WEIGHT, byteorder=b"little" + b" " * (8 << 20), compressed=("byteorder",)
    )
    _refused_cheaply(archive, "byteorder .the byte order. declares 8,388,614 bytes, more than the 16")


def test_data_pkl_with_a_huge_binbytes8(tmp_path):
    size = checkpoint_io.MAX_PICKLE_BYTES  # stands for the attack's 1 GiB: anything above the limit is refused
    opcode = b"\x80\x02\x8e" + struct.pack("<Q", size)
    archive = hostile.write_archive(tmp_path / "pkl.pt", (opcode, size), {}, compressed=("data.pkl",))
    assert archive.stat().st_size < 1 << 20
    _refused_cheaply(archive, "data.pkl .the pickled module tree. declares")


def test_data_pkl_announcing_more_bytes_than_it_holds(tmp_path):
    forged = b"\x80\x02\x8e" + struct.pack("<Q", 1 << 30) + b"x" * 100 + b"."
    archive = hostile.write_archive(tmp_path / "pkl.pt", forged, {})
    _refused_cheaply(archive, "expected 1073741824 bytes in a bytes8, but only 101 remain")


def test_members_not_needed_are_never_inflated(tmp_path, monkeypatch):
    bomb = {"constants.pkl": 32 << 20, "extra/unused.bin": 32 << 20}
    archive = hostile.weight_archive(tmp_path / "ok.pt", WEIGHT, extra=bomb, compressed=tuple(bomb))
    opened = []
    original = zipfile.ZipFile.open

    def spy(self, name, *args, **kwargs):
        opened.append(getattr(name, "filename", name))
        return original(self, name, *args, **kwargs)

    monkeypatch.setattr(zipfile.ZipFile, "open", spy)
    state_dict = read_state_dict(archive)
    assert list(state_dict) == ["weight"]
    assert sorted(opened) == sorted(f"archive/{n}" for n in ("byteorder", "data.pkl", "data/0", "code/__torch__/m.py"))


def test_reading_a_storage_does_not_copy_it_whole_in_python(tmp_path):
    numel = 8 << 20  # 32 MiB, stored as torch.jit.save stores it
    archive = hostile.weight_archive(tmp_path / "big.pt", hostile.Tensor("0", numel, (numel,), (1,)))
    tracemalloc.start()
    try:
        assert read_state_dict(archive)["weight"].shape == (numel,)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 10 << 20  # the 8 MiB read chunk, not the 32 MiB record


def test_compressed_torch_save_archive_is_refused(tmp_path):
    plain = tmp_path / "plain.pt"
    torch.save({"weight": torch.zeros(1 << 20)}, plain)
    deflated = tmp_path / "deflated.pt"
    with zipfile.ZipFile(plain) as src, zipfile.ZipFile(deflated, "w", zipfile.ZIP_DEFLATED) as dst:
        for info in src.infolist():
            dst.writestr(info.filename, src.read(info))
    assert read_state_dict(plain)["weight"].shape == (1 << 20,)
    _refused_cheaply(deflated, "members of this torch.save archive are compressed")


def test_module_tree_nested_thousands_deep(tmp_path):
    archive = hostile.write_archive(tmp_path / "deep.pt", hostile.nested_pickle(5000), {})
    _refused_cheaply(archive, "nested more than 256 levels deep", python_peak=64 << 20)
    shallow = hostile.write_archive(tmp_path / "shallow.pt", hostile.nested_pickle(20), {})
    assert read_state_dict(shallow) == {}


# ---- views bigger than their storage ----


@pytest.mark.parametrize(
    "size, stride",
    [((4_000_000, 64), (0, 1)), ((8, 64), (1, 1)), ((64, 8), (1, 4))],
    ids=["stride-0", "overlapping-rows", "overlapping-columns"],
)
def test_torchscript_view_repeating_its_storage(tmp_path, size, stride):
    archive = hostile.weight_archive(tmp_path / "view.pt", hostile.Tensor("0", 64 * 8, size, stride))
    _refused_cheaply(archive, f"tensor 'weight' of shape {re.escape(str(size))} has strides")


def test_torch_save_expanded_row(tmp_path):
    path = tmp_path / "expanded.pt"
    row = torch.randn(1, 64)
    torch.save({"ln_final.weight": torch.ones(64), "token_embedding.weight": row.expand(4_000_000, 64)}, path)
    assert path.stat().st_size < 10_000
    _refused_cheaply(path, r"'token_embedding.weight' of shape \(4000000, 64\) has strides \(0, 1\)")


def test_ordinary_views_are_accepted(tmp_path):
    base = torch.randn(6, 4)
    path = tmp_path / "views.pt"
    torch.save({"t": base.t(), "row": base[2], "column": base[:, 1], "one": base[:1].expand(1, 4)}, path)
    state_dict = read_state_dict(path)
    assert torch.equal(state_dict["t"], base.t()) and torch.equal(state_dict["column"], base[:, 1])
    transposed = hostile.weight_archive(tmp_path / "t.pt", hostile.Tensor("0", 6, (3, 2), (1, 3)))
    assert read_state_dict(transposed)["weight"].shape == (3, 2)
