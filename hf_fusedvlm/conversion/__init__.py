"""Converting LLaVA checkpoints into fused LLaVA checkpoints (not remote code: never copied into a checkpoint).

One pipeline (`pipeline.convert_checkpoint`, the `fusedvlm-convert` command) for every source format:
- `checkpoint`, `shards`: resolving a folder or Hub id (its JSON files first), config.json and the format, shard
  headers (bytes left on disk) and `.bin` shards (memory-mapped); `sentence_encoder`: the instruction encoder.
- `request`: what passes between the steps; `options`: the fuser settings the command accepts (torch-free).
- the formats, each contributing its `check` and `plan`: `llava_hf`; `original` (with `original_layout`, its variants
  and config mapping, and `original_processor`, its tokenizer, image processor and chat templates).
- `writing`: planned tensors, the shard writer, remote code; `staging`: the output folder policy and the move into
  place; `verify`: `--verify`. What a fused output holds, its model card and the Hub upload are
  `hf_fusedvlm.publishing`, shared with training.
- `cli`: the command; `demo`: `--demo`.

The parity rule itself (`fused_from_llava`, projector widening) is `hf_fusedvlm.parity`, shared with `tiny` and
training; its names are re-exported here. Names are imported on first use, so that the command's `--help` does not
import torch.
"""

import importlib


_EXPORTS = {
    "ConversionError": ".errors",
    "VerificationError": ".errors",
    "ConversionResult": ".writing",
    "OutputTensor": ".writing",
    "PlannedShard": ".writing",
    "shard_name": ".writing",
    "write_shard": ".writing",
    "write_shards": ".writing",
    "SentenceEncoder": ".sentence_encoder",
    "load_sentence_encoder": ".sentence_encoder",
    "VERIFY_TOLERANCES": ".verify",
    "checkpoint_format": ".checkpoint",
    "resolve_checkpoint": ".checkpoint",
    "convert_checkpoint": ".pipeline",
    "main": ".cli",
    "main_original": ".cli",
    "expand_projector_input": "..parity",
    "fused_config_from_llava": "..parity",
    "fused_from_llava": "..parity",
    "llava_checkpoint_key": "..parity",
    "new_fuser_tensors": "..parity",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name], __name__), name)
    globals()[name] = value
    return value
