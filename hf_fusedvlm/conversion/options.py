"""The fuser settings `fusedvlm-convert` accepts, from the fuser registry (torch-free: the command's parser reads
them)."""

from ..fuser_registry import FUSERS


# FusedLlavaConfig fields of no single fuser that `--fuser-option NAME=VALUE` may set, with their help (layers and
# groups have their own flags; the instruction encoder's pooling comes from its sentence-transformers folder).
GENERAL_FUSER_OPTIONS = {
    "instruction_embedding_normalize": "whether the instruction embedding is L2-normalised (fusers that read the "
    "instruction; default: as the sentence encoder does)",
}
INSTRUCTION_ENCODER_EXAMPLE = "sentence-transformers/all-mpnet-base-v2"


def known_fuser_options() -> dict[str, str]:
    """The names `--fuser-option` accepts, with their help: every registered fuser's `config_fields`, then
    [`GENERAL_FUSER_OPTIONS`]."""
    options = {}
    for fuser_type, fuser in FUSERS.items():
        for name, field in fuser.config_fields.items():
            options.setdefault(name, f"{fuser_type}: {field.help}")
    return {**options, **GENERAL_FUSER_OPTIONS}
