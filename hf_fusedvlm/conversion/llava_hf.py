"""The llava-hf format (`LlavaForConditionalGeneration` checkpoints in safetensors, e.g. llava-hf/llava-1.5-7b-hf).

plan: read the config and the shard headers, map each key to the fused model's name (legacy llava-hf names
included), keep every tensor's bytes (only `model.multi_modal_projector.linear_1.weight` is widened when the fuser's
projector reads several slots, see `hf_fusedvlm.parity.expand_projector_input`), add the new fuser tensors (and igva's
instruction encoder) as one extra shard, and check the plan against the fused model. write: shards, index, config
with `auto_map`, remote code, generation config, processor and card into a staging folder. verify (optional): the
logits of source and result agree. Then the folder moves into place."""

import os
from pathlib import Path

import torch
from transformers import AutoProcessor, GenerationConfig, LlavaConfig, LlavaProcessor

from ..configuration_fused_llava import FusedLlavaConfig
from ..parity import (
    FUSER_PREFIX,
    INSTRUCTION_ENCODER_PREFIX,
    PROJECTOR_INPUT_KEY,
    expand_projector_input,
    fused_config_from_llava,
    llava_checkpoint_key,
    new_fuser_tensors,
)
from ..processing_fused_llava import FusedLlavaProcessor
from .checkpoint import LLAVA_HF, checkpoint_format, read_config_json, resolve_checkpoint
from .errors import ConversionError, as_torch_dtype, parse_dtype
from .hub import publish_result
from .model_card import card_command, render_model_card, source_license
from .pipeline import check_fuser_choice, describe_result, fuser_settings, prepare_output
from .sentence_encoder import SentenceEncoder, load_sentence_encoder
from .shards import StoredShard, read_shards
from .staging import staged_output
from .verify import verify_against_llava
from .writing import (
    PlannedShard,
    count_parameters,
    plan_mismatches,
    plan_new_tensors,
    plan_tensor,
    planned_shard,
    write_remote_code,
    write_shards,
)


EXPECTED = "a LLaVA checkpoint folder (or Hub repo) such as llava-hf/llava-1.5-7b-hf"


def read_llava_config(folder: Path) -> LlavaConfig:
    """The source's `LlavaConfig`, or a `ConversionError` saying why it is not a llava-hf checkpoint."""
    raw = read_config_json(folder, EXPECTED)
    if checkpoint_format(raw, folder) != LLAVA_HF:
        raise ConversionError(
            f"{folder} is an original-format LLaVA checkpoint (flat config with mm_vision_tower), not a llava-hf "
            "one: convert it with convert_original_checkpoint, or with fusedvlm-convert, which reads both formats."
        )
    return LlavaConfig.from_pretrained(folder)


# ----------------------------------------------------------------------------------------------------------- plan


def plan_source_shards(shards: list[StoredShard], config: FusedLlavaConfig, dtype) -> list[PlannedShard]:
    """Per source shard, its tensors under their fused names (cast to `dtype`, the projector input widened)."""
    widened_shape = None
    seen, planned = {}, []
    for shard in shards:
        entries = []
        for tensor in shard.tensors:
            name = llava_checkpoint_key(tensor.key)
            if name in seen:
                raise ConversionError(
                    f"{tensor.key!r} in {shard.path.name} and {seen[name]!r} are the same tensor "
                    f"({name}): the checkpoint is inconsistent; re-save it."
                )
            seen[name] = tensor.key
            if name == PROJECTOR_INPUT_KEY:
                try:
                    widened_shape = expand_projector_input(torch.empty(tensor.shape, device="meta"), config).shape
                except ValueError as error:
                    raise ConversionError(
                        f"Cannot widen the projector for --fuser {config.fuser_type}: {error}"
                    ) from error
                entries.append(
                    plan_tensor(
                        name, tensor, dtype, widened_shape, lambda weight: expand_projector_input(weight, config)
                    )
                )
            else:
                entries.append(plan_tensor(name, tensor, dtype))
        planned.append(planned_shard(entries, shard))
    return planned


def check_plan(config: FusedLlavaConfig, planned: list[PlannedShard]) -> None:
    """Refuse a plan whose tensors are not exactly the fused model's (names and shapes), before anything is written."""
    unexpected, missing, wrong = plan_mismatches(config, planned)
    details = []
    if unexpected:
        details.append(f"{len(unexpected)} tensors the fused model does not have (e.g. {unexpected[0]})")
    if missing:
        details.append(f"{len(missing)} parameters the checkpoint lacks (e.g. {missing[0]})")
    if wrong:
        name, planned_shape, expected_shape = wrong[0]
        details.append(
            f"{len(wrong)} tensors of the wrong shape (e.g. {name}: {planned_shape}, expected {expected_shape})"
        )
    if details:
        raise ConversionError(
            "The source checkpoint does not match its config.json: " + "; ".join(details) + ". Convert an unmodified "
            "llava-hf LlavaForConditionalGeneration checkpoint."
        )


def plan_conversion(source: Path, config: FusedLlavaConfig, encoder: SentenceEncoder | None, dtype):
    """(planned shards, number of source tensors, new tensor entries)."""
    shards = read_shards(source, "--input")
    planned = plan_source_shards(shards, config, dtype)
    new_tensors = plan_new_tensors(new_fuser_tensors(config, seed=0), dtype)
    if encoder is not None:
        encoder_state = {INSTRUCTION_ENCODER_PREFIX + k: v for k, v in encoder.model.state_dict().items()}
        new_tensors += plan_new_tensors(encoder_state, dtype)
    if new_tensors:
        planned.append(PlannedShard(new_tensors))
    check_plan(config, planned)
    return planned, sum(len(shard.tensors) for shard in shards), new_tensors


# ---------------------------------------------------------------------------------------------------------- write


def write_processor(source: Path, folder: Path, instruction_tokenizer) -> None:
    try:
        llava_processor = AutoProcessor.from_pretrained(source)
    except Exception as error:
        raise ConversionError(
            f"Could not load the source's processor from {source} ({type(error).__name__}: {error}): a llava-hf "
            "checkpoint ships its image processor, tokenizer and chat template; download them with the weights."
        ) from error
    if not isinstance(llava_processor, LlavaProcessor):
        raise ConversionError(
            f"{source} has no LlavaProcessor (AutoProcessor gave {type(llava_processor).__name__}): the checkpoint "
            "needs processor_config.json / preprocessor_config.json and its tokenizer files."
        )
    processor = FusedLlavaProcessor.from_llava_processor(llava_processor, instruction_tokenizer=instruction_tokenizer)
    processor.save_pretrained(folder)


def write_companions(
    staging: Path,
    source: Path,
    llava_config: LlavaConfig,
    config: FusedLlavaConfig,
    encoder: SentenceEncoder | None,
    card,
) -> None:
    """Everything beside the weights: config and remote code, generation config, processor, model card."""
    write_remote_code(config, staging)
    if (source / "generation_config.json").is_file():
        generation_config = GenerationConfig.from_pretrained(source)
    else:
        generation_config = GenerationConfig.from_model_config(llava_config)
    generation_config.save_pretrained(staging)
    write_processor(source, staging, encoder.tokenizer if encoder else None)
    card.save(staging / "README.md")


# -------------------------------------------------------------------------------------------------------- convert


def convert_llava_checkpoint(
    input: str | os.PathLike,
    output: str | os.PathLike,
    fuser_type: str,
    *,
    fuser_layers: list[int] | None = None,
    fuser_layer_groups: list[list[int]] | None = None,
    fuser_options: dict | None = None,
    instruction_encoder: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    verify: bool = False,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    base_model: str | None = None,
    progress: bool = True,
):
    """Convert a llava-hf `LlavaForConditionalGeneration` checkpoint into a fused one; see the module docstring.

    Args:
        input: checkpoint folder or Hub repo id.
        output: folder to create: new, empty, or with `overwrite` an earlier fused LLaVA output.
        fuser_type: a registered fuser (`hf_fusedvlm.FUSERS`).
        fuser_layers, fuser_layer_groups: `FusedLlavaConfig` fields (defaults scale the papers' layouts to the tower).
        fuser_options: further `FusedLlavaConfig` fuser fields (`pipeline.known_fuser_options()`), such as
            `{"fuser_num_heads": 8}`.
        instruction_encoder: sentence-transformers folder or Hub repo id of the instruction encoder (igva); its
            pooling and normalisation are carried into the config.
        dtype: `"float32"`, `"bfloat16"` or `"float16"` to cast floating tensors; default keeps the source's bytes.
        verify: compare the logits of source and result for one image and prompt before moving the output in place.
        push_to_hub: repo id to upload the result to in one commit (token from `HF_TOKEN` or `hf auth login`).
        private: create the Hub repo private.
        base_model: Hub id of the source for the model card, when `input` is a local folder.
        progress: show a progress bar of shards and bytes.

    Returns: a `ConversionResult`.
    """
    dtype = parse_dtype(dtype)
    check_fuser_choice(fuser_type, instruction_encoder)
    settings = fuser_settings(fuser_layers, fuser_layer_groups, fuser_options)
    output = prepare_output(input, output, overwrite, push_to_hub)

    source, repo_id = resolve_checkpoint(input)
    llava_config = read_llava_config(source)
    encoder = load_sentence_encoder(instruction_encoder, dtype) if instruction_encoder is not None else None
    try:
        config = fused_config_from_llava(
            llava_config,
            fuser_type,
            instruction_encoder_config=encoder.model.config if encoder else None,
            **{**(encoder.config_fields if encoder else {}), **settings},
        )
    except ValueError as error:
        raise ConversionError(f"Invalid fuser settings for this checkpoint: {error}") from error
    if dtype is not None:
        config.dtype = dtype
    planned, num_copied, new_tensors = plan_conversion(source, config, encoder, dtype)

    origin = base_model or repo_id
    new_parameters = count_parameters([PlannedShard(new_tensors)], FUSER_PREFIX)
    license, license_link = source_license(source)
    card = render_model_card(
        config,
        model_id=push_to_hub or output.name,
        base_model=origin,
        license=license,
        license_link=license_link,
        instruction_encoder=encoder.name if encoder else None,
        new_parameters=new_parameters,
        convert_command=card_command(
            origin or source.name,
            fuser_type=fuser_type,
            fuser_layers=fuser_layers,
            fuser_layer_groups=fuser_layer_groups,
            fuser_options=fuser_options,
            instruction_encoder=encoder.name if encoder else None,
            dtype=dtype,
        ),
    )
    with staged_output(output, overwrite) as staging:
        total_bytes = write_shards(staging, planned, progress)
        write_companions(staging, source, llava_config, config, encoder, card)
        result = describe_result(output, config, planned, num_copied, len(new_tensors), new_parameters, total_bytes)
        if verify:
            result.verify_max_abs_diff, result.verify_tolerance = verify_against_llava(
                source, staging, as_torch_dtype(config.dtype)
            )
    return publish_result(result, push_to_hub, private, f"Add {fuser_type} fused LLaVA from {origin or source.name}")
