"""``python -m clipviz.publish_space``: the Spaces repository it assembles, and its push against the Hub look-alike
(tests/hub_server.py), end to end through the command line in a fresh process and in-process."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
from huggingface_hub import HfApi

from clipviz import publish_space
from clipviz.publish_space import PublishError, assemble, main, push_space
from tests.hub_server import (  # noqa: F401 (importing a fixture registers it)
    USER,
    HubServer,
    hub_api_fixture,
    hub_fixture,
    hub_server_fixture,
)

ROOT = Path(__file__).resolve().parents[1]
SPACE = ROOT / "space"
EMBEDDED = ROOT / "embedded"
SPACE_ID = f"{USER}/clipviz-space"


def expected_files(models: list[Path]) -> set[str]:
    """What the Spaces repository must hold, derived from the Space folder and the model folders independently."""
    code = {p.name for p in SPACE.glob("*.py")} - {"make_examples.py"}
    names = [entry["file"] for entry in json.loads((SPACE / "examples" / "examples.json").read_text())]
    examples = {f"examples/{name}" for name in ["examples.json", "LICENSES.md", *names]}
    weights = {
        f"models/{folder.name}/{path.relative_to(folder).as_posix()}"
        for folder in models
        for path in folder.rglob("*")
        if path.is_file() and "__pycache__" not in path.parts
    }
    library = {"clipviz/__init__.py", "clipviz/rendering.py", "explaining_clipviz.py"}  # what the Space imports
    return code | {"README.md", "requirements.txt"} | examples | library | weights


def tree(api: HfApi, revision: str = "main") -> dict[str, str]:
    entries = api.list_repo_tree(SPACE_ID, repo_type="space", revision=revision, recursive=True)
    return {entry.path: entry.blob_id for entry in entries if hasattr(entry, "blob_id")}


def test_assembly_holds_the_space_the_examples_and_the_embedded_models_only(tmp_path):
    out = tmp_path / "space"
    files = assemble(out)
    models = [EMBEDDED / "clipviz-tiny-vit", EMBEDDED / "clipviz-tiny-resnet"]
    assert set(files) == expected_files(models)
    assert {str(p.relative_to(out)) for p in out.rglob("*") if p.is_file()} == set(files)
    for name in files:
        source = SPACE / name if not name.startswith("models/") else EMBEDDED / name.removeprefix("models/")
        source = ROOT / name if name.startswith("clipviz/") or name == "explaining_clipviz.py" else source
        assert (out / name).read_bytes() == source.read_bytes() and not (out / name).is_symlink()


def test_symlinked_code_files_ship_their_contents(tmp_path):
    """A model folder whose remote-code files are symlinks to the repository's copies ships real files."""
    model = tmp_path / "linked-model"
    model.mkdir()
    for path in (EMBEDDED / "clipviz-tiny-vit").iterdir():
        target = ROOT / path.name if path.suffix == ".py" else path
        (model / path.name).symlink_to(target)
    (model / "__pycache__").mkdir()
    (model / "__pycache__" / "x.pyc").write_bytes(b"\0")
    files = assemble(tmp_path / "out", models=[model])
    code = tmp_path / "out" / "models" / "linked-model" / "modeling_clipviz.py"
    assert not code.is_symlink() and code.read_bytes() == (ROOT / "modeling_clipviz.py").read_bytes()
    assert not any("__pycache__" in name for name in files)


@pytest.mark.parametrize(
    ("setup", "message"),
    [
        (lambda tmp: {"models": [tmp / "nowhere"]}, r"--model .*nowhere is not a model folder \(no config.json"),
        (lambda tmp: {"models": [EMBEDDED / "clipviz-tiny-vit"] * 2}, "Two --model folders are named"),
        (lambda tmp: {"space_dir": tmp}, "is not the Space folder"),
    ],
)
def test_assembly_errors_say_what_to_fix(tmp_path, setup, message):
    with pytest.raises(PublishError, match=message):
        assemble(tmp_path / "out", **setup(tmp_path))
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_the_command_publishes_exactly_the_assembly_and_a_rerun_makes_no_commit(hub, api, tmp_path):
    """Two runs of the real command line in fresh processes: the first creates the Space (gradio SDK) with exactly
    the expected files, byte for byte; the second finds every remote hash equal and commits nothing."""
    env = {**hub.environ(tmp_path / "cache"), "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "clipviz.publish_space", "--repo-id", SPACE_ID]
    first = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert first.returncode == 0, first.stderr
    assert f"to {hub.url}/spaces/{SPACE_ID} (commit" in first.stdout

    models = [EMBEDDED / "clipviz-tiny-vit", EMBEDDED / "clipviz-tiny-resnet"]
    assert set(tree(api)) == expected_files(models) | {".gitattributes"}
    commits = [c.commit_id for c in api.list_repo_commits(SPACE_ID, repo_type="space")]
    assert len(commits) == 2  # the repo's initial commit, then the one publishing commit
    weights = api.hf_hub_download(
        SPACE_ID, "models/clipviz-tiny-vit/model.safetensors", repo_type="space", cache_dir=tmp_path / "dl"
    )
    assert Path(weights).read_bytes() == (EMBEDDED / "clipviz-tiny-vit" / "model.safetensors").read_bytes()
    app = api.hf_hub_download(SPACE_ID, "app.py", repo_type="space", cache_dir=tmp_path / "dl")
    assert Path(app).read_bytes() == (SPACE / "app.py").read_bytes()
    assert ("POST", "/api/repos/create") in hub.log and api.space_info(SPACE_ID).sdk == "gradio"

    second = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert second.returncode == 0, second.stderr
    assert "no commit made" in second.stdout
    assert [c.commit_id for c in api.list_repo_commits(SPACE_ID, repo_type="space")] == commits


def test_a_change_is_one_commit_with_only_that_change(hub, api, tmp_path):
    first = tmp_path / "first"
    assemble(first, models=[EMBEDDED / "clipviz-tiny-vit", EMBEDDED / "clipviz-tiny-resnet"])
    assert push_space(first, SPACE_ID).created_commit
    before = tree(api)

    second = tmp_path / "second"
    assemble(second, models=[EMBEDDED / "clipviz-tiny-vit"])  # one model fewer
    (second / "README.md").write_text((second / "README.md").read_text() + "\nA changed card.\n")
    result = push_space(second, SPACE_ID)
    assert result.created_commit and result.changed == ["README.md"]
    assert result.deleted == sorted(name for name in before if name.startswith("models/clipviz-tiny-resnet/"))
    after = tree(api)
    assert set(after) == set(before) - set(result.deleted)
    assert [name for name in after if after[name] != before[name]] == ["README.md"]
    commits = api.list_repo_commits(SPACE_ID, repo_type="space")
    assert len(commits) == 3 and commits[0].title == "Publish the clipviz Space"


def test_an_unrelated_space_is_refused_unless_replace_is_given(hub, api, tmp_path, capsys):
    """A --repo-id naming a Space that holds something else fails with a clear error and leaves it untouched;
    --replace publishes anyway (deleting the other files); a Space published before updates without --replace."""
    api.create_repo(SPACE_ID, repo_type="space", space_sdk="gradio")
    api.upload_file(
        path_or_fileobj=b"print('another app')\n", path_in_repo="app.py", repo_id=SPACE_ID, repo_type="space"
    )
    before = [c.commit_id for c in api.list_repo_commits(SPACE_ID, repo_type="space")]
    models = ["--model", str(EMBEDDED / "clipviz-tiny-resnet")]
    assert main(["--repo-id", SPACE_ID, *models]) == 1
    err = capsys.readouterr().err
    assert err.startswith(f"error: The Space {SPACE_ID} already holds 1 file(s) (app.py) but no earlier clipviz")
    assert "--replace" in err and "Traceback" not in err and err.count("\n") == 1
    assert [c.commit_id for c in api.list_repo_commits(SPACE_ID, repo_type="space")] == before
    assert set(tree(api)) == {".gitattributes", "app.py"}

    assert main(["--repo-id", SPACE_ID, *models, "--replace"]) == 0
    assert set(tree(api)) == expected_files([EMBEDDED / "clipviz-tiny-resnet"]) | {".gitattributes"}
    assert main(["--repo-id", SPACE_ID, "--model", str(EMBEDDED / "clipviz-tiny-vit")]) == 0  # our own: no --replace
    assert set(tree(api)) == expected_files([EMBEDDED / "clipviz-tiny-vit"]) | {".gitattributes"}


def test_publish_failures_are_one_line_errors(hub, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("HF_TOKEN", hub.read_token)
    assert main(["--repo-id", SPACE_ID, "--endpoint", hub.url]) == 1
    err = capsys.readouterr().err
    assert err.startswith("error: The token may not write") and "Traceback" not in err
    assert main(["--repo-id", SPACE_ID, "--model", str(tmp_path)]) == 1
    assert "is not a model folder" in capsys.readouterr().err
    hub.kill()
    monkeypatch.setenv("HF_TOKEN", hub.token)
    assert main(["--repo-id", SPACE_ID, "--endpoint", hub.url]) == 1
    assert "Network failure" in capsys.readouterr().err


def test_output_dir_only_assembles(tmp_path, capsys):
    assert main(["--output-dir", str(tmp_path / "out"), "--model", str(EMBEDDED / "clipviz-tiny-resnet")]) == 0
    assert "Assembled" in capsys.readouterr().out
    assert (tmp_path / "out" / "models" / "clipviz-tiny-resnet" / "config.json").is_file()
    assert main(["--output-dir", str(tmp_path / "out")]) == 1  # not empty: never written over
    assert "exists and is not an empty folder" in capsys.readouterr().err
    assert os.path.isdir(publish_space.DEFAULT_SPACE_DIR)


def test_the_assembled_space_runs_on_its_own(tmp_path):
    """The assembly is a complete Space: launched from a folder with nothing of the repository around it (no
    PYTHONPATH, no ../embedded), it lists its shipped models and explains a scene with them."""
    from gradio_client import Client, handle_file

    from tests.space_server import SpaceServer

    out = tmp_path / "deployed"
    assemble(out)
    server = SpaceServer(app=out / "app.py", cwd=tmp_path, PYTHONPATH="", CLIPVIZ_EMBEDDED_DIR="")
    try:
        client = Client(server.url, verbose=False)
        overlays, probabilities, *_ = client.predict(
            image=handle_file(str(out / "examples" / "scene_1000000001.png")),
            prompts="a photo of a purple square\na photo of a blue circle",
            model="embedded: clipviz-tiny-resnet",
            api_name="/explain",
        )
        assert len(overlays) == 2 and len(probabilities["confidences"]) == 2
        log = server.log.read_text()
    finally:
        server.stop()
    assert str(ROOT) not in log and "Traceback" not in log
