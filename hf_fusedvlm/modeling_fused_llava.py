"""PyTorch FusedLlava: LLaVA whose visual tokens fuse several vision-encoder layers."""

from dataclasses import dataclass

import torch
from torch import nn
from transformers import (
    AutoModel,
    GenerationMixin,
    LlavaForConditionalGeneration,
    LlavaModel,
    LlavaPreTrainedModel,
)
from transformers.cache_utils import Cache
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast, LlavaModelOutputWithPast
from transformers.utils.generic import can_return_tuple

from .configuration_fused_llava import FusedLlavaConfig
from .modeling_fusion import (
    FusedLlavaImageFeaturesOutput,
    FusedPreTrainedMixin,
    FusedVisionMixin,
    add_balance_loss,
)


# The start of LlavaModel.get_placeholder_mask's error, which code and tests written for LLaVA match.
IMAGE_MISMATCH_PHRASE = "Image features and image tokens do not match"


@dataclass
class FusedLlavaModelOutputWithPast(LlavaModelOutputWithPast):
    r"""
    fusion_weights (`torch.Tensor` of shape `(num_images, num_groups)`, *optional*):
        Per-image weights over the layer groups (`igva`, `average`), when images were encoded in this call.
    """

    fusion_weights: torch.Tensor | None = None


@dataclass
class FusedLlavaCausalLMOutputWithPast(LlavaCausalLMOutputWithPast):
    r"""
    fusion_weights (`torch.Tensor` of shape `(num_images, num_groups)`, *optional*):
        Per-image weights over the layer groups (`igva`, `average`), when images were encoded in this call.
    balance_loss (`torch.Tensor` of shape `()`, *optional*):
        IGVA's weighted balance loss, already included in `loss` when `labels` are given.
    """

    fusion_weights: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


class FusedLlavaPreTrainedModel(FusedPreTrainedMixin, LlavaPreTrainedModel):
    config: FusedLlavaConfig


class FusedLlavaModel(FusedVisionMixin, FusedLlavaPreTrainedModel, LlavaModel):
    """LLaVA model whose image features come from `fuser` over several vision layers (no LM head)."""

    def __init__(self, config: FusedLlavaConfig):
        super(LlavaModel, self).__init__(config)
        self.build_fusion(config)
        self.language_model = AutoModel.from_config(config.text_config)
        # Depend on the fuser type: only modules that exist are named (see `_fusion_module_prefixes`).
        self._keep_in_fp32_modules, self._keep_in_fp32_modules_strict = self._fusion_module_prefixes()
        self.post_init()

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        image_sample_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> FusedLlavaImageFeaturesOutput:
        r"""
        Runs the vision tower (recording only the layers the fuser reads, unless `output_hidden_states=True` asks for
        all of them), the fuser and the projector.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`):
                The images.
            vision_feature_layer (`int` or `list[int]`, *optional*):
                Accepted for compatibility with [`LlavaModel.get_image_features`]; must be the config's (the fused
                layers are fixed when the model is built).
            vision_feature_select_strategy (`str`, *optional*):
                Likewise; must be the config's.
            instruction_input_ids (`torch.LongTensor` of shape `(num_instructions, instruction_length)`, *optional*):
                The instructions tokenised for the instruction encoder (needed by `igva`).
            instruction_attention_mask (`torch.Tensor` of shape `(num_instructions, instruction_length)`, *optional*):
                Their attention mask.
            image_sample_index (`torch.LongTensor` of shape `(num_images,)`, *optional*):
                The instruction row of each image; needed when the images are not one per instruction.

        Returns:
            [`FusedLlavaImageFeaturesOutput`] whose `pooler_output` holds one `(num_patches, text_hidden_size)` tensor
            per image.
        """
        self.check_feature_selection(vision_feature_layer, vision_feature_select_strategy)
        instruction_embeds = self._instruction_embeds_per_image(
            pixel_values.shape[0], instruction_input_ids, instruction_attention_mask, image_sample_index
        )
        outputs = self.fused_image_features(pixel_values, instruction_embeds, **kwargs)
        outputs.pooler_output = list(outputs.pooler_output)
        return outputs

    def get_placeholder_mask(
        self, input_ids: torch.LongTensor, inputs_embeds: torch.Tensor, image_features: torch.Tensor
    ) -> torch.Tensor:
        """[`LlavaModel.get_placeholder_mask`] (`image_features` of shape `(total_patches, hidden)`), with a mismatch
        also reported in images; the message starts as LLaVA's, for code that matches it."""
        if input_ids is not None and not torch.compiler.is_compiling():
            num_tokens = int((input_ids == self.config.image_token_id).sum())
            vision = self.config.vision_config
            per_image = (vision.image_size // vision.patch_size) ** 2
            if num_tokens != image_features.shape[0] and image_features.shape[0] % per_image == 0:
                raise ValueError(
                    f"{IMAGE_MISMATCH_PHRASE}: the prompts hold {num_tokens} image tokens "
                    f"({num_tokens / per_image:g} images' worth), but "
                    f"{image_features.shape[0] // per_image} images were given, each filling {per_image} image "
                    "tokens: write one image token per image and let the processor expand it (FusedLlavaProcessor "
                    "does), and pass every image of every prompt."
                )
        return super().get_placeholder_mask(input_ids, inputs_embeds, image_features)

    def encode_images_once(
        self,
        pixel_values,
        instruction_input_ids,
        instruction_attention_mask,
        image_sample_index,
        mm_encoder_outputs,
        vision_feature_layer=None,
        vision_feature_select_strategy=None,
        image_sizes=None,
    ) -> dict:
        """`mm_encoder_outputs` with the fused image features, encoding `pixel_values` unless already encoded."""
        if image_sizes is not None:
            raise ValueError(
                "image_sizes is not supported: a fused LLaVA's vision tower reads fixed-size images (CLIP, SigLIP), "
                "so do not pass image_sizes."
            )
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        if pixel_values is not None:
            if mm_encoder_outputs.get("image") is not None:
                raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
            mm_encoder_outputs["image"] = self.get_image_features(
                pixel_values,
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
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        image_sample_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> FusedLlavaModelOutputWithPast:
        r"""
        [`LlavaModel.forward`] with fused image features; the extra inputs are those of [`get_image_features`].
        `vision_feature_layer` and `vision_feature_select_strategy` must be the config's; `image_sizes` is not
        supported (fixed-size vision towers only).
        """
        mm_encoder_outputs = self.encode_images_once(
            pixel_values,
            instruction_input_ids,
            instruction_attention_mask,
            image_sample_index,
            mm_encoder_outputs,
            vision_feature_layer,
            vision_feature_select_strategy,
            image_sizes,
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
        return FusedLlavaModelOutputWithPast(**outputs, fusion_weights=getattr(image_outputs, "fusion_weights", None))


# GenerationMixin is named among the direct bases, as transformers asks of generative models since v4.50 (it also comes
# through LlavaForConditionalGeneration; the method resolution order is unchanged).
class FusedLlavaForConditionalGeneration(FusedLlavaPreTrainedModel, LlavaForConditionalGeneration, GenerationMixin):
    """LLaVA with multi-layer visual feature fusion and a language modelling head."""

    def __init__(self, config: FusedLlavaConfig):
        super(LlavaForConditionalGeneration, self).__init__(config)
        self.model = FusedLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self._keep_in_fp32_modules, self._keep_in_fp32_modules_strict = self._fusion_module_prefixes()
        self.post_init()

    @property
    def fuser(self):
        return self.model.fuser

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        image_sample_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> FusedLlavaImageFeaturesOutput:
        """See [`FusedLlavaModel.get_image_features`]."""
        return self.model.get_image_features(
            pixel_values,
            vision_feature_layer=vision_feature_layer,
            vision_feature_select_strategy=vision_feature_select_strategy,
            instruction_input_ids=instruction_input_ids,
            instruction_attention_mask=instruction_attention_mask,
            image_sample_index=image_sample_index,
            **kwargs,
        )

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.LongTensor | None = None,
        past_key_values: Cache | None = None,
        inputs_embeds: torch.FloatTensor | None = None,
        vision_feature_layer: int | list[int] | None = None,
        vision_feature_select_strategy: str | None = None,
        labels: torch.LongTensor | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        image_sizes: torch.Tensor | None = None,
        mm_encoder_outputs: dict | None = None,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        image_sample_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> FusedLlavaCausalLMOutputWithPast:
        r"""
        [`LlavaForConditionalGeneration.forward`] with fused image features. With `labels`, IGVA's balance loss
        (`config.balance_loss_weight` times the negative mean entropy of the group weights) is added to the LM loss.
        The extra inputs are those of [`FusedLlavaModel.get_image_features`]; `logits_to_keep` is named so that
        `generate()` passes it and prefill computes the logits of the last position only.
        """
        mm_encoder_outputs = self.model.encode_images_once(
            pixel_values,
            instruction_input_ids,
            instruction_attention_mask,
            image_sample_index,
            mm_encoder_outputs,
            vision_feature_layer,
            vision_feature_select_strategy,
            image_sizes,
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
        return FusedLlavaCausalLMOutputWithPast(**add_balance_loss(outputs, image_outputs, labels))


__all__ = ["FusedLlavaPreTrainedModel", "FusedLlavaModel", "FusedLlavaForConditionalGeneration"]
