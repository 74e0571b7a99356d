"""hf-fusedvlm: multi-layer visual feature fusion (MMFuser, IGVA and baselines) for LLaVA in Transformers.

Importing the package registers `fused_llava` with `AutoConfig`, `AutoModel` and `AutoModelForImageTextToText`
(both model keys map to the generation class, so `AutoModel` + `generate()` works) and `FusedLlavaProcessor` with
`AutoProcessor`, and marks the classes for `auto_map` so that `save_pretrained` writes checkpoints loadable with
`trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_fused_llava import FusedLlavaConfig
from .configuration_fused_llava_next import FusedLlavaNextConfig
from .fusers import FUSERS, Fuser, FuserField, FuserOutput, build_fuser, fuser_class, register_fuser
from .modeling_fused_llava import FusedLlavaForConditionalGeneration, FusedLlavaModel, FusedLlavaPreTrainedModel
from .modeling_fused_llava_next import (
    FusedLlavaNextForConditionalGeneration,
    FusedLlavaNextModel,
    FusedLlavaNextPreTrainedModel,
)
from .processing_fused_llava import FusedLlavaProcessor, instruction_from_conversation, instruction_from_prompt
from .processing_fused_llava_next import FusedLlavaNextProcessor


__version__ = "0.1.0"

for config_class, model_class, processor_class in (
    (FusedLlavaConfig, FusedLlavaForConditionalGeneration, FusedLlavaProcessor),
    (FusedLlavaNextConfig, FusedLlavaNextForConditionalGeneration, FusedLlavaNextProcessor),
):
    AutoConfig.register(config_class.model_type, config_class, exist_ok=True)
    AutoModel.register(config_class, model_class, exist_ok=True)
    AutoModelForImageTextToText.register(config_class, model_class, exist_ok=True)
    config_class.register_for_auto_class()
    model_class.register_for_auto_class("AutoModelForImageTextToText")
    AutoProcessor.register(config_class, processor_class, exist_ok=True)
    processor_class.register_for_auto_class()

__all__ = [
    "FUSERS",
    "Fuser",
    "FuserField",
    "FusedLlavaConfig",
    "FusedLlavaForConditionalGeneration",
    "FusedLlavaModel",
    "FusedLlavaNextConfig",
    "FusedLlavaNextForConditionalGeneration",
    "FusedLlavaNextModel",
    "FusedLlavaNextPreTrainedModel",
    "FusedLlavaNextProcessor",
    "FusedLlavaPreTrainedModel",
    "FusedLlavaProcessor",
    "FuserOutput",
    "build_fuser",
    "fuser_class",
    "instruction_from_conversation",
    "instruction_from_prompt",
    "register_fuser",
]
