"""The instruction encoder of `igva`: a sentence-transformers folder (or a plain transformers text encoder) read
without sentence-transformers, for both checkpoint formats.

`modules.json` lists the modules: a Transformer, a Pooling and optionally a Normalize (any other module is refused).
`1_Pooling/config.json` comes in two formats, both read: sentence-transformers <= 4 writes booleans
(`"pooling_mode_mean_tokens": true`, ..., `word_embedding_dimension`), 5 and 6 write
`{"embedding_dimension": ..., "pooling_mode": "mean", "include_prompt": ...}` (module types under
`sentence_transformers.base.modules...`). The fused model computes mean, cls and max pooling exactly
(`FusedLlavaConfig.instruction_pooling`); the other modes are refused by name. The truncation length is
`max_seq_length` of `sentence_bert_config.json` (older versions), else the tokenizer's `model_max_length` (where
5 and 6 keep it). A folder without `modules.json` is pooled as `SentenceTransformer()` pools one: mean, no
normalisation, with a warning (as sentence-transformers warns); a `modules.json` without a Pooling module, which
sentence-transformers cannot turn into sentence embeddings, is refused, and so is a tokenizer that reads every word
as its unknown token (a folder without tokenizer files)."""

import json
import warnings
from dataclasses import dataclass
from pathlib import Path

import torch
from transformers import AutoConfig, AutoModel, AutoTokenizer

from ..parity import INSTRUCTION_ENCODER_PREFIX
from .checkpoint import resolve_checkpoint
from .errors import ConversionError
from .options import INSTRUCTION_ENCODER_EXAMPLE as EXAMPLE


# sentence-transformers pooling mode (both spellings) -> `instruction_pooling`.
SUPPORTED_POOLING = {
    "mean": "mean",
    "mean_tokens": "mean",
    "cls": "cls",
    "cls_token": "cls",
    "max": "max",
    "max_tokens": "max",
}


@dataclass
class SentenceEncoder:
    """A sentence encoder: its transformer's config, pooling (`instruction_pooling`) and L2 normalisation, the name
    the model card gives it (a Hub id or a folder name), and once loaded its transformer and tokenizer."""

    config: object
    pooling: str
    normalize: bool
    name: str
    model: torch.nn.Module | None = None
    tokenizer: object = None

    @property
    def fused_tensors(self) -> dict[str, torch.Tensor]:
        """The loaded transformer's weights under their names in a fused checkpoint."""
        return {INSTRUCTION_ENCODER_PREFIX + key: value for key, value in self.model.state_dict().items()}

    @property
    def config_fields(self) -> dict:
        """The `FusedLlavaConfig` fields that make the fused model pool as this encoder does."""
        return {"instruction_pooling": self.pooling, "instruction_embedding_normalize": self.normalize}


def _read_json(path: Path, what: str) -> dict | list:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as error:
        raise ConversionError(
            f"--instruction-encoder: {path} ({what}) is missing or not valid JSON ({error})."
        ) from error


def read_pooling(config_file: Path) -> str:
    """The `instruction_pooling` of a sentence-transformers Pooling config, in either format."""
    config = _read_json(config_file, "the Pooling module's config")
    if "pooling_mode" in config:  # sentence-transformers >= 5
        modes = config["pooling_mode"]
        modes = [modes] if isinstance(modes, str) else list(modes)
    else:
        modes = [
            name.removeprefix("pooling_mode_")
            for name, value in config.items()
            if name.startswith("pooling_mode_") and value is True
        ]
    if len(modes) != 1 or modes[0] not in SUPPORTED_POOLING:
        raise ConversionError(
            f"{config_file} sets pooling modes {modes}: the fused model computes exactly one of mean, cls or max "
            "pooling (pooling_mode_mean_tokens / _cls_token / _max_tokens in older folders); choose a sentence "
            f"encoder that pools so, such as {EXAMPLE}."
        )
    return SUPPORTED_POOLING[modes[0]]


def _read_modules(folder: Path) -> tuple[Path, str, bool]:
    """(transformer folder, pooling, normalize) from `modules.json`."""
    modules = _read_json(folder / "modules.json", "the sentence-transformers module list")
    transformer_path, pooling, normalize = None, None, False
    for module in modules if isinstance(modules, list) else []:
        kind, path = str(module.get("type", "")), folder / module.get("path", "")
        if kind.endswith(".Transformer"):
            transformer_path = path
        elif kind.endswith(".Pooling"):
            pooling = read_pooling(path / "config.json")
        elif kind.endswith(".Normalize"):
            normalize = True
        else:
            raise ConversionError(
                f"--instruction-encoder {folder}: module {kind!r} is not supported; the instruction encoder may only "
                f"have Transformer, Pooling and Normalize modules (as {EXAMPLE})."
            )
    if transformer_path is None:
        raise ConversionError(f"--instruction-encoder {folder}: modules.json lists no Transformer module.")
    if pooling is None:
        raise ConversionError(
            f"--instruction-encoder {folder}: modules.json lists no Pooling module, so the folder gives token "
            "embeddings, not sentence embeddings (sentence-transformers cannot encode with it either). Add the "
            f"encoder's Pooling module (1_Pooling/config.json and its modules.json entry), as {EXAMPLE} has it."
        )
    return transformer_path, pooling, normalize


# A probe the tokenizer of any real text encoder reads as more than unknown tokens.
_PROBE = "What colour is the square in the image?"


def _check_tokenizer(tokenizer, transformer_path: Path, folder: Path) -> None:
    """Refuse a tokenizer that reads every word as its unknown token: transformers builds one with an empty
    vocabulary for a folder that has a config.json but no tokenizer files, and every instruction would embed alike."""
    ids = tokenizer(_PROBE, add_special_tokens=False)["input_ids"]
    if tokenizer.unk_token_id is not None and ids and all(token == tokenizer.unk_token_id for token in ids):
        raise ConversionError(
            f"--instruction-encoder {folder}: its tokenizer reads every word as {tokenizer.unk_token!r} (only "
            f"{len(tokenizer)} tokens known): {transformer_path} lacks the tokenizer files (tokenizer.json, "
            f"vocab.txt, ...). Give the complete sentence-transformers folder, such as {EXAMPLE}."
        )


def _check_prompts(folder: Path) -> None:
    settings_file = folder / "config_sentence_transformers.json"
    if settings_file.is_file():
        prompt_name = _read_json(settings_file, "sentence-transformers settings").get("default_prompt_name")
        if prompt_name:
            raise ConversionError(
                f"--instruction-encoder {folder} prepends its prompt {prompt_name!r} to every sentence "
                "(default_prompt_name), which the fused model does not do: choose an encoder without a default "
                "prompt, or set default_prompt_name to null."
            )


def _check_text_encoder(transformer_path: Path, folder: Path):
    """The transformer's config; folders that are not a text encoder (a LLaVA, a causal LM, an encoder-decoder) are
    refused by name."""
    if not (transformer_path / "config.json").is_file():
        raise ConversionError(
            f"--instruction-encoder {folder} has no config.json: give a sentence-transformers folder or Hub id "
            f"such as {EXAMPLE}."
        )
    try:
        config = AutoConfig.from_pretrained(transformer_path)
    except Exception as error:
        raise ConversionError(
            f"--instruction-encoder {folder}: its config.json could not be read ({type(error).__name__}: {error})."
        ) from error
    architectures = config.architectures or []
    if (
        getattr(config, "is_encoder_decoder", False)
        or config.sub_configs
        or any(name.endswith(("ForCausalLM", "ForConditionalGeneration")) for name in architectures)
        or not hasattr(config, "hidden_size")
    ):
        kind = ", ".join(architectures) or "no architectures"
        raise ConversionError(
            f"--instruction-encoder {folder} is a {config.model_type!r} model ({kind}), not a text encoder: give a "
            f"sentence encoder such as {EXAMPLE}."
        )
    return config


def _load(auto_class, transformer_path: Path, folder: Path, **kwargs):
    try:
        return auto_class.from_pretrained(transformer_path, **kwargs)
    except Exception as error:
        raise ConversionError(
            f"--instruction-encoder {folder}: the transformer at {transformer_path} could not be loaded with "
            f"AutoModel and AutoTokenizer ({type(error).__name__}: {error}). Give a sentence-transformers folder "
            f"such as {EXAMPLE}, complete and unmodified."
        ) from error


def load_sentence_encoder(path_or_repo_id, dtype: torch.dtype | None = None, weights: bool = True) -> SentenceEncoder:
    """The sentence encoder of a sentence-transformers folder or Hub id (see the module docstring). Without
    `weights`, only its JSON files are read (a Hub repo's weights and tokenizer are not downloaded; a local folder's
    tokenizer is checked too): its settings are checked and its config read, but `model` and `tokenizer` stay None.
    With `weights`, a Hub repo's tokenizer is downloaded and checked before its weights."""
    what = "--instruction-encoder"
    folder, repo_id = resolve_checkpoint(path_or_repo_id, what, metadata_only=True)
    if (folder / "modules.json").is_file():
        transformer_path, pooling, normalize = _read_modules(folder)
        _check_prompts(folder)
    else:
        transformer_path, pooling, normalize = folder, "mean", False
    config = _check_text_encoder(transformer_path, folder)
    settings_file = transformer_path / "sentence_bert_config.json"
    settings = _read_json(settings_file, "sentence-transformers settings") if settings_file.is_file() else {}
    if settings.get("do_lower_case"):
        raise ConversionError(
            f"--instruction-encoder {folder} lower-cases sentences before tokenising (do_lower_case in "
            "sentence_bert_config.json), which the fused model's processor does not do: choose another encoder."
        )
    name = repo_id or folder.name
    local = Path(path_or_repo_id).expanduser().is_dir()
    if not weights:
        if local:  # its tokenizer files are here already: no download
            _check_tokenizer(_load(AutoTokenizer, transformer_path, folder), transformer_path, folder)
        return SentenceEncoder(config, pooling, normalize, name)
    if not local:  # the same snapshot folder, filled in two steps: the tokenizer, checked, then the weights
        resolve_checkpoint(path_or_repo_id, what, without_weights=True)
    tokenizer = _load(AutoTokenizer, transformer_path, folder)
    _check_tokenizer(tokenizer, transformer_path, folder)  # before the weights load
    if not local:
        resolve_checkpoint(path_or_repo_id, what)
    model = _load(AutoModel, transformer_path, folder, dtype=dtype or "auto").eval()
    if settings.get("max_seq_length"):  # sentence-transformers truncates there, below the model's own limit
        tokenizer.model_max_length = settings["max_seq_length"]
    if not (folder / "modules.json").is_file():
        warnings.warn(
            f"--instruction-encoder {folder} has no modules.json (not a sentence-transformers folder): its token "
            "states are mean-pooled without normalisation, as SentenceTransformer() pools such a folder. If the "
            "encoder was trained with another pooling, give its sentence-transformers folder instead.",
            stacklevel=2,
        )
    return SentenceEncoder(model.config, pooling, normalize, name, model, tokenizer)
