"""Where a conversion writes: `--output` checked before anything is read (never inside the input, never a folder
this tool did not write), a hidden staging folder beside it, and the move into place once the result is complete.

The staging folder `.NAME.converting-XXXX` holds an owner file (host and process id); a later run removes the
staging folders whose process is gone (a conversion killed by SIGKILL or a power cut), and names, with the command
to remove them, those it cannot tell are stale. Replacing an earlier output renames it to `.NAME.replaced-XXXX`,
moves the staging folder into place, then deletes the old one; a later run restores an old output set aside when no
new one took its place (killed between the renames), and finishes deleting one whose replacement is in place.

`--overwrite` replaces only what a fused output holds: an earlier output that also holds other files (notes, a
`checkpoint-500/` of a training run) is refused, with their names, rather than deleted with it."""

import errno
import json
import os
import shutil
import socket
import tempfile
import uuid
from contextlib import contextmanager
from pathlib import Path

from ..publishing.folders import OWNER_FILE, foreign_files, is_fused_output
from .errors import ConversionError, listed


# OSError numbers that mean "cannot write there" rather than a bug: disk full, quota, read-only, permissions.
_WRITE_ERRNOS = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM}


def check_output(output: Path, overwrite: bool, inputs: list[Path]) -> None:
    """Refuse an `--output` that would touch an input, is a file, or is a non-empty folder that `overwrite` may not
    replace: `--overwrite` replaces only an empty folder or an earlier fused LLaVA output holding nothing else. An
    earlier output left aside by an interrupted replacement is restored (or its deletion finished) first."""
    for message in clean_stale_staging(output):
        print(f"note: {message}")
    for source in inputs:
        if output == source or output.is_relative_to(source) or source.is_relative_to(output):
            where = "is" if output == source else "is inside" if output.is_relative_to(source) else "contains"
            raise ConversionError(f"--output {output} {where} the input {source}: choose a folder outside the input.")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"--output {output} is a file: give a folder path.")
    contents = sorted(path.name for path in output.iterdir()) if output.is_dir() else []
    if not contents:
        return
    if not is_fused_output(output):
        raise ConversionError(
            f"--output {output} is not empty and is not a fused LLaVA checkpoint (it holds {listed(contents, 5)}): "
            "choose a new or empty folder. --overwrite only replaces an empty folder or an earlier fused LLaVA "
            "output (config.json with model_type 'fused_llava' and safetensors weights), never other files."
        )
    foreign = foreign_files(output)
    if foreign:
        raise ConversionError(
            f"--output {output} is an earlier fused LLaVA output but also holds {listed(foreign, 5)}, which a fused "
            "output does not have: replacing the folder would delete them. Move them elsewhere, or choose another "
            "--output."
        )
    if not overwrite:
        raise ConversionError(
            f"--output {output} is not empty: pass --overwrite to replace this earlier fused LLaVA output (all of "
            "its files), or choose another folder."
        )


def _owner_alive(owner_file: Path) -> bool | None:
    """True / False when the staging folder's process is / is not running on this host; None when unknown."""
    try:
        owner = json.loads(owner_file.read_text(encoding="utf-8"))
        host, pid = owner["host"], int(owner["pid"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    if host != socket.gethostname():
        return None
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # a process of another user holds the pid
        return True
    return True


def clean_stale_staging(output: Path) -> list[str]:
    """Remove the staging folders of `output` left by conversions that no longer run; returns messages for the
    stale ones removed and for the ones that could not be checked (with the command to remove them)."""
    messages = []
    if not output.parent.is_dir():
        return messages
    for old in sorted(output.parent.glob(f".{output.name}.replaced-*")):
        if not old.is_dir():
            continue
        if output.exists() and not is_fused_output(old):  # the replacement is in place: finish deleting the old one
            shutil.rmtree(old, ignore_errors=True)
            messages.append(f"removed {old}, an earlier output of {output} whose deletion was interrupted")
        elif output.exists():  # a whole model is never deleted unasked
            messages.append(
                f"{old} is an earlier output of {output} that an interrupted replacement set aside; {output} holds "
                f"the newer one. If you do not need the earlier one, remove it with: rm -rf {old}"
            )
        elif is_fused_output(old):  # killed between the two renames: put the earlier output back
            old.rename(output)
            messages.append(
                f"restored {output} from {old}: a conversion was interrupted while replacing it, so the earlier "
                "output is back in place"
            )
        else:
            messages.append(
                f"{old} holds part of an earlier output of {output} (a replacement was interrupted); check it, then "
                f"remove it with: rm -rf {old}"
            )
    for folder in sorted(output.parent.glob(f".{output.name}.converting-*")):
        if not folder.is_dir():
            continue
        alive = _owner_alive(folder / OWNER_FILE)
        if alive is False:
            shutil.rmtree(folder, ignore_errors=True)
            messages.append(f"removed {folder}, left by an interrupted conversion")
        elif alive is None:
            messages.append(
                f"{folder} looks like an interrupted conversion's staging folder (owner unknown); if no conversion "
                f"is running, remove it with: rm -rf {folder}"
            )
    return messages


def staging_folder(output: Path) -> Path:
    """A new hidden folder beside `output` (same file system, so the final move is a rename), with the mode a plain
    mkdir would give and an owner file for `clean_stale_staging`."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the output's mode
    owner = {"host": socket.gethostname(), "pid": os.getpid()}
    (staging / OWNER_FILE).write_text(json.dumps(owner), encoding="utf-8")
    return staging


def move_into_place(staging: Path, output: Path) -> None:
    """Replace `output` by `staging` (the owner file removed): renames, so a reader sees the old or the new folder.
    The owner file goes last, so that a staging folder left by a kill between the renames is known to be stale."""
    if output.is_dir():
        old = output.parent / f".{output.name}.replaced-{uuid.uuid4().hex[:8]}"
        output.rename(old)
        staging.rename(output)
        (output / OWNER_FILE).unlink(missing_ok=True)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output)
        (output / OWNER_FILE).unlink(missing_ok=True)


def check_writable(output: Path) -> None:
    """Refuse early an `--output` whose nearest existing parent cannot be written."""
    parent = output.parent
    while not parent.exists() and parent != parent.parent:
        parent = parent.parent
    if not os.access(parent, os.W_OK | os.X_OK):
        raise ConversionError(
            f"--output {output}: {parent} is not writable (read-only or no permission): choose another folder."
        )


@contextmanager
def staged_output(output: Path, overwrite: bool):
    """Yield a staging folder for `output`; when the block completes, move it into place (after checking again that
    `output` may be replaced). On any error or interruption the staging folder is removed and `output` is left as it
    was; a full disk or a read-only folder becomes a `ConversionError` naming the folder."""
    for message in clean_stale_staging(output):
        print(f"note: {message}")
    staging = None
    try:
        staging = staging_folder(output)
        yield staging
        check_output(output, overwrite, [])  # nothing unexpected appeared there meanwhile
        move_into_place(staging, output)
    except BaseException as error:
        if staging is not None:
            shutil.rmtree(staging, ignore_errors=True)
        if isinstance(error, OSError) and error.errno in _WRITE_ERRNOS:
            raise ConversionError(
                f"Could not write the conversion beside --output {output} ({error.strerror}: {error.filename}); "
                "nothing was written. Free some space or choose a writable folder."
            ) from error
        raise
