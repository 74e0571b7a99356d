"""Publishing a converted checkpoint folder to the Hugging Face Hub in one commit."""

import os
from pathlib import Path

from huggingface_hub import CommitInfo, CommitOperationAdd, CommitOperationDelete, HfApi, constants
from huggingface_hub.errors import EntryNotFoundError, RepositoryNotFoundError, RevisionNotFoundError
from huggingface_hub.utils import DEFAULT_IGNORE_PATTERNS, filter_repo_objects

from .checkpoint import hub_connection_error
from .errors import ConversionError
from .writing import ConversionResult


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


def check_hub_login(repo_id: str, token: str | None = None) -> None:
    """Before a long conversion: the Hub endpoint answers and a token is set, or a `ConversionError` with the fix
    (the token itself is never printed)."""
    unreachable = hub_connection_error()
    if unreachable:
        raise ConversionError(
            f"--push-to-hub {repo_id}: {unreachable}. Check your connection (and HF_ENDPOINT or HTTPS_PROXY), or drop "
            "--push-to-hub and upload later with `hf upload`. Nothing was converted."
        )
    api = HfApi(token=token)
    try:
        api.whoami()
    except Exception as error:  # httpx connection errors, 401s and missing tokens all stop the push the same way
        if api.token is None and not os.environ.get("HF_TOKEN"):
            reason = "no Hugging Face token is set"
        else:
            reason = (
                f"the Hub at {constants.ENDPOINT} could not be reached or refused the token ({type(error).__name__})"
            )
        raise ConversionError(
            f"--push-to-hub {repo_id}: {reason}. Log in with `hf auth login` (or set HF_TOKEN), check your connection "
            "and HF_ENDPOINT, or drop --push-to-hub and upload later with `hf upload`. Nothing was converted."
        ) from error


def publish_result(result: ConversionResult, push_to_hub: str | None, private: bool, commit_message: str):
    """List the files of a finished conversion and, with `push_to_hub`, upload its folder in one commit."""
    output = result.output
    result.files = folder_files(output)
    if push_to_hub:
        try:
            commit = push_folder_to_hub(output, push_to_hub, private=private, commit_message=commit_message)
        except Exception as error:
            raise ConversionError(
                f"The conversion succeeded ({output}) but pushing to {push_to_hub} failed "
                f"({type(error).__name__}: {error}). Log in with `hf auth login` (or set HF_TOKEN) and upload it with "
                f"`hf upload {push_to_hub} {output} .`."
            ) from error
        result.commit_url = commit.commit_url
    return result
