"""The fusion step and the loading that every fused model family shares (LLaVA-1.5 in `modeling_fused_llava`,
LLaVA-NeXT in `modeling_fused_llava_next`, the vLLM models): vision tower hidden states -> fuser -> projector, the
instruction embeddings, and `from_pretrained` (its checks are in `checkpoint_checks`)."""

import copy
import os
from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from torch import nn
from transformers import AutoModel, PreTrainedConfig
from transformers import initialization as init
from transformers.activations import ACT2FN
from transformers.modeling_outputs import BaseModelOutputWithPooling
from transformers.quantizers.base import get_keys_to_not_convert
from transformers.utils import output_capturing

from .checkpoint_checks import (
    check_bitsandbytes,
    check_fused_checkpoint,
    corrupt_safetensors_files,
    hub_kwargs,
    missing_weight_files,
)
from .fusers import VisionHiddenStates, build_fuser, collecting_hidden_states, init_fuser_weights


# transformers >= 5.23 (which added `select_hidden_states`) records exactly the hidden-state indices listed in
# `output_hidden_states`; older releases shift such a list by one, so they record every layer and the fuser's are kept.
RECORDS_LISTED_HIDDEN_STATES = hasattr(output_capturing, "select_hidden_states")
# Projector weight dtypes the fused features are cast to; a quantised projector (uint8/int8 storage) gets the tower's.
FLOAT_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


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


class FusedLlavaMultiModalProjector(nn.Module):
    """LLaVA's two-layer MLP projector, reading the fuser's `output_size` channels (same parameter names)."""

    def __init__(self, config, input_size: int):
        super().__init__()
        text_size = config.text_config.hidden_size
        self.linear_1 = nn.Linear(input_size, text_size, bias=config.multimodal_projector_bias)
        self.act = ACT2FN[config.projector_hidden_act]
        self.linear_2 = nn.Linear(text_size, text_size, bias=config.multimodal_projector_bias)

    def forward(self, image_features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(image_features)))


def pool_sentence_embeddings(last_hidden_state: torch.Tensor, attention_mask: torch.Tensor, config) -> torch.Tensor:
    """Sentence embeddings `(num_instructions, encoder_hidden)` pooled from the instruction encoder's
    `last_hidden_state` `(num_instructions, length, encoder_hidden)` as sentence-transformers does
    (`config.instruction_pooling`: masked mean, first token or masked channel-wise max), then L2-normalised if
    `config.instruction_embedding_normalize`."""
    mask = attention_mask.unsqueeze(-1).to(last_hidden_state.dtype)
    if config.instruction_pooling == "cls":
        embeds = last_hidden_state[:, 0]
    elif config.instruction_pooling == "max":
        # Padding must never win the maximum; sentence-transformers fills it with -1e9 the same way.
        embeds = last_hidden_state.masked_fill(mask == 0, -1e9).max(1).values
    else:
        embeds = (last_hidden_state * mask).sum(1) / mask.sum(1).clamp_min(1e-9)
    if config.instruction_embedding_normalize:
        embeds = F.normalize(embeds, p=2, dim=-1)
    return embeds


def fuser_dtype(fuser: nn.Module, vision_dtype: torch.dtype | None) -> torch.dtype | None:
    """The dtype a fuser reads: its weights', or the tower's (`vision_dtype`) for a fuser without weights."""
    weight = next(fuser.parameters(), None)
    return weight.dtype if weight is not None else vision_dtype


def encoder_layers(vision_tower: nn.Module) -> list[nn.Module] | None:
    """The layers whose outputs are a transformers vision tower's hidden states (those it records them from), or None
    when it does not say (the fusion step then records the hidden states it reads instead)."""
    spec = (getattr(vision_tower, "_can_record_outputs", None) or {}).get("hidden_states")
    if not isinstance(spec, type):
        return None
    layers = [module for module in vision_tower.modules() if isinstance(module, spec)]
    return layers if len(layers) == getattr(vision_tower.config, "num_hidden_layers", None) else None


def fuse_and_project(
    fuser: nn.Module,
    projector: nn.Module,
    hidden_states: Sequence[torch.Tensor | None],
    instruction_embeds: torch.Tensor | None,
    vision_dtype: torch.dtype,
):
    """The fusion step: `hidden_states` (indexed by hidden-state index, `None` for the layers the fuser does not read;
    each `(num_crops, num_tokens, vision_hidden)`; a [`VisionHiddenStates`] also carries group means) cast to the
    fuser's dtype, fused (with `instruction_embeds` `(num_crops, encoder_hidden)` for the fusers that read the
    instruction), cast to the projector's dtype (the tower's, `vision_dtype`, for a quantised projector) and
    projected. Returns `(features, fuser_output)`, features `(num_crops, num_patches, text_hidden)`."""
    if not isinstance(hidden_states, VisionHiddenStates):
        hidden_states = VisionHiddenStates(hidden_states)
    fused = fuser(hidden_states.to(fuser_dtype(fuser, vision_dtype)), instruction_embeds)
    projector_dtype = projector.linear_2.weight.dtype
    if projector_dtype not in FLOAT_DTYPES:
        projector_dtype = vision_dtype
    return projector(fused.features.to(projector_dtype)), fused


class FusedPreTrainedMixin:
    """What every fused model class adds to its transformers base: the fuser's initialisation, fp32 fusion modules,
    and `from_pretrained` guards (not a fused checkpoint, bitsandbytes, quantisation skips, foreign fuser weights,
    corrupt or missing shards)."""

    def _init_weights(self, module):
        super()._init_weights(module)
        init_fuser_weights(module)

    @classmethod
    def is_custom_code(cls) -> bool:
        """`False`: initialise as transformers' own models are initialised.

        For custom code, transformers' `initialize_weights` marks a module initialised, without calling its
        `_init_weights`, when all the module's *own* parameters are; it passes that choice down to the sub-models, so
        CLIP's attention and MLP blocks and the deformable attention (whose linears are children) would keep the
        generic `Linear` init when weights are missing from a checkpoint, unlike a model built with `__init__`. That
        shortcut protects remote code whose `_init_weights` overwrites loaded tensors; this model and its sub-models
        initialise only through `transformers.initialization`, which leaves loaded tensors untouched."""
        return False

    def _fusion_module_prefixes(self) -> tuple[list[str], list[str]]:
        """`(fp32_modules, strict_fp32_modules)` of this model, from its config: the instruction encoder (`igva`)
        stays fp32 under fp16 and the fuser, when it has weights, under fp16 and bf16 (deformable sampling and the
        group softmax need fp32). Patterns match module names from the start, so they carry this model's prefix."""
        prefix = "" if self.base_model is self else f"{self.base_model_prefix}."
        has_fuser_weights = any(True for _ in self.base_model.fuser.parameters())
        has_encoder = self.base_model.instruction_encoder is not None
        return [f"{prefix}instruction_encoder"] if has_encoder else [], [f"{prefix}fuser"] if has_fuser_weights else []

    @classmethod
    def from_pretrained(cls, pretrained_model_name_or_path, *model_args, **kwargs):
        """`PreTrainedModel.from_pretrained`, first refusing a file path and checkpoints that are not fused LLaVAs
        (they would load with a randomly initialised language model), checking that a bitsandbytes
        `quantization_config` (passed, or in the `config` that the Auto classes pass) can be honoured, and keeping the
        fuser and the instruction encoder out of bitsandbytes quantisation; then refusing weights that belong to
        another fuser than the config's `fuser_type`, and naming a corrupt or missing shard."""
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)) and os.path.isfile(
            pretrained_model_name_or_path
        ):
            raise ValueError(
                f"{pretrained_model_name_or_path} is a file: pass the checkpoint's folder (the one holding config.json "
                "and the weights) or its Hub id."
            )
        check_fused_checkpoint(pretrained_model_name_or_path, kwargs, cls.config_class.model_type)
        if isinstance(pretrained_model_name_or_path, (str, os.PathLike)):
            subfolder = kwargs.get("subfolder") or ""
            missing = missing_weight_files(
                os.path.join(pretrained_model_name_or_path, subfolder) if subfolder else pretrained_model_name_or_path
            )
            if missing:
                raise OSError(missing + ".")
        quantization_config = kwargs.get("quantization_config") or getattr(
            kwargs.get("config"), "quantization_config", None
        )
        check_bitsandbytes(quantization_config)
        if kwargs.get("quantization_config") is not None:
            kwargs["quantization_config"] = cls._skip_fusion_in_quantization(
                pretrained_model_name_or_path, kwargs["quantization_config"], kwargs
            )
        wants_info = kwargs.pop("output_loading_info", False)
        try:
            model, info = super().from_pretrained(
                pretrained_model_name_or_path, *model_args, output_loading_info=True, **kwargs
            )
        except SafetensorError as error:
            raise OSError(
                f"A weights file of {pretrained_model_name_or_path} is corrupt or truncated ({error}): "
                f"{corrupt_safetensors_files(pretrained_model_name_or_path) or 'download it again'}."
            ) from error
        except RuntimeError as error:
            if "ignore_mismatched_sizes" not in str(error):
                raise
            raise ValueError(
                f"The weights of {pretrained_model_name_or_path} do not have the shapes its config describes (see the "
                "report above): was config.json edited (fuser_type, fuser_layers, ...) after saving? A fused "
                "checkpoint's fuser can only be changed by converting its plain source again."
            ) from error
        foreign = [key for key in info["unexpected_keys"] if key.startswith(("model.fuser.", "fuser."))]
        if foreign:
            raise ValueError(
                f"{pretrained_model_name_or_path} holds fuser weights that fuser_type={model.config.fuser_type!r} does "
                f"not have ({', '.join(sorted(foreign)[:4])}, ...): its config.json names another fuser than the one "
                "its weights were saved with. Restore the saved fuser_type, or convert the plain source again."
            )
        return (model, info) if wants_info else model

    @classmethod
    def _skip_fusion_in_quantization(cls, pretrained_model_name_or_path, quantization_config, kwargs):
        """A copy of a bitsandbytes `quantization_config` whose `llm_int8_skip_modules` also names the fuser.

        transformers' quantizers leave `_keep_in_fp32_modules` unquantised but not `_keep_in_fp32_modules_strict`,
        where the fuser is. When the user gives no skip list, transformers' automatic skips (`lm_head`, ...) are kept
        by computing them on a weightless copy of the model."""
        method = (
            quantization_config.get("quant_method")
            if isinstance(quantization_config, dict)
            else getattr(quantization_config, "quant_method", None)
        )
        if method != "bitsandbytes" or isinstance(quantization_config, dict):
            return quantization_config
        config = kwargs.get("config")
        if not isinstance(config, PreTrainedConfig):
            config = cls.config_class.from_pretrained(pretrained_model_name_or_path, **hub_kwargs(kwargs))
        with torch.device("meta"), init.no_init_weights():
            skeleton = cls(copy.deepcopy(config))
        skip = quantization_config.llm_int8_skip_modules
        skip = list(get_keys_to_not_convert(skeleton) if skip is None else skip)
        fp32_modules, strict_fp32_modules = skeleton._fusion_module_prefixes()
        quantization_config = copy.deepcopy(quantization_config)
        quantization_config.llm_int8_skip_modules = skip + [
            m for m in fp32_modules + strict_fp32_modules if m not in skip
        ]
        return quantization_config

    def save_pretrained(self, save_directory, *args, **kwargs):
        """`PreTrainedModel.save_pretrained`; a generation class names itself in `auto_map` for both `AutoModel` and
        `AutoModelForImageTextToText`, so that remote-code users can load and `generate()` with either."""
        if self.base_model is not self:
            class_path = f"{type(self).__module__.rsplit('.', 1)[-1]}.{type(self).__name__}"
            self.config.auto_map = {
                **(getattr(self.config, "auto_map", None) or {}),
                "AutoModel": class_path,
                "AutoModelForImageTextToText": class_path,
            }
        return super().save_pretrained(save_directory, *args, **kwargs)

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


def add_balance_loss(outputs, image_outputs, labels) -> dict:
    """The fields of a fused generation output: `outputs` (the base class's), IGVA's balance loss added to its loss
    when `labels` are given, and the fusion weights and balance loss of `image_outputs` (None when no image was
    encoded in this call)."""
    balance_loss = getattr(image_outputs, "balance_loss", None)
    if labels is not None and balance_loss is not None:
        outputs.loss = outputs.loss + balance_loss.to(outputs.loss.device)
    return {**outputs, "fusion_weights": getattr(image_outputs, "fusion_weights", None), "balance_loss": balance_loss}


# The attention implementation vLLM's Transformers modeling backend sets on the language model before building it.
VLLM_TRANSFORMERS_BACKEND_ATTENTION = "vllm"


def check_instruction_reachable(config) -> None:
    """Refuse to build a fuser that reads the instruction inside vLLM's Transformers modeling backend: that backend
    calls the processor with placeholder text (one image token per image) instead of the prompt, so the instruction
    taken from the prompt would be empty, and it cannot batch instruction tensors of different lengths."""
    if config.text_config._attn_implementation != VLLM_TRANSFORMERS_BACKEND_ATTENTION:
        return
    raise ValueError(
        f"fuser_type={config.fuser_type!r} reads the user's instruction, which vLLM's Transformers modeling backend "
        "cannot give it: that backend calls the processor with one image token per image instead of the prompt, so "
        "the instruction would be empty. Serve this checkpoint with the hf-fusedvlm vLLM plugin instead (leave "
        "model_impl at 'auto' and install hf-fusedvlm beside vLLM)."
    )


class FusedVisionMixin:
    """The image path of a fused model: `build_fusion` makes its modules; `fused_image_features` runs them on crops."""

    def build_fusion(self, config) -> None:
        """The vision tower, fuser, projector and (for fusers that read the instruction) frozen instruction encoder."""
        self.vision_tower = AutoModel.from_config(config.vision_config)
        self.fuser = build_fuser(config)
        # The fuser reads all its layers at once: a device map must keep it on one device. `post_init` merges this
        # per-instance list into the model's.
        self._no_split_modules = [type(self.fuser).__name__]
        self.multi_modal_projector = FusedLlavaMultiModalProjector(config, self.fuser.output_size)
        if self.fuser.reads_instruction:
            check_instruction_reachable(config)
            self.instruction_encoder = AutoModel.from_config(config.instruction_encoder_config)
            self.instruction_encoder.requires_grad_(False)
        else:
            self.instruction_encoder = None
        self._built_feature_selection = (
            config.normalised_feature_layer(config.vision_feature_layer),
            config.vision_feature_select_strategy,
        )

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
        return pool_sentence_embeddings(hidden, instruction_attention_mask, self.config)

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
        if num_images and not 0 <= int(image_sample_index.min()) <= int(image_sample_index.max()) < embeds.shape[0]:
            raise ValueError(
                f"image_sample_index {image_sample_index.tolist()} points outside the {embeds.shape[0]} instructions: "
                "each entry is the row of its image's sample in instruction_input_ids (0 to "
                f"{embeds.shape[0] - 1})."
            )
        return embeds[image_sample_index.to(embeds.device)]

    def check_feature_selection(self, vision_feature_layer=None, vision_feature_select_strategy=None) -> None:
        """Raise a clear `ValueError` when the config's or the call's vision feature selection differs from the one
        the fuser was built for: its layers and its token selection are fixed at construction."""
        built_layer, select_strategy = self._built_feature_selection
        for source, layer, strategy in (
            ("config", self.config.vision_feature_layer, self.config.vision_feature_select_strategy),
            ("call", vision_feature_layer, vision_feature_select_strategy),
        ):
            if layer is not None and self.config.normalised_feature_layer(layer) != built_layer:
                raise ValueError(
                    f"vision_feature_layer={layer!r} (from the {source}) differs from {built_layer}, the layer(s) this "
                    "model's fuser was built for; the fused layers cannot change after construction: build a new "
                    "model from a config with the layers you want (vision_feature_layer, fuser_layers, "
                    "fuser_layer_groups)."
                )
            if strategy is not None and strategy != select_strategy:
                raise ValueError(
                    f"vision_feature_select_strategy={strategy!r} (from the {source}) differs from "
                    f"{select_strategy!r}, the one this model's fuser was built for: build a new model instead."
                )

    def fused_image_features(self, pixel_values: torch.Tensor, instruction_embeds, **kwargs):
        """Vision tower, fuser and projector over `pixel_values` `(num_crops, channels, height, width)`, with one
        instruction embedding per crop. The tower keeps only what the fuser reads, the layers it reads alone and one
        running mean per layer group it averages (`collecting_hidden_states`), unless `output_hidden_states=True`
        asks for every layer. Returns a [`FusedLlavaImageFeaturesOutput`] whose `pooler_output` is the
        `(num_crops, num_patches, text_hidden)` tensor and whose `hidden_states` are the layers kept."""
        config = self.config
        layers = None if kwargs.get("output_hidden_states") else encoder_layers(self.vision_tower)
        if layers is not None:
            kwargs["output_hidden_states"] = False
            dtype = fuser_dtype(self.fuser, None)
            with collecting_hidden_states(layers, config.vision_layers_kept, config.vision_layer_means, dtype) as kept:
                image_outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
            states = kept.hidden_states()
        else:
            if not kwargs.get("output_hidden_states"):  # a tower that names no layers: record those the fuser reads
                kwargs["output_hidden_states"] = config.vision_layers_needed if RECORDS_LISTED_HIDDEN_STATES else True
            image_outputs = self.vision_tower(pixel_values, return_dict=True, **kwargs)
            states = image_outputs.hidden_states
            if kwargs["output_hidden_states"] is not True:
                states = tuple(state if i in config.vision_layers_needed else None for i, state in enumerate(states))
        features, fused = fuse_and_project(
            self.fuser,
            self.multi_modal_projector,
            states,
            instruction_embeds,
            image_outputs.last_hidden_state.dtype,
        )
        return FusedLlavaImageFeaturesOutput(
            last_hidden_state=image_outputs.last_hidden_state,
            pooler_output=features,
            hidden_states=tuple(states),
            attentions=image_outputs.attentions,
            fusion_weights=fused.fusion_weights,
            balance_loss=fused.balance_loss,
        )
