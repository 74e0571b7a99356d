"""What a trained checkpoint records about its run (the command in the card, the arguments in `training_args.json`):
never a secret, never an absolute path of the machine it ran on."""

import dataclasses
import os
import shlex
from pathlib import Path


REDACTED = "<redacted>"


def is_secret(name: str) -> bool:
    """Whether an option or argument named `name` (`--hub_token`, `hub_token`, ...) holds a secret."""
    return "token" in name.lower().lstrip("-")


def shown_path(value: str) -> str:
    """`value` as a checkpoint may show it: an absolute path becomes relative to the working folder when inside it, and
    its last component (the folder or file name) otherwise; anything else is returned unchanged."""
    if not os.path.isabs(value):
        return value
    path, here = Path(value), Path.cwd()
    return str(path.relative_to(here)) if path.is_relative_to(here) and path != here else path.name


def recorded_command(program: str, argv: list[str]) -> str:
    """The command line `program argv...` with every `*token*` option and its value left out and absolute paths
    shown by [`shown_path`]."""
    words, skip_value = [program], False
    for word in argv:
        if skip_value:
            skip_value = False
            if not word.startswith("--"):
                continue
        if word.startswith("--"):
            name, has_value, value = word.partition("=")
            if is_secret(name):
                skip_value = not has_value
                continue
            words.append(f"{name}={shown_path(value)}" if has_value else word)
        else:
            words.append(shown_path(word))
    return shlex.join(words)


def recorded_arguments(*arguments) -> dict:
    """The fields of argument dataclasses (or dicts) as one JSON-ready dict: secrets removed, absolute paths shown by
    [`shown_path`]."""
    record = {}
    for group in arguments:
        fields = (
            group.to_dict()
            if hasattr(group, "to_dict")
            else group
            if isinstance(group, dict)
            else (dataclasses.asdict(group))
        )
        for name, value in fields.items():
            if is_secret(name):
                continue
            record[name] = shown_path(value) if isinstance(value, str) else value
    return record
