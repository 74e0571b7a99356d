"""The processor of an imported original-format checkpoint, made as llava-hf made LLaVA-1.5's: the LLM tokenizer with
`<image>` (the original code's -200 placeholder) and `<pad>` added, the CLIP image processor of `--vision-tower`
padding to a square (`image_aspect_ratio: pad`), and the `llava_v1` conversation the models were trained with as chat
template; and the files written beside the weights."""

import math
from pathlib import Path

from tokenizers import AddedToken
from transformers import AutoConfig, AutoTokenizer, CLIPVisionConfig, GenerationConfig, LlavaImageProcessorPil
from transformers.image_processing_utils import ImageProcessingMixin

from ..configuration_fused_llava import FusedLlavaConfig
from ..processing_fused_llava import FusedLlavaProcessor
from .errors import ConversionError
from .sentence_encoder import SentenceEncoder
from .writing import write_remote_code


IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# llava-hf pads the vocabulary to a multiple of 64 rows for efficient matmuls.
VOCAB_MULTIPLE = 64


LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
# The `llava_v1` conversation of the original code (separator style TWO: " " after user turns, "</s>" after
# assistant turns), image placeholders first in the user turn as the original training data has them. A leading
# system message replaces the default system prompt.
LLAVA_V1_CHAT_TEMPLATE = (
    "{% set ns = namespace(system='" + LLAVA_V1_SYSTEM.replace("'", "\\'") + "', start=0) %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set ns.start = 1 %}"
    "{% if messages[0]['content'] is string %}{% set ns.system = messages[0]['content'] %}"
    "{% else %}{% set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') %}{% endif %}{% endif %}"
    "{{ ns.system + ' ' }}"
    "{% for message in messages[ns.start:] %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for block in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% else %}{{ ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)


def read_vision_tower(folder: Path, name: str) -> tuple[CLIPVisionConfig, LlavaImageProcessorPil]:
    """The CLIP vision config and the image processor settings of `--vision-tower`."""
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as error:
        raise ConversionError(f"--vision-tower {name}: no loadable config.json ({error}).") from error
    if config.model_type == "clip":
        config = config.vision_config
    if config.model_type != "clip_vision_model":
        raise ConversionError(
            f"--vision-tower {name} is a {config.model_type!r} model: the original LLaVA code builds CLIP towers "
            "(CLIPVisionModel); give the CLIP model named by mm_vision_tower."
        )
    try:
        settings = ImageProcessingMixin.get_image_processor_dict(folder)[0]
    except Exception as error:
        raise ConversionError(
            f"--vision-tower {name} has no image processor settings (preprocessor_config.json): the original code "
            f"loads CLIPImageProcessor from the tower's folder ({error})."
        ) from error
    known = set(LlavaImageProcessorPil().to_dict()) - {"image_processor_type"}
    image_processor = LlavaImageProcessorPil(**{key: value for key, value in settings.items() if key in known})
    return config, image_processor


def add_llava_tokens(tokenizer, vocab_size: int) -> tuple[int, int, int]:
    """Add `<image>` and `<pad>` as llava-hf does; returns (image token id, pad token id, new vocabulary size, a
    multiple of `VOCAB_MULTIPLE`)."""
    if len(tokenizer) > vocab_size:
        raise ConversionError(
            f"The tokenizer has {len(tokenizer)} tokens but the embedding matrix only {vocab_size} rows: the "
            "tokenizer files do not belong to these weights."
        )
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"  # batched generation
    new_size = math.ceil(max(vocab_size, len(tokenizer)) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id, new_size


def load_llm_tokenizer(source: Path):
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise ConversionError(
            f"Could not load the LLM tokenizer from {source} ({type(error).__name__}: {error}): original LLaVA "
            "checkpoints ship tokenizer.model or tokenizer.json with tokenizer_config.json; download them with the "
            "weights."
        ) from error


def write_companions(
    staging: Path,
    source: Path,
    config: FusedLlavaConfig,
    text_config,
    tokenizer,
    image_processor,
    encoder: SentenceEncoder | None,
    card,
) -> None:
    """Everything beside the weights: config and remote code, generation config, processor, model card."""
    write_remote_code(config, staging)
    generation_config = (
        GenerationConfig.from_pretrained(source)
        if (source / "generation_config.json").is_file()
        else GenerationConfig.from_model_config(text_config)
    )
    generation_config.pad_token_id = text_config.pad_token_id
    generation_config.save_pretrained(staging)
    FusedLlavaProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        instruction_tokenizer=encoder.tokenizer if encoder else None,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=LLAVA_V1_CHAT_TEMPLATE,
        num_additional_image_tokens=1,
    ).save_pretrained(staging)
    card.save(staging / "README.md")
