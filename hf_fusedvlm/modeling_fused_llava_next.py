"""PyTorch FusedLlavaNext: LLaVA-NeXT (any resolution) whose visual tokens fuse several vision-encoder layers.

Built on transformers' `llava_next` as `llava_next` is built on `llava`: the fusion step (`modeling_fusion`) replaces
the single-layer projection on every crop, the base view and the tiles alike, and LLaVA-NeXT's packing (unpadding,
`image_newline`) is unchanged, so an image gives as many tokens as in LLaVA-NeXT."""

import math
from dataclasses import dataclass

import torch
from torch import nn
from transformers import AutoModel, GenerationMixin
from transformers.cache_utils import Cache
from transformers.models.llava_next.modeling_llava_next import (
    LlavaNextCausalLMOutputWithPast,
    LlavaNextForConditionalGeneration,
    LlavaNextModel,
    LlavaNextModelOutputWithPast,
    LlavaNextPreTrainedModel,
    image_size_to_num_patches,
)
from transformers.utils.generic import can_return_tuple

from .configuration_fused_llava_next import FusedLlavaNextConfig
from .modeling_fusion import FusedLlavaImageFeaturesOutput, FusedPreTrainedMixin, FusedVisionMixin, add_balance_loss


@dataclass
class FusedLlavaNextModelOutputWithPast(LlavaNextModelOutputWithPast):
    r"""
    fusion_weights (`torch.Tensor` of shape `(num_crops, num_groups)`, *optional*):
        Per-crop weights over the layer groups (`igva`, `average`), when images were encoded in this call.
    """

    fusion_weights: torch.Tensor | None = None


@dataclass
class FusedLlavaNextCausalLMOutputWithPast(LlavaNextCausalLMOutputWithPast):
    r"""
    fusion_weights (`torch.Tensor` of shape `(num_crops, num_groups)`, *optional*):
        Per-crop weights over the layer groups (`igva`, `average`), when images were encoded in this call.
    balance_loss (`torch.Tensor` of shape `()`, *optional*):
        IGVA's weighted balance loss, already included in `loss` when `labels` are given.
    """

    fusion_weights: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


class FusedLlavaNextPreTrainedModel(FusedPreTrainedMixin, LlavaNextPreTrainedModel):
    config: FusedLlavaNextConfig


class FusedLlavaNextModel(FusedVisionMixin, FusedLlavaNextPreTrainedModel, LlavaNextModel):
    """LLaVA-NeXT model whose crops' features come from `fuser` over several vision layers (no LM head)."""

    def __init__(self, config: FusedLlavaNextConfig):
        super(LlavaNextModel, self).__init__(config)
        self.build_fusion(config)
        embed_std = 1 / math.sqrt(config.text_config.hidden_size)
        self.image_newline = nn.Parameter(torch.randn(config.text_config.hidden_size, dtype=self.dtype) * embed_std)
        self.vocab_size = config.text_config.vocab_size
        self.language_model = AutoModel.from_config(config.text_config)
        self._keep_in_fp32_modules, self._keep_in_fp32_modules_strict = self._fusion_module_prefixes()
        self.post_init()

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.Tensor,
        image_sizes: torch.Tensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        image_sample_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> FusedLlavaImageFeaturesOutput:
        r"""
        Every crop through the vision tower (recording only the layers the fuser reads), the fuser and the projector,
        then each image's crops packed as [`LlavaNextModel.pack_image_features`] packs them.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, num_crops, channels, height, width)` or
                `(total_crops, channels, height, width)`):
                The crops of each image, the base view first, as `LlavaNextImageProcessor` gives them.
            image_sizes (`torch.LongTensor` of shape `(num_images, 2)`):
                Each image's (height, width) before tiling.
            vision_feature_layer, vision_feature_select_strategy:
                Accepted for compatibility; must be the config's (the fused layers are fixed at construction).
            instruction_input_ids, instruction_attention_mask, image_sample_index:
                As in [`FusedLlavaModel.get_image_features`]: one instruction per image, shared by all its crops.

        Returns:
            [`FusedLlavaImageFeaturesOutput`] whose `pooler_output` holds one `(num_image_tokens, text_hidden_size)`
            tensor per image.
        """
        self.check_feature_selection(vision_feature_layer, vision_feature_select_strategy)
        pixel_values, crops_per_image = self.crops_of_images(pixel_values, image_sizes)
        instruction_embeds = self._instruction_embeds_per_image(
            len(crops_per_image), instruction_input_ids, instruction_attention_mask, image_sample_index
        )
        if instruction_embeds is not None:
            counts = torch.tensor(crops_per_image, device=instruction_embeds.device)
            instruction_embeds = instruction_embeds.repeat_interleave(counts, dim=0)
        outputs = self.fused_image_features(pixel_values, instruction_embeds, **kwargs)
        outputs.pooler_output, _ = self.pack_image_features(
            torch.split(outputs.pooler_output, crops_per_image),
            image_sizes,
            vision_feature_select_strategy=self.config.vision_feature_select_strategy,
            image_newline=self.image_newline,
        )
        return outputs

    def crops_of_images(self, pixel_values: torch.Tensor, image_sizes: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """(the crops of all images `(total_crops, channels, height, width)`, the number of crops of each image): the
        processor's padding crops left out."""
        crops_per_image = [
            image_size_to_num_patches(
                image_size=size,
                grid_pinpoints=self.config.image_grid_pinpoints,
                patch_size=self.config.vision_config.image_size,
            )
            for size in image_sizes
        ]
        if pixel_values.dim() == 5:
            pixel_values = torch.cat([crops[:count] for crops, count in zip(pixel_values, crops_per_image)])
        elif pixel_values.dim() != 4:
            raise ValueError(
                f"pixel_values of shape {tuple(pixel_values.shape)}: expected (num_images, num_crops, channels, "
                "height, width) or (total_crops, channels, height, width)."
            )
        return pixel_values, crops_per_image

    def encode_images_once(
        self,
        pixel_values,
        image_sizes,
        instruction_input_ids,
        instruction_attention_mask,
        image_sample_index,
        mm_encoder_outputs,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
    ) -> dict:
        """`mm_encoder_outputs` with the fused image features, encoding `pixel_values` unless already encoded."""
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        if pixel_values is not None and pixel_values.size(0) > 0:
            if mm_encoder_outputs.get("image") is not None:
                raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
            if image_sizes is None:
                raise ValueError(
                    "image_sizes is required with pixel_values: LLaVA-NeXT tiles each image by its size "
                    "(FusedLlavaNextProcessor returns both)."
                )
            mm_encoder_outputs["image"] = self.get_image_features(
                pixel_values,
                image_sizes,
                vision_feature_layer=vision_feature_layer,
                vision_feature_select_strategy=vision_feature_select_strategy,
                instruction_input_ids=instruction_input_ids,
                instruction_attention_mask=instruction_attention_mask,
                image_sample_index=image_sample_index,
                return_dict=True,
            )
        elif vision_feature_layer is not None or vision_feature_select_strategy is not None:
            self.check_feature_selection(vision_feature_layer, vision_feature_select_strategy)
        return mm_encoder_outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        mm_encoder_outputs: dict | None = None,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        image_sample_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> FusedLlavaNextModelOutputWithPast:
        r"""[`LlavaNextModel.forward`] with fused image features; the extra inputs are those of
        [`get_image_features`]."""
        mm_encoder_outputs = self.encode_images_once(
            pixel_values,
            image_sizes,
            instruction_input_ids,
            instruction_attention_mask,
            image_sample_index,
            mm_encoder_outputs,
            vision_feature_layer,
            vision_feature_select_strategy,
        )
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            mm_encoder_outputs=mm_encoder_outputs,
            return_dict=True,
            **kwargs,
        )
        image_outputs = mm_encoder_outputs.get("image")
        return FusedLlavaNextModelOutputWithPast(
            **outputs, fusion_weights=getattr(image_outputs, "fusion_weights", None)
        )


class FusedLlavaNextForConditionalGeneration(
    FusedLlavaNextPreTrainedModel, LlavaNextForConditionalGeneration, GenerationMixin
):
    """LLaVA-NeXT with multi-layer visual feature fusion and a language modelling head."""

    def __init__(self, config: FusedLlavaNextConfig):
        super(LlavaNextForConditionalGeneration, self).__init__(config)
        self.model = FusedLlavaNextModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self._keep_in_fp32_modules, self._keep_in_fp32_modules_strict = self._fusion_module_prefixes()
        self.post_init()

    @property
    def fuser(self):
        return self.model.fuser

    def get_image_features(self, pixel_values, image_sizes, **kwargs) -> FusedLlavaImageFeaturesOutput:
        """See [`FusedLlavaNextModel.get_image_features`]."""
        return self.model.get_image_features(pixel_values, image_sizes, **kwargs)

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        image_sizes: torch.LongTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        mm_encoder_outputs: dict | None = None,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        image_sample_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> FusedLlavaNextCausalLMOutputWithPast:
        r"""[`LlavaNextForConditionalGeneration.forward`] with fused image features; with `labels`, IGVA's balance
        loss is added to the LM loss. The extra inputs are those of [`FusedLlavaNextModel.get_image_features`]."""
        mm_encoder_outputs = self.model.encode_images_once(
            pixel_values,
            image_sizes,
            instruction_input_ids,
            instruction_attention_mask,
            image_sample_index,
            mm_encoder_outputs,
            vision_feature_layer,
            vision_feature_select_strategy,
        )
        outputs = super().forward(
            input_ids=input_ids,
            attention_mask=attention_mask,
            position_ids=position_ids,
            past_key_values=past_key_values,
            inputs_embeds=inputs_embeds,
            labels=labels,
            mm_encoder_outputs=mm_encoder_outputs,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        image_outputs = mm_encoder_outputs.get("image")
        return FusedLlavaNextCausalLMOutputWithPast(**add_balance_loss(outputs, image_outputs, labels))


__all__ = ["FusedLlavaNextPreTrainedModel", "FusedLlavaNextModel", "FusedLlavaNextForConditionalGeneration"]
