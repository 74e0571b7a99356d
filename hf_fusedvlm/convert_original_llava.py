"""Import of original-format LLaVA checkpoints into fused LLaVA checkpoints (the `fusedvlm-convert-original` command).

The original format is what haotian-liu/LLaVA and its forks, among them the official MMFuser and IGVA code, save: one
flat Llama (or Mistral) config with `mm_*` keys (model_type `llava_llama`), weights `model.*` (the LLM,
`model.mm_projector.*` and the fusion modules) and `lm_head.*` in safetensors or `pytorch_model*.bin` shards, and the
LLM's tokenizer. The vision tower is named by the config's `mm_vision_tower` and only stored in the checkpoint when it
was trained (`model.vision_tower.vision_tower.*`); its config, image processor and, otherwise, its weights come from
`--vision-tower`.

Variants, recognised from the config and the keys (`VARIANTS`):

- `llava`: plain LLaVA-1.5 (`mm_projector_type` `mlp2x_gelu`, projector `model.mm_projector.0/.2`). The result uses
  `--fuser` (default `none`) with the parity initialisation of `fusedvlm-convert`.
- `mmfuser`: MMFuser (`mm_vision_select_layer` such as `"list-22/-17/-12/-7/-2"`); the deformable block
  `model.mm_projector.0.*` becomes `model.fuser.*`, the MLP linears `model.mm_projector.1/.3` the projector.
- `igva`: IGVA (`vit_aggregate_groups`, `vit_base_layer`, `aggregate_by_average: false`, `aggregator_*`,
  `sentence_embed_dim`); `model.vision_aggregator.*` becomes `model.fuser.*` (its `transformers.N` blocks
  `blocks.N`), the projector reads 2 x the vision width, the frozen sentence encoder (`model.sentence_embedder.0.
  auto_model.*` when stored, else the weights of `--instruction-encoder`) becomes `model.instruction_encoder.*`, with
  the pooling and normalisation read from the sentence-transformers folder given as `--instruction-encoder`.
- `igva-average`: IGVA's pre-training mode (`aggregate_by_average: true`), the `average` fuser.

As llava-hf's conversion of LLaVA-1.5, the image placeholder (-200 in the original code) becomes an `<image>` token,
a `<pad>` token is added, the embedding matrix and `lm_head` grow to a multiple of 64 rows, the image processor pads
to a square (`image_aspect_ratio: pad`) and the chat template renders the `llava_v1` conversation the models were
trained with.

The pipeline is the streaming one of `convert_llava`: shards are read one at a time (safetensors bytes are copied
unchanged; `.bin` shards are memory-mapped), written into a hidden temporary folder beside `--output`, and moved
into place when complete.
"""

import argparse
import ast
import json
import math
import os
import pickle
import re
import shlex
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
from huggingface_hub import HfApi
from tokenizers import AddedToken
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    CLIPVisionConfig,
    GenerationConfig,
    LlavaConfig,
    LlavaImageProcessorPil,
)
from transformers.image_processing_utils import ImageProcessingMixin
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from .configuration_fused_llava import FusedLlavaConfig
from .convert_llava import (
    _HUB_PATTERNS,
    _SAFETENSORS_DTYPES,
    _TORCH_TO_SAFETENSORS,
    DTYPES,
    SAFETENSORS_INDEX,
    SAFETENSORS_SINGLE,
    VERIFY_QUESTION,
    VERIFY_TOLERANCES,
    ConversionError,
    ConversionResult,
    VerificationError,
    _check_output,
    _move_into_place,
    _OutputTensor,
    PlannedShard,
    _source_license,
    _SourceTensor,
    _write_remote_code,
    build_prompt,
    parse_fuser_options,
    parse_groups,
    parse_layers,
    plan_mismatches,
    publish_result,
    read_config_json,
    read_source_shards,
    render_model_card,
    resolve_checkpoint,
    run_conversion_command,
    staging_folder,
    write_shards,
    verification_image,
)
from .converting import (
    FUSER_PREFIX,
    INSTRUCTION_ENCODER_PREFIX,
    PROJECTOR_INPUT_KEY,
    expand_projector_input,
    fused_config_from_llava,
    new_fuser_tensors,
)
from .fusers import FUSERS, fuser_class
from .processing_fused_llava import FusedLlavaProcessor

VARIANTS = ("llava", "mmfuser", "igva", "igva-average")
VARIANT_FUSERS = {"mmfuser": "mmfuser", "igva": "igva", "igva-average": "average"}
VARIANT_ORIGINS = {
    "llava": "haotian-liu/LLaVA",
    "mmfuser": "the official MMFuser code (yuecao0119/MMFuser)",
    "igva": "the official IGVA code (YiZheng-zy/IGVA)",
    "igva-average": "the official IGVA code (YiZheng-zy/IGVA), pre-training mode",
}
# The original model types and the LLM config each one extends.
ORIGINAL_MODEL_TYPES = {"llava_llama": "llama", "llava_mistral": "mistral"}
IMAGE_TOKEN = "<image>"
PAD_TOKEN = "<pad>"
# llava-hf pads the vocabulary to a multiple of 64 rows for efficient matmuls.
VOCAB_MULTIPLE = 64
# MSCrossAttnBlock of the official MMFuser code hard-codes these (and LayerNorm eps 1e-6).
MMFUSER_NUM_HEADS = 16
MMFUSER_NUM_POINTS = 4
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
# Keys listed in errors before "... and N more".
_MAX_LISTED_KEYS = 12

LLAVA_V1_SYSTEM = (
    "A chat between a curious human and an artificial intelligence assistant. The assistant gives helpful, "
    "detailed, and polite answers to the human's questions."
)
# The `llava_v1` conversation of the original code (separator style TWO: " " after user turns, "</s>" after
# assistant turns), image placeholders first in the user turn as the original training data has them. A leading
# system message replaces the default system prompt.
LLAVA_V1_CHAT_TEMPLATE = (
    "{% set ns = namespace(system='" + LLAVA_V1_SYSTEM.replace("'", "\\'") + "', start=0) %}"
    "{% if messages and messages[0]['role'] == 'system' %}{% set ns.start = 1 %}"
    "{% if messages[0]['content'] is string %}{% set ns.system = messages[0]['content'] %}"
    "{% else %}{% set ns.system = messages[0]['content'] | selectattr('type', 'equalto', 'text') "
    "| map(attribute='text') | join(' ') %}{% endif %}{% endif %}"
    "{{ ns.system + ' ' }}"
    "{% for message in messages[ns.start:] %}"
    "{{ message['role'].upper() + ': ' }}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for block in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{{ message['content'] | selectattr('type', 'equalto', 'text') | map(attribute='text') | join(' ') }}"
    "{% endif %}"
    "{% if message['role'] == 'assistant' %}{{ '</s>' }}{% else %}{{ ' ' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)

# Buffers that older transformers saved and current ones recompute (rotary frequencies, position ids).
_RECOMPUTED_BUFFER = re.compile(r"(^|\.)(rotary_emb\.inv_freq|position_ids)$")
_LLM_RENAMES = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
_MLP_PROJECTOR = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
)
# (original prefix, fused prefix) per variant; the first matching prefix wins.
KEY_RENAMES = {
    "llava": _LLM_RENAMES + _MLP_PROJECTOR,
    "mmfuser": _LLM_RENAMES
    + (
        ("model.mm_projector.0.", FUSER_PREFIX),
        ("model.mm_projector.1.", "model.multi_modal_projector.linear_1."),
        ("model.mm_projector.3.", "model.multi_modal_projector.linear_2."),
    ),
    "igva": _LLM_RENAMES
    + _MLP_PROJECTOR
    + (
        ("model.vision_aggregator.transformers.", FUSER_PREFIX + "blocks."),
        ("model.vision_aggregator.", FUSER_PREFIX),
        ("model.sentence_embedder.0.auto_model.", INSTRUCTION_ENCODER_PREFIX),
    ),
    "igva-average": _LLM_RENAMES + _MLP_PROJECTOR,
}
TOWER_PREFIX = "model.vision_tower."
# The parts of a full CLIPModel checkpoint that the vision tower does not use.
_CLIP_TEXT_PARTS = ("text_model", "text_projection", "visual_projection", "logit_scale")
EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


@dataclass
class OriginalTensor:
    """One tensor of a source shard: its bytes in a safetensors file (`source`) or a memory-mapped `tensor`."""

    key: str
    dtype: torch.dtype
    shape: list[int]
    source: _SourceTensor | None = None
    tensor: torch.Tensor | None = None


@dataclass
class OriginalShard:
    path: Path
    metadata: dict | None
    tensors: list[OriginalTensor]

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix == ".safetensors"


@dataclass
class SentenceEncoder:
    """A sentence-transformers model: its transformer, tokenizer and pooling settings."""

    model: torch.nn.Module
    tokenizer: object
    pooling: str
    normalize: bool


# --------------------------------------------------------------------------------------------------------- inputs


def _listed(keys, limit: int = _MAX_LISTED_KEYS) -> str:
    keys = sorted(keys)
    shown = ", ".join(keys[:limit])
    return shown + (f", ... and {len(keys) - limit} more" if len(keys) > limit else "")


def resolve_original(path_or_repo_id: str | os.PathLike, what: str) -> tuple[Path, str | None]:
    """`resolve_checkpoint` for original-format checkpoints and CLIP towers, which are often `.bin` only: from the
    Hub, `.bin` weights are downloaded only when the repo has no safetensors."""
    if Path(path_or_repo_id).expanduser().exists() or str(path_or_repo_id).startswith((".", "/", "~")):
        return resolve_checkpoint(path_or_repo_id, what)
    try:
        files = HfApi().list_repo_files(str(path_or_repo_id))
    except Exception:  # resolve_checkpoint below reports the failure with the fix
        files = []
    patterns = list(_HUB_PATTERNS)
    if files and not any(name.endswith(".safetensors") for name in files):
        patterns.append("*.bin")
    return resolve_checkpoint(path_or_repo_id, what, allow_patterns=patterns)


def read_original_config(folder: Path) -> dict:
    """The raw config.json of an original-format checkpoint, or a `ConversionError` saying what it is instead."""
    raw = read_config_json(
        folder, "an original-format LLaVA checkpoint folder (or Hub repo) such as liuhaotian/llava-v1.5-7b"
    )
    model_type = raw.get("model_type")
    if model_type in ("llava", FusedLlavaConfig.model_type):
        raise ConversionError(
            f"{folder} is a {'llava-hf' if model_type == 'llava' else 'fused LLaVA'} checkpoint (model_type "
            f"{model_type!r}), not an original-format one: use fusedvlm-convert for llava-hf checkpoints."
        )
    if model_type not in ORIGINAL_MODEL_TYPES or "mm_vision_tower" not in raw:
        raise ConversionError(
            f"{folder} is not an original-format LLaVA checkpoint: expected model_type one of "
            f"{', '.join(ORIGINAL_MODEL_TYPES)} with an mm_vision_tower entry, got model_type {model_type!r} "
            f"(architectures {raw.get('architectures')})."
        )
    unsupported = []
    if raw.get("mm_use_im_start_end") or raw.get("mm_use_im_patch_token"):
        unsupported.append("image start/end or patch tokens (mm_use_im_start_end / mm_use_im_patch_token)")
    if raw.get("mm_patch_merge_type", "flat") != "flat" or raw.get("image_aspect_ratio") == "anyres":
        unsupported.append("LLaVA-NeXT any-resolution inputs (mm_patch_merge_type / image_aspect_ratio anyres)")
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu":
        unsupported.append(f"mm_projector_type {raw.get('mm_projector_type', 'linear')!r} (only mlp2x_gelu)")
    if unsupported:
        raise ConversionError(f"{folder} uses {'; '.join(unsupported)}, which fused LLaVA does not support.")
    return raw


def parse_select_layer(value) -> int | list[int]:
    """`mm_vision_select_layer` as the original code parses it: an int, a list, or a string such as `"-2"` or
    MMFuser's `"list-22/-17/-12/-7/-2"`."""
    if isinstance(value, bool):
        raise ConversionError(f"mm_vision_select_layer {value!r} is not a layer index.")
    if isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, int) for v in value)):
        return value
    if isinstance(value, str):
        try:
            if value.startswith("list"):
                return [int(part) for part in value[4:].split("/")]
            return int(value)
        except ValueError:
            pass
    raise ConversionError(
        f"mm_vision_select_layer {value!r} is neither a layer index such as -2 nor a list such as "
        "\"list-22/-17/-12/-7/-2\"."
    )


def parse_groups_literal(value) -> list[list[int]]:
    """IGVA's `vit_aggregate_groups`, a Python literal string such as `"[[1,2,3],[4,5,6]]"` (or already a list)."""
    try:
        groups = ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError) as error:
        raise ConversionError(f"vit_aggregate_groups {value!r} is not a list of lists of layer indices.") from error
    if not isinstance(groups, (list, tuple)) or not all(
        isinstance(group, (list, tuple)) and group and all(isinstance(layer, int) for layer in group)
        for group in groups
    ):
        raise ConversionError(f"vit_aggregate_groups {value!r} is not a list of non-empty lists of layer indices.")
    return [list(group) for group in groups]


def _load_pickle_shard(path: Path) -> dict[str, torch.Tensor]:
    """A `.bin` state dict, memory-mapped when its format allows, refusing anything but tensors."""
    try:
        try:
            state = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
        except RuntimeError:  # the pre-1.6 pickle format cannot be memory-mapped
            state = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        raise ConversionError(
            f"{path} holds objects other than tensors, which are not loaded for safety ({error}): re-save the state "
            "dict with torch.save(model.state_dict(), ...) or as safetensors."
        ) from error
    except (EOFError, RuntimeError, OSError) as error:
        raise ConversionError(f"{path} is truncated or corrupt ({error}): re-download or re-save it.") from error
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ConversionError(f"{path} is not a state dict of tensors.")
    return state


def read_shards(folder: Path, what: str) -> list[OriginalShard]:
    """The weights of `folder`: safetensors shards (headers checked, bytes left on disk) or, without any,
    `pytorch_model*.bin` shards (memory-mapped)."""
    if (folder / SAFETENSORS_INDEX).is_file() or (folder / SAFETENSORS_SINGLE).is_file():
        return [
            OriginalShard(
                shard.path,
                shard.metadata,
                [OriginalTensor(t.key, _SAFETENSORS_DTYPES[t.dtype], t.shape, source=t) for t in shard.tensors],
            )
            for shard in read_source_shards(folder)
        ]
    if (folder / PICKLE_INDEX).is_file():
        try:
            weight_map = json.loads((folder / PICKLE_INDEX).read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConversionError(f"{folder / PICKLE_INDEX} is corrupt ({error}): re-download it.") from error
        names = sorted(set(weight_map.values()))
        missing = [name for name in names if not (folder / name).is_file()]
        if missing:
            raise ConversionError(
                f"{folder} is missing {len(missing)} of the {len(names)} shards listed in {PICKLE_INDEX}: "
                f"{_listed(missing)}. Download the complete checkpoint and retry."
            )
    elif (folder / PICKLE_SINGLE).is_file():
        names = [PICKLE_SINGLE]
    else:
        raise ConversionError(
            f"{what} {folder} has no weights: expected {SAFETENSORS_INDEX}, {SAFETENSORS_SINGLE}, {PICKLE_INDEX} or "
            f"{PICKLE_SINGLE}."
        )
    shards = []
    for name in names:
        state = _load_pickle_shard(folder / name)
        tensors = [OriginalTensor(key, value.dtype, list(value.shape), tensor=value) for key, value in state.items()]
        shards.append(OriginalShard(folder / name, None, tensors))
    return shards


def detect_variant(raw: dict, keys: set[str]) -> str:
    """Which of `VARIANTS` an original checkpoint is, from its config and keys."""
    # The IGVA code writes vit_aggregate_groups (None when unused) into every config it saves.
    if raw.get("vit_aggregate_groups") is not None or any(key.startswith("model.vision_aggregator.") for key in keys):
        return "igva-average" if raw.get("aggregate_by_average") else "igva"
    layers = parse_select_layer(raw.get("mm_vision_select_layer", -2))
    if isinstance(layers, list) or any(key.startswith("model.mm_projector.0.cross_attn.") for key in keys):
        return "mmfuser"
    return "llava"


def map_original_key(key: str, variant: str) -> str | None:
    """The fused checkpoint name of an original key of `variant`; None for buffers current transformers recompute;
    the key itself (unexpected) when no rename applies."""
    if _RECOMPUTED_BUFFER.search(key):
        return None
    for prefix, replacement in KEY_RENAMES[variant]:
        if key.startswith(prefix):
            return replacement + key[len(prefix) :]
    return key


def original_key(name: str, variant: str) -> str:
    """The original key a fused parameter name comes from (for error messages)."""
    for prefix, replacement in KEY_RENAMES[variant]:
        if name.startswith(replacement):
            return prefix + name[len(replacement) :]
    return name


# ---------------------------------------------------------------------------------------------- sentence encoder


_POOLING_MODES = {"mean_tokens": "mean", "cls_token": "cls", "max_tokens": "max"}


def load_sentence_encoder(folder: Path, dtype: torch.dtype | None) -> SentenceEncoder:
    """A sentence-transformers model folder read without sentence-transformers: `modules.json` lists a Transformer,
    a Pooling (its `config.json` gives the `pooling_mode_*`) and optionally a Normalize module. A plain transformers
    folder (no `modules.json`) gets mean pooling without normalisation, as `SentenceTransformer()` gives it."""
    modules_file = folder / "modules.json"
    transformer_path, pooling, normalize = folder, "mean", False
    if modules_file.is_file():
        try:
            modules = json.loads(modules_file.read_text(encoding="utf-8"))
        except json.JSONDecodeError as error:
            raise ConversionError(f"{modules_file} is not valid JSON ({error}).") from error
        for module in modules:
            kind, path = module.get("type", ""), folder / module.get("path", "")
            if kind.endswith(".Transformer"):
                transformer_path = path
            elif kind.endswith(".Pooling"):
                pooling = _read_pooling(path / "config.json")
            elif kind.endswith(".Normalize"):
                normalize = True
            else:
                raise ConversionError(
                    f"--instruction-encoder {folder}: module {kind!r} is not supported; the instruction encoder may "
                    "only have Transformer, Pooling and Normalize modules (as all-mpnet-base-v2)."
                )
    try:
        model = AutoModel.from_pretrained(transformer_path, dtype=dtype or "auto").eval()
        tokenizer = AutoTokenizer.from_pretrained(transformer_path)
    except Exception as error:
        raise ConversionError(
            f"--instruction-encoder {folder}: the transformer at {transformer_path} could not be loaded with "
            f"AutoModel and AutoTokenizer ({type(error).__name__}: {error}). Give a sentence-transformers folder "
            "such as sentence-transformers/all-mpnet-base-v2."
        ) from error
    settings_file = transformer_path / "sentence_bert_config.json"
    if settings_file.is_file():
        max_length = json.loads(settings_file.read_text(encoding="utf-8")).get("max_seq_length")
        if max_length:  # sentence-transformers truncates there, below the model's own limit
            tokenizer.model_max_length = max_length
    return SentenceEncoder(model, tokenizer, pooling, normalize)


def _read_pooling(config_file: Path) -> str:
    if not config_file.is_file():
        raise ConversionError(f"{config_file} is missing: the sentence-transformers Pooling module needs it.")
    config = json.loads(config_file.read_text(encoding="utf-8"))
    modes = [name for name, value in config.items() if name.startswith("pooling_mode_") and value is True]
    modes = [name.removeprefix("pooling_mode_") for name in modes]
    if len(modes) != 1 or modes[0] not in _POOLING_MODES:
        raise ConversionError(
            f"{config_file} sets pooling modes {modes}: exactly one of "
            f"{', '.join('pooling_mode_' + mode for mode in _POOLING_MODES)} is supported."
        )
    return _POOLING_MODES[modes[0]]


# --------------------------------------------------------------------------------------------------------- configs


def text_config_from_original(raw: dict, vocab_size: int, pad_token_id: int):
    """The LLM config inside a flat original config (its `mm_*`, IGVA and trainer keys left out)."""
    config_class = CONFIG_MAPPING[ORIGINAL_MODEL_TYPES[raw["model_type"]]]
    # Legacy spellings that the config classes still convert (rope_theta -> rope_parameters, torch_dtype -> dtype).
    allowed = set(config_class().to_dict()) | {"rope_theta", "rope_scaling", "torch_dtype"}
    allowed -= {"model_type", "architectures", "transformers_version", "_name_or_path", "auto_map"}
    fields = {key: value for key, value in raw.items() if key in allowed}
    fields.update(vocab_size=vocab_size, pad_token_id=pad_token_id)
    return config_class(**fields)


def read_vision_tower(folder: Path, name: str) -> tuple[CLIPVisionConfig, LlavaImageProcessorPil]:
    """The CLIP vision config and the image processor settings of `--vision-tower`."""
    try:
        config = AutoConfig.from_pretrained(folder)
    except Exception as error:
        raise ConversionError(f"--vision-tower {name}: no loadable config.json ({error}).") from error
    if config.model_type == "clip":
        config = config.vision_config
    if config.model_type != "clip_vision_model":
        raise ConversionError(
            f"--vision-tower {name} is a {config.model_type!r} model: the original LLaVA code builds CLIP towers "
            "(CLIPVisionModel); give the CLIP model named by mm_vision_tower."
        )
    try:
        settings = ImageProcessingMixin.get_image_processor_dict(folder)[0]
    except Exception as error:
        raise ConversionError(
            f"--vision-tower {name} has no image processor settings (preprocessor_config.json): the original code "
            f"loads CLIPImageProcessor from the tower's folder ({error})."
        ) from error
    known = set(LlavaImageProcessorPil().to_dict()) - {"image_processor_type"}
    image_processor = LlavaImageProcessorPil(**{key: value for key, value in settings.items() if key in known})
    return config, image_processor


def add_llava_tokens(tokenizer, vocab_size: int) -> tuple[int, int, int]:
    """Add `<image>` and `<pad>` as llava-hf does; returns (image token id, pad token id, new vocabulary size, a
    multiple of `VOCAB_MULTIPLE`)."""
    if len(tokenizer) > vocab_size:
        raise ConversionError(
            f"The tokenizer has {len(tokenizer)} tokens but the embedding matrix only {vocab_size} rows: the "
            "tokenizer files do not belong to these weights."
        )
    if IMAGE_TOKEN not in tokenizer.get_vocab():
        tokenizer.add_tokens([AddedToken(IMAGE_TOKEN, special=True, normalized=False)], special_tokens=True)
    if tokenizer.pad_token is None or tokenizer.pad_token == tokenizer.unk_token:
        tokenizer.add_special_tokens({"pad_token": PAD_TOKEN})
    tokenizer.padding_side = "left"  # batched generation
    new_size = math.ceil(max(vocab_size, len(tokenizer)) / VOCAB_MULTIPLE) * VOCAB_MULTIPLE
    return tokenizer.convert_tokens_to_ids(IMAGE_TOKEN), tokenizer.pad_token_id, new_size


def fused_config_from_original(
    raw: dict,
    variant: str,
    keys: dict[str, list[int]],
    text_config,
    vision_config: CLIPVisionConfig,
    image_token_index: int,
    fuser_type: str,
    encoder: SentenceEncoder | None,
    fuser_kwargs: dict,
) -> FusedLlavaConfig:
    """The fused config of an original checkpoint of `variant`; `keys` maps its keys to shapes."""
    select_feature = raw.get("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise ConversionError(f"mm_vision_select_feature {select_feature!r} is not one of 'patch', 'cls_patch'.")
    strategy = "default" if select_feature == "patch" else "full"
    fuser_kwargs = dict(fuser_kwargs)
    layers = parse_select_layer(raw.get("mm_vision_select_layer", -2))
    if variant == "llava":
        if isinstance(layers, list):
            raise ConversionError(f"A plain LLaVA reads one vision layer, mm_vision_select_layer is {layers}.")
        base_layer = layers
    elif variant == "mmfuser":
        if strategy != "default":
            raise ConversionError("MMFuser needs square patch grids: mm_vision_select_feature must be 'patch'.")
        if not isinstance(layers, list):
            raise ConversionError(
                f"An MMFuser checkpoint selects several layers (mm_vision_select_layer such as "
                f"\"list-22/-17/-12/-7/-2\"), got {layers!r}."
            )
        heads = fuser_kwargs.setdefault("fuser_num_heads", MMFUSER_NUM_HEADS)
        points = fuser_kwargs.setdefault("fuser_num_points", MMFUSER_NUM_POINTS)
        shape = keys.get("model.mm_projector.0.cross_attn.attention_weights.weight")
        num_levels = shape[0] // (heads * points) if shape else len(layers) - 1
        if len(layers) < num_levels + 1:
            raise ConversionError(
                f"The MMFuser block reads {num_levels} levels and a query layer, but mm_vision_select_layer lists "
                f"only {len(layers)} layers ({layers})."
            )
        # The official block reads the first num_levels selected layers as levels and the last as the query.
        fuser_kwargs["fuser_layers"] = layers[:num_levels] + [layers[-1]]
        fuser_kwargs.setdefault("fuser_layer_norm_eps", 1e-6)
        base_layer = layers[-1]
    else:
        # IGVA always drops the CLS token of the base layer and reads the groups' CLS rows itself.
        strategy = "default"
        base_layer = raw.get("vit_base_layer", -2)
        fuser_kwargs["fuser_layer_groups"] = parse_groups_literal(raw.get("vit_aggregate_groups"))
        if variant == "igva":
            for option, name in (
                ("aggregator_hidden_size", "aggregator_hidden_dim"),
                ("aggregator_num_layers", "aggregator_num_transformers"),
                ("aggregator_num_heads", "aggregator_num_heads"),
            ):
                if raw.get(name) is None:
                    raise ConversionError(f"The IGVA config lacks {name}: the aggregator's size cannot be known.")
                fuser_kwargs[option] = raw[name]
            embed_dim = raw.get("sentence_embed_dim")
            if embed_dim is not None and embed_dim != encoder.model.config.hidden_size:
                raise ConversionError(
                    f"The checkpoint was trained with {embed_dim}-d sentence embeddings (sentence_embed_dim) but "
                    f"--instruction-encoder gives {encoder.model.config.hidden_size}-d ones: give the sentence "
                    f"encoder it was trained with ({raw.get('sentence_embedder')})."
                )
    if encoder is not None:
        fuser_kwargs.setdefault("instruction_pooling", encoder.pooling)
        fuser_kwargs.setdefault("instruction_embedding_normalize", encoder.normalize)
    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    llava_config = LlavaConfig(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_index,
        image_seq_length=num_patches + (1 if strategy == "full" else 0),
        vision_feature_layer=base_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    try:
        config = fused_config_from_llava(
            llava_config,
            fuser_type,
            instruction_encoder_config=encoder.model.config if encoder else None,
            **fuser_kwargs,
        )
    except ValueError as error:
        raise ConversionError(f"The checkpoint's fusion settings do not fit its vision tower: {error}") from error
    config.pad_token_id = text_config.pad_token_id
    return config


# -------------------------------------------------------------------------------------------------------- planning


def _cast(dtype: torch.dtype | None, tensor_dtype: torch.dtype) -> torch.dtype:
    return dtype if dtype is not None and tensor_dtype.is_floating_point else tensor_dtype


def _plan(name: str, tensor: OriginalTensor, dtype: torch.dtype | None, shape=None, transform=None) -> _OutputTensor:
    """An output entry for a source tensor: bytes copied when unchanged, else through `transform` and the cast."""
    target = _cast(dtype, tensor.dtype)
    shape = list(shape or tensor.shape)
    if transform is None and target == tensor.dtype and tensor.source is not None:
        return _OutputTensor(name, tensor.source.dtype, shape, tensor.source.nbytes, source=tensor.source)

    def convert(value):
        value = transform(value) if transform is not None else value
        return value.to(target)

    nbytes = math.prod(shape) * target.itemsize
    return _OutputTensor(
        name, _TORCH_TO_SAFETENSORS[target], shape, nbytes, source=tensor.source, tensor=tensor.tensor,
        transform=convert,
    )


def _append_mean_rows(new_size: int):
    """Grow a `(vocab, hidden)` matrix to `new_size` rows with copies of its mean row: a deterministic start for the
    new tokens (llava-hf samples around the same mean); `<image>` rows are never read, `<pad>` ones masked out."""

    def grow(matrix: torch.Tensor) -> torch.Tensor:
        mean = matrix.float().mean(0, keepdim=True).to(matrix.dtype)
        return torch.cat([matrix, mean.expand(new_size - matrix.shape[0], -1)])

    return grow


def plan_checkpoint(
    shards: list[OriginalShard],
    variant: str,
    config: FusedLlavaConfig,
    source_vocab: int,
    dtype: torch.dtype | None,
) -> list[PlannedShard]:
    """Per source shard, the fused entries of its tensors (renamed, embeddings grown, projector widened)."""
    new_vocab = config.text_config.vocab_size
    widen_projector = variant == "llava" and fuser_class(config.fuser_type).projector_slots(config)[1] > 1

    def widen(weight):
        return expand_projector_input(weight, config)

    planned = []
    for shard in shards:
        entries = []
        for tensor in shard.tensors:
            name = map_original_key(tensor.key, variant)
            if name is None:
                continue
            if name in EMBEDDING_KEYS and tensor.shape[0] == source_vocab and new_vocab > source_vocab:
                entry = _plan(name, tensor, dtype, [new_vocab, *tensor.shape[1:]], _append_mean_rows(new_vocab))
            elif name == PROJECTOR_INPUT_KEY and widen_projector:
                shape = expand_projector_input(torch.empty(tensor.shape, device="meta"), config).shape
                entry = _plan(name, tensor, dtype, shape, widen)
            else:
                entry = _plan(name, tensor, dtype)
            entries.append(entry)
        planned.append(_planned_shard(entries, shard))
    return planned


def _planned_shard(entries: list[_OutputTensor], shard: OriginalShard) -> PlannedShard:
    if shard.is_safetensors:
        return PlannedShard(entries, shard.path, shard.metadata)
    return PlannedShard(entries)


def plan_vision_tower(shards: list[OriginalShard], dtype: torch.dtype | None) -> list[PlannedShard]:
    """The vision tensors of a CLIP checkpoint (a full CLIPModel, or a CLIPVisionModel with or without the
    `vision_model.` prefix of older transformers) as the fused tower."""
    planned = []
    for shard in shards:
        entries = [
            _plan(TOWER_PREFIX + tensor.key.removeprefix("vision_model."), tensor, dtype)
            for tensor in shard.tensors
            if tensor.key.split(".")[0] not in _CLIP_TEXT_PARTS and not _RECOMPUTED_BUFFER.search(tensor.key)
        ]
        planned.append(_planned_shard(entries, shard))
    return planned


def plan_new_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> list[_OutputTensor]:
    """Entries for tensors made in memory (fresh fuser weights, the sentence encoder's)."""
    entries = []
    for name, tensor in tensors.items():
        tensor = tensor.detach().to(_cast(dtype, tensor.dtype)).contiguous()
        entries.append(
            _OutputTensor(name, _TORCH_TO_SAFETENSORS[tensor.dtype], list(tensor.shape),
                          tensor.numel() * tensor.element_size(), tensor=tensor)
        )
    return entries


def check_keys(config: FusedLlavaConfig, planned: list[PlannedShard], variant: str, folder: Path) -> None:
    """Refuse, before anything is written, a plan that is not exactly the fused model's tensors: the error lists the
    unexpected and the missing keys under their original names, and the tensors of the wrong shape."""
    unexpected, missing, wrong = plan_mismatches(config, planned)
    unexpected = [original_key(name, variant) for name in unexpected]
    missing = [original_key(name, variant) for name in missing]
    wrong = [f"{original_key(name, variant)} {shape} (expected {expected})" for name, shape, expected in wrong]
    if unexpected or missing or wrong:
        details = []
        if unexpected:
            details.append(f"{len(unexpected)} unexpected keys: {_listed(unexpected)}")
        if missing:
            details.append(f"{len(missing)} missing keys: {_listed(missing)}")
        if wrong:
            details.append(f"{len(wrong)} tensors of the wrong shape: {_listed(wrong)}")
        raise ConversionError(
            f"{folder} does not match the {variant!r} layout its config.json describes ({VARIANT_ORIGINS[variant]}): "
            + "; ".join(details)
            + f". Supported layouts: {', '.join(VARIANTS)} (see the README section 'Import original-format "
            "checkpoints'); a checkpoint of another LLaVA fork cannot be imported."
        )


# --------------------------------------------------------------------------------------------------------- verify


def verify_original_conversion(
    output: Path, source: Path, text_config, dtype: torch.dtype | None
) -> tuple[float, float]:
    """What can be checked without the original code: the converted model, loaded as users load it, answers an
    image and prompt with finite logits, and on text alone gives the logits of the source's LLM loaded with
    transformers from the source folder (its original vocabulary). Returns (max |diff|, tolerance)."""
    dtype = dtype or torch.float32
    tolerance = VERIFY_TOLERANCES[dtype]
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    inputs = processor(
        images=verification_image(), text=build_prompt(processor, VERIFY_QUESTION), return_tensors="pt"
    )
    text_ids = processor.tokenizer(VERIFY_QUESTION, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True, dtype=dtype).eval()
        image_logits = model(**inputs).logits
        actual = model(input_ids=text_ids).logits.float()[..., : text_config.vocab_size]
        del model
        llm = AutoModelForCausalLM.from_pretrained(source, config=text_config, dtype=dtype).eval()
        expected = llm(input_ids=text_ids).logits.float()
        del llm
    if not torch.isfinite(image_logits).all():
        raise VerificationError("--verify: the converted model gives non-finite logits for an image and prompt.")
    difference = (actual - expected).abs()
    max_diff = difference.max().item()
    if not bool((difference <= tolerance * expected.abs().clamp_min(1.0)).all()):
        raise VerificationError(
            f"--verify failed: on text alone the converted model's logits differ from the source LLM's by up to "
            f"{max_diff:.3g} (tolerance {tolerance:g} x max(1, |logit|)). The output was not written."
        )
    return max_diff, tolerance


# -------------------------------------------------------------------------------------------------------- convert


def convert_original_checkpoint(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    vision_tower: str | os.PathLike | None = None,
    instruction_encoder: str | os.PathLike | None = None,
    fuser_type: str | None = None,
    fuser_layers: list[int] | None = None,
    fuser_layer_groups: list[list[int]] | None = None,
    fuser_options: dict | None = None,
    dtype: str | torch.dtype | None = None,
    verify: bool = False,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    base_model: str | None = None,
    progress: bool = True,
) -> ConversionResult:
    """Convert an original-format LLaVA checkpoint (plain, MMFuser or IGVA) into a fused one; see the module
    docstring.

    Args:
        input: checkpoint folder or Hub repo id.
        output: folder to create (must not exist or be empty, unless `overwrite`).
        vision_tower: folder or Hub id of the CLIP model named by the checkpoint's `mm_vision_tower` (config, image
            processor and, unless the checkpoint holds its own tower, weights).
        instruction_encoder: sentence-transformers folder or Hub id of IGVA's sentence encoder.
        fuser_type: for a plain LLaVA, the fuser to add with parity initialisation (default `none`); for MMFuser and
            IGVA checkpoints it is fixed by the checkpoint.
        fuser_layers, fuser_layer_groups, fuser_options: further `FusedLlavaConfig` fields, as `fusedvlm-convert`.
        dtype: `"float32"`, `"bfloat16"` or `"float16"` to cast floating tensors; default keeps the source's.
        verify: check the result before moving it into place (see `verify_original_conversion`).
        push_to_hub, private, base_model, progress: as `convert_llava_checkpoint`.
    """
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"Unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    if fuser_type is not None and fuser_type not in FUSERS:
        raise ConversionError(f"Unknown fuser {fuser_type!r}: choose one of {', '.join(FUSERS)}.")
    output = Path(output).expanduser().resolve()
    local_input = Path(input).expanduser()
    _check_output(output, overwrite, [local_input.resolve()] if local_input.is_dir() else [])

    source, repo_id = resolve_original(input, "--input")
    raw = read_original_config(source)
    shards = read_shards(source, "--input")
    keys = {tensor.key: tensor.shape for shard in shards for tensor in shard.tensors}
    variant = detect_variant(raw, set(keys))
    fuser_type = _fuser_for_variant(variant, fuser_type)
    tower_inside = any(key.startswith("model.vision_tower.vision_tower.") for key in keys)

    tower_name = raw.get("mm_vision_tower")
    if vision_tower is None:
        where = (
            "its tower weights are inside, but not the tower's config and image processor"
            if tower_inside
            else "it holds no vision tower (no model.vision_tower.vision_tower.* weights)"
        )
        raise ConversionError(
            f"{source}: {where}. Its config names mm_vision_tower {tower_name!r}: pass --vision-tower with that "
            "CLIP model's folder or Hub id (e.g. --vision-tower openai/clip-vit-large-patch14-336)."
        )
    tower_folder, tower_repo = resolve_original(vision_tower, "--vision-tower")
    vision_config, image_processor = read_vision_tower(tower_folder, str(vision_tower))
    image_processor.do_pad = raw.get("image_aspect_ratio") == "pad"

    encoder = encoder_name = None
    if FUSERS[fuser_type].reads_instruction:
        if instruction_encoder is None:
            trained = raw.get("sentence_embedder")
            trained = f" (the checkpoint was trained with {trained})" if trained else ""
            raise ConversionError(
                f"The {variant} checkpoint embeds the user's instruction: pass --instruction-encoder with the "
                f"sentence-transformers folder or Hub id of its sentence encoder{trained}, e.g. "
                "sentence-transformers/all-mpnet-base-v2."
            )
        encoder_folder, encoder_repo = resolve_checkpoint(instruction_encoder, "--instruction-encoder")
        encoder = load_sentence_encoder(encoder_folder, dtype)
        encoder_name = encoder_repo or encoder_folder.name
    elif instruction_encoder is not None:
        raise ConversionError(f"--instruction-encoder is only used by IGVA (fuser igva), not by {fuser_type}: drop it.")

    embed_key = "model.embed_tokens.weight"
    if embed_key not in keys:
        raise ConversionError(f"{source} has no {embed_key}: it is not a LLaVA checkpoint ({_listed(keys)}).")
    source_vocab = keys[embed_key][0]
    tokenizer = _load_tokenizer(source)
    image_token_index, pad_token_id, new_vocab = add_llava_tokens(tokenizer, source_vocab)
    text_config = text_config_from_original(raw, new_vocab, pad_token_id)

    if variant != "llava" and (fuser_layers is not None or fuser_layer_groups is not None):
        raise ConversionError(
            f"The layers of a trained {variant} checkpoint are fixed by its config: drop --fuser-layers and "
            "--fuser-groups."
        )
    fuser_kwargs = dict(fuser_options or {})
    if fuser_layers is not None:
        fuser_kwargs["fuser_layers"] = fuser_layers
    if fuser_layer_groups is not None:
        fuser_kwargs["fuser_layer_groups"] = fuser_layer_groups
    config = fused_config_from_original(
        raw, variant, keys, text_config, vision_config, image_token_index, fuser_type, encoder, fuser_kwargs
    )
    source_dtype = raw.get("torch_dtype") or raw.get("dtype")
    config.dtype = dtype or (DTYPES.get(source_dtype) if source_dtype else None)

    planned = plan_checkpoint(shards, variant, config, source_vocab, dtype)
    if not tower_inside:
        planned += plan_vision_tower(read_shards(tower_folder, "--vision-tower"), dtype)
    new_tensors = []
    if variant == "llava":
        new_tensors += plan_new_tensors(new_fuser_tensors(config, seed=0), dtype)
    if encoder is not None and not any(key.startswith("model.sentence_embedder.") for key in keys):
        encoder_state = encoder.model.state_dict()
        new_tensors += plan_new_tensors({INSTRUCTION_ENCODER_PREFIX + k: v for k, v in encoder_state.items()}, dtype)
    planned = [shard for shard in planned if shard.entries]
    if new_tensors:
        planned.append(PlannedShard(new_tensors))
    check_keys(config, planned, variant, source)

    staging = staging_folder(output)
    try:
        total_bytes = write_shards(staging, planned, progress)
        _write_remote_code(config, staging)
        generation_config = (
            GenerationConfig.from_pretrained(source)
            if (source / "generation_config.json").is_file()
            else GenerationConfig.from_model_config(text_config)
        )
        generation_config.pad_token_id = pad_token_id
        generation_config.save_pretrained(staging)
        processor = FusedLlavaProcessor(
            image_processor=image_processor,
            tokenizer=tokenizer,
            instruction_tokenizer=encoder.tokenizer if encoder else None,
            patch_size=vision_config.patch_size,
            vision_feature_select_strategy=config.vision_feature_select_strategy,
            chat_template=LLAVA_V1_CHAT_TEMPLATE,
            num_additional_image_tokens=1,
        )
        processor.save_pretrained(staging)
        origin = base_model or repo_id or source.name
        license, license_link = _source_license(source)
        # The fuser's size: fresh weights for a plain LLaVA, the trained ones for MMFuser and IGVA.
        new_parameters = sum(
            math.prod(entry.shape)
            for shard in planned
            for entry in shard.entries
            if entry.name.startswith(FUSER_PREFIX)
        )
        card = render_model_card(
            config,
            model_id=push_to_hub or output.name,
            base_model=base_model or repo_id,
            license=license,
            license_link=license_link,
            instruction_encoder=encoder_name,
            new_parameters=new_parameters,
            convert_command=_card_command(origin, tower_repo or tower_folder.name, encoder_name, fuser_type, variant),
            imported_from=None if variant == "llava" else VARIANT_ORIGINS[variant],
        )
        card.save(staging / "README.md")
        result = ConversionResult(
            output=output,
            fuser_type=fuser_type,
            num_shards=len(planned),
            num_tensors_copied=sum(len(shard.tensors) for shard in shards),
            num_new_tensors=len(new_tensors),
            new_parameters=new_parameters,
            total_bytes=total_bytes,
            dtype=str(config.dtype).removeprefix("torch.") if config.dtype is not None else None,
        )
        if verify:
            source_text_config = text_config_from_original(raw, source_vocab, raw.get("pad_token_id"))
            result.verify_max_abs_diff, result.verify_tolerance = verify_original_conversion(
                staging, source, source_text_config, dtype
            )
        _check_output(output, overwrite, [])  # nothing appeared there meanwhile
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return publish_result(result, push_to_hub, private, f"Import {variant} LLaVA from {origin}")


def _fuser_for_variant(variant: str, fuser_type: str | None) -> str:
    """The fuser of the result: fixed by a trained fusion checkpoint, the user's choice (default none) for LLaVA."""
    if variant == "llava":
        return fuser_type or "none"
    fixed = VARIANT_FUSERS[variant]
    if fuser_type not in (None, fixed):
        raise ConversionError(
            f"The checkpoint is a trained {variant} model ({VARIANT_ORIGINS[variant]}): it converts to fuser {fixed}, "
            f"not {fuser_type}. Drop --fuser."
        )
    return fixed


def _load_tokenizer(source: Path):
    try:
        return AutoTokenizer.from_pretrained(source)
    except Exception as error:
        raise ConversionError(
            f"Could not load the LLM tokenizer from {source} ({type(error).__name__}: {error}): original LLaVA "
            "checkpoints ship tokenizer.model or tokenizer.json with tokenizer_config.json; download them with the "
            "weights."
        ) from error


def _card_command(input, vision_tower, instruction_encoder, fuser_type, variant) -> str:
    """The conversion command for the model card, naming Hub ids (or folder names), never local paths."""
    parts = ["fusedvlm-convert-original", "--input", str(input), "--output", "OUTPUT", "--vision-tower",
             str(vision_tower)]
    if instruction_encoder is not None:
        parts += ["--instruction-encoder", str(instruction_encoder)]
    if variant == "llava" and fuser_type != "none":
        parts += ["--fuser", fuser_type]
    return shlex.join(parts)


# ------------------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedvlm-convert-original",
        description=(
            "Import an original-format LLaVA checkpoint (haotian-liu/LLaVA layout: plain LLaVA-1.5, or trained with "
            "the official MMFuser or IGVA code) as a fused LLaVA loadable with trust_remote_code=True. The variant "
            "is recognised from config.json and the weight names."
        ),
        epilog=(
            "Examples: fusedvlm-convert-original --input liuhaotian/llava-v1.5-7b --output ./llava-1.5-7b-fused "
            "--vision-tower openai/clip-vit-large-patch14-336 --verify;  fusedvlm-convert-original --input "
            "./igva-7b --output ./igva-7b-fused --vision-tower openai/clip-vit-large-patch14-336 "
            "--instruction-encoder sentence-transformers/all-mpnet-base-v2"
        ),
    )
    parser.add_argument("--input", required=True, help="original-format checkpoint folder or Hub repo id")
    parser.add_argument("--output", required=True, help="folder to create")
    parser.add_argument("--vision-tower", help="the CLIP model named by mm_vision_tower: folder or Hub repo id")
    parser.add_argument("--instruction-encoder", help="IGVA's sentence-transformers encoder: folder or Hub repo id")
    parser.add_argument("--fuser", choices=list(FUSERS), help="fuser for a plain LLaVA (default none); fixed otherwise")
    parser.add_argument("--fuser-layers", help="with --fuser mmfuser/concat: vision hidden-state indices")
    parser.add_argument("--fuser-groups", help='with --fuser igva/average: layer groups, e.g. "1,2,3;4,5,6"')
    parser.add_argument("--fuser-option", action="append", metavar="NAME=VALUE", help="other fuser config fields")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="cast floating weights (default: keep the source's)")
    parser.add_argument("--verify", action="store_true",
                        help="load the result, check an image prompt and compare text-only logits with the source LLM")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the result to this Hub repo in one commit")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private (with --push-to-hub)")
    parser.add_argument("--base-model", metavar="REPO_ID", help="Hub id of a local --input, for the model card")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.private and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub")
    return run_conversion_command(
        lambda: convert_original_checkpoint(
            args.input,
            args.output,
            vision_tower=args.vision_tower,
            instruction_encoder=args.instruction_encoder,
            fuser_type=args.fuser,
            fuser_layers=parse_layers(args.fuser_layers),
            fuser_layer_groups=parse_groups(args.fuser_groups),
            fuser_options=parse_fuser_options(args.fuser_option),
            dtype=args.dtype,
            verify=args.verify,
            overwrite=args.overwrite,
            push_to_hub=args.push_to_hub,
            private=args.private,
            base_model=args.base_model,
            progress=not args.no_progress,
        )
    )


if __name__ == "__main__":
    sys.exit(main())
