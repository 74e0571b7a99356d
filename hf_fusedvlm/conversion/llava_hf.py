"""The llava-hf format (`LlavaForConditionalGeneration` checkpoints in safetensors, e.g. llava-hf/llava-1.5-7b-hf, and
`LlavaNextForConditionalGeneration` ones, e.g. llava-hf/llava-v1.6-mistral-7b-hf), as a source of the conversion
pipeline (`pipeline`).

check: the fused config (`FusedLlavaConfig` or `FusedLlavaNextConfig`) of the source's config and the fuser arguments. plan: map each key to the fused
model's name (legacy llava-hf names included), keep every tensor's bytes (only
`model.multi_modal_projector.linear_1.weight` is widened when the fuser's projector reads several slots, see
`hf_fusedvlm.parity.expand_projector_input`), add the new fuser tensors (and igva's instruction encoder) as one extra
shard; the companions are the source's generation config and its processor made fused; verify compares the logits of
source and result for one image and prompt."""

from pathlib import Path

from transformers import AutoConfig, AutoProcessor, LlavaNextProcessor, LlavaProcessor

from ..configuration_fused_llava import FusedLlavaConfig
from ..parity import PROJECTOR_INPUT_KEY, fused_config_from_llava, llava_checkpoint_key, new_fuser_tensors
from ..processing_fused_llava import FusedLlavaProcessor, missing_chat_template_message
from ..processing_fused_llava_next import FusedLlavaNextProcessor
from .errors import ConversionError, as_torch_dtype
from .request import Plan, Request, Source, check_fuser_choice
from .shards import read_shards
from .verify import verify_against_llava
from .writing import (
    new_tensors_shard,
    plan_projector_input,
    plan_renamed_shards,
    plan_tensor,
    source_generation_config,
)


# The fused processor of each plain llava-hf processor.
FUSED_PROCESSORS = {LlavaProcessor: FusedLlavaProcessor, LlavaNextProcessor: FusedLlavaNextProcessor}


# ---------------------------------------------------------------------------------------------------------- write


def write_processor(source: Path, folder: Path, instruction_tokenizer) -> None:
    try:
        llava_processor = AutoProcessor.from_pretrained(source)
    except Exception as error:
        raise ConversionError(
            f"Could not load the source's processor from {source} ({type(error).__name__}: {error}): a llava-hf "
            "checkpoint ships its image processor, tokenizer and chat template; download them with the weights."
        ) from error
    fused_class = FUSED_PROCESSORS.get(type(llava_processor))
    if fused_class is None:
        raise ConversionError(
            f"{source} has no LlavaProcessor or LlavaNextProcessor (AutoProcessor gave "
            f"{type(llava_processor).__name__}): the checkpoint needs processor_config.json / "
            "preprocessor_config.json and its tokenizer files."
        )
    processor = fused_class.from_llava_processor(llava_processor, instruction_tokenizer=instruction_tokenizer)
    message = missing_chat_template_message(processor, reads_instruction=instruction_tokenizer is not None)
    if message:
        print(f"warning: {message}")
    processor.save_pretrained(folder)


def write_companions(folder: Path, source: Path, llava_config, encoder) -> None:
    """The source's generation config (or one from its config) and its processor made fused."""
    source_generation_config(source, llava_config).save_pretrained(folder)
    write_processor(source, folder, encoder.tokenizer if encoder else None)


# ------------------------------------------------------------------------------------------------ the format


def check(source: Source, request: Request) -> FusedLlavaConfig:
    """The fused config of the source's `LlavaConfig` and the request, from config.json alone."""
    if request.vision_tower is not None:
        raise ConversionError(
            f"{source.given} is a llava-hf checkpoint, which holds its vision tower: drop --vision-tower (it is for "
            "original-format checkpoints)."
        )
    if request.fuser_type is None:
        raise ConversionError(f"{source.given} is a llava-hf checkpoint: choose the fuser to add with --fuser.")
    check_fuser_choice(request.fuser_type, request.encoder)
    try:
        config = fused_config_from_llava(
            AutoConfig.from_pretrained(source.folder),
            request.fuser_type,
            instruction_encoder_config=request.encoder.config if request.encoder else None,
            **request.settings,
        )
    except ValueError as error:
        raise ConversionError(f"Invalid fuser settings for this checkpoint: {error}") from error
    if request.dtype is not None:
        config.dtype = request.dtype
    return config


def plan(source: Source, request: Request) -> Plan:
    """The source's tensors under their fused names, the new fuser tensors (and the instruction encoder's)."""
    config = check(source, request)
    shards, dtype, encoder = read_shards(source.folder, "--input"), request.dtype, request.encoder

    def plan_entry(name, tensor):  # the projector's input widened for the fuser's slots
        if name == PROJECTOR_INPUT_KEY:
            return plan_projector_input(name, tensor, config, dtype)
        return plan_tensor(name, tensor, dtype)

    new_tensors = {**new_fuser_tensors(config, seed=0), **(encoder.fused_tensors if encoder else {})}
    planned = plan_renamed_shards(shards, llava_checkpoint_key, plan_entry) + new_tensors_shard(new_tensors, dtype)
    llava_config = AutoConfig.from_pretrained(source.folder)
    return Plan(
        config=config,
        shards=planned,
        num_source_tensors=sum(len(shard.tensors) for shard in shards),
        num_new_tensors=len(new_tensors),
        source_name=lambda name: name,
        layout="its config.json",
        fix="Convert an unmodified llava-hf LlavaForConditionalGeneration (or LlavaNext...) checkpoint.",
        write_companions=lambda folder: write_companions(folder, source.folder, llava_config, encoder),
        verify=lambda folder: verify_against_llava(source.folder, folder, as_torch_dtype(config.dtype)),
        commit_message=f"Add {request.fuser_type} fused LLaVA",
        card_fuser=request.fuser_type,
    )
