"""Steps both formats share around plan -> write -> verify: checking the fuser choice and the output before anything
is read, the fuser settings, and the description of the finished result."""

import os
from pathlib import Path

from ..fusers import FUSERS, fuser_class
from .errors import ConversionError
from .hub import check_hub_login
from .staging import check_output, check_writable
from .writing import ConversionResult, PlannedShard


# FusedLlavaConfig fields `--fuser-option NAME=VALUE` may set (layers and groups have their own flags).
FUSER_OPTIONS = (
    "fuser_num_heads",
    "fuser_num_points",
    "fuser_layer_norm_eps",
    "aggregator_hidden_size",
    "aggregator_num_layers",
    "aggregator_num_heads",
    "balance_loss_weight",
    "instruction_embedding_normalize",
    "dense_connector_type",
)
INSTRUCTION_ENCODER_EXAMPLE = "sentence-transformers/all-mpnet-base-v2"


def instruction_fusers() -> list[str]:
    return [name for name, fuser in FUSERS.items() if fuser.reads_instruction]


def check_fuser_choice(fuser_type: str, instruction_encoder, hint: str = "") -> None:
    """A registered fuser, with an instruction encoder exactly when it reads the instruction."""
    reads_instruction = fuser_class_or_error(fuser_type).reads_instruction
    if reads_instruction and instruction_encoder is None:
        raise ConversionError(
            f"--fuser {fuser_type} embeds the user's instruction: pass --instruction-encoder with a sentence encoder "
            f"folder or Hub repo id{hint} (IGVA uses {INSTRUCTION_ENCODER_EXAMPLE})."
        )
    if not reads_instruction and instruction_encoder is not None:
        raise ConversionError(
            f"--instruction-encoder is only used by --fuser {', '.join(instruction_fusers())}, not {fuser_type}: "
            "drop it."
        )


def fuser_class_or_error(fuser_type: str):
    try:
        return fuser_class(fuser_type)
    except ValueError as error:
        raise ConversionError(f"--fuser: {error}") from error


def fuser_settings(fuser_layers=None, fuser_layer_groups=None, fuser_options=None) -> dict:
    """The `FusedLlavaConfig` fuser fields of the layer, group and option arguments."""
    unknown = sorted(set(fuser_options or {}) - set(FUSER_OPTIONS))
    if unknown:
        raise ConversionError(f"Unknown fuser options {unknown}: choose among {', '.join(FUSER_OPTIONS)}.")
    settings = dict(fuser_options or {})
    if fuser_layers is not None:
        settings["fuser_layers"] = list(fuser_layers)
    if fuser_layer_groups is not None:
        settings["fuser_layer_groups"] = [list(group) for group in fuser_layer_groups]
    return settings


def prepare_output(
    input: str | os.PathLike, output: str | os.PathLike, overwrite: bool, push_to_hub: str | None
) -> Path:
    """The absolute `output`, checked before anything is read or downloaded: not the input nor inside it, a folder
    `--overwrite` may replace, a writable parent, and a reachable Hub when pushing."""
    output = Path(output).expanduser().resolve()
    local_input = Path(input).expanduser()
    check_output(output, overwrite, [local_input.resolve()] if local_input.exists() else [])
    check_writable(output)
    if push_to_hub:
        check_hub_login(push_to_hub)
    return output


def describe_result(
    output: Path,
    config,
    planned: list[PlannedShard],
    num_copied: int,
    num_new: int,
    new_parameters: int,
    total_bytes: int,
) -> ConversionResult:
    return ConversionResult(
        output=output,
        fuser_type=config.fuser_type,
        num_shards=len(planned),
        num_tensors_copied=num_copied,
        num_new_tensors=num_new,
        new_parameters=new_parameters,
        total_bytes=total_bytes,
        dtype=str(config.dtype).removeprefix("torch.") if config.dtype is not None else None,
    )
