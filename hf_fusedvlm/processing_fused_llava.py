"""Processor class for FusedLlava: LLaVA's processor plus the tokenizer of the instruction encoder (IGVA)."""

import copy
import json
import os

from transformers import LlavaProcessor, ProcessorMixin
from transformers.feature_extraction_utils import BatchFeature
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER
from transformers.utils import cached_file, logging

from .fuser_registry import FUSERS


logger = logging.get_logger(__name__)

INSTRUCTION_INPUT_NAMES = ["instruction_input_ids", "instruction_attention_mask", "image_sample_index"]
# Texts that no chat template changes and no real conversation contains: rendering them reveals the role markers.
_PROBE_TURNS = ("FusedLlavaProbeFirstQuestion", "FusedLlavaProbeAnswer", "FusedLlavaProbeSecondQuestion")
# Hub options that decide where a file is found, forwarded when looking for the instruction tokenizer.
_HUB_KWARGS = ("cache_dir", "force_download", "local_files_only", "proxies", "revision", "token")


# PIL modes of 16-bit grayscale images (PNG, TIFF), which PIL's conversion to RGB clips at 255.
_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N")


def _checked_image(image, do_rescale: bool):
    """`image` as the image processor can read it: 16-bit grayscale scaled to 8 bits (65535 -> 255) instead of
    clipped; pixel values above 255 refused (they would be clipped or scaled wrong); a float image already in [0, 1]
    while the image processor rescales by 1/255 is warned about, as transformers' image processors warn."""
    mode = getattr(image, "mode", None)
    if mode in _SIXTEEN_BIT_MODES:
        return image.convert("I").point(lambda value: value / 257).convert("L")
    if mode in ("I", "F"):
        high = image.getextrema()[1]
        if high > 255:
            raise ValueError(
                f"An image of PIL mode {mode!r} has pixel values up to {high}, which converting it to RGB would clip "
                "at 255: the processor expects 8-bit images (or 16-bit grayscale, scaled down); scale it to 0..255 "
                "first."
            )
        return image
    if hasattr(image, "dtype") and hasattr(image, "max") and getattr(image, "size", 1) != 0:
        is_float = image.is_floating_point() if hasattr(image, "is_floating_point") else image.dtype.kind == "f"
        low, high = float(image.min()), float(image.max())
        if high > 255:
            raise ValueError(
                f"An image array has pixel values up to {high:g}: the processor expects 8-bit values (0..255), or "
                "floats in [0, 1] with do_rescale=False; scale it to 0..255 first (a 16-bit image: divide by 257)."
            )
        if is_float and do_rescale and low >= 0 and high <= 1:
            logger.warning_once(
                "An image has float pixel values in [0, 1], which the image processor rescales by 1/255 again. If "
                "the values are already rescaled, pass do_rescale=False; if they are 0..255 values, ignore this."
            )
    return image


def _checked_images(images, do_rescale: bool):
    """[`_checked_image`] over flat or nested lists of images."""
    if isinstance(images, (list, tuple)):
        return [_checked_images(image, do_rescale) for image in images]
    return _checked_image(images, do_rescale)


def _collapse_whitespace(text: str) -> str:
    return " ".join(text.split())


def instruction_from_conversation(conversation: list[dict], image_token: str = "<image>") -> str:
    """The instruction of a chat conversation: the text blocks of its last `"user"` message joined by spaces.

    Image blocks, image tokens and every other message (system prompt, assistant answers, earlier user turns) are left
    out; runs of whitespace become one space and the ends are stripped. A message whose `content` is a string counts
    as one text block.
    """
    user_messages = [message for message in conversation if message.get("role") == "user"]
    if not user_messages:
        raise ValueError(
            "The conversation has no message with role 'user' to take the instruction from: add the user's question, "
            "or pass `instructions=` explicitly."
        )
    content = user_messages[-1].get("content") or ""
    if isinstance(content, str):
        texts = [content]
    else:
        texts = [block["text"] for block in content if block.get("type") == "text"]
    return _collapse_whitespace(" ".join(texts).replace(image_token, " "))


def instruction_from_prompt(
    prompt: str,
    user_marker: str | None = None,
    assistant_marker: str | None = None,
    special_tokens: tuple[str, ...] | list[str] = ("<image>",),
) -> str:
    """The instruction in a rendered prompt: its last user turn without markup.

    The text after the last `user_marker` (which drops a system prefix and earlier turns; the whole prompt when the
    marker is `None` or absent), cut at the next `assistant_marker`, with every `special_tokens` entry (image token,
    BOS, ...) removed; runs of whitespace become one space and the ends are stripped.
    """
    if user_marker and user_marker in prompt:
        prompt = prompt.rsplit(user_marker, 1)[1]
    if assistant_marker:
        prompt = prompt.split(assistant_marker, 1)[0]
    for token in special_tokens:
        prompt = prompt.replace(token, " ")
    return _collapse_whitespace(prompt)


def missing_chat_template_message(processor, reads_instruction: bool) -> str | None:
    """What a processor without a chat template costs, for a converter to print as a warning before it writes one
    (None when `processor` has a template): `apply_chat_template` and training need it, and with `reads_instruction`
    the fuser's instruction is the whole prompt, role words included."""
    if getattr(processor, "chat_template", None):
        return None
    message = (
        "the source's processor has no chat template, so apply_chat_template and fusedvlm-train cannot render "
        "conversations (add chat_template.jinja from the model the checkpoint was fine-tuned from)"
    )
    if reads_instruction:
        message += (
            "; and the instruction the fuser reads will be the whole prompt, role words such as 'USER:' included, "
            "unless `instructions=` is passed to the processor"
        )
    return message + "."


def _common_prefix(first: str, second: str) -> str:
    return os.path.commonprefix([first, second])


def _common_suffix(first: str, second: str) -> str:
    return os.path.commonprefix([first[::-1], second[::-1]])[::-1]


class _HeldSubProcessors:
    """`FusedLlavaProcessor.get_attributes()`. On the class (what `from_pretrained` loads) it lists every sub-processor
    the constructor accepts; on an instance (what `__init__` checks and `save_pretrained` writes) it leaves out an
    absent instruction tokenizer, so that a processor without one is exactly a `LlavaProcessor`."""

    def __get__(self, instance, owner):
        def get_attributes() -> list[str]:
            attributes = ProcessorMixin.get_attributes.__func__(owner)
            if instance is not None and getattr(instance, "instruction_tokenizer", None) is None:
                attributes = [name for name in attributes if name != "instruction_tokenizer"]
            return attributes

        return get_attributes


class FusedProcessorMixin:
    """What a fused model's processor adds to its LLaVA processor (`LlavaProcessor`, `LlavaNextProcessor`): the
    instruction tokenizer and the routing of each sample's instruction to it; see [`FusedLlavaProcessor`]."""

    get_attributes = _HeldSubProcessors()

    def __init__(
        self,
        image_processor=None,
        tokenizer=None,
        instruction_tokenizer=None,
        patch_size=None,
        vision_feature_select_strategy=None,
        chat_template=None,
        image_token="<image>",
        num_additional_image_tokens=0,
        **kwargs,
    ):
        super().__init__(
            image_processor=image_processor,
            tokenizer=tokenizer,
            patch_size=patch_size,
            vision_feature_select_strategy=vision_feature_select_strategy,
            chat_template=chat_template,
            image_token=image_token,
            num_additional_image_tokens=num_additional_image_tokens,
            **kwargs,
        )
        if instruction_tokenizer is not None:
            self.check_argument_for_proper_class("instruction_tokenizer", instruction_tokenizer)
        self.instruction_tokenizer = instruction_tokenizer
        self._role_markers = {}  # chat template -> (user marker, assistant marker)

    @classmethod
    def from_llava_processor(cls, llava_processor, instruction_tokenizer=None):
        """This processor with copies of `llava_processor`'s image processor, tokenizer, chat template and LLaVA
        settings (patch size, feature strategy, image token, additional image tokens), plus `instruction_tokenizer`
        (for `igva`); `llava_processor` is the plain processor this class extends (`LlavaProcessor` for
        `FusedLlavaProcessor`, `LlavaNextProcessor` for `FusedLlavaNextProcessor`)."""
        return cls(
            image_processor=copy.deepcopy(llava_processor.image_processor),
            tokenizer=copy.deepcopy(llava_processor.tokenizer),
            instruction_tokenizer=instruction_tokenizer,
            patch_size=llava_processor.patch_size,
            vision_feature_select_strategy=llava_processor.vision_feature_select_strategy,
            chat_template=copy.deepcopy(llava_processor.chat_template),
            image_token=llava_processor.image_token,
            num_additional_image_tokens=llava_processor.num_additional_image_tokens,
        )

    @classmethod
    def _load_tokenizer_from_pretrained(cls, sub_processor_type, pretrained_model_name_or_path, subfolder="", **kwargs):
        # The instruction tokenizer is optional: without its subfolder the processor has none (the base class would
        # fall back to loading the LLM tokenizer in its place).
        if sub_processor_type == "instruction_tokenizer":
            folder = os.path.join(subfolder, sub_processor_type) if subfolder else sub_processor_type
            hub_kwargs = {key: kwargs[key] for key in _HUB_KWARGS if key in kwargs}
            found = cached_file(
                pretrained_model_name_or_path,
                "tokenizer_config.json",
                subfolder=folder,
                _raise_exceptions_for_missing_entries=False,
                **hub_kwargs,
            )
            if found is None:
                cls._check_no_instruction_needed(pretrained_model_name_or_path, subfolder, hub_kwargs)
                return None
        return super()._load_tokenizer_from_pretrained(
            sub_processor_type, pretrained_model_name_or_path, subfolder=subfolder, **kwargs
        )

    @staticmethod
    def _check_no_instruction_needed(pretrained_model_name_or_path, subfolder: str, hub_kwargs: dict) -> None:
        """Refuse to load a processor without instruction tokenizer beside a model whose fuser reads the instruction:
        the missing folder would only surface at generate()."""
        config_file = cached_file(
            pretrained_model_name_or_path,
            "config.json",
            subfolder=subfolder,
            _raise_exceptions_for_missing_entries=False,
            **hub_kwargs,
        )
        if config_file is None:
            return
        with open(config_file, encoding="utf-8") as file:
            fuser_type = json.load(file).get("fuser_type")
        if fuser_type in FUSERS and FUSERS[fuser_type].reads_instruction:
            raise OSError(
                f"{pretrained_model_name_or_path} holds a {fuser_type} model, whose fuser reads the user's instruction, "
                "but no instruction_tokenizer/ folder with the instruction encoder's tokenizer: the checkpoint is "
                "incomplete. Add it with FusedLlavaProcessor.from_llava_processor(processor, instruction_tokenizer="
                "AutoTokenizer.from_pretrained(ENCODER)).save_pretrained(FOLDER), ENCODER being the sentence encoder "
                "the model was converted with."
            )

    def __call__(self, images=None, text=None, instructions: str | list[str] | None = None, **kwargs) -> BatchFeature:
        r"""
        Prepares images and prompts as [`LlavaProcessor`] does and, with an instruction tokenizer, tokenises one
        instruction per sample for the fuser.

        Args:
            images (`ImageInput`, *optional*):
                The images, flat or nested per sample; one per image token in `text`, in order.
            text (`str` or `list[str]`, *optional*):
                The prompts, one per sample, each with one image token per image.
            instructions (`str` or `list[str]`, *optional*):
                One instruction per sample for the instruction encoder. By default each is taken from its prompt
                (see the class docstring). Only valid with an instruction tokenizer.
            kwargs:
                Processing options (`return_tensors`, `padding`, `padding_side`, `do_pad`, ...), as for
                [`LlavaProcessor`].

        Returns:
            [`BatchFeature`] with `input_ids`, `attention_mask`, `pixel_values` and, with an instruction tokenizer,
            `instruction_input_ids`, `instruction_attention_mask` `(batch_size, instruction_length)` and, when the
            images are not one per sample, `image_sample_index` `(num_images,)`.
        """
        if instructions is not None and self.instruction_tokenizer is None:
            raise ValueError(
                "`instructions` were given but this processor has no instruction_tokenizer: build it with the "
                "tokenizer of the model's instruction encoder, or leave `instructions` out for fusers that read none."
            )
        if instructions is not None and text is None:
            raise ValueError("`instructions` were given without prompts: pass one prompt per sample as `text`.")
        # Harnesses that serve every model through one code path (lmms-eval's generic `huggingface` model) pass
        # empty `videos` / `audios` lists; LLaVA takes neither, and transformers rejects the old `audios` name.
        for unused in ("videos", "audios", "audio"):
            if unused in kwargs and kwargs[unused] is not None and len(kwargs[unused]) == 0:
                kwargs.pop(unused)
        if images is not None:
            do_rescale = kwargs.get("do_rescale", (kwargs.get("images_kwargs") or {}).get("do_rescale"))
            if do_rescale is None:
                do_rescale = getattr(self.image_processor, "do_rescale", True)
            images = _checked_images(images, do_rescale)
        if self.instruction_tokenizer is None or text is None:
            return super().__call__(images=images, text=text, **kwargs)

        prompts = [text] if isinstance(text, str) else list(text)
        if instructions is None:
            instructions = [self.get_instruction(prompt) for prompt in prompts]
        else:
            instructions = [instructions] if isinstance(instructions, str) else list(instructions)
            if len(instructions) != len(prompts):
                raise ValueError(
                    f"Got {len(instructions)} instructions for {len(prompts)} prompts: pass exactly one instruction "
                    "per sample, or none to take each sample's instruction from its prompt."
                )

        outputs = super().__call__(images=images, text=text, **kwargs)
        data = {**outputs, **self._encode_instructions(instructions)}
        images_per_sample = [prompt.count(self.image_token) for prompt in prompts]
        if images is not None and images_per_sample != [1] * len(prompts):
            data["image_sample_index"] = [
                sample for sample, count in enumerate(images_per_sample) for _ in range(count)
            ]
        # The kwargs class is passed explicitly: transformers < 5.23 requires it.
        return_tensors = self._merge_kwargs(
            self.valid_processor_kwargs, tokenizer_init_kwargs=self.tokenizer.init_kwargs, **kwargs
        )["text_kwargs"].get("return_tensors")
        return BatchFeature(data, tensor_type=return_tensors, skip_tensor_conversion=self.skip_tensor_conversion)

    def _encode_instructions(self, instructions: list[str]) -> dict:
        """`instruction_input_ids` and `instruction_attention_mask` as lists, right-padded; too long ones truncated
        to the instruction tokenizer's `model_max_length`, with a warning (no limit when the tokenizer sets none)."""
        tokenizer = self.instruction_tokenizer
        limit = tokenizer.model_max_length
        options = {"padding": True, "padding_side": "right", "return_token_type_ids": False}
        if limit >= VERY_LARGE_INTEGER:  # the tokenizer sets no limit
            encoded = tokenizer(instructions, **options)
        else:
            # One token over the limit shows which ones are too long without the tokenizer's own length warning.
            encoded = tokenizer(instructions, truncation=True, max_length=limit + 1, **options)
            too_long = [index for index, mask in enumerate(encoded["attention_mask"]) if sum(mask) > limit]
            if too_long:
                logger.warning(
                    f"The instructions of samples {too_long} are longer than the instruction tokenizer's limit of "
                    f"{limit} tokens and were truncated to it: shorten them, or pass shorter `instructions=`."
                )
                encoded = tokenizer(instructions, truncation=True, max_length=limit, **options)
        return {
            "instruction_input_ids": encoded["input_ids"],
            "instruction_attention_mask": encoded["attention_mask"],
        }

    def apply_chat_template(self, conversation, chat_template=None, instructions: list[str] | None = None, **kwargs):
        """[`ProcessorMixin.apply_chat_template`]; when it tokenises and there is an instruction tokenizer, each
        conversation's instruction (the text of its last user message, see [`instruction_from_conversation`]), or
        the given `instructions`, goes to the processor call with the rendered prompt."""
        if kwargs.get("tokenize") and self.instruction_tokenizer is not None:
            if instructions is None:
                conversations = [conversation] if isinstance(conversation[0], dict) else conversation
                instructions = [instruction_from_conversation(chat, self.image_token) for chat in conversations]
            kwargs["processor_kwargs"] = {**(kwargs.get("processor_kwargs") or {}), "instructions": instructions}
        elif instructions is not None:
            raise ValueError(
                "`instructions` are only used when apply_chat_template tokenises (tokenize=True) with a processor "
                "that has an instruction_tokenizer."
            )
        return super().apply_chat_template(conversation, chat_template=chat_template, **kwargs)

    def chat_role_markers(self) -> tuple[str | None, str | None]:
        """`(user_marker, assistant_marker)` of the default chat template, e.g. `("USER:", "ASSISTANT:")`, found by
        rendering a probe conversation; `(None, None)` without a chat template or when it cannot render the probe."""
        if self.chat_template is None:
            return None, None
        key = str(self.chat_template)
        if key not in self._role_markers:
            first, answer, second = _PROBE_TURNS
            probe = [
                {"role": "user", "content": [{"type": "text", "text": first}]},
                {"role": "assistant", "content": [{"type": "text", "text": answer}]},
                {"role": "user", "content": [{"type": "text", "text": second}]},
            ]
            try:
                rendered = super().apply_chat_template(probe, add_generation_prompt=True)
                before_first, rest = rendered.split(first, 1)
                after_first, rest = rest.split(answer, 1)
                after_answer, after_second = rest.split(second, 1)
            except Exception as error:  # templates may reject the probe; fall back to the whole prompt
                logger.warning_once(
                    f"Could not find the role markers of the chat template ({error}): instructions taken from raw "
                    "prompts will be the whole prompt without special tokens. Pass `instructions=` explicitly."
                )
                self._role_markers[key] = (None, None)
            else:
                user_marker = _common_suffix(before_first, after_answer).strip() or None
                assistant_marker = _common_prefix(after_first, after_second).strip() or None
                self._role_markers[key] = (user_marker, assistant_marker)
        return self._role_markers[key]

    def get_instruction(self, prompt: str) -> str:
        """The instruction of a raw prompt: [`instruction_from_prompt`] with the chat template's role markers
        ([`chat_role_markers`]), removing the image token and the LLM tokenizer's special tokens."""
        user_marker, assistant_marker = self.chat_role_markers()
        if self.chat_template is None:
            logger.warning_once(
                "This processor has no chat template, so the instruction the fuser reads is the whole prompt, role "
                "words such as 'USER:' included: pass `instructions=` (the user's question) or give the processor "
                "the model's chat template."
            )
        special_tokens = dict.fromkeys([self.image_token, *self.tokenizer.all_special_tokens])
        return instruction_from_prompt(prompt, user_marker, assistant_marker, special_tokens=tuple(special_tokens))

    @property
    def model_input_names(self) -> list[str]:
        names = self.tokenizer.model_input_names + self.image_processor.model_input_names
        if self.instruction_tokenizer is not None:
            names = names + INSTRUCTION_INPUT_NAMES
        return list(dict.fromkeys(names))


class FusedLlavaProcessor(FusedProcessorMixin, LlavaProcessor):
    r"""
    Constructs a FusedLlava processor: a [`LlavaProcessor`] (image processor, LLM tokenizer, chat template) plus, for
    fusers that read the user's instruction (`igva`), the instruction encoder's own tokenizer, as InstructBLIP's
    processor feeds its Q-Former tokenizer. One call returns everything [`FusedLlavaForConditionalGeneration`] takes:

    - `input_ids`, `attention_mask` `(batch_size, sequence_length)`: the LLM prompt, each image token expanded to the
      image's number of patches as LLaVA does. Pass `padding=True, padding_side="left"` for batched generation.
    - `pixel_values` `(num_images, num_channels, height, width)`; image-processor options such as LLaVA-1.5's
      pad-to-square `do_pad` pass through.
    - With an instruction tokenizer: `instruction_input_ids`, `instruction_attention_mask`
      `(batch_size, instruction_length)`, one row per sample, padded on the right (the encoder mean-pools under the
      mask and uses absolute positions); and, when the images are not exactly one per sample,
      `image_sample_index` `(num_images,)`: the sample (instruction row) of each image, in the order the images are
      given. Without an instruction tokenizer (`mmfuser`, `concat`, `average`, `none`) none of these is produced.

    Where each sample's instruction comes from, in this order:

    1. `instructions=` (one string per sample) given to `__call__` or `apply_chat_template`, used as is.
    2. `apply_chat_template(..., tokenize=True)`: the text blocks of the last user message, see
       [`instruction_from_conversation`] (images and the other roles removed).
    3. A raw prompt string: its last user turn, see [`~FusedLlavaProcessor.get_instruction`]: the text after the chat
       template's last user marker (e.g. `USER:`), up to the assistant marker (`ASSISTANT:`), with the image token and
       the LLM tokenizer's special tokens removed. The markers are found by rendering a probe conversation with the
       chat template; without one the whole prompt is the instruction. A system prefix is dropped with everything
       before the last user marker.

    2 and 3 collapse whitespace, so the same question gives the same instruction whether it comes from a
    conversation, the prompt rendered from it, or a hand-written prompt in the template's format.

    Instructions longer than the instruction tokenizer's `model_max_length` are truncated to it with a warning that
    names the samples, as sentence-transformers truncates at its encoder's limit, so long prompts keep working in
    pipelines.

    Args:
        image_processor ([`BaseImageProcessor`], *optional*):
            The source LLaVA's image processor (LLaVA-1.5's pad-to-square is [`LlavaImageProcessor`]'s `do_pad`).
        tokenizer ([`PreTrainedTokenizerBase`], *optional*):
            The LLM tokenizer.
        instruction_tokenizer ([`PreTrainedTokenizerBase`], *optional*):
            The tokenizer of the model's instruction encoder (e.g. all-mpnet-base-v2's for `igva`). Saved to and loaded
            from the subfolder `instruction_tokenizer/`. Leave it out for fusers that read no instruction.
        patch_size (`int`, *optional*):
            Patch size of the vision tower.
        vision_feature_select_strategy (`str`, *optional*):
            `"default"` (drop the CLS token) or `"full"`, as in the model's config.
        chat_template (`str`, *optional*):
            A Jinja template that renders a conversation into a prompt.
        image_token (`str`, *optional*, defaults to `"<image>"`):
            The image placeholder in prompts (the tokenizer's `image_token` wins when it has one).
        num_additional_image_tokens (`int`, *optional*, defaults to 0):
            Tokens the vision tower adds to the patches (1 for a CLS token).
    """


__all__ = [
    "FusedLlavaProcessor",
    "FusedProcessorMixin",
    "instruction_from_conversation",
    "instruction_from_prompt",
    "missing_chat_template_message",
]
