"""Push a converted folder to the Hub as one commit, and say clearly what went wrong when it cannot be done.

One `create_repo(exist_ok=True)`, then one `upload_folder` whose `parent_commit` is the revision's head as read just
before: if someone pushed in between, the Hub refuses instead of silently mixing two uploads. huggingface_hub skips
files whose content the Hub already has, so pushing identical content creates no commit, and a push that was cut off
resumes where it stopped (uploaded LFS objects are not sent again).

The token comes from the usual huggingface_hub places (`HF_TOKEN`, `hf auth login`); the endpoint from `HF_ENDPOINT`.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

# Weight files a previous push may have left that this folder does not contain (e.g. shards after a single-file
# push): deleted in the same commit, so transformers never sees two sets of weights.
STALE_WEIGHT_PATTERNS = ["model*.safetensors", "model.safetensors.index.json"]


class PushError(RuntimeError):
    """Pushing to the Hub failed; the message says why and what to do."""


@dataclass
class PushResult:
    repo_url: str
    revision: str
    commit_oid: str
    commit_url: str
    created_commit: bool
    pull_request_url: str | None = None


def check_token(endpoint: str | None = None, token: str | None = None) -> str:
    """Fail fast, before a long conversion, when there is no usable token; return the account name."""
    from huggingface_hub import HfApi, get_token

    token = token or get_token()
    if not token:
        raise PushError(
            "No Hugging Face token found, so nothing can be pushed. Log in with `hf auth login` or set HF_TOKEN to "
            "a token with write access (https://huggingface.co/settings/tokens)."
        )
    api = HfApi(endpoint=endpoint, token=token)
    with translate_hub_errors("checking the token", api.endpoint):
        return api.whoami()["name"]


def push_folder(
    folder: Path,
    repo_id: str,
    *,
    private: bool = False,
    revision: str | None = None,
    create_pr: bool = False,
    commit_message: str | None = None,
    endpoint: str | None = None,
    token: str | None = None,
) -> PushResult:
    """Create `repo_id` if needed and upload `folder` to `revision` (default main) in one commit, or as a pull
    request with `create_pr`. A branch that does not exist yet is created from main."""
    from huggingface_hub import HfApi

    api = HfApi(endpoint=endpoint, token=token)
    with translate_hub_errors(f"pushing to {repo_id}", api.endpoint, repo_id, revision):
        repo_url = str(api.create_repo(repo_id, private=private, exist_ok=True, repo_type="model"))
        target = _ensure_revision(api, repo_id, revision)
        parent = api.repo_info(repo_id, revision=target).sha
        info = api.upload_folder(
            repo_id=repo_id,
            folder_path=folder,
            revision=target,
            commit_message=commit_message or f"Upload clipviz conversion ({folder.name})",
            create_pr=create_pr,
            parent_commit=parent,
            delete_patterns=STALE_WEIGHT_PATTERNS,
        )
    created = info.oid != parent
    return PushResult(repo_url, target, info.oid, info.commit_url, created, info.pr_url if created else None)


def _ensure_revision(api, repo_id: str, revision: str | None) -> str:
    """main; an existing pull request `refs/pr/N` (must exist); or a branch, created from main when missing."""
    if not revision or revision == "main":
        return "main"
    if revision.startswith("refs/pr/"):
        return revision
    branch = revision.removeprefix("refs/heads/")
    api.create_branch(repo_id, branch=branch, exist_ok=True)
    return branch


@contextmanager
def translate_hub_errors(
    action: str, endpoint: str, repo_id: str | None = None, revision: str | None = None
) -> Iterator[None]:
    """Turn huggingface_hub's and the HTTP client's exceptions into a `PushError` that says what to do."""
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    try:
        yield
    except LocalTokenNotFoundError:
        raise PushError("No Hugging Face token found: log in with `hf auth login` or set HF_TOKEN.") from None
    except Exception as error:
        # huggingface_hub wraps some failures (an LFS upload that gave up: RuntimeError from the transport error)
        chain = _cause_chain(error)
        http_error = next((e for e in chain if isinstance(e, HfHubHTTPError)), None)
        if http_error is not None:
            status = http_error.response.status_code if http_error.response is not None else None
            raise PushError(_http_message(action, endpoint, status, repo_id, revision, http_error)) from None
        network_error = next((e for e in chain if is_network_error(e)), None)
        if network_error is None:
            raise
        raise PushError(
            f"Network failure while {action}: the connection to {endpoint} failed "
            f"({type(network_error).__name__}: {network_error}). Check the connection (and HF_ENDPOINT), then run "
            "the same command again: files the Hub already received are not uploaded twice."
        ) from None


def _cause_chain(error: BaseException) -> list[BaseException]:
    """The error and what it was raised from (explicitly or while handling), outermost first."""
    chain: list[BaseException] = []
    while error is not None and error not in chain:
        chain.append(error)
        error = error.__cause__ or error.__context__
    return chain


def _http_message(action, endpoint, status, repo_id, revision, error) -> str:
    server_says = getattr(error, "server_message", None) or (str(error).splitlines() or [""])[0]
    if status == 401:
        return (
            f"The Hub rejected the token while {action} (401 Unauthorized): it is invalid or expired. Create a token "
            f"with write access at {endpoint}/settings/tokens and log in again (`hf auth login`) or set HF_TOKEN."
        )
    if status == 403:
        namespace = repo_id.split("/")[0] if repo_id else "this namespace"
        return (
            f"The token may not write to {repo_id or 'this repo'} (403 Forbidden while {action}): use a token with "
            f"write access, and make sure your account may create and write repos in `{namespace}`."
        )
    if status == 404:
        where = f"{repo_id}@{revision}" if revision else repo_id
        return (
            f"Not found while {action} (404): {where}. A --revision of the form refs/pr/N must name an existing "
            f"pull request (branch names are created when missing). Hub said: {server_says}"
        )
    if status == 412:
        return (
            f"Someone else pushed to {repo_id} while this upload ran (412 Precondition Failed): nothing was "
            "committed. Run the same command again to push on top of the new head."
        )
    return f"The Hub answered HTTP {status} while {action}: {server_says}"


def is_network_error(error: BaseException) -> bool:
    """Whether an exception is a transport failure (refused, reset, timed out) of whichever HTTP client is in use."""
    if isinstance(error, ConnectionError | TimeoutError):
        return True
    module = type(error).__module__.split(".")[0]
    return module in ("httpx", "httpx2", "httpcore", "requests", "urllib3") and "HTTPStatus" not in type(error).__name__


__all__ = ["PushError", "PushResult", "check_token", "is_network_error", "push_folder", "translate_hub_errors"]
