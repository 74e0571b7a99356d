"""The Hugging Face Hub: whether it can be reached (in seconds, not after minutes of retries) and the upload of a
checkpoint folder in one commit."""

import os
import socket
import urllib.parse
import urllib.request
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects


def folder_files(folder: str | os.PathLike) -> list[str]:
    """The files of `folder` as repo paths (posix, relative), without `.git/` and cache folders, sorted."""
    folder = Path(folder)
    paths = sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if path.is_file())
    return list(filter_repo_objects(paths, ignore_patterns=DEFAULT_IGNORE_PATTERNS))


def push_folder_to_hub(
    folder: str | os.PathLike,
    repo_id: str,
    *,
    private: bool = False,
    token: str | None = None,
    commit_message: str | None = None,
    revision: str | None = None,
) -> CommitInfo:
    """Upload every file of `folder` (weights, config, processor files, code, card) to the model repo `repo_id` in
    a single commit, creating the repo if needed; files the repo holds that `folder` does not are deleted in the same
    commit (except `.gitattributes`), so the repo ends up holding exactly the folder's files.

    The token comes from `token`, else from `HF_TOKEN` or `hf auth login` (huggingface_hub's usual lookup); it is
    never printed or written anywhere.
    """
    folder = Path(folder)
    if not folder.is_dir():
        raise ValueError(f"{folder} is not a folder: convert a checkpoint first, then push its output folder.")
    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    local = folder_files(folder)
    try:
        remote = set(api.list_repo_files(repo_id, repo_type="model", revision=revision))
    except (EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError):
        remote = set()
    operations = [CommitOperationAdd(path_in_repo=path, path_or_fileobj=str(folder / path)) for path in local]
    operations += [
        CommitOperationDelete(path_in_repo=path) for path in sorted(remote - set(local)) if path != ".gitattributes"
    ]
    return api.create_commit(
        repo_id,
        operations,
        commit_message=commit_message or "Upload fused LLaVA checkpoint",
        repo_type="model",
        revision=revision,
    )


# Seconds to wait for a TCP connection to the Hub before calling it unreachable. huggingface_hub retries a refused or
# timed-out connection with back-off for about 40 s per file before it gives up; a user should learn in seconds.
HUB_CONNECT_TIMEOUT = 5.0


def hub_connection_error(timeout: float = HUB_CONNECT_TIMEOUT) -> str | None:
    """Why the Hub endpoint (`HF_ENDPOINT`, default https://huggingface.co) could not be reached, in a few words, or None
    when a TCP connection to it opens within `timeout` seconds. None as well under `HF_HUB_OFFLINE` (the libraries
    then read only the cache) and behind a proxy (the proxy, not this machine, connects to the Hub)."""
    if constants.HF_HUB_OFFLINE:
        return None
    endpoint = urllib.parse.urlsplit(constants.ENDPOINT)
    if endpoint.hostname is None:
        return f"HF_ENDPOINT {constants.ENDPOINT!r} is not a URL"
    if endpoint.scheme in urllib.request.getproxies() and not urllib.request.proxy_bypass(endpoint.hostname):
        return None
    port = endpoint.port or (443 if endpoint.scheme == "https" else 80)
    try:
        socket.create_connection((endpoint.hostname, port), timeout=timeout).close()
    except OSError as error:
        reason = error.strerror or str(error) or type(error).__name__
        return f"the Hub at {constants.ENDPOINT} could not be reached ({reason})"
    return None


def unreachable_hub_message(what: str, repo_id: str, reason: str) -> str:
    """The one line a command prints when `repo_id` must come from a Hub it cannot reach."""
    return (
        f"{what} {repo_id}: {reason}. Check your connection (and HF_ENDPOINT or HTTPS_PROXY), pass a local folder, or "
        "set HF_HUB_OFFLINE=1 to use a copy in the Hugging Face cache."
    )
