"""hf-fusedvlm: multi-layer visual feature fusion (MMFuser, IGVA and baselines) for LLaVA in Transformers.

Importing the package registers `fused_llava` with `AutoConfig`, `AutoModel` and `AutoModelForImageTextToText`
(both model keys map to the generation class, so `AutoModel` + `generate()` works) and `FusedLlavaProcessor` with
`AutoProcessor`, and marks the classes for `auto_map` so that `save_pretrained` writes checkpoints loadable with
`trust_remote_code=True`.
"""

from transformers import AutoConfig, AutoModel, AutoModelForImageTextToText, AutoProcessor

from .configuration_fused_llava import FusedLlavaConfig
from .fusers import FUSERS, Fuser, FuserField, FuserOutput, build_fuser, fuser_class, register_fuser
from .modeling_fused_llava import FusedLlavaForConditionalGeneration, FusedLlavaModel, FusedLlavaPreTrainedModel
from .processing_fused_llava import FusedLlavaProcessor, instruction_from_conversation, instruction_from_prompt


__version__ = "0.1.0"

AutoConfig.register(FusedLlavaConfig.model_type, FusedLlavaConfig, exist_ok=True)
AutoModel.register(FusedLlavaConfig, FusedLlavaForConditionalGeneration, exist_ok=True)
AutoModelForImageTextToText.register(FusedLlavaConfig, FusedLlavaForConditionalGeneration, exist_ok=True)
FusedLlavaConfig.register_for_auto_class()
FusedLlavaForConditionalGeneration.register_for_auto_class("AutoModelForImageTextToText")
AutoProcessor.register(FusedLlavaConfig, FusedLlavaProcessor, exist_ok=True)
FusedLlavaProcessor.register_for_auto_class()

__all__ = [
    "FUSERS",
    "Fuser",
    "FuserField",
    "FusedLlavaConfig",
    "FusedLlavaForConditionalGeneration",
    "FusedLlavaModel",
    "FusedLlavaPreTrainedModel",
    "FusedLlavaProcessor",
    "FuserOutput",
    "build_fuser",
    "fuser_class",
    "instruction_from_conversation",
    "instruction_from_prompt",
    "register_fuser",
]
