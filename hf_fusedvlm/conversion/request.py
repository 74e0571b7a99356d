"""What the conversion pipeline passes between its steps and its source formats: the user's request (checked
fuser arguments), the source checkpoint, and a format's plan."""

from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configuration_fused_llava import FusedLlavaConfig
from ..fuser_registry import fuser_class, instruction_fusers
from .checkpoint import resolve_checkpoint
from .errors import ConversionError
from .options import INSTRUCTION_ENCODER_EXAMPLE, known_fuser_options
from .sentence_encoder import SentenceEncoder
from .writing import PlannedShard


def fuser_class_or_error(fuser_type: str):
    try:
        return fuser_class(fuser_type)
    except ValueError as error:
        raise ConversionError(f"--fuser: {error}") from error


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


def fuser_settings(fuser_layers=None, fuser_layer_groups=None, fuser_options=None) -> dict:
    """The `FusedLlavaConfig` fuser fields of the layer, group and option arguments."""
    known = known_fuser_options()
    unknown = sorted(set(fuser_options or {}) - set(known))
    if unknown:
        raise ConversionError(f"Unknown fuser options {unknown}: choose among {', '.join(known)}.")
    settings = dict(fuser_options or {})
    if fuser_layers is not None:
        settings["fuser_layers"] = list(fuser_layers)
    if fuser_layer_groups is not None:
        settings["fuser_layer_groups"] = [list(group) for group in fuser_layer_groups]
    return settings


@dataclass
class Request:
    """What the user asked for. `encoder` is the instruction encoder, its settings only (no weights) until the
    weights are read."""

    fuser_type: str | None
    fuser_layers: list[int] | None
    fuser_layer_groups: list[list[int]] | None
    fuser_options: dict | None
    vision_tower: str | None
    encoder: SentenceEncoder | None
    dtype: torch.dtype | None

    @property
    def settings(self) -> dict:
        """The `FusedLlavaConfig` fields the arguments set: the encoder's pooling, then layers, groups and options."""
        encoder_fields = self.encoder.config_fields if self.encoder else {}
        return {**encoder_fields, **fuser_settings(self.fuser_layers, self.fuser_layer_groups, self.fuser_options)}

    @property
    def fixes_layers(self) -> bool:
        return self.fuser_layers is not None or self.fuser_layer_groups is not None


@dataclass
class Source:
    """The `--input` checkpoint: as given, its local folder (a Hub repo's JSON files only until `download`), the Hub
    id it came from, and its config.json."""

    given: str
    folder: Path
    repo_id: str | None
    raw: dict
    downloaded: bool

    def download(self) -> Path:
        if not self.downloaded:
            self.folder, _ = resolve_checkpoint(self.given, "--input", allow_pickles=True)
            self.downloaded = True
        return self.folder


@dataclass
class Plan:
    """What a source format makes of a downloaded checkpoint.

    `shards` are the output shards; `source_name` gives the source key of a fused tensor name (for error messages);
    `layout` says what the checkpoint was read as and `fix` what to do when its tensors do not match it.
    `write_companions(folder)` writes the processor and generation config, `verify(folder)` compares the written
    model with the source (returns `(max |difference|, tolerance)`). `card_vision_tower`, `card_fuser` and
    `imported_from` complete the model card; `commit_message` is the Hub commit's."""

    config: FusedLlavaConfig
    shards: list[PlannedShard]
    num_source_tensors: int
    num_new_tensors: int
    source_name: Callable[[str], str]
    layout: str
    fix: str
    write_companions: Callable[[Path], None]
    verify: Callable[[Path], tuple[float, float]]
    commit_message: str
    card_fuser: str | None
    card_vision_tower: str | None = None
    imported_from: str | None = None
