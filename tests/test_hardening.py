"""Hostile and careless inputs to the converter, the config and the model: each gets a clear error, never a
traceback, never a half-written or destroyed folder, and memory bounded by what the checkpoint declares.

Every hostile file is built here, small, by ``tests/hostile_checkpoints.py``."""

import json
import math
import os
import re
import struct
import subprocess
import sys
import tracemalloc
import zipfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file
from transformers import AutoModel

from clipviz import checkpoint_io, hub_repo, model_card, verify
from clipviz.checkpoint_io import CheckpointError, read_state_dict
from clipviz.sources import SourceError, load_source
from configuration_clipviz import CLIPVizConfig
from modeling_clipviz import CLIPVizModel
from tests import hostile_checkpoints as hostile
from tests.convert_fixtures import HEAD_FLAGS, make_archive_from_config, tiny_openai_config
from tests.helpers import TINY_TEXT, TINY_VISION, pixels, tiny_config, tiny_model, token_ids
from tests.openai_reference import randomized_openai_clip

REPO_ROOT = Path(__file__).resolve().parent.parent

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
    """Small but valid epsilons are kept as given, reach the LayerNorms, and the model runs finite."""
    text, vision = {**TINY_TEXT, "layer_norm_eps": 1e-6}, {**TINY_VISION["vit"], "layer_norm_eps": 1e-12}
    config = CLIPVizConfig(text_config=text, vision_config=vision, projection_dim=32)
    assert config.text_config.layer_norm_eps == 1e-6 and config.vision_config.layer_norm_eps == 1e-12
    config.text_config.validate_architecture()
    model = CLIPVizModel(config).eval()
    assert model.text_model.ln_final.eps == 1e-6 and model.vision_model.ln_post.eps == 1e-12
    with torch.no_grad():
        out = model(input_ids=token_ids(2), pixel_values=pixels(1, config.vision_config.image_size))
    assert out.logits_per_image.shape == (1, 2) and torch.isfinite(out.logits_per_image).all()


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


# ---- --overwrite never destroys what the converter did not write ----


def _previous_conversion(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps({"model_type": "clipviz"}))
    for name in ("model.safetensors", "README.md", "modeling_clipviz.py", "tokenizer.json"):
        (folder / name).write_text("old")
    return folder


def test_overwrite_refuses_a_folder_holding_the_source(tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "src.pt").write_bytes(b"weights")
    (out / "notes.txt").write_text("mine")
    with pytest.raises(hub_repo.OutputFolderError, match="src.pt lies inside --output-dir"):
        hub_repo.check_output_dir(out, overwrite=True, inputs=[out / "src.pt"])
    with pytest.raises(hub_repo.OutputFolderError, match="does not hold a previous clipviz conversion"):
        with hub_repo.staged_folder(out, overwrite=True):
            pytest.fail("the conversion must not start")
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "src.pt"]


def test_overwrite_refuses_a_conversion_with_foreign_files(tmp_path):
    out = _previous_conversion(tmp_path / "out")
    (out / "notes.txt").write_text("mine")
    (out / "runs").mkdir()
    with pytest.raises(
        hub_repo.OutputFolderError, match=r"also 2 entries a conversion does not write \(notes.txt, runs"
    ):
        hub_repo.check_output_dir(out, overwrite=True)
    assert (out / "notes.txt").read_text() == "mine"


def test_overwrite_refuses_files_added_while_converting(tmp_path):
    out = _previous_conversion(tmp_path / "out")
    with pytest.raises(hub_repo.OutputFolderError, match="notes.txt"):
        with hub_repo.staged_folder(out, overwrite=True) as staging:
            (staging / "config.json").write_text(json.dumps({"model_type": "clipviz"}))
            (out / "notes.txt").write_text("written meanwhile")
    assert (out / "notes.txt").read_text() == "written meanwhile" and (out / "README.md").read_text() == "old"


def test_overwrite_replaces_a_previous_conversion(tmp_path):
    out = _previous_conversion(tmp_path / "out")
    with hub_repo.staged_folder(out, overwrite=True) as staging:
        (staging / "config.json").write_text(json.dumps({"model_type": "clipviz"}))
    assert [p.name for p in out.iterdir()] == ["config.json"]


# ---- output folders that cannot be created ----


def test_output_parent_is_a_file(tmp_path):
    (tmp_path / "file").write_text("x")
    with pytest.raises(hub_repo.OutputFolderError, match="file is a file, not a folder"):
        hub_repo.check_output_dir(tmp_path / "file" / "deeper" / "out", overwrite=False)


def test_output_parent_not_writable(tmp_path, monkeypatch):
    # tests may run as root, for whom chmod does not forbid anything: the check asks os.access, so ask it to say no
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != tmp_path)
    with pytest.raises(hub_repo.OutputFolderError, match="no permission to write in"):
        hub_repo.check_output_dir(tmp_path / "out", overwrite=False)


def test_output_folder_creation_failing_late_is_a_clear_error(tmp_path, monkeypatch):
    def refuse(self, *args, **kwargs):
        raise PermissionError(13, "Permission denied", str(self))

    monkeypatch.setattr(Path, "mkdir", refuse)
    with pytest.raises(hub_repo.OutputFolderError, match="cannot create --output-dir .*Permission denied"):
        with hub_repo.staged_folder(tmp_path / "out", overwrite=False):
            pass


@pytest.mark.parametrize("text", ["100B", "999", "0.5KB", "0", "0.0005MB"])
def test_shard_size_below_1kb_is_refused(text):
    with pytest.raises(ValueError, match="at least 1KB"):
        hub_repo.parse_size(text)


def test_shard_size_of_1kb_and_more():
    assert hub_repo.parse_size("1KB") == 1000 and hub_repo.parse_size("2GiB") == 2 << 30


# ---- open_clip configs that cannot describe a model ----


@pytest.mark.parametrize(
    "config, message",
    [
        ({"model_cfg": {"vision_cfg": {"head_width": 0}}}, "`head_width` must be a positive integer, got 0"),
        ({"model_cfg": {"vision_cfg": {"width": 100, "head_width": 64}}}, "width 100 is not a multiple"),
        ({"model_cfg": {"text_cfg": {"heads": "8"}}}, "`heads` must be a positive integer"),
        ({"model_cfg": [1, 2]}, "`model_cfg` must be a JSON object, got list"),
        ({"model_cfg": {"vision_cfg": "ViT-B-32"}}, "`vision_cfg` must be a JSON object, got str"),
        ([1], "holds a JSON list, not an object"),
    ],
    ids=["head-width-0", "indivisible", "heads-str", "model-cfg-list", "vision-cfg-str", "top-level-list"],
)
def test_bad_open_clip_config(tmp_path, config, message):
    (tmp_path / "open_clip_config.json").write_text(json.dumps(config))
    torch.save({"logit_scale": torch.tensor(1.0)}, tmp_path / "open_clip_pytorch_model.bin")
    with pytest.raises(SourceError, match=message):
        load_source(str(tmp_path))


# ---- head counts and activations a TorchScript archive records ----


def test_archive_records_heads_and_activation(tmp_path):
    config = tiny_openai_config("vit")
    config.text_config.num_attention_heads = 2  # not OpenAI's width // 64 (= 1 at width 64)
    archive = make_archive_from_config(tmp_path / "two-heads.pt", config)
    source = load_source(str(archive))
    assert (source.text_heads, source.vision_heads) == (2, 4)
    assert source.hidden_act == {"text": "quick_gelu", "vision": "quick_gelu"}


def test_flag_contradicting_the_archive_is_refused(tmp_path):
    config = tiny_openai_config("resnet")
    source = load_source(str(make_archive_from_config(tmp_path / "rn.pt", config)))
    assert (source.text_heads, source.vision_heads, source.hidden_act) == (
        4,
        4,
        {"text": "quick_gelu", "vision": "quick_gelu"},
    )
    with pytest.raises(ValueError, match="the flags say text heads = 8, but .* records 4"):
        verify.source_facts(source, text_heads=8)
    facts = verify.source_facts(source, text_heads=4)
    assert (facts.text_heads, facts.vision_heads) == (4, 4)


def test_reference_config_ignores_the_converted_configs_guesses():
    config = tiny_config("vit")  # 4 heads per tower, QuickGELU
    config.text_config.hidden_act = "gelu"
    reference = verify.reference_config(config, verify.SourceFacts(text_heads=2))
    assert reference.text_config.num_attention_heads == 2  # what the source says
    assert reference.vision_config.num_attention_heads == 1  # OpenAI's rule, not the config's 4
    assert reference.text_config.hidden_act == "quick_gelu"  # nothing recorded: OpenAI's activation
    assert config.text_config.num_attention_heads == 4  # the converted config is left alone


# ---- the model card: counts, and whose weights these are ----


def _card(openai_weights: bool, tensors: int = 1, maps: int = 1, files: int = 1) -> str:
    report = verify.VerificationReport(tensors, maps, 0.0, [], "2 procedural scenes × 4 captions")
    info = model_card.CardInfo(
        title="t",
        repo_id="org/t",
        source_description="a state dict",
        source_sha256=None,
        license="other",
        base_model=None,
        architecture=[("Text tower", "x")],
        dtype_name="float32",
        weight_files=[f"model-{i}.safetensors" for i in range(files)],
        weight_bytes=1,
        report=report,
        has_tokenizer=False,
        image_size=32,
        bos_eos=(998, 999),
        openai_weights=openai_weights,
    )
    return model_card.render(info)


def test_card_counts_have_the_right_number():
    assert [model_card.count(n, "head") for n in (0, 1, 2, 1000)] == ["0 heads", "1 head", "2 heads", "1,000 heads"]
    one = _card(False)
    assert "the 1 saved tensor is bitwise identical" in one and "rows of the 1 attention map sum" in one
    many = _card(False, tensors=3, maps=2, files=2)
    assert "all 3 saved tensors are bitwise identical" in many and "rows of all 2 attention maps sum" in many
    assert "2 shards" in many


def test_card_says_openais_clip_only_for_openais_weights():
    assert _card(True).split("\n# t\n")[1].lstrip().startswith("OpenAI's CLIP as a transformers model")
    other = _card(False)
    assert "OpenAI's CLIP as" not in other and "not OpenAI's weights" in other


# ---- the command line: one `error:` line, exit 1, nothing written ----


def _cli(args, capsys) -> tuple[int, str]:
    from convert_weights import main

    code = main([str(arg) for arg in args])
    return code, capsys.readouterr().err


def _clean_failure(code: int, stderr: str, pattern: str, out: Path) -> None:
    errors = [line for line in stderr.splitlines() if line.startswith("error:")]
    assert code == 1 and len(errors) == 1 and re.search(pattern, errors[0]), stderr
    assert "Traceback" not in stderr
    if out.parent.is_dir():
        assert not any(p.name.startswith(out.name) for p in out.parent.iterdir()), list(out.parent.iterdir())


@pytest.fixture(scope="module")
def tiny_state_dict() -> dict[str, torch.Tensor]:
    model = randomized_openai_clip(tiny_openai_config("vit"))
    return {key: value.contiguous() for key, value in model.state_dict().items()}


def test_cli_module_tree_nested_thousands_deep(tmp_path, capsys):
    archive = hostile.write_archive(tmp_path / "deep.pt", hostile.nested_pickle(5000), {})
    code, stderr = _cli([archive, "--output-dir", tmp_path / "out"], capsys)
    _clean_failure(code, stderr, "nested more than 256 levels deep", tmp_path / "out")


@pytest.mark.parametrize("dtype", [torch.int64, torch.bool])
def test_cli_integer_or_bool_tensors_where_floats_belong(tmp_path, capsys, tiny_state_dict, dtype):
    tensors = {**tiny_state_dict, "ln_final.weight": torch.ones(64, dtype=dtype)}
    save_file(tensors, tmp_path / "int.safetensors")
    code, stderr = _cli([tmp_path / "int.safetensors", "--output-dir", tmp_path / "out", *HEAD_FLAGS], capsys)
    name = str(dtype).removeprefix("torch.")
    _clean_failure(code, stderr, f"`ln_final.weight` holds {name} values but .* needs floating-point", tmp_path / "out")


def test_cli_output_parent_read_only(tmp_path, capsys, monkeypatch, tiny_state_dict):
    save_file(tiny_state_dict, tmp_path / "ok.safetensors")
    locked = tmp_path / "locked"
    locked.mkdir()
    access = os.access
    monkeypatch.setattr(os, "access", lambda path, mode: Path(path) != locked and access(path, mode))
    code, stderr = _cli([tmp_path / "ok.safetensors", "--output-dir", locked / "out", *HEAD_FLAGS], capsys)
    _clean_failure(code, stderr, "no permission to write in .*locked", locked / "out")


def test_cli_output_parent_is_a_file(tmp_path, capsys, tiny_state_dict):
    save_file(tiny_state_dict, tmp_path / "ok.safetensors")
    (tmp_path / "file").write_text("x")
    code, stderr = _cli([tmp_path / "ok.safetensors", "--output-dir", tmp_path / "file" / "out", *HEAD_FLAGS], capsys)
    _clean_failure(code, stderr, "file is a file, not a folder", tmp_path / "file" / "out")
    assert (tmp_path / "file").read_text() == "x"


def test_cli_open_clip_head_width_zero(tmp_path, capsys, tiny_state_dict):
    folder = tmp_path / "open_clip"
    folder.mkdir()
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": {"vision_cfg": {"head_width": 0}}}))
    save_file(tiny_state_dict, folder / "open_clip_model.safetensors")
    code, stderr = _cli([folder, "--output-dir", tmp_path / "out"], capsys)
    _clean_failure(code, stderr, "`head_width` must be a positive integer, got 0", tmp_path / "out")
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": "ViT-B-32"}))
    code, stderr = _cli([folder, "--output-dir", tmp_path / "out"], capsys)
    _clean_failure(code, stderr, "`model_cfg` must be a JSON object, got str", tmp_path / "out")


def test_cli_shard_size_below_1kb(tmp_path, capsys):
    """A bad flag value is an argument error: argparse's one `error:` line, exit status 2 (as for every flag)."""
    with pytest.raises(SystemExit) as exit_info:
        _cli(["x.pt", "--output-dir", tmp_path / "out", "--max-shard-size", "100B"], capsys)
    stderr = capsys.readouterr().err
    assert exit_info.value.code == 2 and "--max-shard-size 100B is 100 bytes; it must be at least 1KB" in stderr
    assert not (tmp_path / "out").exists()


def test_cli_overwrite_keeps_the_source_and_foreign_files(tmp_path, capsys, tiny_state_dict):
    out = tmp_path / "out"
    out.mkdir()
    save_file(tiny_state_dict, out / "src.safetensors")
    (out / "notes.txt").write_text("mine")
    code, stderr = _cli([out / "src.safetensors", "--output-dir", out, "--overwrite", *HEAD_FLAGS], capsys)
    assert code == 1 and "src.safetensors lies inside --output-dir" in stderr and "Traceback" not in stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "src.safetensors"]
    save_file(tiny_state_dict, tmp_path / "src.safetensors")
    code, stderr = _cli([tmp_path / "src.safetensors", "--output-dir", out, "--overwrite", *HEAD_FLAGS], capsys)
    assert code == 1 and "does not hold a previous clipviz conversion" in stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt", "src.safetensors"]


def test_cli_stride_zero_view_and_bomb(tmp_path, capsys):
    expanded = tmp_path / "expanded.pt"
    torch.save({"token_embedding.weight": torch.randn(1, 64).expand(4_000_000, 64)}, expanded)
    code, stderr = _cli([expanded, "--output-dir", tmp_path / "out"], capsys)
    _clean_failure(
        code, stderr, r"'token_embedding.weight' of shape \(4000000, 64\) has strides \(0, 1\)", tmp_path / "out"
    )
    numel = 4 << 20
    bomb = hostile.weight_archive(
        tmp_path / "bomb.pt", hostile.Tensor("0", numel, (numel,), (1,)), compressed=("data/0",)
    )
    code, stderr = _cli([bomb, "--output-dir", tmp_path / "out"], capsys)
    _clean_failure(code, stderr, "compression ratio above the 100:1", tmp_path / "out")


def test_cli_in_a_subprocess_prints_one_error_line(tmp_path):
    archive = hostile.write_archive(tmp_path / "deep.pt", hostile.nested_pickle(5000), {})
    env = {**os.environ, "PYTHONPATH": str(REPO_ROOT), "OMP_NUM_THREADS": "1"}
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "convert_weights.py"), str(archive), "--output-dir", str(tmp_path / "out")],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    _clean_failure(result.returncode, result.stderr, "nested more than 256 levels deep", tmp_path / "out")


# ---- heads the checkpoint records, and a verification that does not share the converter's assumptions ----


@pytest.fixture(scope="module")
def two_head_archive(tmp_path_factory):
    """A text tower of 2 heads at width 64, where OpenAI's rule (width / 64) says 1."""
    config = tiny_openai_config("vit")
    config.text_config.num_attention_heads = 2
    return make_archive_from_config(tmp_path_factory.mktemp("heads") / "two-heads.pt", config, archive=True)


def test_recorded_heads_are_used_and_verified(two_head_archive, tmp_path, capsys):
    out = tmp_path / "out"
    code, stderr = _cli([two_head_archive.path, "--output-dir", out], capsys)  # no head flags needed
    assert code == 0, stderr
    config = json.loads((out / "config.json").read_text())
    assert config["text_config"]["num_attention_heads"] == 2 and config["vision_config"]["num_attention_heads"] == 4
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    inputs = two_head_archive.inputs()
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    torch.testing.assert_close(logits, two_head_archive.expected_logits(inputs), rtol=1e-4, atol=1e-4)
    card = (out / "README.md").read_text()
    assert "2 heads" in card and "text tower 2 attention heads" not in card  # read, so not listed as assumed


def test_converter_ignoring_recorded_heads_fails_verification(two_head_archive, tmp_path, capsys, monkeypatch):
    """The bug the attack found: the converter used width / 64. The reference now builds from what the source
    says, so the wrong model is caught instead of verified."""
    from clipviz import convert

    original = convert.config_from_openai_state_dict

    def openai_rule(state_dict, **kwargs):
        return original(state_dict, **{**kwargs, "text_heads": None})

    monkeypatch.setattr(convert, "config_from_openai_state_dict", openai_rule)
    code, stderr = _cli([two_head_archive.path, "--output-dir", tmp_path / "out"], capsys)
    _clean_failure(code, stderr, "disagrees with OpenAI clip/model.py", tmp_path / "out")


def test_flag_contradicting_recorded_heads_is_an_error(two_head_archive, tmp_path, capsys):
    code, stderr = _cli([two_head_archive.path, "--output-dir", tmp_path / "out", "--text-heads", "4"], capsys)
    _clean_failure(code, stderr, "the flags say text heads = 4, but .* records 2", tmp_path / "out")


def test_plain_state_dict_assumptions_are_printed_and_in_the_card(tmp_path, capsys, tiny_state_dict):
    save_file(tiny_state_dict, tmp_path / "plain.safetensors")
    out = tmp_path / "out"
    code, stderr = _cli([tmp_path / "plain.safetensors", "--output-dir", out, "--text-heads", "4"], capsys)
    assert code == 0, stderr
    card = (out / "README.md").read_text()
    assumed = (
        "Assumed, as the checkpoint does not record them (OpenAI's values): image tower 1 attention head (width 64 "
        "/ 64; --vision-heads N if not); MLP activation QuickGELU (--hidden-act gelu if not); LayerNorm epsilon 1e-05; "
        "image preprocessing (OpenAI's mean, std and bicubic resizing); start/end-of-text ids 49406/49407 (the "
        "vocabulary's last two)."
    )
    assert assumed in card and assumed in stderr, stderr
    assert "text tower" not in card.split("Assumed, as")[1].split("\n")[0]  # --text-heads stated it
    assert "OpenAI's CLIP as" not in card and "not OpenAI's weights" in card


def test_cli_tensors_sharing_their_values(tmp_path, capsys, tiny_state_dict):
    """Each tensor is no bigger than its storage, but two keys alias one storage: written out, the data doubles."""
    tensors = dict(tiny_state_dict)
    fc = tensors["transformer.resblocks.0.mlp.c_fc.weight"]
    tensors["transformer.resblocks.1.mlp.c_fc.weight"] = fc  # the same tensor under a second name
    torch.save(tensors, tmp_path / "tied.pt")
    code, stderr = _cli([tmp_path / "tied.pt", "--output-dir", tmp_path / "out", *HEAD_FLAGS], capsys)
    _clean_failure(code, stderr, "transformer.resblocks.0.mlp.c_fc.weight.* overlap in one storage", tmp_path / "out")
    half = tensors["transformer.resblocks.0.mlp.c_proj.weight"]
    checkpoint_io.refuse_aliased_tensors({"a": half[:64], "b": half[64:]}, "x")  # disjoint rows of one storage: fine
    with pytest.raises(CheckpointError, match="overlap in one storage"):
        checkpoint_io.refuse_aliased_tensors({"a": half[:, :100], "b": half[:, 100:]}, "x")  # interleaved columns
