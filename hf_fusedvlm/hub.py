"""Publishing a converted checkpoint folder to the Hugging Face Hub in one commit."""

import os
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi
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


__all__ = ["folder_files", "push_folder_to_hub"]
