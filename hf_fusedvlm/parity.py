"""Turning a plain LLaVA into a fused one that computes exactly the same function.

The parity rule (DESIGN.md): every source tensor is kept bit-identical; `mmfuser` starts with `gamma1 = gamma2 = 0`
(the block returns its query layer, the source's `vision_feature_layer`); `igva`, `average` and `concat` widen the
projector's first linear and the new input columns start at zero; `none` adds nothing. A source whose
`vision_feature_layer` lists several layers (LLaVA concatenates them) becomes `concat` over those layers, its projector
unchanged.
"""

import re

import torch
from transformers import LlavaConfig, LlavaForConditionalGeneration, PreTrainedConfig, PreTrainedModel

from .configuration_fused_llava import FusedLlavaConfig
from .configuration_fused_llava_next import FusedLlavaNextConfig
from .fusers import build_fuser, fuser_class
from .modeling_fused_llava import FusedLlavaForConditionalGeneration
from .modeling_fused_llava_next import FusedLlavaNextForConditionalGeneration


PROJECTOR_INPUT_KEY = "model.multi_modal_projector.linear_1.weight"
FUSER_PREFIX = "model.fuser."
INSTRUCTION_ENCODER_PREFIX = "model.instruction_encoder."
# llava-hf checkpoints store `LlavaForConditionalGeneration` under its pre-v4.52 names (transformers still saves them
# that way and renames on load; the remote-code fused class gets no such renaming), so they are mapped to the
# current module layout: (pattern, replacement), first match wins. Published checkpoints also keep the CLIP/SigLIP
# tower's `vision_model.` level, which transformers 5 drops from `CLIPVisionModel` / `SiglipVisionModel`.
LEGACY_LLAVA_KEY_RENAMES = (
    (re.compile(r"^language_model\.lm_head\."), "lm_head."),
    (re.compile(r"^language_model\.model\."), "model.language_model."),
    (re.compile(r"^(model\.)?vision_tower\.vision_model\."), "model.vision_tower."),
    (re.compile(r"^vision_tower\."), "model.vision_tower."),
    (re.compile(r"^multi_modal_projector\."), "model.multi_modal_projector."),
    (re.compile(r"^image_newline$"), "model.image_newline"),
)


# The fused config and model class of each plain LLaVA family, by the source config's `model_type`.
FUSED_FAMILIES = {
    "llava": (FusedLlavaConfig, FusedLlavaForConditionalGeneration),
    "llava_next": (FusedLlavaNextConfig, FusedLlavaNextForConditionalGeneration),
}


FUSED_MODEL_CLASSES = {config_class: model_class for config_class, model_class in FUSED_FAMILIES.values()}


def fused_family(llava_config: PreTrainedConfig) -> tuple[type, type]:
    """(fused config class, fused model class) of a plain LLaVA config (LLaVA-1.5 or LLaVA-NeXT)."""
    family = FUSED_FAMILIES.get(llava_config.model_type)
    if family is None:
        raise ValueError(
            f"A {llava_config.model_type!r} model cannot be fused: the supported sources are "
            f"{', '.join(FUSED_FAMILIES)} (LlavaForConditionalGeneration, LlavaNextForConditionalGeneration)."
        )
    return family


def llava_checkpoint_key(name: str) -> str:
    """The `LlavaForConditionalGeneration` parameter name of a llava-hf checkpoint key, legacy or current."""
    for pattern, replacement in LEGACY_LLAVA_KEY_RENAMES:
        if pattern.match(name):
            return pattern.sub(replacement, name, count=1)
    return name


def fused_config_from_llava(
    llava_config: LlavaConfig,
    fuser_type: str,
    instruction_encoder_config: PreTrainedConfig | None = None,
    **fuser_kwargs,
) -> FusedLlavaConfig:
    """The fused config of a plain LLaVA (or LLaVA-NeXT) config: all its fields kept, fuser fields from the arguments
    (a source whose `vision_feature_layer` lists several layers gives `concat` over them, see `FusedLlavaConfig`)."""
    config_class, model_class = fused_family(llava_config)
    fields = llava_config.to_dict()
    for key in ("model_type", "architectures", "auto_map", "transformers_version", "_name_or_path"):
        fields.pop(key, None)
    if fuser_class(fuser_type).reads_instruction:
        fields["instruction_encoder_config"] = instruction_encoder_config
    config = config_class(**fields, fuser_type=fuser_type, **fuser_kwargs)
    config.architectures = [model_class.__name__]
    return config


def expand_projector_input(weight: torch.Tensor, config: FusedLlavaConfig) -> torch.Tensor:
    """The source projector's `linear_1.weight` `(text_hidden, vision_hidden)` widened to the fuser's output with
    zero columns, the source columns in the fuser's base-layer slot (`Fuser.projector_slots`). A source that lists
    several layers already reads `(text_hidden, num_layers * vision_hidden)`, the `concat` fuser's layout: unchanged."""
    vision_size = config.vision_config.hidden_size
    if isinstance(config.vision_feature_layer, list):
        num_layers = len(config.vision_feature_layer)
        if weight.shape[-1] != vision_size * num_layers:
            raise ValueError(
                f"{PROJECTOR_INPUT_KEY} has {weight.shape[-1]} input columns, expected {num_layers} x the vision "
                f"hidden size {vision_size} for vision_feature_layer={config.vision_feature_layer}."
            )
        return weight
    if weight.shape[-1] != vision_size:
        raise ValueError(
            f"{PROJECTOR_INPUT_KEY} has {weight.shape[-1]} input columns, expected the vision hidden size "
            f"{vision_size}: the source is not a single-layer LLaVA projector."
        )
    slot, num_slots = fuser_class(config.fuser_type).projector_slots(config)
    if slot is None:
        fields = " / ".join(fuser_class(config.fuser_type).layer_fields) or "its layers"
        raise ValueError(
            f"A {config.fuser_type} fuser whose {fields} leave out the source's vision_feature_layer "
            f"({config.base_layer}) cannot reproduce the source: include that layer."
        )
    if num_slots == 1:
        return weight
    widened = weight.new_zeros(weight.shape[0], vision_size * num_slots)
    widened[:, slot * vision_size : (slot + 1) * vision_size] = weight
    return widened


def new_fuser_tensors(
    config: FusedLlavaConfig, dtype: torch.dtype | None = None, seed: int | None = None
) -> dict[str, torch.Tensor]:
    """Freshly initialised fuser parameters under their checkpoint names (`model.fuser.*`); empty for `none`.

    With `seed`, the random initialisation is reproducible (the global RNG state is left as it was)."""
    if seed is None:
        fuser = build_fuser(config)
    else:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            fuser = build_fuser(config)
    return {
        FUSER_PREFIX + name: (tensor if dtype is None else tensor.to(dtype)).detach().contiguous()
        for name, tensor in fuser.state_dict().items()
    }


def fused_from_llava(
    llava: LlavaForConditionalGeneration,
    fuser_type: str,
    instruction_encoder: PreTrainedModel | None = None,
    **fuser_kwargs,
) -> PreTrainedModel:
    """A fused model that computes exactly what `llava` computes (until trained): a
    `FusedLlavaForConditionalGeneration` for a `LlavaForConditionalGeneration`, a
    `FusedLlavaNextForConditionalGeneration` for a `LlavaNextForConditionalGeneration`.

    Args:
        llava: the plain source model; its tensors are copied unchanged.
        fuser_type: a registered fuser (`hf_fusedvlm.FUSERS`).
        instruction_encoder: the sentence encoder for `igva` (its weights are copied in and frozen).
        fuser_kwargs: further `FusedLlavaConfig` fuser fields (`fuser_layers`, `fuser_layer_groups`, ...).
    """
    if isinstance(llava.config, FusedLlavaConfig):
        raise TypeError(
            f"fused_from_llava converts a plain LLaVA or LLaVA-NeXT model; got a fused model (fuser_type="
            f"{llava.config.fuser_type!r}): convert its plain source instead, or load it with from_pretrained."
        )
    reads_instruction = fuser_class(fuser_type).reads_instruction
    if reads_instruction and instruction_encoder is None:
        raise ValueError(f"fuser_type={fuser_type!r} needs an instruction_encoder (a text encoder model).")
    config = fused_config_from_llava(
        llava.config,
        fuser_type,
        instruction_encoder_config=instruction_encoder.config if instruction_encoder is not None else None,
        **fuser_kwargs,
    )
    state_dict = dict(llava.state_dict())
    state_dict[PROJECTOR_INPUT_KEY] = expand_projector_input(state_dict[PROJECTOR_INPUT_KEY], config)
    state_dict.update(new_fuser_tensors(config, dtype=llava.dtype))
    if reads_instruction:
        state_dict.update(
            {INSTRUCTION_ENCODER_PREFIX + name: tensor for name, tensor in instruction_encoder.state_dict().items()}
        )
    fused = fused_family(llava.config)[1](config)
    fused.load_state_dict(state_dict, strict=True)
    fused.generation_config = llava.generation_config
    return fused.to(llava.dtype).eval()
