"""Deterministic tiny LLaVA checkpoints for tests, demos and benchmarks, built without any download.

Sizes are multiples of 64 so that bitsandbytes can quantise them on CPU. Tokenizers are trained with `tokenizers` on
a fixed corpus; weights come from a seeded generator, so the same call gives the same checkpoint on every machine.
"""

from collections import Counter

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers
from transformers import (
    AutoConfig,
    AutoModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaImageProcessorPil,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
    LlavaProcessor,
    PreTrainedTokenizerFast,
)

from .fusers import IGVAFuser, fuser_class
from .parity import fused_from_llava
from .processing_fused_llava import FusedLlavaProcessor
from .processing_fused_llava_next import FusedLlavaNextProcessor


IMAGE_TOKEN = "<image>"
NUM_IMAGE_TOKENS = 16  # 32x32 pixels, 8x8 patches
PATCH_SIZE = 8
LLAVA_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'system' %}{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' ' }}{% endfor %}"
    "{% else %}{{ message['role'].upper() + ': ' }}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}{{ content['text'] + ' ' }}"
    "{% endfor %}{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
_CORPUS = [
    "USER: What is shown in the image? ASSISTANT: A small red circle next to a blue square.",
    "USER: How many dots are there? ASSISTANT: There are three dots in the top left corner.",
    "USER: Which digit is written in the corner? ASSISTANT: The digit seven is written in green.",
    "USER: What colour is the triangle? ASSISTANT: The triangle is yellow and the background is white.",
    "USER: Describe the picture in detail. ASSISTANT: It shows shapes, digits and colours of many sizes.",
    "USER: Is there a cat or a dog? ASSISTANT: Neither, only a grey line and an orange star.",
    "one two three four five six seven eight nine zero left right top bottom middle large tiny",
]


def _train_tokenizer(model, trainer, normalizer=None, pre_tokenizer=None, decoder=None) -> Tokenizer:
    tokenizer = Tokenizer(model)
    if normalizer is not None:
        tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    if decoder is not None:
        tokenizer.decoder = decoder
    tokenizer.train_from_iterator(_CORPUS, trainer=trainer)
    return tokenizer


def build_tiny_llm_tokenizer(vocab_size: int = 256) -> PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer with LLaVA-1.5's special tokens (`<s>`, `</s>`, `<unk>`, `<pad>`, `<image>`)."""
    special = ["<unk>", "<s>", "</s>", "<pad>", IMAGE_TOKEN]
    tokenizer = _train_tokenizer(
        models.BPE(unk_token="<unk>"),
        trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special, show_progress=False),
        pre_tokenizer=pre_tokenizers.ByteLevel(add_prefix_space=False),
        decoder=decoders.ByteLevel(),
    )
    tokenizer.post_processor = processors.TemplateProcessing(
        single="<s> $A", pair="<s> $A <s> $B", special_tokens=[("<s>", tokenizer.token_to_id("<s>"))]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token="<s>",
        eos_token="</s>",
        unk_token="<unk>",
        pad_token="<pad>",
        extra_special_tokens={"image_token": IMAGE_TOKEN},
        padding_side="left",
        chat_template=LLAVA_CHAT_TEMPLATE,
        model_max_length=256,
    )


def build_tiny_instruction_tokenizer(vocab_size: int = 192) -> PreTrainedTokenizerFast:
    """A BERT-style WordPiece tokenizer (`[CLS] ... [SEP]`) for the tiny instruction encoder.

    The vocabulary is counted directly (special tokens, every character alone and as a `##` continuation, then the
    most frequent words, ties broken alphabetically) rather than trained: `tokenizers`' WordPiece trainer breaks ties
    in a different order in every process, which would change the token ids from run to run."""
    special = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    normalizer = normalizers.BertNormalizer(lowercase=True)
    pre_tokenizer = pre_tokenizers.BertPreTokenizer()
    words = Counter(
        word for line in _CORPUS for word, _ in pre_tokenizer.pre_tokenize_str(normalizer.normalize_str(line))
    )
    characters = sorted({character for word in words for character in word})
    vocab = special + characters + [f"##{character}" for character in characters]
    frequent = sorted((word for word in words if len(word) > 1), key=lambda word: (-words[word], word))
    vocab += frequent[: max(0, vocab_size - len(vocab))]
    tokenizer = Tokenizer(models.WordPiece({token: index for index, token in enumerate(vocab)}, unk_token="[UNK]"))
    tokenizer.normalizer = normalizer
    tokenizer.pre_tokenizer = pre_tokenizer
    tokenizer.decoder = decoders.WordPiece()
    cls_id, sep_id = tokenizer.token_to_id("[CLS]"), tokenizer.token_to_id("[SEP]")
    tokenizer.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]", special_tokens=[("[CLS]", cls_id), ("[SEP]", sep_id)]
    )
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        unk_token="[UNK]",
        pad_token="[PAD]",
        cls_token="[CLS]",
        sep_token="[SEP]",
        mask_token="[MASK]",
        model_max_length=64,
    )


def tiny_image_processor(image_size: int = 32) -> LlavaImageProcessorPil:
    """LLaVA-1.5 preprocessing (pad to square, then CLIP resize and crop) at `image_size` pixels."""
    return LlavaImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        do_pad=True,
        do_convert_rgb=True,
    )


# Per vision tower: LLaVA's feature selection (SigLIP has no class token to drop) and tower-specific config fields.
TINY_TOWERS = {
    "clip_vision_model": {"select_strategy": "default", "extra_tokens": 1, "fields": {"projection_dim": 64}},
    "siglip_vision_model": {"select_strategy": "full", "extra_tokens": 0, "fields": {}},
}


def tiny_llava_config(
    tokenizer: PreTrainedTokenizerFast,
    num_vision_layers: int = 6,
    *,
    num_text_heads: int = 4,
    vision_model_type: str = "clip_vision_model",
    image_size: int = 32,
) -> LlavaConfig:
    """A llava-hf style config: a CLIP (or SigLIP, `vision_model_type="siglip_vision_model"`) vision tower (32x32
    images by default, 8x8 patches) and a 2-layer, 64-wide Llama with `num_text_heads` heads (vLLM's CPU attention
    needs a head size of at least 32, i.e. 2 heads)."""
    tower = TINY_TOWERS[vision_model_type]
    vision_config = AutoConfig.for_model(
        vision_model_type,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=num_vision_layers,
        num_attention_heads=4,
        image_size=image_size,
        patch_size=PATCH_SIZE,
        **tower["fields"],
    )
    text_config = AutoConfig.for_model(
        "llama",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=num_text_heads,
        num_key_value_heads=2,
        vocab_size=len(tokenizer),
        max_position_embeddings=512,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    return LlavaConfig(
        vision_config=vision_config,
        text_config=text_config,
        image_token_index=tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        image_seq_length=(image_size // PATCH_SIZE) ** 2,
        vision_feature_layer=-2,
        vision_feature_select_strategy=tower["select_strategy"],
    )


def _seeded_init(model: torch.nn.Module, seed: int) -> None:
    """Overwrite every floating tensor with seeded values (std 0.2), so checkpoints match across machines."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, tensor in sorted(model.state_dict(keep_vars=True).items()):
            if not tensor.is_floating_point():
                continue
            if "norm" in name.lower() and name.endswith(".weight"):
                tensor.fill_(1.0)
            else:
                tensor.copy_(torch.randn(tensor.shape, generator=generator) * 0.2)


def build_tiny_llava(
    seed: int = 0,
    num_vision_layers: int = 6,
    *,
    num_text_heads: int = 4,
    vision_model_type: str = "clip_vision_model",
    image_size: int = 32,
) -> tuple[LlavaForConditionalGeneration, LlavaProcessor]:
    """A plain tiny `LlavaForConditionalGeneration` and its `LlavaProcessor`, identical for the same seed (options as
    for [`tiny_llava_config`])."""
    tokenizer = build_tiny_llm_tokenizer()
    config = tiny_llava_config(
        tokenizer,
        num_vision_layers,
        num_text_heads=num_text_heads,
        vision_model_type=vision_model_type,
        image_size=image_size,
    )
    model = LlavaForConditionalGeneration(config).eval()
    _seeded_init(model, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    processor = LlavaProcessor(
        image_processor=tiny_image_processor(image_size),
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy=TINY_TOWERS[vision_model_type]["select_strategy"],
        num_additional_image_tokens=TINY_TOWERS[vision_model_type]["extra_tokens"],
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def tiny_image_grid_pinpoints(image_size: int = 32) -> list[list[int]]:
    """LLaVA-NeXT's crop layouts (1x2, 2x1, 2x2 tiles of the tower's image size) for the tiny towers."""
    return [[image_size, 2 * image_size], [2 * image_size, image_size], [2 * image_size, 2 * image_size]]


def build_tiny_llava_next(
    seed: int = 0, num_vision_layers: int = 6, *, num_text_heads: int = 4, image_size: int = 32
) -> tuple[LlavaNextForConditionalGeneration, LlavaNextProcessor]:
    """A plain tiny `LlavaNextForConditionalGeneration` (the CLIP tower and Llama of [`tiny_llava_config`], with
    `num_text_heads` heads, crops of `image_size` pixels tiled up to 2x2) and its `LlavaNextProcessor`, identical for
    the same seed."""
    tokenizer = build_tiny_llm_tokenizer()
    fields = tiny_llava_config(
        tokenizer, num_vision_layers, num_text_heads=num_text_heads, image_size=image_size
    ).to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    pinpoints = tiny_image_grid_pinpoints(image_size)
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(**fields, image_grid_pinpoints=pinpoints)).eval()
    _seeded_init(model, seed)
    model.generation_config.pad_token_id = tokenizer.pad_token_id
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": image_size},
        crop_size={"height": image_size, "width": image_size},
        image_grid_pinpoints=pinpoints,
        do_convert_rgb=True,
    )
    processor = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=PATCH_SIZE,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_CHAT_TEMPLATE,
    )
    return model, processor


def build_tiny_instruction_encoder(seed: int = 0):
    """A 1-layer BERT sentence encoder (64-d) and its WordPiece tokenizer."""
    tokenizer = build_tiny_instruction_tokenizer()
    config = AutoConfig.for_model(
        "bert",
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=1,
        num_attention_heads=4,
        vocab_size=len(tokenizer),
        max_position_embeddings=64,
        pad_token_id=tokenizer.pad_token_id,
    )
    encoder = AutoModel.from_config(config).eval()
    _seeded_init(encoder, seed + 1)
    return encoder, tokenizer


def build_tiny_fused(
    fuser_type: str,
    seed: int = 0,
    *,
    num_text_heads: int = 4,
    vision_model_type: str = "clip_vision_model",
    trained: bool = False,
    family: str = "llava",
):
    """A tiny fused LLaVA of `fuser_type` converted from [`build_tiny_llava`] (with `num_text_heads` and
    `vision_model_type`; fusers that read the instruction with [`build_tiny_instruction_encoder`]), and its
    `FusedLlavaProcessor`. With `family="llava_next"`, a fused LLaVA-NeXT converted from [`build_tiny_llava_next`]
    (CLIP tower only) and its `FusedLlavaNextProcessor`.

    With `trained=True` the model is moved away from its source as training would: seeded noise (std 0.05) is added
    to every fuser weight, MMFuser's gammas (zero at conversion) are drawn with std 0.2, IGVA's projection of the
    group features is shrunk 50 times, and the projector's first linear is drawn anew (std 0.2), new columns included.
    The fusion then shows in the logits, which is what checks of other engines need.
    """
    if family == "llava":
        llava, llava_processor = build_tiny_llava(
            seed, num_text_heads=num_text_heads, vision_model_type=vision_model_type
        )
        processor_class = FusedLlavaProcessor
    elif family == "llava_next" and vision_model_type == "clip_vision_model":
        llava, llava_processor = build_tiny_llava_next(seed, num_text_heads=num_text_heads)
        processor_class = FusedLlavaNextProcessor
    else:
        raise ValueError(
            f"build_tiny_fused builds family='llava' (CLIP or SigLIP tower) or family='llava_next' (CLIP tower), not "
            f"family={family!r} with vision_model_type={vision_model_type!r}."
        )
    encoder = instruction_tokenizer = None
    if fuser_class(fuser_type).reads_instruction:
        encoder, instruction_tokenizer = build_tiny_instruction_encoder(seed)
    with torch.random.fork_rng():
        torch.manual_seed(seed)  # the new fuser weights are drawn from the global generator
        model = fused_from_llava(llava, fuser_type, instruction_encoder=encoder).eval()
    if trained:
        generator = torch.Generator().manual_seed(seed + 2)

        def noise(tensor: torch.Tensor, std: float) -> torch.Tensor:
            return torch.randn(tensor.shape, generator=generator) * std

        with torch.no_grad():
            for name, parameter in model.model.fuser.named_parameters():
                if name.rsplit(".", 1)[-1].startswith("gamma"):
                    parameter.copy_(noise(parameter, 0.2))
                else:
                    parameter.add_(noise(parameter, 0.05))
            projector = model.model.multi_modal_projector.linear_1.weight
            projector.copy_(noise(projector, 0.2))
            if isinstance(model.model.fuser, IGVAFuser):
                # The group features reach the aggregator far larger than the unit-norm sentence embedding, so its
                # attention saturates and the instruction barely moves the weights; shrunk, the instruction counts.
                model.model.fuser.cls_proj.weight.mul_(0.02)
    processor = processor_class.from_llava_processor(llava_processor, instruction_tokenizer=instruction_tokenizer)
    return model, processor
