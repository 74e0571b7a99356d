"""The processor of an imported original-format checkpoint, made as llava-hf made LLaVA-1.5's and LLaVA-1.6's: the LLM
tokenizer with `<image>` (the original code's -200 placeholder) and `<pad>` added, the CLIP image processor of
`--vision-tower` padding to a square (`image_aspect_ratio: pad`) or, for LLaVA-1.6 (`anyres`), LLaVA-NeXT's image
processor with the same CLIP settings for every tile, and the conversation the models were trained with as chat
template (`llava_v1`; for LLaVA-1.6 also `mistral_instruct` and `chatml_direct`); and the files written beside the
weights."""

import math
from pathlib import Path

from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoTokenizer,
    CLIPVisionConfig,
    LlavaImageProcessorPil,
    LlavaNextImageProcessorPil,
    SiglipVisionConfig,
)
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.image_utils import PILImageResampling

from ..configuration_fused_llava import FusedLlavaConfig
from ..configuration_fused_llava_next import FusedLlavaNextConfig
from ..processing_fused_llava import FusedLlavaProcessor
from ..processing_fused_llava_next import FusedLlavaNextProcessor
from .errors import ConversionError
from .sentence_encoder import SentenceEncoder
from .writing import source_generation_config


IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# llava-hf pads the vocabulary to a multiple of 64 rows for efficient matmuls.
VOCAB_MULTIPLE = 64


LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
# `vicuna_v1`, the conversation Dense Connector's Vicuna models were trained (`--version v1`) and evaluated with.
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the user's questions."
)
LLAMA_3_SYSTEM = (
    "You are a helpful language and vision assistant. You are able to understand the visual content that the user "
    "provides, and assist the user with a variety of tasks using natural language."
)


def _jinja_string(text: str) -> str:
    return "'" + text.replace("\\", "\\\\").replace("'", "\\'") + "'"


def conversation_chat_template(
    system: str,
    system_prefix: str,
    system_end: str,
    user: str,
    user_end: str,
    assistant: str,
    assistant_end: str,
    system_in_first_turn: bool = False,
) -> str:
    """A chat template writing a conversation as the original code's `Conversation.get_prompt` does: the system
    prompt (a leading system message replaces it), then each turn as its role's prefix, the message and its end; the
    generation prompt is the assistant prefix without its trailing whitespace when the prefix ends in a space
    (`ASSISTANT:`), as written. Image placeholders come first in their turn, each on its own line, as in the
    original training data. With `system_in_first_turn` (separator style LLAMA_2), a non-empty system prompt opens
    the first turn's message instead of the conversation."""
    generation = assistant.rstrip(" ")
    system_block = "{{ " + _jinja_string(system_prefix) + " + ns.system + " + _jinja_string(system_end) + " }}"
    first_turn = "{% if loop.first and ns.system %}" + system_block + "{% endif %}" if system_in_first_turn else ""
    return (
        "{% set ns = namespace(system=" + _jinja_string(system) + ", start=0) %}"
        "{% if messages and messages[0]['role'] == 'system' %}{% set ns.start = 1 %}"
        "{% if messages[0]['content'] is string %}{% set ns.system = messages[0]['content'] %}"
        "{% else %}{% set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
        "| map(attribute='text') | join(' ') %}{% endif %}{% endif %}"
        + ("" if system_in_first_turn else system_block)
        + "{% for message in messages[ns.start:] %}"
        "{% if message['role'] == 'assistant' %}{{ " + _jinja_string(assistant) + " }}"
        "{% else %}{{ "
        + _jinja_string(user)
        + " }}{% endif %}"
        + first_turn
        + "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
        "{% for block in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
        "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
        "{% endif %}"
        "{% if message['role'] == 'assistant' %}{{ " + _jinja_string(assistant_end) + " }}"
        "{% else %}{{ " + _jinja_string(user_end) + " }}{% endif %}"
        "{% endfor %}"
        "{% if add_generation_prompt %}{{ " + _jinja_string(generation) + " }}{% endif %}"
    )


def vicuna_chat_template(system: str) -> str:
    """Separator style TWO (`llava_v1`, `vicuna_v1`): " " after the system prompt and user turns, "</s>" after
    assistant turns."""
    return conversation_chat_template(system, "", " ", "USER: ", " ", "ASSISTANT: ", "</s>")


# The `llava_v1` conversation of the original code, which the plain, MMFuser and IGVA models were trained with.
LLAVA_V1_CHAT_TEMPLATE = vicuna_chat_template(LLAVA_V1_SYSTEM)
VICUNA_V1_CHAT_TEMPLATE = vicuna_chat_template(VICUNA_V1_SYSTEM)
# Dense Connector's `llama_3` conversation, as its code writes it: every turn ends with <|eot_id|>, and the assistant's
# turns carry the header of the role named `system` there.
LLAMA_3_HEADER = "<|start_header_id|>{}<|end_header_id|>\n\n"
# LLaVA-1.6's conversations besides `llava_v1` (Vicuna): `mistral_instruct` (separator style LLAMA_2: "[INST] ...
# [/INST]", an empty system prompt by default) for Mistral, `chatml_direct` (style MPT) for the 34B (Nous-Hermes-2-Yi).
MISTRAL_INSTRUCT_CHAT_TEMPLATE = conversation_chat_template(
    "", "<<SYS>>\n", "\n<</SYS>>\n\n", "[INST] ", " [/INST]", " ", " </s>", system_in_first_turn=True
)
CHATML_SYSTEM = "Answer the questions."
CHATML_END = "<|im_end|>"
CHATML_DIRECT_CHAT_TEMPLATE = conversation_chat_template(
    CHATML_SYSTEM,
    "<|im_start|>system\n",
    CHATML_END,
    "<|im_start|>user\n",
    CHATML_END,
    "<|im_start|>assistant\n",
    CHATML_END,
)
LLAMA_3_CHAT_TEMPLATE = conversation_chat_template(
    LLAMA_3_SYSTEM,
    "<|begin_of_text|>" + LLAMA_3_HEADER.format("system"),
    "<|eot_id|>",
    LLAMA_3_HEADER.format("user"),
    "<|eot_id|>",
    LLAMA_3_HEADER.format("system"),
    "<|eot_id|>",
)


def is_llama_3_tokenizer(tokenizer) -> bool:
    """Llama-3's tokenizer (the header and end-of-turn tokens of its chat format), as opposed to Vicuna's."""
    vocab = tokenizer.get_vocab()
    return "<|eot_id|>" in vocab and "<|start_header_id|>" in vocab


def is_chatml_tokenizer(tokenizer) -> bool:
    """A tokenizer with ChatML's turn tokens (LLaVA-1.6-34B's Nous-Hermes-2-Yi), as opposed to Vicuna's."""
    vocab = tokenizer.get_vocab()
    return "<|im_start|>" in vocab and CHATML_END in vocab


def any_resolution_image_processor(image_processor: LlavaImageProcessorPil, pinpoints) -> LlavaNextImageProcessorPil:
    """LLaVA-NeXT's image processor for LLaVA-1.6 (`process_anyres_image`): the base view resized to a square and the
    tiles of the best pinpoint (the image resized into it and padded with black), each tile with the tower's settings
    (CLIP's, as transformers converted liuhaotian/llava-v1.6-*; Dense Connector's SigLIP ones: 384 px tiles, no
    crop); `pinpoints` are (height, width)."""
    settings = image_processor.to_dict()
    known = set(LlavaNextImageProcessorPil().to_dict()) - {"image_processor_type", "image_grid_pinpoints", "do_pad"}
    return LlavaNextImageProcessorPil(
        **{key: value for key, value in settings.items() if key in known},
        image_grid_pinpoints=[list(pair) for pair in pinpoints],
    )


def read_vision_tower(
    folder: Path, name: str, siglip_named: str | None = None
) -> tuple[CLIPVisionConfig | SiglipVisionConfig, LlavaImageProcessorPil]:
    """The vision config and the image processor of `--vision-tower`: a CLIP model, or the SigLIP model of a
    checkpoint whose code builds SigLIP towers (`siglip_named`: the tower the checkpoint's config names)."""
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as error:
        raise ConversionError(f"--vision-tower {name}: no loadable config.json ({error}).") from error
    if config.model_type in ("clip", "siglip"):
        config = config.vision_config
    if siglip_named is not None:
        return siglip_vision_tower(config, name, siglip_named)
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


# The official Dense Connector SigLIP image processor: a fixed 384 px square, bicubic, mean and std 0.5, no crop.
SIGLIP_IMAGE_SIZE = 384
SIGLIP_MEAN_STD = [0.5, 0.5, 0.5]


def siglip_vision_tower(config, name: str, named: str) -> tuple[SiglipVisionConfig, LlavaImageProcessorPil]:
    """A SigLIP tower as the official Dense Connector code builds it: no pooling head (it replaces it with the
    identity), images resized to 384 px whatever the tower's preprocessor_config.json says."""
    if config.model_type != "siglip_vision_model":
        raise ConversionError(
            f"--vision-tower {name} is a {config.model_type!r} model, but the checkpoint names the SigLIP tower "
            f"{named!r}, which its code builds as a SigLIP model: give that SigLIP model (e.g. --vision-tower "
            "google/siglip-so400m-patch14-384)."
        )
    if config.image_size != SIGLIP_IMAGE_SIZE:
        raise ConversionError(
            f"--vision-tower {name} reads {config.image_size} px images, but the official code resizes every image "
            f"to {SIGLIP_IMAGE_SIZE} px: give the tower the checkpoint names ({named})."
        )
    config.vision_use_head = False
    # Any resolution: the tiles are crop_size squares, the base view is resized to `size` (not padded).
    image_processor = LlavaImageProcessorPil(
        size={"height": SIGLIP_IMAGE_SIZE, "width": SIGLIP_IMAGE_SIZE},
        crop_size={"height": SIGLIP_IMAGE_SIZE, "width": SIGLIP_IMAGE_SIZE},
        do_center_crop=False,
        resample=PILImageResampling.BICUBIC,
        image_mean=SIGLIP_MEAN_STD,
        image_std=SIGLIP_MEAN_STD,
    )
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
    # Batched generation needs left padding; init_kwargs is what save_pretrained writes.
    tokenizer.padding_side = tokenizer.init_kwargs["padding_side"] = "left"
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
    chat_template: str,
) -> None:
    """The generation config and the processor (with `chat_template`, the conversation the model was trained
    with)."""
    generation_config = source_generation_config(source, text_config)
    generation_config.pad_token_id = text_config.pad_token_id
    turn_end = {LLAMA_3_CHAT_TEMPLATE: "<|eot_id|>", CHATML_DIRECT_CHAT_TEMPLATE: CHATML_END}.get(chat_template)
    if turn_end is not None:
        # Llama-3 and ChatML end a turn with their own token; the official evaluation stops there (its stop string)
        # as well as at the end of text.
        eos = generation_config.eos_token_id
        eos = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        end_of_turn = tokenizer.convert_tokens_to_ids(turn_end)
        generation_config.eos_token_id = eos + [end_of_turn] if end_of_turn not in eos else eos
    generation_config.save_pretrained(staging)
    processor_class = FusedLlavaNextProcessor if isinstance(config, FusedLlavaNextConfig) else FusedLlavaProcessor
    processor_class(
        image_processor=image_processor,
        tokenizer=tokenizer,
        instruction_tokenizer=encoder.tokenizer if encoder else None,
        patch_size=config.vision_config.patch_size,
        vision_feature_select_strategy=config.vision_feature_select_strategy,
        chat_template=chat_template,
        # LLaVA's processors count the class token the default strategy drops; SigLIP has none.
        num_additional_image_tokens=0 if config.vision_config.model_type.startswith("siglip") else 1,
    ).save_pretrained(staging)
