"""clipviz-convert --push-to-hub against a real HTTP server speaking the Hub's API (tests/hub_server.py).

Nothing is mocked on the client side: huggingface_hub and transformers talk HTTP to 127.0.0.1. In-process calls are
pointed at the server through huggingface_hub's constants (read at import time from HF_ENDPOINT, so set here by
monkeypatch); the fresh process gets the environment variables.
"""

import contextlib
import io
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from huggingface_hub import HfApi, constants
from PIL import Image
from transformers import AutoModel, pipeline

from clipviz.push import PushError, push_folder
from convert_weights import main
from tests.convert_fixtures import HEAD_FLAGS, make_archive
from tests.hub_server import (  # noqa: F401 (importing a fixture registers it)
    USER,
    HubServer,
    hub_api_fixture,
    hub_fixture,
    hub_server_fixture,
)
from tests.openai_reference import openai_tokenizer_module

REPO = f"{USER}/clipviz-tiny"
LABELS = ["a red circle", "a blue square", "a photo of a dog"]
CORPUS = [
    "a photo of a cat",
    "Hello, World!!! (really?) -- yes; 100% sure.",
    "naïve café in Zürich, Ελλάδα",
    "東京タワーの写真",
    "🙂🚀 emoji 👍🏽",
    "  tabs\tand\nnewlines   everywhere  ",
    "",
    "it’s &amp; ﬁne",
    "word " * 100,
]

FRESH_PROCESS = textwrap.dedent(
    """
    import json, sys, torch
    from PIL import Image
    from transformers import AutoModel, AutoProcessor, pipeline
    repo, inputs_path, image_path, out_path = sys.argv[1:5]
    labels = sys.argv[5:]
    model = AutoModel.from_pretrained(repo, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(repo, trust_remote_code=True)
    with torch.no_grad():
        out = model(**torch.load(inputs_path), output_attentions=True)
    classifier = pipeline("zero-shot-image-classification", model=repo, trust_remote_code=True)
    corpus = json.load(open("corpus.json"))
    torch.save(
        {
            "module": type(model).__module__,
            "processor": type(processor).__name__,
            "ids": [processor.tokenizer(text, truncation=True, max_length=77)["input_ids"] for text in corpus],
            "logits": out.logits_per_image,
            "attentions": out.vision_model_output.attentions + out.text_model_output.attentions,
            "scores": classifier(Image.open(image_path), candidate_labels=labels),
        },
        out_path,
    )
    """
)


@pytest.fixture(scope="module")
def archive(tmp_path_factory):
    return make_archive(tmp_path_factory.mktemp("archive") / "vit.pt", "vit", fp16=True)


@pytest.fixture(scope="module")
def folder(archive, tmp_path_factory):
    """One conversion (no push) shared by the tests that push an existing folder."""
    out = tmp_path_factory.mktemp("converted") / "clipviz-tiny"
    with contextlib.redirect_stdout(io.StringIO()):
        assert main([str(archive.path), "--output-dir", str(out), *HEAD_FLAGS]) == 0
    return out


def convert_and_push(archive, out: Path, capsys, *extra: str) -> tuple[int, str, str]:
    code = main([str(archive.path), "--output-dir", str(out), *HEAD_FLAGS, "--push-to-hub", REPO, *extra])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def openai_ids(text: str) -> list[int]:
    """OpenAI's SimpleTokenizer ids as `clip.tokenize(text, truncate=True)` lays them out, without the padding."""
    ids = [49406, *openai_tokenizer_module().SimpleTokenizer().encode(text), 49407]
    return ids[:76] + [49407] if len(ids) > 77 else ids


def tree(api: HfApi, revision: str) -> dict[str, str]:
    """path -> blob id of every file at a revision."""
    return {entry.path: entry.blob_id for entry in api.list_repo_tree(REPO, revision=revision, recursive=True)}


def test_push_then_load_from_the_server_in_a_fresh_process(hub, api, archive, folder, tmp_path):
    result = push_folder(folder, REPO)
    assert result.created_commit and result.repo_url == f"{hub.url}/{REPO}"
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *(p.name for p in folder.iterdir())])

    inputs = archive.inputs()
    torch.save(inputs, tmp_path / "inputs.pt")
    (tmp_path / "corpus.json").write_text(json.dumps(CORPUS))
    pixels = np.random.default_rng(0).integers(0, 256, (40, 48, 3), dtype=np.uint8)
    Image.fromarray(pixels).save(tmp_path / "image.png")
    env = {**hub.environ(tmp_path / "cache"), "HF_HOME": str(tmp_path / "hf_home"), "PYTHONPATH": ""}
    args = [sys.executable, "-c", FRESH_PROCESS, REPO, "inputs.pt", "image.png", "out.pt", *LABELS]
    run = subprocess.run(
        args, cwd=tmp_path, env=env, stdin=subprocess.DEVNULL, capture_output=True, text=True, timeout=300
    )
    assert run.returncode == 0, run.stderr[-3000:]
    loaded = torch.load(tmp_path / "out.pt")
    assert loaded["module"].startswith("transformers_modules.")  # the Hub's remote-code path, not this checkout
    assert loaded["processor"] == "CLIPProcessor"
    assert loaded["ids"] == [openai_ids(text) for text in CORPUS]  # the Hub copy tokenizes exactly as OpenAI does

    local = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    with torch.no_grad():
        expected = local(**inputs, output_attentions=True)
    torch.testing.assert_close(loaded["logits"], expected.logits_per_image, atol=1e-6, rtol=0)
    torch.testing.assert_close(loaded["logits"], archive.expected_logits(inputs), atol=1e-4, rtol=1e-4)
    local_attentions = expected.vision_model_output.attentions + expected.text_model_output.attentions
    for got, want in zip(loaded["attentions"], local_attentions, strict=True):
        torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    classifier = pipeline("zero-shot-image-classification", model=str(folder), trust_remote_code=True)
    want_scores = classifier(Image.open(tmp_path / "image.png"), candidate_labels=LABELS)
    assert [s["label"] for s in loaded["scores"]] == [s["label"] for s in want_scores]
    np.testing.assert_allclose([s["score"] for s in loaded["scores"]], [s["score"] for s in want_scores], atol=1e-6)


def test_identical_content_makes_no_commit_and_a_changed_card_makes_one(hub, api, archive, folder, tmp_path, capsys):
    first = push_folder(folder, REPO)
    commits = [c.commit_id for c in api.list_repo_commits(REPO)]
    again = push_folder(folder, REPO)
    assert not again.created_commit and again.commit_oid == first.commit_oid
    assert [c.commit_id for c in api.list_repo_commits(REPO)] == commits

    code, stdout, stderr = convert_and_push(archive, tmp_path / "relicensed", capsys, "--license", "apache-2.0")
    assert code == 0, stderr
    assert "Pushed to" in stdout
    after = [c.commit_id for c in api.list_repo_commits(REPO)]
    assert len(after) == len(commits) + 1 and after[1:] == commits
    before_files, after_files = tree(api, commits[0]), tree(api, after[0])
    assert set(before_files) == set(after_files)
    assert [path for path in after_files if after_files[path] != before_files[path]] == ["README.md"]
    readme = Path(api.hf_hub_download(REPO, "README.md", cache_dir=tmp_path / "downloads")).read_text()
    assert "license: apache-2.0" in readme


def test_server_killed_mid_upload_then_a_rerun_completes(hub, api, archive, tmp_path, capsys):
    out = tmp_path / "clipviz-tiny"
    hub.fail_after_bytes(200, method="POST", path_prefix=f"/api/models/{REPO}/commit/")
    code, _, stderr = convert_and_push(archive, out, capsys, "--overwrite")
    assert code == 1
    assert "Network failure" in stderr and "run the same command again" in stderr and "Traceback" not in stderr
    assert (out / "model.safetensors").is_file()  # the verified conversion stays for the retry

    hub.restart()
    assert api.list_repo_files(REPO) == [".gitattributes"]  # the cut commit never landed
    uploads_before = sum(method == "PUT" for method, _ in hub.log)
    code, stdout, stderr = convert_and_push(archive, out, capsys, "--overwrite")
    assert code == 0, stderr
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *(p.name for p in out.iterdir())])
    assert sum(method == "PUT" for method, _ in hub.log) == uploads_before  # LFS objects were kept, not resent


def test_server_killed_during_an_lfs_upload_then_a_rerun_completes(hub, api, folder, monkeypatch, tmp_path):
    """The cut comes in the middle of the weights' LFS PUT: huggingface_hub retries it (with shortened sleeps
    here: the real ones add up to 23 s) against a dead server, then gives up; nothing is committed, and the
    re-run uploads the object and lands the whole folder."""
    import functools

    import huggingface_hub.lfs

    fast = functools.partial(huggingface_hub.lfs.http_backoff, base_wait_time=0.01, max_wait_time=0.02)
    monkeypatch.setattr(huggingface_hub.lfs, "http_backoff", fast)
    hub.fail_after_bytes(4096, method="PUT", path_prefix="/lfs-upload/")
    with pytest.raises(PushError, match=r"Network failure.*run the same command again"):
        push_folder(folder, REPO)
    hub.restart()
    assert api.list_repo_files(REPO) == [".gitattributes"]  # nothing landed
    assert push_folder(folder, REPO).created_commit
    assert sorted(api.list_repo_files(REPO)) == sorted([".gitattributes", *(p.name for p in folder.iterdir())])
    weights = api.hf_hub_download(REPO, "model.safetensors", cache_dir=tmp_path / "downloads")
    assert Path(weights).read_bytes() == (folder / "model.safetensors").read_bytes()  # the cut object was redone


def test_push_to_a_branch_and_as_a_pull_request(hub, api, archive, folder, tmp_path, capsys):
    code, stdout, stderr = convert_and_push(archive, tmp_path / "out", capsys, "--revision", "dev", "--private")
    assert code == 0, stderr
    assert "(dev, commit" in stdout
    assert api.list_repo_files(REPO) == [".gitattributes"]
    assert "model.safetensors" in api.list_repo_files(REPO, revision="dev")
    assert api.model_info(REPO).private

    result = push_folder(folder, REPO, create_pr=True, commit_message="Add the tiny conversion")
    assert result.pull_request_url == f"{hub.url}/{REPO}/discussions/1"
    assert api.list_repo_files(REPO) == [".gitattributes"]
    assert "model.safetensors" in api.list_repo_files(REPO, revision="refs/pr/1")
    assert api.list_repo_commits(REPO, revision="refs/pr/1")[0].title == "Add the tiny conversion"


def test_push_failures_say_what_to_do(hub, archive, folder, tmp_path, capsys, monkeypatch):
    with monkeypatch.context() as patch:
        patch.delenv("HF_TOKEN")
        patch.setattr(constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-here"))
        code, _, stderr = convert_and_push(archive, tmp_path / "never", capsys)
    assert code == 1 and "No Hugging Face token found" in stderr and "hf auth login" in stderr
    assert not (tmp_path / "never").exists()  # refused before converting

    cases = [
        ({"token": "hf_not_a_real_token"}, r"401 Unauthorized.*invalid or expired"),
        ({"token": hub.read_token}, r"403 Forbidden.*write access"),
        ({"revision": "refs/pr/7"}, r"\(404\).*refs/pr/7"),
    ]
    for kwargs, message in cases:
        with pytest.raises(PushError, match=message):
            push_folder(folder, REPO, **kwargs)
    hub.kill()
    with pytest.raises(PushError, match=r"Network failure.*connection to http://127\.0\.0\.1.* failed"):
        push_folder(folder, REPO)
    assert os.environ["HF_TOKEN"] == hub.token
