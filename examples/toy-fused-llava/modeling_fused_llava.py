"""PyTorch FusedLlava: LLaVA whose visual tokens fuse several vision-encoder layers."""

import importlib.metadata
import importlib.util
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import AutoModel, LlavaForConditionalGeneration, LlavaModel, LlavaPreTrainedModel
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.models.llava.modeling_llava import LlavaCausalLMOutputWithPast, LlavaModelOutputWithPast
from transformers.utils import is_bitsandbytes_available
from transformers.utils.generic import can_return_tuple

from .configuration_fused_llava import INSTRUCTION_FUSERS, FusedLlavaConfig
from .fusers import build_fuser, init_fuser_weights


@dataclass
class FusedLlavaImageFeaturesOutput(BaseModelOutputWithPooling):
    r"""
    pooler_output (`list[torch.Tensor]`):
        One `(num_patches, text_hidden_size)` tensor per image: the projected fused features.
    fusion_weights (`torch.Tensor` of shape `(num_images, num_groups)`, *optional*):
        Per-image weights over the layer groups (`igva`, `average`).
    balance_loss (`torch.Tensor` of shape `()`, *optional*):
        IGVA's weighted balance loss for these images.
    """

    fusion_weights: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


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


class FusedLlavaMultiModalProjector(nn.Module):
    """LLaVA's two-layer MLP projector, reading the fuser's `output_size` channels (same parameter names)."""

    def __init__(self, config: FusedLlavaConfig, input_size: int):
        super().__init__()
        text_size = config.text_config.hidden_size
        self.linear_1 = nn.Linear(input_size, text_size, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_size, text_size, bias=config.multimodal_projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


# Oldest bitsandbytes that runs 4-bit on CPU; the `quantization` extra of pyproject.toml requires the same.
BITSANDBYTES_MIN_VERSION = "0.48.0"


def check_bitsandbytes(quantization_config) -> None:
    """Raise a clear `ImportError` when `quantization_config` asks for bitsandbytes and it is missing or too old."""
    if isinstance(quantization_config, dict):
        quant_method = quantization_config.get("quant_method")
    else:
        quant_method = getattr(quantization_config, "quant_method", None)
    if quant_method != "bitsandbytes" or is_bitsandbytes_available(min_version=BITSANDBYTES_MIN_VERSION):
        return
    if importlib.util.find_spec("bitsandbytes") is None:
        found = "bitsandbytes is not installed"
    else:
        found = f"bitsandbytes {importlib.metadata.version('bitsandbytes')} is installed"
    raise ImportError(
        f"Loading a fused LLaVA in 4-bit or 8-bit needs bitsandbytes>={BITSANDBYTES_MIN_VERSION}, but {found}: "
        'run `pip install "hf-fusedvlm[quantization]"` (or `pip install -U "bitsandbytes>='
        f'{BITSANDBYTES_MIN_VERSION}"` where hf-fusedvlm is used through trust_remote_code).'
    )


class FusedLlavaPreTrainedModel(LlavaPreTrainedModel):
    config: FusedLlavaConfig
    _no_split_modules = ["MMFuser", "IGVAFuser", "AverageFuser", "ConcatFuser", "SingleLayerFuser"]

    def _init_weights(self, module):
        super()._init_weights(module)
        init_fuser_weights(module)

    @classmethod
    def from_pretrained(cls, *args, **kwargs):
        """`PreTrainedModel.from_pretrained`, first checking that a bitsandbytes `quantization_config` (passed, or in
        the `config` that the Auto classes pass) can be honoured."""
        check_bitsandbytes(
            kwargs.get("quantization_config") or getattr(kwargs.get("config"), "quantization_config", None)
        )
        return super().from_pretrained(*args, **kwargs)

    def fuser_memory_footprint(self, return_buffers: bool = True) -> dict[str, int | float]:
        """How much of [`~PreTrainedModel.get_memory_footprint`] (same counting rule, so quantised weights count at
        their storage size) the fusion adds: returns `total`, `fuser` and `instruction_encoder` in bytes, and
        `share`, the fraction of `total` taken by the fuser and the instruction encoder together."""

        def footprint(module: nn.Module | None) -> int:
            if module is None:
                return 0
            tensors = [*module.parameters(), *(module.buffers() if return_buffers else ())]
            return sum(tensor.nelement() * tensor.element_size() for tensor in tensors)

        total = self.get_memory_footprint(return_buffers=return_buffers)
        fuser, encoder = footprint(self.base_model.fuser), footprint(self.base_model.instruction_encoder)
        return {"total": total, "fuser": fuser, "instruction_encoder": encoder, "share": (fuser + encoder) / total}


class FusedLlavaModel(FusedLlavaPreTrainedModel, LlavaModel):
    """LLaVA model whose image features come from `fuser` over several vision layers (no LM head)."""

    # Quantisation must leave the fuser and the instruction encoder alone; deformable sampling needs fp32.
    _keep_in_fp32_modules = ["fuser", "instruction_encoder"]
    _keep_in_fp32_modules_strict = ["fuser"]

    def __init__(self, config: FusedLlavaConfig):
        super(LlavaModel, self).__init__(config)
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.fuser = build_fuser(config)
        self.multi_modal_projector = FusedLlavaMultiModalProjector(config, self.fuser.output_size)
        self.language_model = AutoModel.from_config(config.text_config)
        if config.fuser_type in INSTRUCTION_FUSERS:
            self.instruction_encoder = AutoModel.from_config(config.instruction_encoder_config)
            self.instruction_encoder.requires_grad_(False)
        else:
            self.instruction_encoder = None
        self.post_init()

    @torch.no_grad()
    def embed_instructions(
        self, instruction_input_ids: torch.LongTensor, instruction_attention_mask: torch.Tensor | None = None
    ) -> torch.Tensor:
        """Sentence embeddings of the instructions, pooled from the frozen encoder's last hidden state as
        sentence-transformers does (`config.instruction_pooling`: masked mean, first token or masked channel-wise
        max), then L2-normalised if `config.instruction_embedding_normalize`. Returns
        `(num_instructions, encoder_hidden)`."""
        if instruction_attention_mask is None:
            instruction_attention_mask = torch.ones_like(instruction_input_ids)
        hidden = self.instruction_encoder(
            input_ids=instruction_input_ids, attention_mask=instruction_attention_mask
        ).last_hidden_state
        mask = instruction_attention_mask.unsqueeze(-1).to(hidden.dtype)
        pooling = self.config.instruction_pooling
        if pooling == "cls":
            embeds = hidden[:, 0]
        elif pooling == "max":
            # Padding must never win the maximum; sentence-transformers fills it with -1e9 the same way.
            embeds = hidden.masked_fill(mask == 0, -1e9).max(1).values
        else:
            embeds = (hidden * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
        if self.config.instruction_embedding_normalize:
            embeds = F.normalize(embeds, p=2, dim=-1)
        return embeds

    def _instruction_embeds_per_image(
        self, num_images: int, instruction_input_ids, instruction_attention_mask, image_sample_index
    ) -> torch.Tensor | None:
        if self.instruction_encoder is None:
            return None
        if instruction_input_ids is None:
            raise ValueError(
                f"fuser_type={self.config.fuser_type!r} reads the user's instruction: pass instruction_input_ids and "
                "instruction_attention_mask (FusedLlavaProcessor returns them when it has an instruction_tokenizer: "
                "load the processor saved with the checkpoint via AutoProcessor.from_pretrained, or build one with "
                "FusedLlavaProcessor.from_llava_processor(llava_processor, instruction_tokenizer=...))."
            )
        embeds = self.embed_instructions(instruction_input_ids, instruction_attention_mask)
        if image_sample_index is None:
            if embeds.shape[0] != num_images:
                raise ValueError(
                    f"Got {embeds.shape[0]} instructions for {num_images} images: pass image_sample_index (the "
                    "instruction row of each image) when a sample has several images or none."
                )
            return embeds
        if image_sample_index.shape != (num_images,):
            raise ValueError(
                f"image_sample_index must have shape ({num_images},), one entry per image, got "
                f"{tuple(image_sample_index.shape)}."
            )
        return embeds[image_sample_index.to(embeds.device)]

    @can_return_tuple
    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        image_sample_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> FusedLlavaImageFeaturesOutput:
        r"""
        Runs the vision tower (recording only the layers the fuser reads), the fuser and the projector.

        Args:
            pixel_values (`torch.FloatTensor` of shape `(num_images, channels, height, width)`):
                The images.
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
        image_outputs = self.vision_tower(
            pixel_values, output_hidden_states=self.config.vision_layers_needed, return_dict=True, **kwargs
        )
        # What a plain LLaVA's projector would receive: the tower's activations, whatever dtype pixel_values had.
        vision_dtype = image_outputs.last_hidden_state.dtype
        fuser_dtype = next(self.fuser.parameters(), image_outputs.last_hidden_state).dtype
        hidden_states = tuple(None if state is None else state.to(fuser_dtype) for state in image_outputs.hidden_states)
        instruction_embeds = self._instruction_embeds_per_image(
            pixel_values.shape[0], instruction_input_ids, instruction_attention_mask, image_sample_index
        )
        fused = self.fuser(hidden_states, instruction_embeds)
        projector_dtype = self.multi_modal_projector.linear_2.weight.dtype
        if projector_dtype not in (torch.float16, torch.bfloat16, torch.float32):
            projector_dtype = vision_dtype  # quantised projector (uint8/int8 storage): feed it the tower's dtype
        image_features = self.multi_modal_projector(fused.features.to(projector_dtype))
        return FusedLlavaImageFeaturesOutput(
            last_hidden_state=image_outputs.last_hidden_state,
            pooler_output=list(image_features),
            hidden_states=image_outputs.hidden_states,
            attentions=image_outputs.attentions,
            fusion_weights=fused.fusion_weights,
            balance_loss=fused.balance_loss,
        )

    def encode_images_once(
        self, pixel_values, instruction_input_ids, instruction_attention_mask, image_sample_index, mm_encoder_outputs
    ) -> dict:
        """`mm_encoder_outputs` with the fused image features, encoding `pixel_values` unless already encoded."""
        mm_encoder_outputs = dict(mm_encoder_outputs or {})
        if pixel_values is not None:
            if mm_encoder_outputs.get("image") is not None:
                raise ValueError("You cannot specify both pixel_values and mm_encoder_outputs at the same time")
            mm_encoder_outputs["image"] = self.get_image_features(
                pixel_values,
                instruction_input_ids=instruction_input_ids,
                instruction_attention_mask=instruction_attention_mask,
                image_sample_index=image_sample_index,
                return_dict=True,
            )
        return mm_encoder_outputs

    @can_return_tuple
    def forward(
        self,
        input_ids: torch.LongTensor | None = None,
        pixel_values: torch.FloatTensor | None = None,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        image_sample_index: torch.LongTensor | None = None,
        mm_encoder_outputs: dict | None = None,
        **kwargs,
    ) -> FusedLlavaModelOutputWithPast:
        r"""
        [`LlavaModel.forward`] with fused image features; the extra inputs are those of [`get_image_features`].
        """
        mm_encoder_outputs = self.encode_images_once(
            pixel_values, instruction_input_ids, instruction_attention_mask, image_sample_index, mm_encoder_outputs
        )
        outputs = super().forward(input_ids=input_ids, mm_encoder_outputs=mm_encoder_outputs, return_dict=True, **kwargs)
        image_outputs = mm_encoder_outputs.get("image")
        return FusedLlavaModelOutputWithPast(
            **outputs, fusion_weights=getattr(image_outputs, "fusion_weights", None)
        )


class FusedLlavaForConditionalGeneration(FusedLlavaPreTrainedModel, LlavaForConditionalGeneration):
    """LLaVA with multi-layer visual feature fusion and a language modelling head."""

    # Patterns match full module names from the start, so the prefixes name the fuser under `model`.
    _keep_in_fp32_modules = ["model.fuser", "model.instruction_encoder"]
    _keep_in_fp32_modules_strict = ["model.fuser"]

    def __init__(self, config: FusedLlavaConfig):
        super(LlavaForConditionalGeneration, self).__init__(config)
        self.model = FusedLlavaModel(config)
        self.lm_head = nn.Linear(config.text_config.hidden_size, config.text_config.vocab_size, bias=False)
        self.post_init()

    @property
    def fuser(self):
        return self.model.fuser

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`, with `auto_map` naming this class for both `AutoModel` and
        `AutoModelForImageTextToText`, so that remote-code users can load and `generate()` with either."""
        class_path = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
        self.config.auto_map = {
            **(getattr(self.config, "auto_map", None) or {}),
            "AutoModel": class_path,
            "AutoModelForImageTextToText": class_path,
        }
        return super().save_pretrained(save_directory, *args, **kwargs)

    def get_image_features(
        self,
        pixel_values: torch.FloatTensor,
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        image_sample_index: torch.LongTensor | None = None,
        **kwargs,
    ) -> FusedLlavaImageFeaturesOutput:
        """See [`FusedLlavaModel.get_image_features`]."""
        return self.model.get_image_features(
            pixel_values,
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
        instruction_input_ids: torch.LongTensor | None = None,
        instruction_attention_mask: torch.Tensor | None = None,
        image_sample_index: torch.LongTensor | None = None,
        labels: torch.LongTensor | None = None,
        mm_encoder_outputs: dict | None = None,
        logits_to_keep: int | torch.Tensor = 0,
        **kwargs,
    ) -> FusedLlavaCausalLMOutputWithPast:
        r"""
        [`LlavaForConditionalGeneration.forward`] with fused image features. With `labels`, IGVA's balance loss
        (`config.balance_loss_weight` times the negative mean entropy of the group weights) is added to the LM loss.
        The extra inputs are those of [`FusedLlavaModel.get_image_features`]; `logits_to_keep` is named so that
        `generate()` passes it and prefill computes the logits of the last position only.
        """
        mm_encoder_outputs = self.model.encode_images_once(
            pixel_values, instruction_input_ids, instruction_attention_mask, image_sample_index, mm_encoder_outputs
        )
        outputs = super().forward(
            input_ids=input_ids,
            labels=labels,
            mm_encoder_outputs=mm_encoder_outputs,
            logits_to_keep=logits_to_keep,
            return_dict=True,
            **kwargs,
        )
        image_outputs = mm_encoder_outputs.get("image")
        balance_loss = getattr(image_outputs, "balance_loss", None)
        if labels is not None and balance_loss is not None:
            outputs.loss = outputs.loss + balance_loss.to(outputs.loss.device)
        return FusedLlavaCausalLMOutputWithPast(
            **outputs,
            fusion_weights=getattr(image_outputs, "fusion_weights", None),
            balance_loss=balance_loss,
        )


__all__ = ["FusedLlavaPreTrainedModel", "FusedLlavaModel", "FusedLlavaForConditionalGeneration"]
