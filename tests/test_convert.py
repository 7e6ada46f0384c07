"""clipviz-convert (convert_weights.main, clipviz.convert): every source kind -> a complete, verified Hub repo folder.

The truth for each conversion is independent of the converter: OpenAI's reference model holding the archive's weights,
transformers' CLIPModel holding the checkpoint, or the archive's tensors read back with torch.jit.load (tests only).
"""

import contextlib
import hashlib
import http.server
import io
import json
import re
import threading
import zipfile
from functools import partial
from pathlib import Path

import pytest
import torch
from huggingface_hub import HfApi, metadata_load
from safetensors import safe_open
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor

from clipviz import checkpoint_io, explain_defaults, hub_repo, verify
from clipviz.state_dict import (
    IGNORED_OPENAI_KEYS,
    CheckpointKeyError,
    open_clip_to_openai_state_dict,
    openai_to_clipviz_key,
    openai_to_transformers_state_dict,
    transformers_to_openai_state_dict,
)
from convert_weights import build_parser, main
from tests.convert_fixtures import HEAD_FLAGS, OPENAI_VOCAB, make_archive
from tests.hostile_checkpoints import Payload
from tests.hub_server import (  # noqa: F401 (importing a fixture registers it)
    USER,
    hub_api_fixture,
    hub_fixture,
    hub_server_fixture,
)

REPO_ROOT = Path(__file__).resolve().parents[1]
EXPECTED_FILES = {
    "README.md",
    "config.json",
    "configuration_clipviz.py",
    "explaining_clipviz.py",
    "modeling_clipviz.py",
    "model.safetensors",
    "preprocessor_config.json",
    "processor_config.json",
    "special_tokens_map.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "vocab.json",
    "merges.txt",
}


@pytest.fixture(scope="module")
def archives(tmp_path_factory):
    folder = tmp_path_factory.mktemp("archives")
    return {
        "vit": make_archive(folder / "vit-fp16.pt", "vit", fp16=True),
        "resnet": make_archive(folder / "rn-fp32.pt", "resnet", fp16=False),
    }


def with_code_that_must_not_run(archive: Path, out: Path, canary: Path) -> Path:
    """A copy of `archive` whose code/ files would create `canary` if anything ran them (and are not valid
    TorchScript any more, so torch.jit.load would fail on them)."""
    with zipfile.ZipFile(archive) as src, zipfile.ZipFile(out, "w") as dst:
        for item in src.infolist():
            data = src.read(item)
            if "/code/" in item.filename and item.filename.endswith(".py"):
                data = f"import os\nopen({str(canary)!r}, 'w').close()\n".encode() + data
            dst.writestr(item, data)
    return out


def forbidden(*args, **kwargs):
    raise AssertionError("the converter must not load pickles or TorchScript with torch's own loaders")


@pytest.fixture(scope="module")
def converted(archives, tmp_path_factory):
    """Both archives converted with default flags (fp32 output), the ViT one from a copy whose TorchScript code
    would create a canary, with torch.jit.load and torch.load unavailable: {backbone: (folder, stdout)}."""
    folder = tmp_path_factory.mktemp("converted")
    canary = folder / "canary"
    sources = {
        "vit": with_code_that_must_not_run(archives["vit"].path, folder / "vit-evil-code.pt", canary),
        "resnet": archives["resnet"].path,
    }
    results = {"canary": canary}
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(torch.jit, "load", forbidden)
        patch.setattr(torch, "load", forbidden)
        for backbone, source in sources.items():
            out = folder / f"clipviz-tiny-{backbone}"
            with contextlib.redirect_stdout(io.StringIO()) as stdout:
                assert main([str(source), "--output-dir", str(out), *HEAD_FLAGS]) == 0
            results[backbone] = (out, stdout.getvalue())
    return results


@pytest.fixture(scope="module")
def converted_vit(converted):
    return converted["vit"][0]


def run(args, capsys) -> tuple[int, str, str]:
    code = main([str(arg) for arg in args])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def archive_tensors(path: Path) -> dict[str, torch.Tensor]:
    """The archive's tensors the trusted way (tests only): torch.jit.load."""
    return dict(torch.jit.load(str(path)).state_dict())


def saved_tensors(folder: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for file in sorted(folder.glob("model*.safetensors")):
        with safe_open(str(file), framework="pt") as f:
            assert f.metadata() == {"format": "pt"}
            tensors.update({key: f.get_tensor(key) for key in f.keys()})
    return tensors


def assert_bitwise(saved: dict[str, torch.Tensor], source: dict[str, torch.Tensor], backbone: str, dtype) -> None:
    expected = {}
    for key, tensor in source.items():
        if key in IGNORED_OPENAI_KEYS:
            continue
        expected[openai_to_clipviz_key(key, backbone)] = tensor.to(dtype) if tensor.is_floating_point() else tensor
    assert set(saved) == set(expected)
    for key, tensor in expected.items():
        assert saved[key].dtype == tensor.dtype, key
        assert torch.equal(saved[key].view(-1).view(torch.uint8), tensor.contiguous().view(-1).view(torch.uint8)), key


def no_leftovers(folder: Path) -> bool:
    return not any(path.name.endswith(".partial") or ".old-" in path.name for path in folder.parent.iterdir())


# ---- OpenAI archives -> complete repo folders ----


@pytest.mark.parametrize("backbone", ["vit", "resnet"])
def test_openai_archive_becomes_a_complete_verified_repo(archives, converted, backbone):
    archive = archives[backbone]
    out, stdout = converted[backbone]
    assert EXPECTED_FILES <= {path.name for path in out.iterdir()}
    assert no_leftovers(out)

    config = json.loads((out / "config.json").read_text())
    assert config["auto_map"] == {
        "AutoConfig": "configuration_clipviz.CLIPVizConfig",
        "AutoModel": "modeling_clipviz.CLIPVizModel",
        "AutoModelForZeroShotImageClassification": "modeling_clipviz.CLIPVizModel",
    }
    assert config["dtype"] == "float32" and config["text_config"]["hidden_act"] == "quick_gelu"
    processor = json.loads((out / "preprocessor_config.json").read_text())
    size = archive.config.vision_config.image_size
    assert processor["size"] == {"shortest_edge": size} and processor["crop_size"] == {"height": size, "width": size}
    assert processor["resample"] == 3 and processor["image_mean"] == [0.48145466, 0.4578275, 0.40821073]

    assert_bitwise(saved_tensors(out), archive_tensors(archive.path), backbone, torch.float32)
    model = AutoModel.from_pretrained(out, trust_remote_code=True).eval()
    inputs = archive.inputs()
    with torch.no_grad():
        logits = model(**inputs).logits_per_image
    torch.testing.assert_close(logits, archive.expected_logits(inputs), atol=1e-4, rtol=1e-4)
    assert type(AutoProcessor.from_pretrained(out)).__name__ == "CLIPProcessor"

    assert "Parity with independent implementations" in stdout and "OpenAI clip/model.py" in stdout
    assert "bitwise equal" in stdout


def test_torchscript_code_is_never_run(converted):
    """The ViT conversion above read an archive whose code would have created the canary, without torch's
    loaders: it succeeded and the canary does not exist."""
    assert (converted["vit"][0] / "model.safetensors").is_file()
    assert not converted["canary"].exists()


def test_model_card_metadata_figures_and_snippet(converted_vit, capsys):
    card = (converted_vit / "README.md").read_text()
    metadata = metadata_load(converted_vit / "README.md")
    assert metadata["library_name"] == "transformers"
    assert metadata["pipeline_tag"] == "zero-shot-image-classification"
    assert metadata["license"] == "mit" and "clip" in metadata["tags"]
    assert "output_attentions=True" in card
    figures = re.findall(r"\| OpenAI clip/model.py \| ([0-9.e+-]+) \| ([0-9.e+-]+) \| ([0-9.e+-]+) \| 2/2 \|", card)
    assert len(figures) == 1 and all(float(value) < 1e-4 for value in figures[0][:2])
    assert "| transformers CLIPModel |" in card

    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)
    assert 'repo = "clipviz-tiny-vit"' in snippet
    exec(snippet.replace('repo = "clipviz-tiny-vit"', f"repo = {str(converted_vit)!r}"), {})
    printed = capsys.readouterr().out
    assert "'label': 'a red image'" in printed  # the pipeline ran


def test_fp16_archive_to_bf16_shards(archives, tmp_path, capsys):
    out = tmp_path / "sharded"
    code, _, stderr = run(
        [archives["vit"].path, "--output-dir", out, "--dtype", "bf16", "--max-shard-size", "3MB", *HEAD_FLAGS], capsys
    )
    assert code == 0, stderr
    assert not (out / "model.safetensors").exists()
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted(out.glob("model-*-of-*.safetensors"))
    assert len(shards) > 2 and set(index["weight_map"].values()) == {shard.name for shard in shards}
    saved = saved_tensors(out)
    assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in saved.values())
    assert_bitwise(saved, archive_tensors(archives["vit"].path), "vit", torch.bfloat16)
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    assert "bfloat16" in (out / "README.md").read_text()


def test_plain_state_dicts_convert_to_the_same_weights(archives, converted_vit, tmp_path, capsys):
    state_dict = archive_tensors(archives["vit"].path)
    save_file({k: v.contiguous() for k, v in state_dict.items()}, tmp_path / "plain.safetensors")
    wrapped = {"epoch": 32, "name": "run", "state_dict": {f"module.{k}": v for k, v in state_dict.items()}}
    torch.save(wrapped, tmp_path / "epoch_32.pt")  # an open_clip training checkpoint
    reference = (converted_vit / "model.safetensors").read_bytes()

    code, _, stderr = run([tmp_path / "plain.safetensors", "--output-dir", tmp_path / "a", *HEAD_FLAGS], capsys)
    assert code == 0, stderr
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == reference

    code, _, stderr = run([tmp_path / "epoch_32.pt", "--output-dir", tmp_path / "b", *HEAD_FLAGS], capsys)
    assert code == 1 and "--hidden-act" in stderr and not (tmp_path / "b").exists()
    args = [tmp_path / "epoch_32.pt", "--output-dir", tmp_path / "b", "--hidden-act", "quick_gelu", *HEAD_FLAGS]
    code, _, stderr = run(args, capsys)
    assert code == 0, stderr
    assert (tmp_path / "b" / "model.safetensors").read_bytes() == reference
    assert "stripped the `module.` prefix" in (tmp_path / "b" / "README.md").read_text()


# ---- transformers and open_clip checkpoints ----


def tiny_transformers_clip(folder: Path, hidden_act: str = "gelu"):
    """A transformers CLIPModel with its own 1000-token vocabulary (998/999 are start/end of text)."""
    from transformers import CLIPConfig, CLIPModel

    torch.manual_seed(3)
    shape = {"hidden_size": 64, "intermediate_size": 256, "num_hidden_layers": 2, "num_attention_heads": 4}
    text = {"vocab_size": 1000, "bos_token_id": 998, "eos_token_id": 999, "pad_token_id": 0}
    config = CLIPConfig(
        text_config={**shape, **text, "hidden_act": hidden_act},
        vision_config={**shape, "image_size": 32, "patch_size": 8, "hidden_act": hidden_act},
        projection_dim=32,
    )
    model = CLIPModel(config).eval()
    with torch.no_grad():
        for parameter in model.parameters():
            if parameter.ndim == 1:
                parameter.add_(torch.randn_like(parameter), alpha=0.1)
    model.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny\n")
    return model


def test_transformers_folder_and_hub_repo_id(api: HfApi, tmp_path, capsys):
    source = tmp_path / "hf-clip"
    hf_model = tiny_transformers_clip(source)
    code, stdout, stderr = run([source, "--output-dir", tmp_path / "from-folder"], capsys)
    assert code == 0, stderr
    assert "transformers CLIPModel" in stdout
    config = json.loads((tmp_path / "from-folder" / "config.json").read_text())
    assert config["text_config"]["hidden_act"] == config["vision_config"]["hidden_act"] == "gelu"
    converted = AutoModel.from_pretrained(tmp_path / "from-folder", trust_remote_code=True).eval()
    inputs = {"input_ids": torch.tensor([[998, 320, 125, 999, 0]]), "pixel_values": torch.randn(2, 3, 32, 32)}
    with torch.no_grad():
        torch.testing.assert_close(converted(**inputs).logits_per_image, hf_model(**inputs).logits_per_image)
    card = (tmp_path / "from-folder" / "README.md").read_text()
    assert metadata_load(tmp_path / "from-folder" / "README.md")["license"] == "apache-2.0"
    assert "No tokenizer files" in card and not (tmp_path / "from-folder" / "tokenizer.json").exists()
    snippet = re.search(r"```python\n(.*?)```", card, re.S).group(1)  # the variant without a tokenizer
    exec(snippet.replace('repo = "from-folder"', f"repo = {str(tmp_path / 'from-folder')!r}"), {})

    api.create_repo(f"{USER}/hf-clip")
    api.upload_folder(repo_id=f"{USER}/hf-clip", folder_path=source)
    args = [f"{USER}/hf-clip", "--output-dir", tmp_path / "from-hub", "--cache-dir", tmp_path / "cache"]
    code, _, stderr = run(args, capsys)
    assert code == 0, stderr
    assert metadata_load(tmp_path / "from-hub" / "README.md")["base_model"] == f"{USER}/hf-clip"
    for name in ("model.safetensors", "config.json"):
        assert (tmp_path / "from-hub" / name).read_bytes() == (tmp_path / "from-folder" / name).read_bytes()


def test_open_clip_folder_with_gelu_and_custom_text_layout(archives, tmp_path, capsys):
    archive = archives["vit"]
    state_dict = archive_tensors(archive.path)
    text_keys = ("token_embedding", "positional_embedding", "ln_final", "text_projection", "transformer.")
    moved = {f"text.{k}" if k.startswith(text_keys) else k: v.contiguous() for k, v in state_dict.items()}
    folder = tmp_path / "open-clip"
    folder.mkdir()
    save_file(moved, folder / "open_clip_model.safetensors")
    model_cfg = {
        "embed_dim": 32,
        "quick_gelu": False,
        "vision_cfg": {"image_size": 32, "layers": 2, "width": 64, "patch_size": 8, "head_width": 16},
        "text_cfg": {"context_length": 77, "vocab_size": OPENAI_VOCAB, "width": 64, "heads": 4, "layers": 2},
    }
    (folder / "open_clip_config.json").write_text(json.dumps({"model_cfg": model_cfg, "preprocess_cfg": {}}))
    code, stdout, stderr = run([folder, "--output-dir", tmp_path / "out", "--license", "mit"], capsys)
    assert code == 0, stderr
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["text_config"]["hidden_act"] == "gelu" and config["vision_config"]["num_attention_heads"] == 4
    assert "moved the text tower out of `text.`" in (tmp_path / "out" / "README.md").read_text()

    reference = archive.reference  # the same weights run with GELU: the truth for this open_clip model
    blocks = [*reference.transformer.resblocks, *reference.visual.transformer.resblocks]
    activations = [block.mlp.gelu for block in blocks]
    for block in blocks:
        block.mlp.gelu = torch.nn.GELU()
    try:
        inputs = archive.inputs()
        expected = archive.expected_logits(inputs)
    finally:
        for block, activation in zip(blocks, activations, strict=True):
            block.mlp.gelu = activation
    model = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    with torch.no_grad():
        torch.testing.assert_close(model(**inputs).logits_per_image, expected, atol=1e-4, rtol=1e-4)


def test_reading_reports_progress(archives, tmp_path):
    """The converter's reading progress bar is fed by checkpoint_io's progress callback."""
    for path in (archives["resnet"].path, tmp_path / "plain.safetensors"):
        if path.suffix == ".safetensors":
            save_file({"a": torch.ones(3, 5), "b": torch.zeros(7, dtype=torch.float16)}, path)
        counted = []
        state_dict = checkpoint_io.read_state_dict(path, progress=counted.append)
        assert sum(counted) == sum(t.untyped_storage().nbytes() for t in state_dict.values()) > 0


def test_key_tables_transformers_round_trip_and_errors(archives):
    openai = {k: v.float() for k, v in archive_tensors(archives["vit"].path).items()}
    hf = openai_to_transformers_state_dict(openai)
    assert "vision_model.encoder.layers.1.self_attn.k_proj.weight" in hf
    back = transformers_to_openai_state_dict(hf)
    assert set(back) == set(openai) - set(IGNORED_OPENAI_KEYS)
    assert all(torch.equal(back[k], openai[k]) for k in back)
    del hf["text_model.encoder.layers.0.self_attn.v_proj.bias"]
    with pytest.raises(CheckpointKeyError, match=r"v_proj.*missing"):
        transformers_to_openai_state_dict(hf)
    with pytest.raises(CheckpointKeyError, match="text_model.extra"):
        transformers_to_openai_state_dict({**hf, "text_model.extra": torch.zeros(1)})
    with pytest.raises(CheckpointKeyError, match="SigLIP logit bias"):
        open_clip_to_openai_state_dict({**openai, "logit_bias": torch.zeros(())})
    with pytest.raises(CheckpointKeyError, match="LayerScale"):
        open_clip_to_openai_state_dict({"module.visual.transformer.resblocks.0.ls_1.gamma": torch.zeros(1)})


# ---- --model NAME: download from (a stand-in for) OpenAI's host, SHA-256 checked ----


@pytest.fixture
def file_server(tmp_path):
    root = tmp_path / "www"
    root.mkdir()
    handler = partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *args: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield root, f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


def publish(root: Path, data: bytes, sha256: str, filename: str) -> str:
    path = root / "clip" / "models" / sha256 / filename
    path.parent.mkdir(parents=True)
    path.write_bytes(data)
    return f"{checkpoint_io.OPENAI_BASE_URL}/clip/models/{sha256}/{filename}"


def test_model_name_is_downloaded_and_verified(archives, file_server, tmp_path, capsys, monkeypatch):
    root, base_url = file_server
    data = archives["vit"].path.read_bytes()
    sha256 = hashlib.sha256(data).hexdigest()
    monkeypatch.setitem(checkpoint_io.OPENAI_URLS, "ViT-B/32", publish(root, data, sha256, "ViT-B-32.pt"))
    out, cache = tmp_path / "b32", tmp_path / "cache"
    args = ["--model", "ViT-B/32", "--download-base-url", base_url, "--cache-dir", cache, "--output-dir", out]
    code, stdout, stderr = run([*args, *HEAD_FLAGS], capsys)
    assert code == 0, stderr
    assert "OpenAI's published checkpoint ViT-B/32" in stdout
    assert (cache / "ViT-B-32.pt").read_bytes() == data
    assert metadata_load(out / "README.md")["base_model"] == "openai/clip-vit-base-patch32"

    forged = publish(root, data + b"tampered", sha256.replace(sha256[:4], "0000"), "ViT-B-16.pt")
    monkeypatch.setitem(checkpoint_io.OPENAI_URLS, "ViT-B/16", forged)
    args = [
        "--model",
        "ViT-B/16",
        "--download-base-url",
        base_url,
        "--cache-dir",
        cache,
        "--output-dir",
        tmp_path / "b16",
    ]
    code, _, stderr = run(args, capsys)
    assert code == 1 and "SHA-256" in stderr
    assert not (cache / "ViT-B-16.pt").exists() and not (tmp_path / "b16").exists()


# ---- errors leave nothing half-written ----


def test_bad_weights_leave_no_output(archives, tmp_path, capsys):
    state_dict = {k: v.clone() for k, v in archive_tensors(archives["vit"].path).items()}
    cases = {
        "nan": (
            {**state_dict, "ln_final.weight": torch.full_like(state_dict["ln_final.weight"], float("nan"))},
            "non-finite",
        ),
        "unknown": ({**state_dict, "visual.extra_head": torch.zeros(3)}, "visual.extra_head"),
        "shape": ({**state_dict, "visual.ln_post.bias": torch.zeros(5)}, r"visual.ln_post.bias.*shape \(5,\)"),
    }
    for name, (tensors, message) in cases.items():
        save_file(tensors, tmp_path / f"{name}.safetensors")
        out = tmp_path / f"out-{name}"
        code, _, stderr = run([tmp_path / f"{name}.safetensors", "--output-dir", out, *HEAD_FLAGS], capsys)
        assert code == 1 and re.search(message, stderr), (name, stderr)
        assert not out.exists() and no_leftovers(out)

    existing = tmp_path / "existing"
    existing.mkdir()
    (existing / "keep.txt").write_text("mine")
    code, _, stderr = run([archives["vit"].path, "--output-dir", existing, *HEAD_FLAGS], capsys)
    assert code == 1 and "--overwrite" in stderr
    code, _, _ = run([tmp_path / "nan.safetensors", "--output-dir", existing, "--overwrite", *HEAD_FLAGS], capsys)
    assert code == 1 and (existing / "keep.txt").read_text() == "mine" and no_leftovers(existing)


def test_verification_catches_a_corrupted_file_and_a_wrong_model(archives, tmp_path, capsys, monkeypatch):
    """The always-on checks fail the conversion (and leave nothing behind) when the written file does not reload
    into the source tensors, or when the outputs disagree with an independent implementation."""
    written = hub_repo.write_weights

    def write_then_flip_a_bit(folder, *args, **kwargs):
        records = written(folder, *args, **kwargs)
        with open(folder / "model.safetensors", "r+b") as f:
            f.seek(-3, 2)
            byte = f.read(1)
            f.seek(-3, 2)
            f.write(bytes([byte[0] ^ 1]))
        return records

    with monkeypatch.context() as patch:
        patch.setattr(hub_repo, "write_weights", write_then_flip_a_bit)
        code, _, stderr = run([archives["resnet"].path, "--output-dir", tmp_path / "a", *HEAD_FLAGS], capsys)
    assert code == 1 and "differ from the converted source tensors" in stderr
    assert not (tmp_path / "a").exists() and no_leftovers(tmp_path / "a")

    references = verify.reference_outputs

    def shifted_references(*args, **kwargs):
        results = references(*args, **kwargs)
        results[verify.OPENAI_REFERENCE].logits_per_image += 1.0
        return results

    monkeypatch.setattr(verify, "reference_outputs", shifted_references)
    code, _, stderr = run([archives["resnet"].path, "--output-dir", tmp_path / "b", *HEAD_FLAGS], capsys)
    assert code == 1 and re.search(r"disagrees with OpenAI clip/model.py.*logits_per_image 1", stderr)
    assert not (tmp_path / "b").exists()


@pytest.mark.parametrize("force_unsafe_env", [False, True], ids=["default", "TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD"])
def test_malicious_pickle_is_refused(archives, tmp_path, capsys, monkeypatch, force_unsafe_env):
    canary = tmp_path / "canary"
    torch.save({"visual.proj": torch.ones(2), "evil": Payload(canary)}, tmp_path / "evil.pt")
    if force_unsafe_env:
        monkeypatch.setenv("TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD", "1")
    code, _, stderr = run([tmp_path / "evil.pt", "--output-dir", tmp_path / "out"], capsys)
    assert code == 1 and "refus" in stderr
    assert not canary.exists() and not (tmp_path / "out").exists()


def truncated(path: Path, out: Path, keep: int) -> Path:
    out.write_bytes(path.read_bytes()[:keep])
    return out


def test_damaged_and_wrong_files_give_clear_errors(archives, tmp_path, capsys):
    archive = archives["vit"].path
    save_file({"w": torch.ones(1000)}, tmp_path / "ok.safetensors")
    header = (10_000_000).to_bytes(8, "little") + b'{"w": {}}'
    cases = {
        "truncated zip": (truncated(archive, tmp_path / "cut.pt", 4000), "truncated"),
        "truncated safetensors": (
            truncated(tmp_path / "ok.safetensors", tmp_path / "cut.safetensors", 500),
            "safetensors",
        ),
        "header larger than file": (tmp_path / "big-header.safetensors", "header"),
        "PNG image": (tmp_path / "image.pt", "PNG image"),
    }
    (tmp_path / "big-header.safetensors").write_bytes(header)
    (tmp_path / "image.pt").write_bytes(b"\x89PNG\r\n\x1a\n" + bytes(100))
    for name, (path, message) in cases.items():
        code, _, stderr = run([path, "--output-dir", tmp_path / "out"], capsys)
        assert code == 1 and message in stderr and "Traceback" not in stderr, (name, stderr)
        assert not (tmp_path / "out").exists()


# ---- command line ----


def test_help_explains_every_flag_with_examples(capsys):
    parser = build_parser()
    for action in parser._actions:
        assert action.help, action.dest
    with pytest.raises(SystemExit) as exit_info:
        main(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    flags = [option for action in parser._actions for option in action.option_strings]
    assert all(flag in text for flag in flags)
    assert "examples:" in text and "clipviz-convert --model ViT-B/32" in text
    assert "clipviz-convert = convert_weights:main" in (REPO_ROOT / "setup.cfg").read_text()
    with pytest.raises(SystemExit) as exit_info:
        main(["--output-dir", "x"])  # no source
    assert exit_info.value.code == 2


def test_staged_folder_replaces_only_on_success(tmp_path):
    target = tmp_path / "out"
    with pytest.raises(RuntimeError), hub_repo.staged_folder(target, overwrite=False) as staging:
        (staging / "half.bin").write_bytes(b"x")
        raise RuntimeError("boom")
    assert not target.exists() and no_leftovers(target)
    with hub_repo.staged_folder(target, overwrite=False) as staging:  # --overwrite replaces only a conversion
        (staging / "config.json").write_text('{"model_type": "clipviz"}')
        (staging / "README.md").write_text("1")
    with hub_repo.staged_folder(target, overwrite=True) as staging:
        (staging / "config.json").write_text('{"model_type": "clipviz"}')
        (staging / "model.safetensors").write_text("2")
    assert sorted(p.name for p in target.iterdir()) == ["config.json", "model.safetensors"] and no_leftovers(target)
    hub_repo.staging_path(target.resolve()).mkdir()  # a conversion killed before it could clean up
    with pytest.raises(hub_repo.OutputFolderError, match="delete that folder"):
        with hub_repo.staged_folder(target, overwrite=True):
            pass
    assert (target / "model.safetensors").read_text() == "2"
    hub_repo.staging_path(target.resolve()).rmdir()
    assert hub_repo.plan_shards({"a": 5, "b": 5, "c": 20, "d": 1}, 10) == [["a", "b"], ["c"], ["d"]]
    assert hub_repo.parse_size("2GB") == 2 * 10**9 and hub_repo.parse_size("1GiB") == 2**30


def test_converted_models_default_to_the_published_explanation(converted):
    """A converted checkpoint's `explain()` without `method=` runs what published benchmarks support (ViT: LeGrad
    with its authors' settings), written into config.json and cited in the model card."""
    for backbone in ("vit", "resnet"):
        folder, expected = converted[backbone][0], explain_defaults.CONVERTED[backbone]
        config = json.loads((folder / "config.json").read_text())
        assert (config["explain_method"], config["explain_options"]) == (expected.method, expected.options)
        card = (folder / "README.md").read_text()
        assert "## Explanations" in card and expected.evidence in card
        model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
        vocab, size = model.config.text_config.vocab_size, model.config.vision_config.image_size
        ids = torch.tensor([[vocab - 2, 1, 2, vocab - 1]])
        pixels = torch.randn(1, 3, size, size, generator=torch.Generator().manual_seed(0))
        default = model.explain(pixels, ids)
        chosen = model.explain(pixels, ids, method=expected.method, **expected.options)
        torch.testing.assert_close(default.image_maps, chosen.image_maps)
        assert torch.isfinite(default.image_maps).all() and default.image_maps.amax() > 0
    assert explain_defaults.CONVERTED["vit"].method == "legrad"
    assert "arXiv 2404.03214" in explain_defaults.CONVERTED["vit"].evidence
