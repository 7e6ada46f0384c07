"""A Hugging Face Hub look-alike HTTP server, for tests that push to and pull from "the Hub".

The real Hub cannot be reached from the test machines, and no self-hostable Hub server installs here, so this module
speaks just enough of the Hub's HTTP API for `huggingface_hub` (2.4, classic non-Xet transfer) and `transformers`
to create repos, push commits (regular and git-LFS files), branch, open pull requests and download, against
`http://127.0.0.1:<port>`. It is stdlib only and keeps everything in memory.

Use it as a context manager or through the `hub_server` pytest fixture (`hub`: the same with this process's
huggingface_hub clients pointed at it; `api`: an `HfApi` client of it): import `hub_server_fixture` (`hub_fixture`,
`hub_api_fixture`) into a test module (the import registers it), or list "tests.hub_server" in a conftest's
`pytest_plugins`.

    with HubServer() as server:
        api = HfApi(endpoint=server.url, token=server.token)

Clients must run with `HF_HUB_DISABLE_XET=1` (the server has no Xet storage, so it never sends `X-Xet-Hash`) and
must be pointed at `server.url` through `endpoint=` or `HF_ENDPOINT` (read when huggingface_hub is imported);
`server.environ(cache_dir)` builds the environment for a subprocess.

Behaviour worth knowing when writing assertions:
- Tokens: `server.token` may write, `server.read_token` may only read. Writes without a token get 401, with an
  unknown token 401 (`Invalid credentials in Authorization header`, as the Hub words it), with the read token 403.
  Public repos can be read without a token; private ones answer like missing ones.
- Upload mode (the preupload answer): "lfs" when the path ends with one of `LFS_SUFFIXES`, the file is at least
  `LFS_MIN_SIZE` bytes, or its first 512 bytes hold a NUL byte (binary); "regular" otherwise. A commit that sends
  a large or binary file inline is rejected, as the Hub rejects binary files pushed outside LFS.
- Spaces (`repo_type="space"`, URLs under `/spaces/` and `/api/spaces/`) must be created with a known `space_sdk`
  (400 otherwise, as on the Hub); their info answer carries `sdk`.
- Every new repo starts with an "initial commit" holding a `.gitattributes` that lists `LFS_SUFFIXES`.
- Commit ids are sha1 over the parent id, the sorted (path, git blob id) tree, the message and the time.
- A commit that leaves the tree unchanged creates no commit and answers with the current head, so pushing identical
  content twice leaves `list_repo_commits` unchanged (huggingface_hub also drops unchanged files itself, using the
  `oid` the preupload answer gives). A commit with `create_pr=1` always opens `refs/pr/N`, even if empty.
- A revision may be a branch name, `refs/heads/<branch>`, `refs/pr/<N>` or a full 40-hex commit id.
- LFS objects are stored per repo, once uploaded with a matching sha256 and size; uploads go to one-time-looking
  hrefs carrying a ticket, since huggingface_hub sends no Authorization header on the LFS PUT.
- `server.log` lists (method, path) of every request, path without query string and still percent-encoded.

Failure simulation: `server.fail_after_bytes(n, method, path_prefix)` arms a one-shot crash: once the next matching
request has sent `n` bytes of its body, the server dies like `server.kill()` (every open connection is cut without
an answer and new connections are refused). `server.restart()` listens again on the same port with the same storage
and tokens, so upload hrefs handed out before the crash stay valid. Note that huggingface_hub retries LFS PUTs,
batch and preupload calls on connection errors (sleeping 1, 2, 4, 8, 8 s), but not the final commit POST.
"""

import base64
import hashlib
import json
import os
import re
import secrets
import socket
import sys
import threading
import traceback
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import parse_qs, unquote, urlsplit

import pytest

LFS_MIN_SIZE = 10 * 1024 * 1024
LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".ckpt", ".h5", ".msgpack", ".onnx", ".npy", ".npz", ".pkl")
USER = "hub-tester"

_REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
_URL_PREFIXES = {"model": "", "dataset": "datasets/", "space": "spaces/"}
_SPACE_SDKS = ("gradio", "docker", "static", "streamlit")
_SHA256 = re.compile(r"[0-9a-f]{64}")
_READ_CHUNK = 64 * 1024
_LFS_BATCH_PATH = ["info", "lfs", "objects", "batch"]
_LFS_JSON = "application/vnd.git-lfs+json"


class _HttpError(Exception):
    """An error answer; `code` becomes the `X-Error-Code` header huggingface_hub maps to its exception classes."""

    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: dict[str, str] | None = None,
        extra: dict | None = None,
    ):
        super().__init__(message)
        self.status, self.message, self.code = status, message, code
        self.headers, self.extra = headers or {}, extra or {}


class _ConnectionCut(Exception):
    """Raised while reading a request body when an armed fault says the server must die now."""


class _ClientGone(Exception):
    """Raised when the client hangs up before its request body is complete; nobody is left to answer."""


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _large_or_binary(size: int, sample: bytes) -> bool:
    """What the Hub refuses to take inline in a commit."""
    return size >= LFS_MIN_SIZE or b"\0" in sample[:512]


def _upload_mode(path: str, size: int, sample: bytes) -> str:
    """The preupload answer, by the rule in the module docstring."""
    return "lfs" if path.endswith(LFS_SUFFIXES) or _large_or_binary(size, sample) else "regular"


@dataclass(frozen=True)
class _Blob:
    """A file as a commit holds it. For LFS files git stores the pointer, so the blob id is the pointer's."""

    data: bytes
    lfs: bool
    sha256: str
    blob_id: str

    @classmethod
    def make(cls, data: bytes, lfs: bool) -> "_Blob":
        sha256 = hashlib.sha256(data).hexdigest()
        return cls(data, lfs, sha256, _git_blob_id(_lfs_pointer(sha256, len(data)) if lfs else data))

    def remote_oid(self) -> str:
        """What huggingface_hub compares with its local file to skip unchanged ones: sha256 for LFS, blob id else."""
        return self.sha256 if self.lfs else self.blob_id

    def lfs_info(self, sha_key: str) -> dict:
        """LFS metadata; tree answers name the sha256 `oid`, repo info answers name it `sha256`."""
        pointer_size = len(_lfs_pointer(self.sha256, len(self.data)))
        return {sha_key: self.sha256, "size": len(self.data), "pointerSize": pointer_size}

    def entry(self, path: str) -> dict:
        """The file's entry in tree and paths-info answers."""
        entry = {"type": "file", "oid": self.blob_id, "size": len(self.data), "path": path}
        if self.lfs:
            entry["lfs"] = self.lfs_info("oid")
        return entry

    def sibling(self, path: str, with_blobs: bool) -> dict:
        """The file's entry in repo info answers, with size and ids only when `?blobs=true` asks for them."""
        if not with_blobs:
            return {"rfilename": path}
        sibling = {"rfilename": path, "size": len(self.data), "blobId": self.blob_id}
        if self.lfs:
            sibling["lfs"] = self.lfs_info("sha256")
        return sibling


@dataclass(frozen=True)
class _Commit:
    oid: str
    parent: str | None
    title: str
    message: str
    date: str
    files: dict[str, _Blob]

    @classmethod
    def make(cls, parent: "_Commit | None", files: dict[str, _Blob], title: str, message: str) -> "_Commit":
        date = _now()
        tree = sorted((path, blob.blob_id) for path, blob in files.items())
        parent_id = parent.oid if parent else None
        oid = hashlib.sha1(json.dumps([parent_id, tree, title, message, date]).encode()).hexdigest()
        return cls(oid, parent_id, title, message, date, files)

    def folder_entry(self, folder: str) -> dict:
        inside = sorted((path, blob.blob_id) for path, blob in self.files.items() if path.startswith(folder + "/"))
        return {
            "type": "directory",
            "oid": hashlib.sha1(json.dumps(inside).encode()).hexdigest(),
            "size": 0,
            "path": folder,
        }

    def is_folder(self, path: str) -> bool:
        return any(name.startswith(path + "/") for name in self.files)


def _initial_files() -> dict[str, _Blob]:
    lines = "".join(f"*{suffix} filter=lfs diff=lfs merge=lfs -text\n" for suffix in LFS_SUFFIXES)
    return {".gitattributes": _Blob.make(lines.encode(), lfs=False)}


@dataclass
class _Repo:
    """One repository: every commit ever made, refs (`refs/heads/*`, `refs/pr/*`) and its LFS objects."""

    repo_type: str
    repo_id: str
    private: bool
    sdk: str | None = None  # spaces only: what runs the Space
    created_at: str = field(default_factory=_now)
    commits: dict[str, _Commit] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)
    lfs_objects: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.add_commit("refs/heads/main", _Commit.make(None, _initial_files(), "initial commit", ""))

    def add_commit(self, ref: str, commit: _Commit) -> None:
        self.commits[commit.oid] = commit
        self.refs[ref] = commit.oid

    def resolve(self, revision: str) -> _Commit:
        for ref in (f"refs/heads/{revision}", revision):
            if ref in self.refs:
                return self.commits[self.refs[ref]]
        if revision in self.commits:
            return self.commits[revision]
        raise _HttpError(404, f"Invalid rev id: {revision}", code="RevisionNotFound")

    def writable_ref(self, revision: str) -> str:
        """Commits go to a branch or to an open pull request, never to a bare commit id."""
        for ref in (f"refs/heads/{revision}", revision):
            if ref in self.refs:
                return ref
        raise _HttpError(404, f"Invalid rev id: {revision} (commit to a branch or refs/pr/N)", code="RevisionNotFound")

    def next_pr_ref(self) -> str:
        numbers = [int(ref.rsplit("/", 1)[1]) for ref in self.refs if ref.startswith("refs/pr/")]
        return f"refs/pr/{max(numbers, default=0) + 1}"

    def history(self, commit: _Commit) -> Iterator[_Commit]:
        """The commit and its ancestors, newest first (every commit has at most one parent)."""
        yield commit
        while commit.parent is not None:
            commit = self.commits[commit.parent]
            yield commit

    def url(self, base_url: str) -> str:
        return f"{base_url}/{_URL_PREFIXES[self.repo_type]}{self.repo_id}"


@dataclass
class _Request:
    method: str
    segments: list[str]
    query: dict[str, list[str]]
    headers: Message
    body: bytes
    base_url: str

    def json(self) -> dict:
        try:
            return json.loads(self.body or b"{}")
        except json.JSONDecodeError as error:
            raise _HttpError(400, f"Body is not valid JSON: {error}") from error

    def flag(self, name: str) -> bool:
        return self.query.get(name, [""])[0].lower() in ("1", "true")


@dataclass
class _Response:
    status: int
    body: bytes = b""
    headers: dict[str, str] = field(default_factory=dict)


def _json(payload: object, status: int = 200, content_type: str = "application/json") -> _Response:
    return _Response(status, json.dumps(payload).encode(), {"Content-Type": content_type})


def _error_response(error: _HttpError) -> _Response:
    response = _json({"error": error.message, **error.extra}, error.status)
    header_safe = error.message.encode("ascii", "backslashreplace").decode()
    response.headers.update({"X-Error-Message": header_safe, **error.headers})
    if error.code:
        response.headers["X-Error-Code"] = error.code
    return response


class _HubState:
    """The Hub's storage and API logic, independent of sockets so that it outlives a killed server."""

    def __init__(self, tokens: dict[str, str]):
        self.tokens = tokens
        self.repos: dict[tuple[str, str], _Repo] = {}
        self.upload_tickets: dict[str, tuple[tuple[str, str], str, int]] = {}
        self.lock = threading.Lock()

    def handle(self, request: _Request) -> _Response:
        try:
            with self.lock:
                return self._route(request)
        except _HttpError as error:
            return _error_response(error)

    def _route(self, request: _Request) -> _Response:
        segments, method = request.segments, request.method
        if segments[:1] == ["api"]:
            return self._route_api(request, segments[1:])
        if segments[:1] == ["lfs-upload"] and method == "PUT" and len(segments) == 2:
            return self._lfs_put(request, segments[1])
        repo_type = _REPO_TYPES.get(segments[0], "model") if segments else "model"
        repo_segments = segments[1:] if repo_type != "model" else segments
        if len(repo_segments) >= 4 and repo_segments[2] == "resolve" and method in ("GET", "HEAD"):
            repo_id = "/".join(repo_segments[:2])
            return self._resolve(request, repo_type, repo_id, repo_segments[3], "/".join(repo_segments[4:]))
        if repo_segments[1:2] and repo_segments[1].endswith(".git") and repo_segments[2:] == _LFS_BATCH_PATH:
            repo_id = f"{repo_segments[0]}/{repo_segments[1].removesuffix('.git')}"
            return self._lfs_batch(request, repo_type, repo_id)
        raise _HttpError(404, f"No route for {method} /{'/'.join(segments)}")

    def _route_api(self, request: _Request, segments: list[str]) -> _Response:
        method = request.method
        if (method, segments) == ("POST", ["repos", "create"]):
            return self._create_repo(request)
        if (method, segments) == ("DELETE", ["repos", "delete"]):
            return self._delete_repo(request)
        if (method, segments) == ("GET", ["whoami-v2"]):
            return self._whoami(request)
        if (method, segments) == ("POST", ["validate-yaml"]):
            return _json({"errors": [], "warnings": []})
        if len(segments) < 3 or segments[0] not in _REPO_TYPES:
            raise _HttpError(404, f"No route for {method} /api/{'/'.join(segments)}")
        repo_type, repo_id = _REPO_TYPES[segments[0]], f"{segments[1]}/{segments[2]}"
        action, args = (segments[3], segments[4:]) if len(segments) > 3 else (None, [])
        handler = self._REPO_ROUTES.get((method, action))
        if handler is None or (action is not None and not args and action != "refs"):
            raise _HttpError(404, f"No route for {method} /api/{'/'.join(segments)}")
        return handler(self, request, repo_type, repo_id, args)

    # -- access control ---------------------------------------------------------------------------------------

    def _role(self, request: _Request) -> str | None:
        """The caller's token role, None when no token was sent; an unknown token is an error even for reads."""
        authorization = request.headers.get("Authorization")
        if not authorization:
            return None
        scheme, _, token = authorization.partition(" ")
        role = self.tokens.get(token.strip()) if scheme.lower() == "bearer" else None
        if role is None:
            raise _HttpError(401, "Invalid credentials in Authorization header")
        return role

    def _require_write(self, request: _Request) -> None:
        role = self._role(request)
        if role is None:
            raise _HttpError(401, "You must be authenticated to do this: send Authorization: Bearer <token>")
        if role != "write":
            raise _HttpError(403, "This token has read access only; the request needs a write token")

    def _repo(self, request: _Request, repo_type: str, repo_id: str, write: bool = False) -> _Repo:
        """The repo, or the Hub's answer for a missing one: 401 without a token, 404 with one (both RepoNotFound)."""
        if write:
            self._require_write(request)
        role = self._role(request)
        repo = self.repos.get((repo_type, repo_id))
        if repo is None or (repo.private and role is None):
            raise _HttpError(401 if role is None else 404, "Repository not found", code="RepoNotFound")
        return repo

    # -- repos ------------------------------------------------------------------------------------------------

    def _create_repo(self, request: _Request) -> _Response:
        self._require_write(request)
        body = request.json()
        repo_type = body.get("type") or "model"
        if repo_type not in _URL_PREFIXES or not body.get("name"):
            raise _HttpError(400, f"Invalid repo type or name: {repo_type!r}, {body.get('name')!r}")
        repo_id = f"{body.get('organization') or USER}/{body['name']}"
        if (repo_type, repo_id) in self.repos:
            url = self.repos[(repo_type, repo_id)].url(request.base_url)
            raise _HttpError(409, f"You already created this {repo_type} repo", extra={"url": url})
        sdk = body.get("sdk") if repo_type == "space" else None
        if repo_type == "space" and sdk not in _SPACE_SDKS:
            raise _HttpError(400, f"Invalid sdk {sdk!r} for a Space: one of {', '.join(_SPACE_SDKS)} is required")
        private = bool(body.get("private")) or body.get("visibility") == "private"
        repo = self.repos[(repo_type, repo_id)] = _Repo(repo_type, repo_id, private, sdk)
        return _json({"url": repo.url(request.base_url), "name": repo_id, "id": repo_id})

    def _delete_repo(self, request: _Request) -> _Response:
        body = request.json()
        repo_id = f"{body.get('organization') or USER}/{body.get('name')}"
        repo = self._repo(request, body.get("type") or "model", repo_id, write=True)
        del self.repos[(repo.repo_type, repo.repo_id)]
        return _json({})

    def _whoami(self, request: _Request) -> _Response:
        role = self._role(request)
        if role is None:
            raise _HttpError(401, "You must be authenticated to call whoami")
        token = {"displayName": f"{role} token", "role": role}
        return _json(
            {
                "type": "user",
                "id": USER,
                "name": USER,
                "fullname": USER,
                "orgs": [],
                "auth": {"type": "access_token", "accessToken": token},
            }
        )

    def _repo_info(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        repo = self._repo(request, repo_type, repo_id)
        commit = repo.resolve("/".join(args) or "main")
        siblings = [blob.sibling(path, request.flag("blobs")) for path, blob in sorted(commit.files.items())]
        info = {
            "_id": hashlib.sha1(repo_id.encode()).hexdigest()[:24],
            "id": repo_id,
            "author": repo_id.split("/")[0],
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(len(blob.data) for blob in commit.files.values()),
        }
        if repo.repo_type == "space":
            info["sdk"] = repo.sdk
        return _json(info)

    def _tree(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        commit = self._repo(request, repo_type, repo_id).resolve(args[0])
        folder = "/".join(args[1:]).strip("/")
        if folder and not commit.is_folder(folder):
            raise _HttpError(404, f"{folder} is not a folder at {args[0]}", code="EntryNotFound")
        prefix = f"{folder}/" if folder else ""
        recursive = request.flag("recursive")
        entries: dict[str, dict] = {}
        for path, blob in commit.files.items():
            if not path.startswith(prefix):
                continue
            parts = path[len(prefix) :].split("/")
            for end in range(1, len(parts) if recursive else min(len(parts), 2)):
                sub_folder = prefix + "/".join(parts[:end])
                entries[sub_folder] = commit.folder_entry(sub_folder)
            if recursive or len(parts) == 1:
                entries[path] = blob.entry(path)
        return _json([entries[path] for path in sorted(entries)])

    def _paths_info(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        commit = self._repo(request, repo_type, repo_id).resolve("/".join(args))
        if "json" in request.headers.get("Content-Type", ""):
            paths = request.json().get("paths", [])
        else:
            paths = parse_qs(request.body.decode()).get("paths", [])
        entries = []
        for path in paths:
            path = path.strip("/")
            if path in commit.files:
                entries.append(commit.files[path].entry(path))
            elif commit.is_folder(path):
                entries.append(commit.folder_entry(path))
        return _json(entries)

    def _commits(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        repo = self._repo(request, repo_type, repo_id)
        authors = [{"user": USER, "avatar": None}]
        return _json(
            [
                {
                    "id": commit.oid,
                    "title": commit.title,
                    "message": commit.message,
                    "authors": authors,
                    "date": commit.date,
                }
                for commit in repo.history(repo.resolve("/".join(args)))
            ]
        )

    def _refs(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        repo = self._repo(request, repo_type, repo_id)

        def listing(prefix: str) -> list[dict]:
            return [
                {"name": ref.removeprefix("refs/heads/"), "ref": ref, "targetCommit": oid}
                for ref, oid in sorted(repo.refs.items())
                if ref.startswith(prefix)
            ]

        return _json(
            {"branches": listing("refs/heads/"), "converts": [], "tags": [], "pullRequests": listing("refs/pr/")}
        )

    def _create_branch(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        repo = self._repo(request, repo_type, repo_id, write=True)
        ref = f"refs/heads/{'/'.join(args)}"
        if ref in repo.refs:
            raise _HttpError(409, f"Reference already exists: {ref}")
        repo.refs[ref] = repo.resolve(request.json().get("startingPoint") or "main").oid
        return _json({})

    def _delete_branch(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        repo = self._repo(request, repo_type, repo_id, write=True)
        ref = f"refs/heads/{'/'.join(args)}"
        if ref == "refs/heads/main":
            raise _HttpError(403, "The default branch cannot be deleted")
        if repo.refs.pop(ref, None) is None:
            raise _HttpError(404, f"Invalid rev id: {ref}", code="RevisionNotFound")
        return _json({})

    # -- uploads ----------------------------------------------------------------------------------------------

    def _preupload(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        commit = self._repo(request, repo_type, repo_id, write=True).resolve("/".join(args))
        answers = []
        for file in request.json().get("files", []):
            mode = _upload_mode(file["path"], int(file["size"]), base64.b64decode(file.get("sample", "")))
            existing = commit.files.get(file["path"])
            oid = existing.remote_oid() if existing else None
            answers.append({"path": file["path"], "uploadMode": mode, "shouldIgnore": False, "oid": oid})
        return _json({"files": answers, "commitOid": commit.oid})

    def _lfs_batch(self, request: _Request, repo_type: str, repo_id: str) -> _Response:
        repo = self._repo(request, repo_type, repo_id, write=True)
        body = request.json()
        if body.get("operation") != "upload":
            raise _HttpError(400, "This server only implements the LFS 'upload' operation")
        answers = [self._lfs_batch_object(request, repo, obj) for obj in body.get("objects", [])]
        return _json({"transfer": "basic", "objects": answers, "hash_algo": "sha256"}, content_type=_LFS_JSON)

    def _lfs_batch_object(self, request: _Request, repo: _Repo, obj: dict) -> dict:
        """Upload instructions for one object; objects the repo already holds get none, as git-LFS specifies."""
        oid, size = obj.get("oid"), obj.get("size")
        answer = {"oid": oid if isinstance(oid, str) else "", "size": size if isinstance(size, int) else 0}
        if not (isinstance(oid, str) and _SHA256.fullmatch(oid) and isinstance(size, int) and size >= 0):
            return {**answer, "error": {"code": 422, "message": "oid must be a sha256 hex digest and size an int"}}
        if oid in repo.lfs_objects:
            return answer
        ticket = secrets.token_urlsafe(16)
        self.upload_tickets[ticket] = ((repo.repo_type, repo.repo_id), oid, size)
        href = f"{request.base_url}/lfs-upload/{ticket}"
        return {**answer, "authenticated": True, "actions": {"upload": {"href": href, "expires_in": 3600}}}

    def _lfs_put(self, request: _Request, ticket: str) -> _Response:
        if ticket not in self.upload_tickets:
            raise _HttpError(404, "Unknown or expired upload href")
        repo_key, oid, size = self.upload_tickets[ticket]
        if repo_key not in self.repos:
            raise _HttpError(404, "Repository not found", code="RepoNotFound")
        actual = hashlib.sha256(request.body).hexdigest()
        if len(request.body) != size or actual != oid:
            message = (
                f"Uploaded content ({len(request.body)} bytes, sha256 {actual}) does not match {oid} ({size} bytes)"
            )
            raise _HttpError(400, message)
        self.repos[repo_key].lfs_objects[oid] = request.body
        return _Response(200)

    def _commit(self, request: _Request, repo_type: str, repo_id: str, args: list[str]) -> _Response:
        repo = self._repo(request, repo_type, repo_id, write=True)
        lines = _ndjson(request.body)
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "A commit body is NDJSON starting with a 'header' line")
        header = lines[0]["value"]
        create_pr, revision = request.flag("create_pr"), "/".join(args)
        base = repo.resolve(revision)
        ref = repo.next_pr_ref() if create_pr else repo.writable_ref(revision)
        parent = header.get("parentCommit")
        if parent and not base.oid.startswith(parent.lower()):
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")
        files = dict(base.files)
        for line in lines[1:]:
            _apply_operation(repo, files, line.get("key"), line.get("value") or {})
        commit = base
        if create_pr or files != base.files:
            commit = _Commit.make(base, files, header.get("summary") or "Commit", header.get("description") or "")
            repo.add_commit(ref, commit)
        repo_url = repo.url(request.base_url)
        answer = {"success": True, "commitOid": commit.oid, "commitUrl": f"{repo_url}/commit/{commit.oid}"}
        if create_pr:
            answer["pullRequestUrl"] = f"{repo_url}/discussions/{ref.rsplit('/', 1)[1]}"
        return _json(answer)

    # -- downloads --------------------------------------------------------------------------------------------

    def _resolve(self, request: _Request, repo_type: str, repo_id: str, revision: str, path: str) -> _Response:
        commit = self._repo(request, repo_type, repo_id).resolve(revision)
        blob = commit.files.get(path)
        if blob is None:
            raise _HttpError(
                404, f"Entry not found: {path}", code="EntryNotFound", headers={"X-Repo-Commit": commit.oid}
            )
        headers = {
            "Content-Type": "application/octet-stream",
            "Accept-Ranges": "bytes",
            "X-Repo-Commit": commit.oid,
            "ETag": f'"{blob.sha256 if blob.lfs else blob.blob_id}"',
        }
        if blob.lfs:
            headers.update({"X-Linked-Etag": f'"{blob.sha256}"', "X-Linked-Size": str(len(blob.data))})
        byte_range = request.headers.get("Range")
        if not byte_range:
            return _Response(200, blob.data, headers)
        start, end = _parse_range(byte_range, len(blob.data))
        headers["Content-Range"] = f"bytes {start}-{end}/{len(blob.data)}"
        return _Response(206, blob.data[start : end + 1], headers)

    _REPO_ROUTES = {
        ("GET", None): _repo_info,
        ("GET", "revision"): _repo_info,
        ("GET", "tree"): _tree,
        ("POST", "paths-info"): _paths_info,
        ("GET", "commits"): _commits,
        ("GET", "refs"): _refs,
        ("POST", "branch"): _create_branch,
        ("DELETE", "branch"): _delete_branch,
        ("POST", "preupload"): _preupload,
        ("POST", "commit"): _commit,
    }


def _ndjson(body: bytes) -> list[dict]:
    try:
        return [json.loads(line) for line in body.splitlines() if line.strip()]
    except json.JSONDecodeError as error:
        raise _HttpError(400, f"Commit body is not NDJSON: {error}") from error


def _checked_path(path: object) -> str:
    if not isinstance(path, str) or not path or path.startswith("/") or ".." in path.split("/"):
        raise _HttpError(400, f"Invalid path in commit: {path!r}")
    return path


def _apply_operation(repo: _Repo, files: dict[str, _Blob], key: str | None, value: dict) -> None:
    """Apply one NDJSON commit line to `files`, refusing what the Hub refuses."""
    path = _checked_path(value.get("path"))
    if key == "file":
        data = base64.b64decode(value.get("content", ""))
        if _large_or_binary(len(data), data):
            raise _HttpError(400, f"Your push was rejected: {path} is binary or too large and must go through LFS")
        files[path] = _Blob.make(data, lfs=False)
    elif key == "lfsFile":
        data = repo.lfs_objects.get(value.get("oid", ""))
        if data is None:
            raise _HttpError(
                400, f"Your push was rejected: LFS object {value.get('oid')} for {path} was never uploaded"
            )
        if value.get("size") not in (None, len(data)):
            raise _HttpError(400, f"LFS object size mismatch for {path}: {value.get('size')} != {len(data)}")
        files[path] = _Blob.make(data, lfs=True)
    elif key == "deletedFile":
        if files.pop(path, None) is None:
            raise _HttpError(404, f"A file with this name doesn't exist: {path}", code="EntryNotFound")
    elif key == "deletedFolder":
        inside = [name for name in files if name.startswith(path.rstrip("/") + "/")]
        if not inside:
            raise _HttpError(404, f"A folder with this name doesn't exist: {path}", code="EntryNotFound")
        for name in inside:
            del files[name]
    else:
        raise _HttpError(400, f"Unknown commit operation: {key!r}")


def _parse_range(header: str, size: int) -> tuple[int, int]:
    """First range of a `bytes=` Range header as inclusive offsets; 416 when it cannot be served."""
    match = re.fullmatch(r"bytes=(\d*)-(\d*)(,.*)?", header.strip())
    if match is None or match.group(1) == match.group(2) == "":
        raise _HttpError(400, f"Malformed Range header: {header}")
    first, last = match.group(1), match.group(2)
    start, end = (int(first), int(last) if last else size - 1) if first else (max(size - int(last), 0), size - 1)
    if start >= size or start > end:
        raise _HttpError(
            416, f"Range {header} not satisfiable for {size} bytes", headers={"Content-Range": f"bytes */{size}"}
        )
    return start, min(end, size - 1)


class _Handler(BaseHTTPRequestHandler):
    """HTTP glue: reads the body (honouring an armed fault), asks `_HubState` and writes the answer."""

    protocol_version = "HTTP/1.1"
    server: "_HTTPServer"

    def do_GET(self) -> None:
        self._serve()

    do_HEAD = do_POST = do_PUT = do_DELETE = do_GET

    def log_message(self, format: str, *args: object) -> None:
        """Silenced: `HubServer.log` records requests for tests, stderr stays for real failures."""

    def _serve(self) -> None:
        hub = self.server.hub
        split = urlsplit(self.path)
        hub.log.append((self.command, split.path))
        self.close_connection = True
        try:
            body = self._read_body(hub.take_fault(self.command, split.path))
        except _ConnectionCut:
            hub.kill()
            return
        except _ClientGone:
            return
        segments = [unquote(segment) for segment in split.path.strip("/").split("/")] if split.path.strip("/") else []
        request = _Request(self.command, segments, parse_qs(split.query), self.headers, body, hub.url)
        try:
            response = hub.state.handle(request)
        except Exception:
            traceback.print_exc(file=sys.stderr)
            response = _json({"error": f"Hub server bug: {traceback.format_exc(limit=1)}"}, 500)
        self._write(response)

    def _read_body(self, cut_after: int | None) -> bytes:
        body = bytearray()
        for chunk in self._body_chunks():
            body += chunk
            if cut_after is not None and len(body) >= cut_after:
                raise _ConnectionCut
        if cut_after is not None:
            raise _ConnectionCut
        return bytes(body)

    def _body_chunks(self) -> Iterator[bytes]:
        if self.headers.get("Transfer-Encoding", "").lower() == "chunked":
            while size := int(self.rfile.readline().split(b";")[0].strip() or b"0", 16):
                yield self.rfile.read(size)
                self.rfile.readline()
            while self.rfile.readline().strip():
                pass
            return
        remaining = int(self.headers.get("Content-Length") or 0)
        while remaining > 0:
            chunk = self.rfile.read(min(remaining, _READ_CHUNK))
            if not chunk:
                raise _ClientGone
            remaining -= len(chunk)
            yield chunk

    def _write(self, response: _Response) -> None:
        """Every answer closes its connection, so that a kill never strands a client on a pooled one."""
        try:
            self.send_response(response.status)
            for name, value in response.headers.items():
                self.send_header(name, value)
            self.send_header("Content-Length", str(len(response.body)))
            self.send_header("Connection", "close")
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(response.body)
        except (BrokenPipeError, ConnectionResetError):
            pass


class _HTTPServer(ThreadingHTTPServer):
    """ThreadingHTTPServer that remembers its open connections so that `kill` can cut them."""

    daemon_threads = True
    block_on_close = False

    def __init__(self, port: int, hub: "HubServer"):
        self.hub = hub
        self.connections: set[socket.socket] = set()
        self.connections_lock = threading.Lock()
        super().__init__(("127.0.0.1", port), _Handler)

    def process_request(self, request: socket.socket, client_address: object) -> None:
        with self.connections_lock:
            self.connections.add(request)
        super().process_request(request, client_address)

    def shutdown_request(self, request: socket.socket) -> None:
        with self.connections_lock:
            self.connections.discard(request)
        super().shutdown_request(request)

    def cut_connections(self) -> None:
        with self.connections_lock:
            connections = list(self.connections)
        for connection in connections:
            try:
                connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass


class HubServer:
    """A Hub look-alike on 127.0.0.1 (see the module docstring); storage survives `kill` and `restart`."""

    def __init__(self) -> None:
        self.token = f"hf_write_{secrets.token_hex(12)}"
        self.read_token = f"hf_read_{secrets.token_hex(12)}"
        self.user = USER
        self.log: list[tuple[str, str]] = []
        self.state = _HubState({self.token: "write", self.read_token: "read"})
        self.port = 0
        self._httpd: _HTTPServer | None = None
        self._lifecycle = threading.Lock()
        self._fault: tuple[str, str, int] | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> "HubServer":
        """Listen (on a free port the first time, on the same port after a kill) and serve in a daemon thread."""
        with self._lifecycle:
            if self._httpd is None:
                self._httpd = _HTTPServer(self.port, self)
                self.port = self._httpd.server_address[1]
                threading.Thread(target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, daemon=True).start()
        return self

    def kill(self) -> None:
        """Die abruptly: stop listening, then cut every open connection without an answer. In that order, so that
        a client whose request was cut and who tries again finds the port closed."""
        with self._lifecycle:
            httpd, self._httpd = self._httpd, None
            if httpd is not None:
                httpd.shutdown()
                httpd.server_close()
                httpd.cut_connections()

    def restart(self) -> "HubServer":
        self.kill()
        return self.start()

    def fail_after_bytes(self, nbytes: int, method: str = "PUT", path_prefix: str = "/") -> None:
        """Arm a one-shot crash: the next `method` request whose path starts with `path_prefix` kills the server
        once `nbytes` of its body have arrived (or at its end if the body is shorter), leaving it unanswered."""
        self._fault = (method, path_prefix, nbytes)

    def take_fault(self, method: str, path: str) -> int | None:
        """Disarm and return the byte count of the armed fault if this request is the one it waits for."""
        with self._lifecycle:
            if self._fault and self._fault[0] == method and path.startswith(self._fault[1]):
                nbytes, self._fault = self._fault[2], None
                return nbytes
        return None

    def environ(self, cache_dir: str | Path) -> dict[str, str]:
        """Environment for a subprocess that talks to this server; huggingface_hub reads it at import time."""
        return {
            **os.environ,
            "HF_ENDPOINT": self.url,
            "HF_TOKEN": self.token,
            "HF_HUB_DISABLE_XET": "1",
            "HF_HUB_CACHE": str(cache_dir),
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "HF_HUB_OFFLINE": "0",
        }

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc_info: object) -> None:
        self.kill()


@pytest.fixture(name="hub_server")
def hub_server_fixture() -> Iterator[HubServer]:
    """A fresh, running HubServer per test."""
    with HubServer() as server:
        yield server


@pytest.fixture(name="hub")
def hub_fixture(hub_server: HubServer, monkeypatch: pytest.MonkeyPatch) -> HubServer:
    """``hub_server`` with this process's huggingface_hub clients pointed at it (endpoint, download URLs, token,
    no Xet) for the test's duration."""
    from huggingface_hub import constants

    monkeypatch.setattr(constants, "HF_HUB_DISABLE_XET", True)
    monkeypatch.setattr(constants, "ENDPOINT", hub_server.url)
    monkeypatch.setattr(
        constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub_server.url + "/{repo_id}/resolve/{revision}/{filename}"
    )
    monkeypatch.setenv("HF_TOKEN", hub_server.token)
    return hub_server


@pytest.fixture(name="api")
def hub_api_fixture(hub: HubServer):
    """An ``HfApi`` client of ``hub``."""
    from huggingface_hub import HfApi

    return HfApi(endpoint=hub.url, token=hub.token)
