"""vLLM's native model for fused LLaVA-NeXT checkpoints (`FusedLlavaNextForConditionalGeneration`).

vLLM's own LLaVA-NeXT serving (`vllm.model_executor.models.llava_next`) with one step replaced: its processing info
(image tokens per image from the image size and `image_grid_pinpoints`), prompt replacement, dummy inputs and packing
of an image's crops (the base view, the tiles unpadded, `image_newline` after each row) are vLLM's; the features of
each crop come from the fused LLaVA's pixel-to-feature step ([`FusedLlavaForConditionalGeneration.
fused_crop_features`]: the tower recording only the layers the fuser reads, the fuser, the projector) instead of one
tower layer and the projector. IGVA's instruction is found as for fused LLaVA-1.5 ([`FusedInstructionProcessorMixin`])
and shared by all crops of its image, as in transformers.
"""

from collections.abc import Mapping

import torch
from torch import nn
from transformers import BatchFeature
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from vllm.config import VllmConfig
from vllm.model_executor.models.interfaces import MultiModalEmbeddings
from vllm.model_executor.models.utils import WeightsMapper
from vllm.multimodal import MULTIMODAL_REGISTRY
from vllm.multimodal.inputs import MultiModalFieldConfig

from ..configuration_fused_llava_next import FusedLlavaNextConfig
from ..processing_fused_llava_next import FusedLlavaNextProcessor
from .vllm_compat import allow_llava_imports_without_torchvision
from .vllm_model import FusedInstructionProcessorMixin, FusedLlavaForConditionalGeneration, FusedProcessingInfoMixin


allow_llava_imports_without_torchvision()  # before vLLM's llava modules: see vllm_compat

from vllm.model_executor.models.llava import LlavaDummyInputsBuilder  # noqa: E402
from vllm.model_executor.models.llava_next import (  # noqa: E402
    LlavaNextForConditionalGeneration,
    LlavaNextMultiModalProcessor,
    LlavaNextProcessingInfo,
)


class FusedLlavaNextProcessingInfo(FusedProcessingInfoMixin, LlavaNextProcessingInfo):
    """vLLM's LLaVA-NeXT processing info (token counts, the largest image) over the fused config and processor."""

    config_class = FusedLlavaNextConfig
    processor_class = FusedLlavaNextProcessor


class FusedLlavaNextMultiModalProcessor(
    FusedInstructionProcessorMixin, LlavaNextMultiModalProcessor[FusedLlavaNextProcessingInfo]
):
    """vLLM's LLaVA-NeXT processor and prompt replacement, with the fused plugin's instruction handling."""

    def _get_mm_fields_config(
        self, hf_inputs: BatchFeature, hf_processor_mm_kwargs: Mapping[str, object]
    ) -> Mapping[str, MultiModalFieldConfig]:
        fields = dict(super()._get_mm_fields_config(hf_inputs, hf_processor_mm_kwargs))
        fields.pop("image_embeds", None)  # refused in `apply`: the fuser reads the image's layers itself
        return {**fields, **self.instruction_fields_config()}


@MULTIMODAL_REGISTRY.register_processor(
    FusedLlavaNextMultiModalProcessor, info=FusedLlavaNextProcessingInfo, dummy_inputs=LlavaDummyInputsBuilder
)
class FusedLlavaNextForConditionalGeneration(FusedLlavaForConditionalGeneration):
    """A fused LLaVA-NeXT served by vLLM: the fused LLaVA's modules plus `image_newline`, every crop fused, the crops
    packed by vLLM's LLaVA-NeXT code."""

    hf_to_vllm_mapper = WeightsMapper(
        orig_to_new_prefix={
            **FusedLlavaForConditionalGeneration.hf_to_vllm_mapper.orig_to_new_prefix,
            "model.image_newline": "image_newline",
        }
    )
    # vLLM's packing of one image's crop features: the base view, then the tiles unpadded to the image's aspect ratio
    # with `image_newline` closing each row (it reads `self.config` and `self.image_newline`).
    _merge_image_patch_embeddings = LlavaNextForConditionalGeneration._merge_image_patch_embeddings

    def __init__(self, *, vllm_config: VllmConfig, prefix: str = ""):
        super().__init__(vllm_config=vllm_config, prefix=prefix)
        self.image_newline = nn.Parameter(torch.empty(self.config.text_config.hidden_size))

    def crops_per_image(self, image_sizes) -> list[int]:
        """Each image's crops (the base view and its tiles) by LLaVA-NeXT's rule; the processor pads the crops of
        images in one call to the largest count, and those padding crops are never encoded."""
        return [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in image_sizes
        ]

    def embed_multimodal(self, **kwargs: object) -> MultiModalEmbeddings:
        """One `(num_image_tokens, text_hidden_size)` tensor per image: its crops fused (each with its image's
        instruction) and projected, then packed by vLLM's LLaVA-NeXT code."""
        pixel_values = kwargs.get("pixel_values")
        if pixel_values is None:
            return []
        image_sizes = kwargs.get("image_sizes")
        if image_sizes is None:
            raise ValueError("A fused LLaVA-NeXT needs each image's image_sizes to tile and pack its crops.")
        image_sizes = [torch.as_tensor(size) for size in image_sizes]
        counts = self.crops_per_image(image_sizes)
        crops = torch.cat([image_crops[:count] for image_crops, count in zip(pixel_values, counts)])
        instruction_embeds = self.instruction_embeds_per_image(kwargs)
        if instruction_embeds is not None:
            repeats = torch.tensor(counts, device=instruction_embeds.device)
            instruction_embeds = instruction_embeds.repeat_interleave(repeats, dim=0)
        features = self.fused_crop_features(crops, instruction_embeds).split(counts)
        return [
            self._merge_image_patch_embeddings(size, image_features, strategy="spatial_unpad")
            for size, image_features in zip(image_sizes, features)
        ]
