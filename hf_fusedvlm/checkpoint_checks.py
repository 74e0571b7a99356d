"""The checks `from_pretrained` of every fused model family runs before transformers loads a checkpoint: the right
model type, every shard present and readable, bitsandbytes where the config quantises. Each names the problem and the
fix instead of letting it surface deep inside loading."""

import importlib.metadata
import importlib.util
import json
import os

from safetensors import SafetensorError, safe_open
from transformers import PreTrainedConfig
from transformers.utils import is_bitsandbytes_available

from .fuser_registry import FUSERS


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


def corrupt_safetensors_files(folder) -> str | None:
    """The safetensors files of a local `folder` that cannot be opened, as a sentence, or None."""
    if not os.path.isdir(folder):
        return None
    corrupt = []
    for name in sorted(os.listdir(folder)):
        if name.endswith(".safetensors"):
            try:
                with safe_open(os.path.join(folder, name), framework="pt"):
                    pass
            except (SafetensorError, OSError):
                corrupt.append(name)
    return f"{', '.join(corrupt)} cannot be read; download or save it again" if corrupt else None


def missing_weight_files(folder) -> str | None:
    """The shards that the safetensors index of a local `folder` names but the folder lacks, as a sentence, or None
    (a deleted or never-copied shard would otherwise surface as a FileNotFoundError deep inside loading)."""
    index_file = os.path.join(folder, "model.safetensors.index.json") if os.path.isdir(folder) else None
    if index_file is None or not os.path.isfile(index_file):
        return None
    try:
        with open(index_file, encoding="utf-8") as handle:
            shards = sorted(set(json.load(handle)["weight_map"].values()))
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        return f"{index_file} is not a valid safetensors index; download or save the checkpoint again"
    missing = [name for name in shards if not os.path.isfile(os.path.join(folder, name))]
    if not missing:
        return None
    return (
        f"{folder} is incomplete: its model.safetensors.index.json names {', '.join(missing)}, which "
        f"{'is' if len(missing) == 1 else 'are'} missing; download or copy the whole checkpoint again"
    )


HUB_KWARGS = ("cache_dir", "force_download", "proxies", "token", "revision", "local_files_only", "subfolder")


def hub_kwargs(kwargs: dict) -> dict:
    return {key: kwargs[key] for key in HUB_KWARGS if key in kwargs}


def check_fused_checkpoint(pretrained_model_name_or_path, kwargs: dict, model_type: str) -> None:
    """Raise a clear `ValueError` when the checkpoint's `config.json` is not of the fused `model_type` (a llava-hf or
    original LLaVA checkpoint, say): its weights would leave the language model randomly initialised."""
    if pretrained_model_name_or_path is None or kwargs.get("gguf_file") is not None:
        return
    try:
        config_dict, _ = PreTrainedConfig.get_config_dict(pretrained_model_name_or_path, **hub_kwargs(kwargs))
    except (OSError, ValueError):
        return  # no readable config.json: from_pretrained reports that itself
    found = config_dict.get("model_type")
    if found == model_type:
        return
    raise ValueError(
        f"{pretrained_model_name_or_path} is not a {model_type} checkpoint (its config.json has model_type="
        f"{found!r}); loading it would leave the fused model's language model randomly initialised. Convert it "
        f"first, e.g. `fusedvlm-convert --input {pretrained_model_name_or_path} --output <folder> --fuser mmfuser` "
        f"(fuser: {', '.join(FUSERS)}; those that read the instruction also need --instruction-encoder), then load "
        "the output folder."
    )
