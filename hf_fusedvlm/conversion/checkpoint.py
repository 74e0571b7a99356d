"""Finding a source checkpoint and telling its format: a local folder or a Hub repo id, its config.json, and whether
it is a llava-hf checkpoint or one in the original LLaVA layout (told apart by structure, never by `model_type`)."""

import json
import os
from pathlib import Path

from huggingface_hub import HfApi, snapshot_download

from ..publishing.folders import FUSED_MODEL_TYPES
from ..publishing.hub import hub_connection_error, unreachable_hub_message
from .errors import ConversionError


# Files a conversion needs from a Hub repository (weights, configs, tokenizer and processor files, card).
HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "README.md"]
# What is fetched first, to check every argument before the weights are downloaded: configs, shard indexes,
# sentence-transformers module lists, processor settings (not the tokenizer vocabularies, which can be megabytes).
METADATA_PATTERNS = ["*.json"]
METADATA_IGNORED = ["*tokenizer.json", "*vocab.json"]
# Everything but the weights: what a tokenizer is read from, to check it before the weights are downloaded.
WITHOUT_WEIGHTS_PATTERNS = [pattern for pattern in HUB_PATTERNS if pattern != "*.safetensors"]
LLAVA_HF = "llava-hf"
ORIGINAL = "original"
# The model types of the plain llava-hf families it converts.
LLAVA_HF_MODEL_TYPES = ("llava", "llava_next")


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike,
    what: str = "--input",
    allow_pickles: bool = False,
    metadata_only: bool = False,
    without_weights: bool = False,
) -> tuple[Path, str | None]:
    """A local folder for `path_or_repo_id` and the Hub repo id it came from (None for a folder outside the cache).

    A local folder is used as is; anything else is taken as a Hub repo id and its weights, configs, tokenizer and
    processor files are downloaded (to the Hugging Face cache). With `allow_pickles`, `.bin` weights are downloaded
    too when the repo has no safetensors (original LLaVA checkpoints and CLIP towers are often `.bin` only). With
    `metadata_only`, only the JSON files are (`METADATA_PATTERNS`); with `without_weights`, everything but the weights
    (configs and tokenizer files): a later call fills the same snapshot folder."""
    path = Path(path_or_repo_id).expanduser()
    text = str(path_or_repo_id)
    if path.is_dir():
        return path.resolve(), repo_id_of_cache_snapshot(path.resolve())
    if path.is_file():
        hint = f"its folder: {what} {path.parent}" if path.name == "config.json" else "the checkpoint's folder"
        raise ConversionError(f"{what} {text} is a file: give {hint} (or a Hub repo id).")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", ""):
        raise ConversionError(f"{what} {text} does not exist: give an existing checkpoint folder or a Hub repo id.")
    unreachable = hub_connection_error()
    if unreachable:
        raise ConversionError(unreachable_hub_message(what, text, unreachable))
    patterns, ignored = list(HUB_PATTERNS), None
    if metadata_only:
        patterns, ignored = METADATA_PATTERNS, METADATA_IGNORED
    elif without_weights:
        patterns = WITHOUT_WEIGHTS_PATTERNS
    elif allow_pickles and not _repo_has_safetensors(text):
        patterns.append("*.bin")
    try:
        folder = snapshot_download(text, allow_patterns=patterns, ignore_patterns=ignored)
    except Exception as error:  # huggingface_hub raises many kinds; all mean the same to the user
        raise ConversionError(
            f"{what} {text} is neither a local folder nor a Hub repo that could be downloaded "
            f"({type(error).__name__}: {error}). Check the path or repo id, your connection, and `hf auth login` "
            "for gated or private repos."
        ) from error
    return Path(folder), text


def _repo_has_safetensors(repo_id: str) -> bool:
    try:
        files = HfApi().list_repo_files(repo_id)
    except Exception:  # the download that follows reports the failure with the fix
        return True
    return any(name.endswith(".safetensors") for name in files)


def repo_id_of_cache_snapshot(path: Path) -> str | None:
    """`org/name` for a folder inside the Hugging Face cache (`models--org--name/snapshots/<sha>`), else None."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return None


def read_config_json(folder: Path, expected: str) -> dict:
    """The raw config.json of a checkpoint; `expected` (e.g. "a LLaVA checkpoint folder (or Hub repo)") completes
    the error message when there is none."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{folder} has no config.json: --input must be {expected}.")
    try:
        raw = json.loads(config_file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{config_file} is not valid JSON ({error}): re-download the checkpoint.") from error
    if not isinstance(raw, dict):
        raise ConversionError(f"{config_file} is not a JSON object: re-download the checkpoint.")
    return raw


def checkpoint_format(raw: dict, folder: Path) -> str:
    """`LLAVA_HF` for a nested LLaVA config (`text_config` and `vision_config`, as `LlavaConfig` saves it),
    `ORIGINAL` for a flat LLM config with `mm_vision_tower` (haotian-liu/LLaVA and its forks; its `model_type` is
    `llava` for llava-v1.5 / v1.6, `llava_llama` or `llava_mistral` for code trained later). Anything else, a fused
    checkpoint included, is refused with what it is."""
    model_type = raw.get("model_type")
    if model_type in FUSED_MODEL_TYPES:
        raise ConversionError(
            f"{folder} is already a fused LLaVA checkpoint (model_type {model_type!r}, fuser_type "
            f"{raw.get('fuser_type')!r}): load it with AutoModel.from_pretrained(..., trust_remote_code=True), or "
            "convert its plain source."
        )
    nested = isinstance(raw.get("text_config"), dict) and isinstance(raw.get("vision_config"), dict)
    if nested and model_type in LLAVA_HF_MODEL_TYPES:
        return LLAVA_HF
    if not nested and raw.get("mm_vision_tower"):
        return ORIGINAL
    raise ConversionError(
        f"{folder} is not a LLaVA checkpoint: its config.json has model_type {model_type!r} (architectures "
        f"{raw.get('architectures')}), "
        + (
            f"nested text_config / vision_config but not model_type {' or '.join(map(repr, LLAVA_HF_MODEL_TYPES))}"
            if nested
            else "no mm_vision_tower entry"
        )
        + ". Expected a llava-hf checkpoint (LlavaForConditionalGeneration or LlavaNextForConditionalGeneration, e.g. "
        "llava-hf/llava-1.5-7b-hf, llava-hf/llava-v1.6-mistral-7b-hf) or an "
        "original-format one (a flat config with mm_* keys, e.g. liuhaotian/llava-v1.5-7b)."
    )
