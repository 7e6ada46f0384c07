"""Publish the Space to the Hub in one command: assemble its repository, then push it as one commit.

    python -m clipviz.publish_space --repo-id user/clipviz [--model embedded/clipviz-tiny-vit ...] [--private]

The Spaces repository holds exactly: the Space's code (``space/*.py`` except ``make_examples.py``, which needs the
repository), ``README.md`` (the Space card) and ``requirements.txt``; the examples that ``examples/examples.json``
names, with the manifest and ``examples/LICENSES.md``; what the Space imports from the repository
(``clipviz/__init__.py`` and ``clipviz/rendering.py``, the drawing code, and ``explaining_clipviz.py``, the method
registry); and each model folder given with ``--model`` (default: the two
embedded models) under ``models/<folder name>/``, where the Space looks for them. Nothing else from the repository.
Files are copied by content, so a model folder whose code files are symlinks to the repository's ships real files.

The push: ``create_repo(repo_type="space", space_sdk="gradio", exist_ok=True)``, then the remote tree's hashes are
compared with the assembled files (git blob ids, sha256 for LFS files); when nothing differs no commit is made,
otherwise one commit adds what changed and deletes what the assembly no longer has, on top of the head read before
(``parent_commit``: a concurrent push makes the Hub refuse instead of mixing). A Space that already holds files but
none of an earlier publish (no ``clipviz/rendering.py``) is refused unless ``--replace`` is given. ``--output-dir`` only assembles.

The token comes from the usual huggingface_hub places (``HF_TOKEN``, ``hf auth login``); the endpoint from
``HF_ENDPOINT`` or ``--endpoint``.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import shutil
import sys
import tempfile
from dataclasses import dataclass
from pathlib import Path

from clipviz.push import PushError, translate_hub_errors

REPO_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_SPACE_DIR = REPO_ROOT / "space"
DEFAULT_MODELS = (REPO_ROOT / "embedded" / "clipviz-tiny-vit", REPO_ROOT / "embedded" / "clipviz-tiny-resnet")
REPOSITORY_ONLY = ("make_examples.py",)  # Space-folder scripts that need the repository: not deployed
# what the Space imports from the repository: the drawing code, and the method registry (the page's layout when its
# default model cannot load; a loaded model's own registry is used otherwise)
LIBRARY_FILES = ("clipviz/__init__.py", "clipviz/rendering.py", "explaining_clipviz.py")
KEPT_REMOTE_FILES = (".gitattributes",)  # written by the Hub when the repo is created; never deleted
PUBLISHED_MARKER = "clipviz/rendering.py"  # every assembly holds it: a Space holding it was published by this command


class PublishError(ValueError):
    """The Space cannot be assembled as asked; the message says what is wrong and how to fix it."""


@dataclass
class PublishResult:
    repo_url: str
    commit_oid: str
    created_commit: bool
    files: list[str]  # the assembled files, repo paths
    changed: list[str]  # added or modified in this push
    deleted: list[str]  # removed from the remote in this push


def space_files(space_dir: Path) -> dict[str, Path]:
    """Repo path -> source file for the Space's own files (see the module docstring for which)."""
    space_dir = Path(space_dir)
    if not (space_dir / "app.py").is_file() or not (space_dir / "README.md").is_file():
        raise PublishError(
            f"{space_dir} is not the Space folder (no app.py and README.md there). Run from a clone of the "
            "repository or pass --space-dir."
        )
    files = {path.name: path for path in sorted(space_dir.glob("*.py")) if path.name not in REPOSITORY_ONLY}
    for name in ("README.md", "requirements.txt"):
        if not (space_dir / name).is_file():
            raise PublishError(f"The Space folder {space_dir} has no {name}.")
        files[name] = space_dir / name
    examples = space_dir / "examples"
    manifest = examples / "examples.json"
    if manifest.is_file():
        try:
            names = [entry["file"] for entry in json.loads(manifest.read_text())]
        except (ValueError, TypeError, KeyError) as error:
            raise PublishError(f"{manifest} is not a list of examples with a 'file' each ({error}).") from None
        for name in ["examples.json", "LICENSES.md", *names]:
            source = examples / name
            if Path(name).name != name or not source.is_file():
                raise PublishError(f"The example file {source} named in {manifest} is missing.")
            files[f"examples/{name}"] = source
    return files


def model_files(folders: list[Path]) -> dict[str, Path]:
    """Repo path -> source file for each model folder, under ``models/<folder name>/`` (caches and hidden files
    left out). A folder must hold a ``config.json``; two folders with the same name would collide."""
    files: dict[str, Path] = {}
    names: set[str] = set()
    for folder in folders:
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise PublishError(
                f"--model {folder} is not a model folder (no config.json there): give a converted clipviz model "
                "folder, e.g. embedded/clipviz-tiny-vit or the output of clipviz-convert."
            )
        name = folder.resolve().name
        if name in names:
            raise PublishError(f"Two --model folders are named {name!r}; the Space keeps models by folder name.")
        names.add(name)
        for path in sorted(folder.rglob("*")):
            relative = path.relative_to(folder)
            if any(part.startswith(".") or part == "__pycache__" for part in relative.parts) or not path.is_file():
                continue
            files[f"models/{name}/{relative.as_posix()}"] = path
    return files


def assemble(out_dir: Path, space_dir: Path = DEFAULT_SPACE_DIR, models: list[Path] | None = None) -> list[str]:
    """Write the Spaces repository into the empty or new folder ``out_dir``; returns its files' repo paths."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise PublishError(f"{out_dir} exists and is not an empty folder; choose a new --output-dir.")
    library = {name: REPO_ROOT / name for name in LIBRARY_FILES}
    files = {**space_files(space_dir), **library, **model_files(list(DEFAULT_MODELS if models is None else models))}
    for repo_path, source in files.items():
        target = out_dir / repo_path
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(source, target)  # follows symlinks: the Space gets the files' contents
    return sorted(files)


def git_blob_id(data: bytes) -> str:
    """The id git (and the Hub's tree listing) gives a regular file's content."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def unchanged(local: Path, remote) -> bool:
    """Whether a remote tree entry (huggingface_hub's ``RepoFile``) holds the local file's content."""
    data = local.read_bytes()
    if remote.lfs is not None:
        return remote.size == len(data) and remote.lfs.sha256 == hashlib.sha256(data).hexdigest()
    return remote.blob_id == git_blob_id(data)


def push_space(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    commit_message: str = "Publish the clipviz Space",
    endpoint: str | None = None,
    token: str | None = None,
    replace: bool = False,
) -> PublishResult:
    """Create the Space if needed and make its main branch hold exactly ``folder`` (plus ``.gitattributes``), in one
    commit, or in none when it already does.

    A Space that holds files but no earlier publish (no ``PUBLISHED_MARKER``) is refused with a `PublishError`, so
    that a mistyped ``repo_id`` never wipes an unrelated Space; ``replace=True`` replaces its contents anyway."""
    from huggingface_hub import CommitOperationAdd, CommitOperationDelete, HfApi
    from huggingface_hub.hf_api import RepoFile

    folder = Path(folder)
    local = {path.relative_to(folder).as_posix(): path for path in sorted(folder.rglob("*")) if path.is_file()}
    api = HfApi(endpoint=endpoint, token=token)
    with translate_hub_errors(f"publishing the Space {repo_id}", api.endpoint, repo_id):
        repo_url = str(api.create_repo(repo_id, repo_type="space", space_sdk="gradio", private=private, exist_ok=True))
        head = api.list_repo_commits(repo_id, repo_type="space")[0].commit_id
        remote = {
            entry.path: entry
            for entry in api.list_repo_tree(repo_id, repo_type="space", revision=head, recursive=True)
            if isinstance(entry, RepoFile)
        }
        foreign = sorted(path for path in remote if path not in KEPT_REMOTE_FILES)
        if foreign and PUBLISHED_MARKER not in remote and not replace:
            shown = ", ".join(foreign[:5]) + (f" and {len(foreign) - 5} more" if len(foreign) > 5 else "")
            raise PublishError(
                f"The Space {repo_id} already holds {len(foreign)} file(s) ({shown}) but no earlier clipviz publish "
                f"(no {PUBLISHED_MARKER}); publishing would delete them. Give another --repo-id, or pass --replace to "
                "replace its contents with the clipviz Space."
            )
        changed = [path for path in local if path not in remote or not unchanged(local[path], remote[path])]
        deleted = sorted(path for path in remote if path not in local and path not in KEPT_REMOTE_FILES)
        if not changed and not deleted:
            return PublishResult(repo_url, head, False, sorted(local), [], [])
        operations = [CommitOperationAdd(path, str(local[path])) for path in changed]
        operations += [CommitOperationDelete(path) for path in deleted]
        info = api.create_commit(
            repo_id, operations, commit_message=commit_message, repo_type="space", parent_commit=head
        )
    return PublishResult(repo_url, info.oid, info.oid != head, sorted(local), changed, deleted)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="python -m clipviz.publish_space",
        description="Assemble the clipviz Space (code, examples, models) and push it to a Hugging Face Space in "
        "one commit (none when nothing changed).",
    )
    target = parser.add_mutually_exclusive_group(required=True)
    target.add_argument("--repo-id", help="the Space to create or update, e.g. your-name/clipviz")
    target.add_argument("--output-dir", type=Path, help="only assemble the Space repository into this new folder")
    parser.add_argument(
        "--model",
        action="append",
        type=Path,
        metavar="FOLDER",
        help="a model folder to ship under models/<name>/ (repeat for several; default: the two embedded models)",
    )
    parser.add_argument("--space-dir", type=Path, default=DEFAULT_SPACE_DIR, help="the Space folder (default: space/)")
    parser.add_argument("--private", action="store_true", help="create the Space as private")
    parser.add_argument(
        "--replace",
        action="store_true",
        help="publish even into a Space that holds files of something else (they are deleted); without it such a "
        "Space is refused",
    )
    parser.add_argument("--endpoint", help="the Hub's URL (default: HF_ENDPOINT or https://huggingface.co)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        if args.output_dir is not None:
            files = assemble(args.output_dir, args.space_dir, args.model)
            print(f"Assembled {len(files)} files in {args.output_dir}")
            return 0
        with tempfile.TemporaryDirectory(prefix="clipviz-space-") as staging:
            assemble(Path(staging) / "space", args.space_dir, args.model)
            result = push_space(
                Path(staging) / "space",
                args.repo_id,
                private=args.private,
                endpoint=args.endpoint,
                replace=args.replace,
            )
    except (PublishError, PushError, OSError) as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    if result.created_commit:
        print(
            f"Published {len(result.files)} files to {result.repo_url} (commit {result.commit_oid[:12]}: "
            f"{len(result.changed)} added or changed, {len(result.deleted)} deleted)"
        )
    else:
        print(f"{result.repo_url} already holds these {len(result.files)} files; no commit made")
    return 0


if __name__ == "__main__":
    sys.exit(main())
