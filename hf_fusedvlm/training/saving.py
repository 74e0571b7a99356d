"""Saving what training produced as a plain fused checkpoint: LoRA merged, 4-bit weights dequantised, keys as in a
converted checkpoint, from the live model or from the full state dict that Trainer gathers under FSDP / DeepSpeed."""

import copy
import os
import re

import torch

from ..modeling_fused_llava import FusedLlavaForConditionalGeneration
from .stages import PEFT_PREFIX


# Name segments that wrappers insert into parameter names (FSDP1, activation checkpointing, DDP / DeepSpeed `module.`).
WRAPPER_SEGMENTS = re.compile(r"(?:^|(?<=\.))(?:_fsdp_wrapped_module|_checkpoint_wrapped_module|_orig_mod)\.")
LORA_KEY = re.compile(r"^(?P<layer>.+)\.lora_(?P<matrix>A|B)\.(?P<adapter>[^.]+)\.weight$")


def _is_4bit(weight) -> bool:
    return getattr(weight, "quant_state", None) is not None


def _dense_weight(linear: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight in full precision (bitsandbytes 4-bit weights dequantised by transformers' helper)."""
    if _is_4bit(linear.weight):
        from transformers.integrations.bitsandbytes import dequantize_bnb_weight

        return dequantize_bnb_weight(linear.weight)
    return linear.weight.detach()


def unwrapped_name(name: str) -> str:
    """A parameter name of a fused model, or of a PEFT model around one, without what FSDP, activation checkpointing,
    `torch.compile` or DDP added to it (`module.` only as the first segment)."""
    return WRAPPER_SEGMENTS.sub("", name.removeprefix("module."))


def gathered(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """`state_dict` with every DTensor replaced by its full tensor. FSDP2's full state dict should hold none, but
    torch's gather leaves them sharded when the device mesh is the CPU's. A collective: call it on every rank."""
    from torch.distributed.tensor import DTensor

    return {key: value.full_tensor() if isinstance(value, DTensor) else value for key, value in state_dict.items()}


def live_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """`model.state_dict()` of a model held whole in this process, with bitsandbytes 4-bit weights dequantised (and
    their quantisation-state entries left out)."""
    state = {}
    for module_name, module in model.named_modules():
        prefix = f"{module_name}." if module_name else ""
        for name, parameter in module.named_parameters(recurse=False):
            state[prefix + name] = (
                _dense_weight(module) if name == "weight" and _is_4bit(parameter) else parameter.detach()
            )
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[prefix + name] = buffer
    return state


def lora_scalings(model: torch.nn.Module) -> dict[str, dict[str, float]]:
    """`{layer name: {active adapter: scaling}}` of the LoRA layers of `model` (names as [`unwrapped_name`] gives)."""
    try:
        from peft.tuners.lora import LoraLayer
    except ImportError:
        return {}
    scalings = {}
    for name, module in model.named_modules():
        if isinstance(module, LoraLayer):
            if any(module.use_dora.get(adapter) for adapter in module.active_adapters):
                raise NotImplementedError("Saving DoRA adapters merged is not implemented; use plain LoRA.")
            scalings[unwrapped_name(name)] = {adapter: module.scaling[adapter] for adapter in module.active_adapters}
    return scalings


def fused_state_dict(model: torch.nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The weights of the plain fused model that `state_dict` describes, keyed as in a fused checkpoint.

    Args:
        model: the trained model (a fused model or a PEFT model around one; wrapped or not); only its LoRA layers'
            scalings are read, never its weights, which FSDP / DeepSpeed may hold sharded.
        state_dict: the full state dict of `model` (keys as its `state_dict()`, possibly with PEFT / FSDP / DDP
            prefixes). LoRA deltas `scaling * B @ A` (B: `(out, r)`, A: `(r, in)`) are added to their base weights.
    """
    scalings = lora_scalings(model)
    state, lora = {}, {}
    for key, tensor in state_dict.items():
        key = unwrapped_name(key)
        match = LORA_KEY.match(key)
        if match:
            lora.setdefault((match["layer"], match["adapter"]), {})[match["matrix"]] = tensor
        elif ".lora_" not in key:
            state[key.replace(".base_layer.", ".")] = tensor
    for (layer, adapter), pair in lora.items():
        scaling = scalings.get(layer, {}).get(adapter)
        if scaling is None:  # an inactive adapter: not part of what the model computes
            continue
        weight_key = f"{layer}.weight"
        weight = state[weight_key]
        delta = (pair["B"].to(torch.float32) @ pair["A"].to(torch.float32)) * scaling
        state[weight_key] = (weight.to(torch.float32) + delta).to(weight.dtype)
    return {key.removeprefix(PEFT_PREFIX): tensor for key, tensor in state.items()}


def full_precision_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain fused model inside `model` (a fused model, or a PEFT model around one, possibly
    on a 4-bit base): LoRA deltas merged into their base weights, 4-bit weights dequantised, keys as in a fused
    checkpoint. The model itself is left unchanged."""
    return fused_state_dict(model, live_state_dict(model))


def save_fused_checkpoint(
    model: torch.nn.Module, output_dir: str | os.PathLike, state_dict: dict[str, torch.Tensor] | None = None
) -> None:
    """Save `model` as a fused checkpoint (weights, config with `auto_map`, remote code) to `output_dir`.

    Without `state_dict`, the weights are read from `model` itself: a plain fused model is saved with
    `save_pretrained`; a PEFT model (LoRA, possibly on a 4-bit base) as the fused model it computes (adapters merged,
    4-bit weights dequantised, no `quantization_config`). With `state_dict` (the full state dict Trainer gathers under
    FSDP or DeepSpeed, whose live parameters are shards), the weights come from it, mapped by [`fused_state_dict`].
    Either way the saved model is built on the meta device, so that memory holds the weights once."""
    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    if state_dict is None and base is model:
        model.save_pretrained(output_dir)
        return
    state = full_precision_state_dict(model) if state_dict is None else fused_state_dict(model, state_dict)
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    with torch.device("meta"):
        plain = FusedLlavaForConditionalGeneration(config)
    missing = plain.state_dict().keys() - state.keys()
    if missing:
        raise ValueError(
            f"The state dict to save lacks {len(missing)} weights of the fused model (e.g. {sorted(missing)[0]}); under "
            "DeepSpeed ZeRO-3 set `stage3_gather_16bit_weights_on_model_save: true` so that Trainer gathers them all."
        )
    plain.load_state_dict(state, strict=True, assign=True)
    plain.generation_config = copy.deepcopy(base.generation_config)
    plain.save_pretrained(output_dir)
