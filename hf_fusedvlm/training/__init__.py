"""Training a fused LLaVA with `transformers.Trainer` (`fusedvlm-train`): from a converted checkpoint to a published one.

The recipe of the papers in Transformers terms:

- Data: LLaVA conversation JSON (`image`, `conversations` with `from: human|gpt`, `<image>` marking the image in the
  human turn), images from a folder. [`FusedLlavaDataCollator`] renders each conversation with the processor's chat
  template, sends the user's instruction to the fuser (`instruction_input_ids`), pads on the right and keeps in
  `labels` only the assistant answers.
- Stages ([`STAGES`]): `stage1` trains the fuser and the projector (LLaVA pre-training / alignment); `stage2` adds the
  whole LLM (instruction tuning); `stage2-lora` puts LoRA adapters (PEFT) on the LLM's linear layers instead;
  `qlora` does the same on a 4-bit bitsandbytes base, the fuser and projector kept in full precision. The vision tower
  and the instruction encoder are always frozen. The trainable parameters per part are printed before training.
- Saving: every checkpoint and the final model are fused checkpoints (weights, config, remote code, processor) that
  load with `AutoModel.from_pretrained(..., trust_remote_code=True)`. LoRA adapters are merged into the LLM weights at
  save time (for `qlora` into the dequantised base weights), so every stage saves the same kind of full-precision
  checkpoint; load it with a `BitsAndBytesConfig` to run it in 4-bit again. `--push_to_hub` uses Trainer's own upload
  and writes the package's model card with a training summary. No pickle is written: the run's arguments go to
  `training_args.json`, without tokens.

Distributed training is accelerate's: `accelerate launch [--num_processes N] -m hf_fusedvlm.training ...` runs the
same command under DDP, FSDP or DeepSpeed, as configured with `accelerate config`; under FSDP and DeepSpeed the saves
are built from the full state dict Trainer gathers.

Modules: `arguments` (the stages, the model and data arguments and `--help`: the stdlib only), `data` (data set, its
checks, collator), `stages` (which parts train, LoRA / QLoRA, loading), `saving` (fused checkpoints from a live model
or a gathered state dict), `recording` (what a checkpoint records about its run, secrets and local paths removed),
`trainer` ([`FusedLlavaTrainer`]), `cli` (parsing, input checks, `main`; it imports the heavy modules after parsing).
"""

import importlib
import logging


# transformers' `TrainingArguments` and `Trainer` import peft, which imports bitsandbytes. On a CPU with AVX512-BF16,
# importing bitsandbytes tries to fetch an optional 4-bit matmul kernel from the Hub through the `kernels` package and,
# when that package is missing, logs a warning on this logger (its only message): every `fusedvlm-train` call, `--help`
# and runs without 4-bit included, printed it. bitsandbytes then uses its own CPU kernel, the one the tests run;
# `kernels` is left out on purpose (it downloads code from the Hub at run time).
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

# Each public name and the module that defines it. Loaded on first use, so that `fusedvlm-train --help` and argument
# errors answer before `Trainer` (and the peft and bitsandbytes it imports) are loaded.
_EXPORTS = {
    "DataArguments": "arguments",
    "FusedLlavaDataCollator": "data",
    "FusedLlavaTrainer": "trainer",
    "IGNORE_INDEX": "data",
    "InvalidTrainingInput": "errors",
    "LORA_STAGES": "arguments",
    "LlavaConversationDataset": "data",
    "ModelArguments": "arguments",
    "ROLES": "data",
    "STAGES": "arguments",
    "check_output_dir": "cli",
    "check_source": "cli",
    "conversation_to_messages": "data",
    "format_parameter_table": "stages",
    "freeze_for_stage": "stages",
    "full_precision_state_dict": "saving",
    "fused_state_dict": "saving",
    "load_model_for_stage": "stages",
    "main": "cli",
    "parameter_part": "stages",
    "parse_arguments": "cli",
    "render_with_answer_spans": "data",
    "save_fused_checkpoint": "saving",
    "trainable_parameters": "stages",
    "validate_records": "data",
}


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_EXPORTS[name]}", __name__), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted([*globals(), *_EXPORTS])


__all__ = [
    "IGNORE_INDEX",
    "LORA_STAGES",
    "ROLES",
    "STAGES",
    "DataArguments",
    "FusedLlavaDataCollator",
    "FusedLlavaTrainer",
    "InvalidTrainingInput",
    "LlavaConversationDataset",
    "ModelArguments",
    "check_output_dir",
    "check_source",
    "conversation_to_messages",
    "format_parameter_table",
    "freeze_for_stage",
    "full_precision_state_dict",
    "fused_state_dict",
    "load_model_for_stage",
    "main",
    "parameter_part",
    "parse_arguments",
    "render_with_answer_spans",
    "save_fused_checkpoint",
    "trainable_parameters",
    "validate_records",
]
