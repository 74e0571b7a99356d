"""vLLM's native model for fused LLaVA checkpoints (`FusedLlavaForConditionalGeneration`).

vLLM's own CLIP / SigLIP tower and language model (tensor parallel), the package's fuser and instruction encoder
(replicated on every rank: they are small and read all layers at once), and a tensor-parallel projector. The
checkpoint is read as saved by transformers; nothing in it changes.

IGVA reads the user's instruction. The multimodal processor takes it from the prompt by the rule of
[`FusedLlavaProcessor.get_instruction`] (the last user turn, or with `mm_processor_kwargs={"instruction_turn":
"image"}` the turn holding the image), unless the request passes `mm_processor_kwargs={"instructions": "..."}`; either
way it becomes a processor option, so it is part of vLLM's multimodal cache key and an image asked about twice with
two instructions is encoded twice.
"""

import dataclasses
from collections.abc import Iterable, Mapping, Sequence

import torch
from torch import nn
from transformers import AutoModel, BatchFeature, CLIPVisionConfig, SiglipVisionConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES
from vllm.config import VllmConfig
from vllm.config.multimodal import MultiModalDummyOptions
from vllm.model_executor.layers.activation import get_act_fn
from vllm.model_executor.layers.linear import ColumnParallelLinear, RowParallelLinear
from vllm.model_executor.models.clip import CLIPVisionModel
from vllm.model_executor.models.interfaces import MultiModalEmbeddings, SupportsMultiModal
from vllm.model_executor.models.siglip import SiglipVisionModel
from vllm.model_executor.models.utils import AutoWeightsLoader, WeightsMapper, init_vllm_registered_model, maybe_prefix
from vllm.model_executor.models.vision import get_num_selected_vision_tokens
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig, MultiModalKwargsItems
from vllm.multimodal.parse import ImageEmbeddingItems, ImageSize, MultiModalDataItems
from vllm.multimodal.processing import (
    BaseDummyInputsBuilder,
    BaseMultiModalProcessor,
    BaseProcessingInfo,
    PromptReplacement,
    PromptUpdate,
)
from vllm.sequence import IntermediateTensors

from ..configuration_fused_llava import FusedLlavaConfig
from ..fusers import build_fuser, collecting_hidden_states, fuser_class
from ..modeling_fusion import fuse_and_project, fuser_dtype, pool_sentence_embeddings
from ..processing_fused_llava import FusedLlavaProcessor


INSTRUCTION_FIELDS = ("instruction_input_ids", "instruction_attention_mask")
# The `mm_processor_kwargs` the plugin reads itself, for fusers that read an instruction: `instructions` (the
# instruction, as the processor takes it) and `instruction_turn` (where it comes from when not given).
PLUGIN_OPTIONS = ("instructions", "instruction_turn")
INSTRUCTION_TURNS = ("last", "image")


class FusedProcessingInfoMixin:
    """What the processing info of every fused family adds to its base: the fused config and processor classes
    (`config_class`, `processor_class`), the plugin's options kept out of the processor, and whether the fuser reads
    the instruction."""

    config_class: type = FusedLlavaConfig
    processor_class: type = FusedLlavaProcessor

    def get_hf_config(self):
        return self.ctx.get_hf_config(self.config_class)

    def get_hf_processor(self, **kwargs: object):
        for option in PLUGIN_OPTIONS:  # call options, not processor settings
            kwargs.pop(option, None)
        return self.ctx.get_hf_processor(self.processor_class, **kwargs)

    def reads_instruction(self) -> bool:
        return fuser_class(self.get_hf_config().fuser_type).reads_instruction


class FusedLlavaProcessingInfo(FusedProcessingInfoMixin, BaseProcessingInfo):
    def get_supported_mm_limits(self) -> Mapping[str, int | None]:
        return {"image": None}

    def get_image_size_with_most_features(self) -> ImageSize:
        size = self.get_hf_config().vision_config.image_size
        return ImageSize(width=size, height=size)

    def get_num_image_tokens(self) -> int:
        """Visual tokens per image: the tower's tokens less the class token under the "default" strategy (the
        vision tower reads fixed-size images, so this is the same for every image)."""
        config = self.get_hf_config()
        vision_config = config.vision_config
        patches = (vision_config.image_size // vision_config.patch_size) ** 2
        has_class_token = isinstance(vision_config, CLIPVisionConfig)
        return get_num_selected_vision_tokens(patches + has_class_token, config.vision_feature_select_strategy)


class FusedLlavaDummyInputsBuilder(BaseDummyInputsBuilder[FusedLlavaProcessingInfo]):
    def get_dummy_text(self, mm_counts: Mapping[str, int]) -> str:
        return self.info.get_hf_processor().image_token * mm_counts.get("image", 0)

    def get_dummy_mm_data(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions):
        size = self.info.get_image_size_with_most_features()
        images = self._get_dummy_images(
            width=size.width,
            height=size.height,
            num_images=mm_counts.get("image", 0),
            overrides=mm_options.get("image"),
        )
        return {"image": images}


class FusedInstructionProcessorMixin:
    """The instruction handling of every fused family's multimodal processor (placed before vLLM's processor class in
    the bases): the instruction found in the prompt or given as `instructions`, made a processor option (the image's
    cache key), one instruction row per image, and the refusal of image embeddings and of unknown options."""

    def get_dummy_inputs(self, seq_len: int, mm_counts: Mapping[str, int], mm_options: MultiModalDummyOptions):
        """vLLM's profiling inputs (image tokens only), with an instruction for fusers that read one: `apply` refuses
        images asked about without one."""
        inputs = super().get_dummy_inputs(seq_len, mm_counts, mm_options)
        if self.info.reads_instruction():
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={"instructions": "Describe the image."})
        return inputs

    def apply(self, inputs, timing_ctx):
        """Adds the instruction taken from the prompt (by `instruction_turn`, see `instruction_from_prompt`) to the
        processor options, for fusers that read one, unless the request or the server gave `instructions` itself.
        vLLM hands the processor the tokenised prompt, so the prompt is decoded first; the rule removes special
        tokens and collapses whitespace, so a tokenizer whose decoding changes only spacing gives the instruction the
        text prompt would."""
        if isinstance(inputs.mm_data_items.get("image"), ImageEmbeddingItems):
            raise ValueError(
                "A fused LLaVA cannot take precomputed image embeddings: its fuser reads several vision layers of the "
                "image itself. Pass the images (PIL images or arrays) instead."
            )
        options = inputs.hf_processor_mm_kwargs
        settings = self.info.ctx.get_merged_mm_kwargs(options)  # with the server's --mm-processor-kwargs
        self.check_processor_options(settings)
        if self.info.reads_instruction() and inputs.mm_data_items:
            instruction = settings.get("instructions")
            if instruction is None:
                prompt = self.info.get_tokenizer().decode(inputs.prompt)
                instruction = self.instruction_from_prompt(prompt, settings.get("instruction_turn", "last"))
            check_instruction(instruction)
            # The options are the image's cache key: the instruction alone, however it was found, so that the same
            # image and instruction share one entry.
            options = {key: value for key, value in options.items() if key != "instruction_turn"}
            inputs = dataclasses.replace(inputs, hf_processor_mm_kwargs={**options, "instructions": instruction})
        return super().apply(inputs, timing_ctx)

    def instruction_from_prompt(self, prompt: str, turn: str) -> str:
        """The instruction in a decoded prompt: its last user turn (`turn="last"`, the processor's rule, what
        transformers reads), or the user turn holding its first image (`turn="image"`).

        The instruction is part of the image's cache key, and vLLM's prefix cache keys every block from the image on
        by it: under "last", each new turn of a chat re-encodes the image and recomputes the conversation from the
        image on; under "image", the image keeps the question it came with and the conversation stays cached."""
        if turn not in INSTRUCTION_TURNS:
            raise ValueError(
                f"mm_processor_kwargs['instruction_turn'] must be one of {list(INSTRUCTION_TURNS)}, not {turn!r}."
            )
        processor = self.info.get_hf_processor()
        if turn == "image":
            _, assistant_marker = processor.chat_role_markers()
            image_start = prompt.find(processor.image_token)
            turn_end = prompt.find(assistant_marker, image_start) if assistant_marker and image_start >= 0 else -1
            if turn_end >= 0:
                prompt = prompt[:turn_end]
        return processor.get_instruction(prompt)

    def check_processor_options(self, options: Mapping[str, object]) -> None:
        """Refuses `mm_processor_kwargs` that neither the processor nor its image processor knows: transformers would
        drop them without a word, and the request would be answered as if they had been applied."""
        scopes = self.info.supported_mm_processor_kwargs
        known = set(scopes).union(*scopes.values())
        if self.info.reads_instruction():
            known.update(PLUGIN_OPTIONS)
        unknown = sorted(set(options) - known)
        if unknown:
            instructions = "`instructions`, `instruction_turn` and " if self.info.reads_instruction() else ""
            raise ValueError(
                f"Unknown mm_processor_kwargs {unknown} for this {self.info.get_hf_config().fuser_type} fused LLaVA: "
                f"it accepts {instructions}the options of its image processor and tokenizer (e.g. do_pad)."
            )

    def _call_hf_processor(self, hf_data: Mapping[str, object], hf_kwargs: Mapping[str, object]) -> BatchFeature:
        # vLLM adds the server's --mm-processor-kwargs to every processor call; `instruction_turn` among them is the
        # plugin's option, which the processor does not take (transformers would warn on every request).
        processor = self.info.get_hf_processor(**hf_kwargs)

        def call_processor(**kwargs):
            kwargs.pop("instruction_turn", None)
            return processor(**kwargs)

        return self.info.ctx.call_hf_processor(call_processor, hf_data, hf_kwargs)

    def _get_hf_mm_text(self, mm_counts: Mapping[str, int]) -> str | None:
        # The processor only tokenises an instruction for a prompt; one image token per image keeps them paired.
        if self.info.reads_instruction():
            return self.dummy_inputs.get_dummy_text(mm_counts)
        return super()._get_hf_mm_text(mm_counts)

    def _postprocess_hf_mm_data(
        self,
        mm_inputs: Mapping[str, object],
        hf_processor_mm_kwargs: Mapping[str, object],
        processed_data: BatchFeature,
    ) -> BatchFeature:
        processed_data.pop("input_ids", None)
        processed_data.pop("attention_mask", None)
        sample_index = processed_data.pop("image_sample_index", None)
        if "instruction_input_ids" in processed_data and "pixel_values" in processed_data:
            # One row per image, so that vLLM can cache and batch images on their own.
            if sample_index is None:
                sample_index = torch.zeros(len(processed_data["pixel_values"]), dtype=torch.long)
            for field in INSTRUCTION_FIELDS:
                processed_data[field] = processed_data[field][torch.as_tensor(sample_index)]
        return processed_data

    def instruction_fields_config(self) -> Mapping[str, MultiModalFieldConfig]:
        """The instruction's fields, one row per image, for fusers that read one."""
        if not self.info.reads_instruction():
            return {}
        return {field: MultiModalFieldConfig.batched("image") for field in INSTRUCTION_FIELDS}


class FusedLlavaMultiModalProcessor(FusedInstructionProcessorMixin, BaseMultiModalProcessor[FusedLlavaProcessingInfo]):
    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        return {"pixel_values": MultiModalFieldConfig.batched("image"), **self.instruction_fields_config()}

    def _get_prompt_updates(
        self,
        mm_items: MultiModalDataItems,
        hf_processor_mm_kwargs: Mapping[str, object],
        out_mm_kwargs: MultiModalKwargsItems,
    ) -> Sequence[PromptUpdate]:
        image_token_id = self.info.get_hf_config().image_token_id
        return [
            PromptReplacement(
                modality="image",
                target=[image_token_id],
                replacement=[image_token_id] * self.info.get_num_image_tokens(),
            )
        ]


class FusedLlavaMultiModalProjector(nn.Module):
    """LLaVA's MLP projector over the fuser's `output_size` channels, split across tensor-parallel ranks."""

    def __init__(self, config: FusedLlavaConfig, input_size: int, quant_config, prefix: str):
        super().__init__()
        text_size = config.text_config.hidden_size
        bias = config.multimodal_projector_bias
        self.linear_1 = ColumnParallelLinear(
            input_size, text_size, bias=bias, quant_config=quant_config, prefix=f"{prefix}.linear_1"
        )
        self.act = get_act_fn(config.projector_hidden_act)
        self.linear_2 = RowParallelLinear(
            text_size, text_size, bias=bias, quant_config=quant_config, prefix=f"{prefix}.linear_2"
        )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        hidden, _ = self.linear_1(features)
        hidden, _ = self.linear_2(self.act(hidden))
        return hidden


def build_vision_tower(config: FusedLlavaConfig, quant_config, prefix: str) -> nn.Module:
    """vLLM's tower for the config's CLIP or SigLIP vision config, built up to the deepest layer the fuser reads,
    without the post-layernorm (LLaVA reads hidden states before it)."""
    vision_config = config.vision_config
    towers = {CLIPVisionConfig: CLIPVisionModel, SiglipVisionConfig: SiglipVisionModel}
    tower_class = next((tower for kind, tower in towers.items() if isinstance(vision_config, kind)), None)
    if tower_class is None:
        raise NotImplementedError(
            f"The vLLM plugin of hf-fusedvlm serves CLIP and SigLIP vision towers, not {type(vision_config).__name__}."
        )
    return tower_class(
        vision_config,
        quant_config=quant_config,
        num_hidden_layers_override=max(config.vision_layers_needed),
        require_post_norm=False,
        prefix=prefix,
    )


def check_instruction(instruction: object) -> None:
    """Refuses an instruction a fuser cannot read: not one string, or empty (an image with no question about it)."""
    if not isinstance(instruction, str):
        raise ValueError(
            f"mm_processor_kwargs['instructions'] must be one string (the fuser's instruction for this prompt's "
            f"images), not {type(instruction).__name__}."
        )
    if not instruction.strip():
        raise ValueError(
            "This fused LLaVA's fuser weighs the vision layers by the user's instruction, and the request has none: "
            "add text to the user's turn, or pass mm_processor_kwargs={'instructions': '...'}."
        )


def pad_rows(rows: torch.Tensor | Sequence[torch.Tensor]) -> torch.Tensor:
    """`(num_rows, max_length)` from a tensor or a list of 1-D rows of different lengths, right-padded with 0."""
    if isinstance(rows, torch.Tensor):
        return rows
    return nn.utils.rnn.pad_sequence(list(rows), batch_first=True, padding_value=0)


@MULTIMODAL_REGISTRY.register_processor(
    FusedLlavaMultiModalProcessor, info=FusedLlavaProcessingInfo, dummy_inputs=FusedLlavaDummyInputsBuilder
)
class FusedLlavaForConditionalGeneration(nn.Module, SupportsMultiModal):
    """A fused LLaVA served by vLLM: the same features and logits as the transformers model, up to kernels."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            "model.language_model.": "language_model.model.",
            "model.vision_tower.": "vision_tower.",
            "model.fuser.": "fuser.",
            "model.instruction_encoder.": "instruction_encoder.",
            "model.multi_modal_projector.": "multi_modal_projector.",
            "lm_head.": "language_model.lm_head.",
        }
    )

    @classmethod
    def get_placeholder_str(cls, modality: str, i: int) -> str | None:
        if modality.startswith("image"):
            return "<image>"
        raise ValueError("Only the image modality is supported")

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__()
        config: FusedLlavaConfig = vllm_config.model_config.hf_config
        quant_config = vllm_config.quant_config
        dtype = vllm_config.model_config.dtype
        self.config = config
        self.configure_mm_token_handling(vocab_size=config.text_config.vocab_size, mm_token_ids=[config.image_token_id])
        with self._mark_tower_model(vllm_config, "image"):
            self.vision_tower = build_vision_tower(config, quant_config, maybe_prefix(prefix, "vision_tower"))
            # As in transformers: the fuser stays fp32 (deformable sampling, group softmax), the instruction encoder
            # under fp16 too.
            self.fuser = build_fuser(config).float()
            if self.fuser.reads_instruction:
                self.instruction_encoder = AutoModel.from_config(config.instruction_encoder_config).eval()
                if dtype == torch.float16:
                    self.instruction_encoder.float()
            else:
                self.instruction_encoder = None
            self.multi_modal_projector = FusedLlavaMultiModalProjector(
                config, self.fuser.output_size, quant_config, maybe_prefix(prefix, "multi_modal_projector")
            )
        text_config = config.text_config
        architectures = text_config.architectures or [MODEL_FOR_CAUSAL_LM_MAPPING_NAMES[text_config.model_type]]
        with self._mark_language_model(vllm_config):
            self.language_model = init_vllm_registered_model(
                vllm_config=vllm_config,
                hf_config=text_config,
                architectures=architectures,
                prefix=maybe_prefix(prefix, "language_model"),
            )
        self.make_empty_intermediate_tensors = self.language_model.make_empty_intermediate_tensors

    def embed_instructions(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        """Sentence embeddings `(num_images, encoder_hidden)` of the per-image instructions `(num_images, length)`."""
        hidden = self.instruction_encoder(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state
        return pool_sentence_embeddings(hidden, attention_mask, self.config)

    def instruction_embeds_per_image(self, kwargs: Mapping[str, object]) -> torch.Tensor | None:
        """The sentence embeddings `(num_images, encoder_hidden)` of the images' instructions in the multimodal
        `kwargs`, or `None` for fusers that read none."""
        if self.instruction_encoder is None:
            return None
        input_ids, attention_mask = (pad_rows(kwargs[field]) for field in INSTRUCTION_FIELDS)
        return self.embed_instructions(input_ids, attention_mask)

    def fused_crop_features(self, pixel_values: torch.Tensor, instruction_embeds: torch.Tensor | None) -> torch.Tensor:
        """The pixel-to-feature step: `(num_crops, channels, height, width)` through the tower (built up to the
        deepest layer the fuser reads), the fuser (with one instruction embedding per crop) and the projector. As in
        transformers, the tower keeps only what the fuser reads while it runs: the layers it reads alone, and one
        running mean per layer group it averages. Returns `(num_crops, num_image_tokens, text_hidden_size)`."""
        config = self.config
        layers = self.vision_tower.vision_model.encoder.layers
        dtype = fuser_dtype(self.fuser, None)
        with collecting_hidden_states(layers, config.vision_layers_kept, config.vision_layer_means, dtype) as kept:
            last_hidden_state = self.vision_tower(pixel_values.to(self.vision_tower.dtype))
        features, _ = fuse_and_project(
            self.fuser, self.multi_modal_projector, kept.hidden_states(), instruction_embeds, last_hidden_state.dtype
        )
        return features

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One `(num_image_tokens, text_hidden_size)` tensor per image: tower, fuser, projector."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        if not isinstance(pixel_values, torch.Tensor):
            pixel_values = torch.stack(list(pixel_values))
        return list(self.fused_crop_features(pixel_values, self.instruction_embeds_per_image(kwargs)))

    def forward(
        self,
        input_ids: torch.Tensor | None,
        positions: torch.Tensor,
        intermediate_tensors: IntermediateTensors | None = None,
        inputs_embeds: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor | IntermediateTensors:
        if intermediate_tensors is not None:
            inputs_embeds = None
        return self.language_model.model(input_ids, positions, intermediate_tensors, inputs_embeds=inputs_embeds)

    def compute_logits(self, hidden_states: torch.Tensor) -> torch.Tensor | None:
        return self.language_model.compute_logits(hidden_states)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        def with_tower_level(named_weights):
            # transformers 5 saves CLIP / SigLIP towers without their `vision_model.` level; vLLM's towers have it.
            for name, tensor in named_weights:
                if name.startswith("model.vision_tower.") and not name.startswith("model.vision_tower.vision_model."):
                    name = "model.vision_tower.vision_model." + name[len("model.vision_tower.") :]
                yield name, tensor

        return AutoWeightsLoader(self).load_weights(with_tower_level(weights), mapper=self.hf_to_vllm_mapper)
