"""Processor class for FusedLlavaNext: LLaVA-NeXT's processor plus the tokenizer of the instruction encoder (IGVA)."""

from transformers import LlavaNextProcessor

from .processing_fused_llava import FusedProcessorMixin


class FusedLlavaNextProcessor(FusedProcessorMixin, LlavaNextProcessor):
    r"""
    Constructs a FusedLlavaNext processor: a [`LlavaNextProcessor`] (any-resolution image processor, LLM tokenizer,
    chat template) plus, for fusers that read the user's instruction (`igva`), the instruction encoder's tokenizer. The
    instruction of each sample is found and tokenised exactly as [`FusedLlavaProcessor`] does it (explicit
    `instructions=`, the last user message of a conversation, or the last user turn of a raw prompt); the images,
    their `image_sizes` and the number of tokens each image token expands to are [`LlavaNextProcessor`]'s.

    One call returns everything [`FusedLlavaNextForConditionalGeneration`] takes: `input_ids`, `attention_mask`,
    `pixel_values` `(num_images, num_crops, channels, height, width)`, `image_sizes` `(num_images, 2)` and, with an
    instruction tokenizer, `instruction_input_ids`, `instruction_attention_mask` and (when the images are not one per
    sample) `image_sample_index`.

    Args:
        image_processor ([`LlavaNextImageProcessor`], *optional*):
            The source LLaVA-NeXT's image processor.
        tokenizer ([`PreTrainedTokenizerBase`], *optional*):
            The LLM tokenizer.
        instruction_tokenizer ([`PreTrainedTokenizerBase`], *optional*):
            The tokenizer of the model's instruction encoder, saved to and loaded from `instruction_tokenizer/`.
        patch_size (`int`, *optional*):
            Patch size of the vision tower.
        vision_feature_select_strategy (`str`, *optional*):
            `"default"` (drop the CLS token) or `"full"`, as in the model's config.
        chat_template (`str`, *optional*):
            A Jinja template that renders a conversation into a prompt.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The image placeholder in prompts.
        num_additional_image_tokens (`int`, *optional*, defaults to 0):
            Tokens the vision tower adds to the patches (1 for a CLS token).
    """


__all__ = ["FusedLlavaNextProcessor"]
