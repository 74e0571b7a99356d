"""Converting LLaVA checkpoints into fused LLaVA checkpoints (not remote code: never copied into a checkpoint).

The parity rule itself (`fused_from_llava`, projector widening) is `hf_fusedvlm.parity`, shared with `tiny` and
training; its names are re-exported here.

Modules, in pipeline order:
- `checkpoint`: resolving a folder or Hub id, reading config.json, telling llava-hf from original-format checkpoints.
- `shards`: safetensors headers and shards (bytes left on disk), `.bin` shards (memory-mapped).
- `sentence_encoder`: the instruction encoder from a sentence-transformers folder (both Pooling formats).
- `llava_hf`, `original` (with `original_layout`, `original_processor`): plan each format's tensors and companions.
- `writing`: planned tensors and shards, the shard writer, remote code; `staging`: the output folder policy, the
  staging folder and the move into place; `verify`: `--verify`; `model_card`; `hub`: publishing.
- `convert`: one entry point for both formats; `cli`: the `fusedvlm-convert` command; `demo`: `--demo`.
"""

from ..parity import (
    expand_projector_input,
    fused_config_from_llava,
    fused_from_llava,
    llava_checkpoint_key,
    new_fuser_tensors,
)
from .checkpoint import checkpoint_format, resolve_checkpoint
from .cli import main, main_original
from .convert import convert_checkpoint
from .errors import ConversionError, VerificationError
from .hub import folder_files, push_folder_to_hub
from .llava_hf import convert_llava_checkpoint
from .model_card import render_model_card
from .original import convert_original_checkpoint
from .sentence_encoder import SentenceEncoder, load_sentence_encoder
from .verify import VERIFY_TOLERANCES
from .writing import ConversionResult, OutputTensor, PlannedShard, shard_name, write_shard, write_shards


__all__ = [
    "ConversionError",
    "ConversionResult",
    "OutputTensor",
    "PlannedShard",
    "SentenceEncoder",
    "VERIFY_TOLERANCES",
    "VerificationError",
    "checkpoint_format",
    "convert_checkpoint",
    "convert_llava_checkpoint",
    "convert_original_checkpoint",
    "expand_projector_input",
    "folder_files",
    "fused_config_from_llava",
    "fused_from_llava",
    "llava_checkpoint_key",
    "load_sentence_encoder",
    "main",
    "main_original",
    "new_fuser_tensors",
    "push_folder_to_hub",
    "render_model_card",
    "resolve_checkpoint",
    "shard_name",
    "write_shard",
    "write_shards",
]
