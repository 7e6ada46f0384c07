"""The Hub look-alike in tests/hub_server.py, driven by the real huggingface_hub and transformers clients.

These tests pin down that the fixture behaves like the Hub wherever the push tests rely on it: if the client
library changes what it sends, they fail here rather than as a puzzling push-test failure.
"""

import hashlib
import json
import random
import subprocess
import sys
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import httpx2
import pytest
from huggingface_hub import HfApi, constants, hf_hub_download, snapshot_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    HfHubHTTPError,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)

from tests.hub_server import USER, HubServer, hub_server_fixture  # noqa: F401 (importing registers the fixture)

REPO = f"{USER}/tiny"
WEIGHTS = random.Random(0).randbytes(2 * 1024 * 1024)


@pytest.fixture(autouse=True)
def classic_transfer(monkeypatch: pytest.MonkeyPatch) -> None:
    """The server has no Xet storage; HF_HUB_DISABLE_XET is read at import, so set the constant it feeds."""
    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)


@pytest.fixture
def api(hub_server: HubServer) -> HfApi:
    return HfApi(endpoint=hub_server.url, token=hub_server.token)


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    """A model folder with one LFS file (binary .safetensors), small text files, a subfolder and a model card."""
    root = tmp_path / "upload"
    (root / "sub").mkdir(parents=True)
    (root / "model.safetensors").write_bytes(WEIGHTS)
    (root / "config.json").write_text('{"hidden_size": 8}\n')
    (root / "README.md").write_text("---\nlicense: mit\n---\n# tiny\n")
    (root / "sub" / "notes.txt").write_text("notes\n")
    return root


@pytest.fixture
def pushed(api: HfApi, folder: Path) -> str:
    """REPO with `folder` pushed to main; returns the commit id."""
    api.create_repo(REPO)
    return api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="add model").oid


def download(server: HubServer, tmp_path: Path, filename: str, revision: str | None = None) -> bytes:
    path = hf_hub_download(REPO, filename, revision=revision, endpoint=server.url, cache_dir=tmp_path / "cache")
    return Path(path).read_bytes()


def raw(server: HubServer, method: str, path: str, body: bytes | dict | Iterator[bytes] | None = None, **headers: str):
    """One plain HTTP call as (status, headers, body), for protocol details the client libraries hide."""
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    url = path if path.startswith("http") else server.url + path
    request = urllib.request.Request(url, data=data, method=method, headers=headers)
    try:
        with urllib.request.urlopen(request) as response:
            return response.status, response.headers, response.read()
    except urllib.error.HTTPError as error:
        return error.code, error.headers, error.read()


def test_create_repo_conflicts_unless_exist_ok(api: HfApi, hub_server: HubServer) -> None:
    assert api.create_repo(REPO) == f"{hub_server.url}/{REPO}"
    with pytest.raises(HfHubHTTPError) as conflict:
        api.create_repo(REPO)
    assert conflict.value.response.status_code == 409
    api.create_repo(REPO, exist_ok=True)
    assert api.list_repo_files(REPO) == [".gitattributes"]


def test_dataset_repos_live_under_their_own_prefix(api: HfApi, hub_server: HubServer, tmp_path: Path) -> None:
    assert api.create_repo(REPO, repo_type="dataset") == f"{hub_server.url}/datasets/{REPO}"
    api.upload_file(path_or_fileobj=WEIGHTS, path_in_repo="data.bin", repo_id=REPO, repo_type="dataset")
    path = hf_hub_download(REPO, "data.bin", repo_type="dataset", endpoint=hub_server.url, cache_dir=tmp_path)
    assert Path(path).read_bytes() == WEIGHTS
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO)


def test_spaces_need_an_sdk_and_live_under_their_own_prefix(api: HfApi, hub_server: HubServer, tmp_path: Path) -> None:
    headers = {"Authorization": f"Bearer {hub_server.token}"}
    body = {"name": REPO.split("/")[1], "type": "space"}  # huggingface_hub itself refuses to send this
    refused = httpx2.post(f"{hub_server.url}/api/repos/create", json=body, headers=headers)
    assert refused.status_code == 400 and "Invalid sdk" in refused.json()["error"]
    url = api.create_repo(REPO, repo_type="space", space_sdk="gradio")
    assert url == f"{hub_server.url}/spaces/{REPO}"
    api.upload_file(path_or_fileobj=b"import gradio\n", path_in_repo="app.py", repo_id=REPO, repo_type="space")
    assert api.space_info(REPO).sdk == "gradio"
    assert sorted(api.list_repo_files(REPO, repo_type="space")) == [".gitattributes", "app.py"]
    path = hf_hub_download(REPO, "app.py", repo_type="space", endpoint=hub_server.url, cache_dir=tmp_path)
    assert Path(path).read_bytes() == b"import gradio\n"
    assert ("POST", f"/api/spaces/{REPO}/commit/main") in hub_server.log
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO)


def test_upload_folder_then_download(
    api: HfApi, hub_server: HubServer, folder: Path, pushed: str, tmp_path: Path
) -> None:
    expected = [".gitattributes", "README.md", "config.json", "model.safetensors", "sub/notes.txt"]
    assert api.list_repo_files(REPO) == expected
    info = api.model_info(REPO, files_metadata=True)
    assert info.sha == pushed
    lfs = {sibling.rfilename: sibling.lfs for sibling in info.siblings}
    assert lfs["model.safetensors"].sha256 == hashlib.sha256(WEIGHTS).hexdigest()
    assert lfs["config.json"] is None
    assert sum(method == "PUT" for method, _ in hub_server.log) == 1

    assert download(hub_server, tmp_path, "model.safetensors") == WEIGHTS
    assert download(hub_server, tmp_path, "sub/notes.txt") == b"notes\n"
    snapshot = Path(snapshot_download(REPO, endpoint=hub_server.url, cache_dir=tmp_path / "snap"))
    for name in expected[1:]:
        assert (snapshot / name).read_bytes() == (folder / name).read_bytes()

    top = {entry.path: type(entry).__name__ for entry in api.list_repo_tree(REPO)}
    assert top == {".gitattributes": "RepoFile", "README.md": "RepoFile", "config.json": "RepoFile",
                   "model.safetensors": "RepoFile", "sub": "RepoFolder"}  # fmt: skip
    [notes, sub] = api.get_paths_info(REPO, ["sub/notes.txt", "sub", "missing"])
    assert (notes.path, notes.size, sub.path) == ("sub/notes.txt", 6, "sub")


def test_reupload_of_identical_content_creates_no_commit(api: HfApi, folder: Path, pushed: str) -> None:
    again = api.upload_folder(repo_id=REPO, folder_path=folder, commit_message="same again")
    assert again.oid == pushed
    assert [commit.title for commit in api.list_repo_commits(REPO)] == ["add model", "initial commit"]


def test_parent_commit_must_be_the_branch_head(api: HfApi, pushed: str) -> None:
    second = api.upload_file(
        path_or_fileobj=b"v2\n", path_in_repo="config.json", repo_id=REPO, commit_message="v2", parent_commit=pushed
    )
    with pytest.raises(HfHubHTTPError) as stale:
        api.upload_file(path_or_fileobj=b"v3\n", path_in_repo="config.json", repo_id=REPO, parent_commit=pushed)
    assert stale.value.response.status_code == 412
    commits = api.list_repo_commits(REPO)
    assert [commit.commit_id for commit in commits[:2]] == [second.oid, pushed]
    assert [commit.title for commit in commits] == ["v2", "add model", "initial commit"]


def test_branch_upload_and_download_by_revision(api: HfApi, hub_server: HubServer, pushed: str, tmp_path: Path) -> None:
    api.create_branch(REPO, branch="dev")
    with pytest.raises(HfHubHTTPError) as exists:
        api.create_branch(REPO, branch="dev")
    assert exists.value.response.status_code == 409
    api.create_branch(REPO, branch="dev", exist_ok=True)
    dev = api.upload_file(path_or_fileobj=b"dev only\n", path_in_repo="dev.txt", repo_id=REPO, revision="dev")

    assert download(hub_server, tmp_path, "dev.txt", revision="dev") == b"dev only\n"
    assert download(hub_server, tmp_path, "dev.txt", revision=dev.oid) == b"dev only\n"
    with pytest.raises(EntryNotFoundError):
        download(hub_server, tmp_path, "dev.txt")
    branches = {ref.name: ref.target_commit for ref in api.list_repo_refs(REPO).branches}
    assert branches == {"main": pushed, "dev": dev.oid}
    api.delete_branch(REPO, branch="dev")
    with pytest.raises(RevisionNotFoundError):
        download(hub_server, tmp_path, "config.json", revision="dev")


def test_create_pr_commits_to_a_pull_request_ref(
    api: HfApi, hub_server: HubServer, folder: Path, pushed: str, tmp_path: Path
) -> None:
    (folder / "config.json").write_text('{"hidden_size": 16}\n')
    pr = api.upload_folder(repo_id=REPO, folder_path=folder, create_pr=True)
    assert (pr.pr_num, pr.pr_revision) == (1, "refs/pr/1")
    assert pr.pr_url == f"{hub_server.url}/{REPO}/discussions/1"
    assert download(hub_server, tmp_path, "config.json", revision="refs/pr/1") == b'{"hidden_size": 16}\n'
    assert download(hub_server, tmp_path, "config.json") == b'{"hidden_size": 8}\n'
    refs = api.list_repo_refs(REPO, include_pull_requests=True)
    assert [(ref.ref, ref.target_commit) for ref in refs.pull_requests] == [("refs/pr/1", pr.oid)]
    assert api.model_info(REPO).sha == pushed


def test_delete_file_and_repo(api: HfApi, pushed: str) -> None:
    api.delete_file("sub/notes.txt", repo_id=REPO)
    assert "sub/notes.txt" not in api.list_repo_files(REPO)
    with pytest.raises(EntryNotFoundError):
        api.delete_file("sub/notes.txt", repo_id=REPO)
    api.delete_repo(REPO)
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(REPO)
    api.delete_repo(REPO, missing_ok=True)


def test_tokens_decide_who_may_write(hub_server: HubServer, pushed: str) -> None:
    anonymous = HfApi(endpoint=hub_server.url, token=False)
    for client, status in [
        (anonymous, 401),
        (HfApi(endpoint=hub_server.url, token="hf_not_a_token"), 401),
        (HfApi(endpoint=hub_server.url, token=hub_server.read_token), 403),
    ]:
        with pytest.raises(HfHubHTTPError) as refused:
            client.create_repo(f"{USER}/other")
        assert refused.value.response.status_code == status
        with pytest.raises(HfHubHTTPError) as refused:
            client.upload_file(path_or_fileobj=b"x", path_in_repo="x.txt", repo_id=REPO)
        assert refused.value.response.status_code == status
    assert anonymous.model_info(REPO).sha == pushed
    assert HfApi(endpoint=hub_server.url, token=hub_server.read_token).whoami()["name"] == USER
    status, _, body = raw(hub_server, "POST", "/api/repos/create", {"name": "other"})
    assert (status, json.loads(body)["error"]) == (
        401,
        "You must be authenticated to do this: send Authorization: Bearer <token>",
    )


def test_private_repos_need_a_token_to_be_seen(api: HfApi, hub_server: HubServer) -> None:
    api.create_repo(REPO, private=True)
    with pytest.raises(RepositoryNotFoundError):
        HfApi(endpoint=hub_server.url, token=False).model_info(REPO)
    assert HfApi(endpoint=hub_server.url, token=hub_server.read_token).model_info(REPO).private


def test_missing_repo_revision_and_entry(api: HfApi, hub_server: HubServer, pushed: str, tmp_path: Path) -> None:
    with pytest.raises(RepositoryNotFoundError):
        api.model_info(f"{USER}/missing")
    with pytest.raises(RepositoryNotFoundError):
        hf_hub_download(f"{USER}/missing", "config.json", endpoint=hub_server.url, cache_dir=tmp_path)
    with pytest.raises(RevisionNotFoundError):
        download(hub_server, tmp_path, "config.json", revision="nope")
    with pytest.raises(EntryNotFoundError):
        download(hub_server, tmp_path, "missing.json")
    status, headers, _ = raw(hub_server, "HEAD", f"/{REPO}/resolve/main/missing.json")
    assert (status, headers["X-Error-Code"], headers["X-Repo-Commit"]) == (404, "EntryNotFound", pushed)


def test_resolve_headers_and_ranges(hub_server: HubServer, pushed: str) -> None:
    sha256 = hashlib.sha256(WEIGHTS).hexdigest()
    status, headers, _ = raw(hub_server, "HEAD", f"/{REPO}/resolve/main/model.safetensors")
    assert status == 200
    assert (headers["X-Repo-Commit"], headers["ETag"], headers["X-Linked-Etag"]) == (
        pushed,
        f'"{sha256}"',
        f'"{sha256}"',
    )
    assert headers["X-Linked-Size"] == headers["Content-Length"] == str(len(WEIGHTS))
    assert "X-Xet-Hash" not in headers
    status, headers, body = raw(hub_server, "GET", f"/{REPO}/resolve/{pushed}/model.safetensors", Range="bytes=10-19")
    assert (status, body, headers["Content-Range"]) == (206, WEIGHTS[10:20], f"bytes 10-19/{len(WEIGHTS)}")
    status, _, body = raw(hub_server, "GET", f"/{REPO}/resolve/main/model.safetensors", Range="bytes=-4")
    assert (status, body) == (206, WEIGHTS[-4:])
    assert raw(hub_server, "GET", f"/{REPO}/resolve/main/config.json", Range="bytes=99-")[0] == 416


def test_lfs_objects_are_checked_before_a_commit_may_use_them(hub_server: HubServer, api: HfApi) -> None:
    api.create_repo(REPO)
    auth = {"Authorization": f"Bearer {hub_server.token}"}
    content = b"\0binary object"
    oid = hashlib.sha256(content).hexdigest()
    batch_request = {"operation": "upload", "objects": [{"oid": oid, "size": len(content)}]}
    _, _, batch = raw(hub_server, "POST", f"/{REPO}.git/info/lfs/objects/batch", batch_request, **auth)
    href = json.loads(batch)["objects"][0]["actions"]["upload"]["href"]
    assert raw(hub_server, "PUT", href, b"\0tampered object")[0] == 400

    lines = [{"key": "header", "value": {"summary": "add"}}, {"key": "lfsFile", "value": {"path": "w.bin", "algo": "sha256", "oid": oid}}]  # fmt: skip
    commit = b"".join(json.dumps(line).encode() + b"\n" for line in lines)
    status, _, body = raw(hub_server, "POST", f"/api/models/{REPO}/commit/main", commit, **auth)
    assert status == 400 and b"never uploaded" in body

    assert raw(hub_server, "PUT", href, iter([content[:5], content[5:]]))[0] == 200, "chunked transfer encoding"
    _, _, batch = raw(hub_server, "POST", f"/{REPO}.git/info/lfs/objects/batch", batch_request, **auth)
    assert "actions" not in json.loads(batch)["objects"][0]
    assert raw(hub_server, "POST", f"/api/models/{REPO}/commit/main", commit, **auth)[0] == 200
    assert api.list_repo_files(REPO) == [".gitattributes", "w.bin"]


def test_interrupted_commit_raises_and_a_rerun_completes(api: HfApi, hub_server: HubServer, folder: Path) -> None:
    api.create_repo(REPO)
    hub_server.fail_after_bytes(100, method="POST", path_prefix=f"/api/models/{REPO}/commit/")
    with pytest.raises(httpx2.TransportError, match="disconnected"):
        api.upload_folder(repo_id=REPO, folder_path=folder)
    with pytest.raises(httpx2.ConnectError):
        api.model_info(REPO)

    hub_server.restart()
    assert api.list_repo_files(REPO) == [".gitattributes"]
    api.upload_folder(repo_id=REPO, folder_path=folder)
    assert "model.safetensors" in api.list_repo_files(REPO)
    assert sum(method == "PUT" for method, _ in hub_server.log) == 1, "the stored LFS object is not sent again"


def test_lfs_upload_cut_midway_is_retried_after_a_restart(
    api: HfApi, hub_server: HubServer, folder: Path, tmp_path: Path
) -> None:
    api.create_repo(REPO)
    hub_server.fail_after_bytes(len(WEIGHTS) // 2, method="PUT")
    restart = threading.Timer(0.3, hub_server.restart)
    restart.start()
    api.upload_folder(repo_id=REPO, folder_path=folder)  # huggingface_hub retries the PUT after 1 s
    restart.join()
    assert sum(method == "PUT" for method, _ in hub_server.log) == 2
    assert download(hub_server, tmp_path, "model.safetensors") == WEIGHTS


TRANSFORMERS_ROUND_TRIP = """
import sys, torch
from transformers import AutoModel, BertConfig, BertModel
config = BertConfig(vocab_size=32, hidden_size=8, num_hidden_layers=1, num_attention_heads=2, intermediate_size=16,
                    max_position_embeddings=16)
pushed = BertModel(config)
pushed.push_to_hub(sys.argv[1])  # save_pretrained into a temporary folder, then create_repo + upload
loaded = AutoModel.from_pretrained(sys.argv[1]).state_dict()
assert loaded.keys() == pushed.state_dict().keys()
assert all(torch.equal(tensor, pushed.state_dict()[name]) for name, tensor in loaded.items())
"""


def test_transformers_push_to_hub_and_from_pretrained(api: HfApi, hub_server: HubServer, tmp_path: Path) -> None:
    """In a subprocess, because transformers only talks to the endpoint that HF_ENDPOINT named at import."""
    command = [sys.executable, "-c", TRANSFORMERS_ROUND_TRIP, REPO]
    env = hub_server.environ(tmp_path / "cache")
    result = subprocess.run(command, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    sha = api.model_info(REPO).sha
    assert {"config.json", "model.safetensors"} <= set(api.list_repo_files(REPO))
    assert ("GET", f"/{REPO}/resolve/{sha}/model.safetensors") in hub_server.log
