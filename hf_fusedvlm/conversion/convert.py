"""One entry point for both source formats: the format is told from the checkpoint's structure
(`checkpoint.checkpoint_format`) and the matching converter runs."""

import os
from pathlib import Path

from .checkpoint import LLAVA_HF, checkpoint_format, read_config_json, resolve_checkpoint
from .errors import ConversionError
from .llava_hf import convert_llava_checkpoint
from .original import convert_original_checkpoint
from .staging import check_output


def convert_checkpoint(
    input: str | os.PathLike,
    output: str | os.PathLike,
    fuser_type: str | None = None,
    *,
    vision_tower=None,
    overwrite: bool = False,
    **options,
):
    """Convert a llava-hf or an original-format LLaVA checkpoint into a fused one.

    llava-hf checkpoints need `fuser_type`; original-format ones need `vision_tower` and default to the fuser their
    variant fixes (`none` for a plain LLaVA). Other keyword arguments are those of `convert_llava_checkpoint` /
    `convert_original_checkpoint`. Returns a `ConversionResult`."""
    local_input = Path(input).expanduser()
    # A bad --output is refused before anything is downloaded.
    check_output(
        Path(output).expanduser().resolve(), overwrite, [local_input.resolve()] if local_input.exists() else []
    )
    source, _ = resolve_checkpoint(input, "--input", allow_pickles=True)
    raw = read_config_json(
        source,
        "a LLaVA checkpoint folder (or Hub repo): llava-hf (e.g. llava-hf/llava-1.5-7b-hf) "
        "or original (e.g. liuhaotian/llava-v1.5-7b)",
    )
    if checkpoint_format(raw, source) == LLAVA_HF:
        if vision_tower is not None:
            raise ConversionError(
                f"{input} is a llava-hf checkpoint, which holds its vision tower: drop --vision-tower (it is for "
                "original-format checkpoints)."
            )
        if fuser_type is None:
            raise ConversionError(f"{input} is a llava-hf checkpoint: choose the fuser to add with --fuser.")
        return convert_llava_checkpoint(input, output, fuser_type, overwrite=overwrite, **options)
    return convert_original_checkpoint(
        input, output, fuser_type=fuser_type, vision_tower=vision_tower, overwrite=overwrite, **options
    )
