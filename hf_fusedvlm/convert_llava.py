"""Streaming conversion of llava-hf checkpoints into fused LLaVA checkpoints (the `fusedvlm-convert` command).

The pipeline is plain: read the source config, build the fused config, then for each safetensors shard read its
header, map the keys to the fused model's names, and write the shard again with every tensor's bytes copied
unchanged (only `model.multi_modal_projector.linear_1.weight` is widened, see `converting.expand_projector_input`);
the new fuser tensors (and igva's instruction encoder) go into one extra shard; then the index, the config with
`auto_map`, the remote-code files, the generation config, the processor and a model card. Tensor bytes are copied in
fixed-size chunks, so memory stays far below one shard whatever the model size.

Everything is written to a hidden temporary folder beside `--output` and moved into place only when it is complete
(and verified, with `--verify`); a failing or interrupted conversion removes it (a `SIGKILL` can leave a hidden
`.NAME.converting-*` folder behind, never a partial `--output`).

This module is not remote code: it may use safetensors, huggingface_hub and tqdm. It is the logic behind
`conversion/convert_llava_to_fused.py`.
"""

import argparse
import contextlib
import json
import math
import os
import shlex
import shutil
import signal
import struct
import sys
import tempfile
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard, ModelCardData, snapshot_download
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import (
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    AutoTokenizer,
    GenerationConfig,
    LlavaConfig,
    LlavaForConditionalGeneration,
    LlavaProcessor,
)
from transformers.dynamic_module_utils import custom_object_save

from .configuration_fused_llava import FusedLlavaConfig
from .converting import (
    INSTRUCTION_ENCODER_PREFIX,
    PROJECTOR_INPUT_KEY,
    expand_projector_input,
    fused_config_from_llava,
    llava_checkpoint_key,
    new_fuser_tensors,
)
from .fusers import FUSERS, fuser_class
from .modeling_fused_llava import FusedLlavaForConditionalGeneration
from .processing_fused_llava import FusedLlavaProcessor


DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
# `--verify` passes when |fused - source| <= tolerance * max(1, |source|) for every logit. float32 runs the same
# arithmetic up to the order of the projector's sums (zero columns added); bf16 / fp16 round every layer's output, so
# one rounding step of difference in the projector can move a logit by a few units in the last place.
VERIFY_TOLERANCES = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 5e-2}
VERIFY_QUESTION = "What is shown in this image?"
SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
_COPY_CHUNK = 64 * 1024 * 1024
_MAX_HEADER = 100 * 1024 * 1024
_SAFETENSORS_DTYPES = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "U16": torch.uint16,
    "U32": torch.uint32,
    "U64": torch.uint64,
    "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
}
_TORCH_TO_SAFETENSORS = {dtype: name for name, dtype in _SAFETENSORS_DTYPES.items()}
_CASTABLE = ("F64", "F32", "F16", "BF16")
# Files a conversion needs from a Hub repository (weights, configs, tokenizer and processor files, card).
_HUB_PATTERNS = ["*.json", "*.safetensors", "*.jinja", "*.txt", "*.model", "*.tiktoken", "README.md"]
_MODEL_CARD_TEMPLATE = "fused_llava.md"
# FusedLlavaConfig fields `--fuser-option NAME=VALUE` may set (layers and groups have their own flags).
FUSER_OPTIONS = (
    "fuser_num_heads",
    "fuser_num_points",
    "fuser_layer_norm_eps",
    "aggregator_hidden_size",
    "aggregator_num_layers",
    "aggregator_num_heads",
    "balance_loss_weight",
    "instruction_embedding_normalize",
)

class ConversionError(ValueError):
    """A conversion that cannot proceed; the message names the problem and the fix."""


class VerificationError(ConversionError):
    """`--verify` found the converted model computing something else than the source."""


@dataclass
class _SourceTensor:
    """One tensor of a source shard: where its bytes are and what it becomes in the output."""

    key: str  # key in the source file
    name: str  # fused checkpoint key
    dtype: str  # safetensors dtype in the source
    shape: list[int]
    begin: int  # absolute byte offset in the file
    nbytes: int


@dataclass
class _SourceShard:
    path: Path
    metadata: dict | None
    tensors: list[_SourceTensor]

    @property
    def nbytes(self) -> int:
        return sum(tensor.nbytes for tensor in self.tensors)


@dataclass
class _OutputTensor:
    """A tensor to write: copied from `source` (bytes or, with `transform`, through torch) or given as `tensor`
    (through `transform` too when one is set, so that a lazily loaded tensor is only transformed when written)."""

    name: str
    dtype: str
    shape: list[int]
    nbytes: int
    source: _SourceTensor | None = None
    transform: object = None  # callable(tensor) -> tensor, applied to the source tensor or to `tensor`
    tensor: torch.Tensor | None = None


@dataclass
class PlannedShard:
    """One output shard: its entries and the safetensors file (and metadata) their unchanged bytes come from, if any."""

    entries: list[_OutputTensor]
    source_path: Path | None = None
    metadata: dict | None = None


@dataclass
class ConversionResult:
    """What `convert_llava_checkpoint` did."""

    output: Path
    fuser_type: str
    num_shards: int
    num_tensors_copied: int
    num_new_tensors: int
    new_parameters: int
    total_bytes: int
    dtype: str | None
    verify_max_abs_diff: float | None = None
    verify_tolerance: float | None = None
    commit_url: str | None = None
    files: list[str] = field(default_factory=list)


# --------------------------------------------------------------------------------------------------------- inputs


def parse_layers(text: str | None) -> list[int] | None:
    """`"3,8,13,18,23"` -> `[3, 8, 13, 18, 23]` (negative indices count from the end)."""
    if text is None:
        return None
    try:
        layers = [int(part) for part in text.split(",") if part.strip()]
    except ValueError:
        raise ConversionError(f"--fuser-layers must be comma-separated integers such as 3,8,13,18,23, got {text!r}.")
    if not layers:
        raise ConversionError("--fuser-layers is empty: give comma-separated layer indices such as 3,8,13,18,23.")
    return layers


def parse_groups(text: str | None) -> list[list[int]] | None:
    """`"1,2,3;4,5,6"` -> `[[1, 2, 3], [4, 5, 6]]`."""
    if text is None:
        return None
    try:
        groups = [
            [int(part) for part in group.split(",") if part.strip()] for group in text.split(";") if group.strip()
        ]
    except ValueError:
        raise ConversionError(
            f"--fuser-groups must be groups of comma-separated integers separated by ';' such as \"1,2,3;4,5,6\", "
            f"got {text!r}."
        )
    if not groups or any(not group for group in groups):
        raise ConversionError(f"--fuser-groups needs non-empty groups such as \"1,2,3;4,5,6\", got {text!r}.")
    return groups


def parse_fuser_options(items: list[str] | None) -> dict:
    """`["aggregator_hidden_size=256", "fuser_num_heads=8"]` -> `{"aggregator_hidden_size": 256, ...}` (values are
    parsed as JSON)."""
    options = {}
    for item in items or []:
        name, separator, value = item.partition("=")
        if not separator or name not in FUSER_OPTIONS:
            raise ConversionError(
                f"--fuser-option takes NAME=VALUE with NAME one of {', '.join(FUSER_OPTIONS)}, got {item!r}."
            )
        try:
            options[name] = json.loads(value)
        except json.JSONDecodeError:
            raise ConversionError(f"--fuser-option {name} needs a number or true/false, got {value!r}.")
    return options


def resolve_checkpoint(
    path_or_repo_id: str | os.PathLike, what: str = "--input", allow_patterns: list[str] | None = None
) -> tuple[Path, str | None]:
    """A local folder for `path_or_repo_id` and the Hub repo id it came from (None for a local folder).

    A local folder is used as is; anything else is taken as a Hub repo id and its weights, configs, tokenizer and
    processor files (or the files matching `allow_patterns`) are downloaded (to the Hugging Face cache)."""
    path = Path(path_or_repo_id).expanduser()
    if path.is_dir():
        return path.resolve(), _repo_id_of_cache_snapshot(path.resolve())
    text = str(path_or_repo_id)
    if path.exists():
        raise ConversionError(f"{what} {text} is a file: give the checkpoint's folder or a Hub repo id.")
    if text.startswith((".", "/", "~")) or text.count("/") > 1 or os.sep in text.replace("/", ""):
        raise ConversionError(f"{what} {text} does not exist: give an existing checkpoint folder or a Hub repo id.")
    try:
        folder = snapshot_download(text, allow_patterns=allow_patterns or _HUB_PATTERNS)
    except Exception as error:  # huggingface_hub raises many kinds; all mean the same to the user
        raise ConversionError(
            f"{what} {text} is neither a local folder nor a Hub repo that could be downloaded "
            f"({type(error).__name__}: {error}). Check the path or repo id, your connection, and `hf auth login` "
            "for gated or private repos."
        ) from error
    return Path(folder), text


def _repo_id_of_cache_snapshot(path: Path) -> str | None:
    """`org/name` for a folder inside the Hugging Face cache (`models--org--name/snapshots/<sha>`), else None."""
    parts = path.parts
    if len(parts) >= 3 and parts[-2] == "snapshots" and parts[-3].startswith("models--"):
        return parts[-3].removeprefix("models--").replace("--", "/")
    return None


def read_config_json(folder: Path, expected: str) -> dict:
    """The raw config.json of a source checkpoint; `expected` (e.g. "a llava-hf checkpoint folder (or Hub repo) such
    as llava-hf/llava-1.5-7b-hf") completes the error message when there is none."""
    config_file = folder / "config.json"
    if not config_file.is_file():
        raise ConversionError(f"{folder} has no config.json: --input must be {expected}.")
    try:
        return json.loads(config_file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as error:
        raise ConversionError(f"{config_file} is not valid JSON ({error}).") from error


def read_llava_config(folder: Path) -> LlavaConfig:
    """The source's `LlavaConfig`, or a `ConversionError` saying why it is not a llava-hf checkpoint."""
    raw = read_config_json(folder, "a llava-hf checkpoint folder (or Hub repo) such as llava-hf/llava-1.5-7b-hf")
    model_type = raw.get("model_type")
    if model_type == FusedLlavaConfig.model_type:
        raise ConversionError(f"{folder} is already a fused LLaVA checkpoint (model_type 'fused_llava').")
    if model_type != "llava":
        hint = (
            " Original LLaVA checkpoints (model_type 'llava_llama') must first be converted to the llava-hf format "
            "with transformers' models/llava/convert_llava_weights_to_hf.py."
            if model_type in ("llava_llama", "llava_mistral", "llava_mpt")
            else ""
        )
        raise ConversionError(
            f"{folder} is not a LLaVA checkpoint: its config.json has model_type {model_type!r} (architectures "
            f"{raw.get('architectures')}), expected 'llava' (LlavaForConditionalGeneration, e.g. "
            f"llava-hf/llava-1.5-7b-hf).{hint}"
        )
    return LlavaConfig.from_pretrained(folder)


def read_safetensors_header(path: Path) -> tuple[dict | None, dict[str, dict], int]:
    """`(metadata, {key: {"dtype", "shape", "data_offsets"}}, data_start)` of a safetensors file, checked against the
    file's size so that truncated or corrupt shards are refused before anything is written."""
    size = path.stat().st_size
    fix = "re-download or re-save the checkpoint"
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ConversionError(f"{path} is truncated ({size} bytes, not even a safetensors header): {fix}.")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(size - 8, _MAX_HEADER):
            raise ConversionError(
                f"{path} is truncated or not a safetensors file (its header claims {header_size} bytes, the file has "
                f"{size}): {fix}."
            )
        try:
            header = json.loads(file.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConversionError(f"{path} has a corrupt safetensors header ({error}): {fix}.") from error
    if not isinstance(header, dict):
        raise ConversionError(f"{path} has a corrupt safetensors header (not a JSON object): {fix}.")
    metadata = header.pop("__metadata__", None)
    data_start = 8 + header_size
    spans = []
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            expected = math.prod(shape) * _SAFETENSORS_DTYPES[dtype].itemsize
        except (KeyError, TypeError, ValueError) as error:
            raise ConversionError(
                f"{path}: tensor {key!r} has a corrupt or unsupported entry {info!r}: {fix}."
            ) from error
        if end - begin != expected or begin < 0:
            raise ConversionError(
                f"{path}: tensor {key!r} spans {end - begin} bytes, its shape needs {expected}: {fix}."
            )
        spans.append((begin, end))
    spans.sort()
    position = 0
    for begin, end in spans:
        if begin != position:
            raise ConversionError(
                f"{path} has overlapping or missing tensor data (offset {begin}, expected {position}): {fix}."
            )
        position = end
    if data_start + position != size:
        state = "truncated" if data_start + position > size else "longer than its header says"
        raise ConversionError(
            f"{path} is {state}: the header needs {data_start + position} bytes, the file has {size}: {fix}."
        )
    return metadata, header, data_start


def read_source_shards(folder: Path) -> list[_SourceShard]:
    """The source's safetensors shards with their tensors mapped to fused checkpoint names, all headers checked."""
    index_file = folder / SAFETENSORS_INDEX
    if index_file.is_file():
        try:
            weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ConversionError(f"{index_file} is corrupt ({error}): re-download the checkpoint.") from error
        shard_names = sorted(set(weight_map.values()))
        missing = [name for name in shard_names if not (folder / name).is_file()]
        if missing:
            raise ConversionError(
                f"{folder} is missing {len(missing)} of the {len(shard_names)} shards listed in {SAFETENSORS_INDEX}: "
                f"{', '.join(missing)}. Download the complete checkpoint (e.g. `hf download REPO_ID`) and retry."
            )
    elif (folder / SAFETENSORS_SINGLE).is_file():
        weight_map, shard_names = None, [SAFETENSORS_SINGLE]
    else:
        found = sorted(path.name for path in folder.glob("*.bin")) + sorted(path.name for path in folder.glob("*.pt"))
        detail = (
            f" It has PyTorch pickles ({', '.join(found[:3])}): load it with LlavaForConditionalGeneration and "
            "save_pretrained() it (safetensors is the default) first."
            if found
            else ""
        )
        raise ConversionError(f"{folder} has no {SAFETENSORS_INDEX} or {SAFETENSORS_SINGLE}: only safetensors "
                              f"checkpoints can be converted.{detail}")

    shards, seen = [], {}
    for shard_name in shard_names:
        path = folder / shard_name
        metadata, header, data_start = read_safetensors_header(path)
        if weight_map is not None:
            listed = [key for key, name in weight_map.items() if name == shard_name and key not in header]
            if listed:
                raise ConversionError(
                    f"{path} lacks {len(listed)} tensors that {SAFETENSORS_INDEX} puts there (e.g. {listed[0]}): the "
                    "shard is corrupt or from another checkpoint; re-download it."
                )
        tensors = []
        for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0]):
            name = llava_checkpoint_key(key)
            if name in seen:
                raise ConversionError(f"{key!r} in {shard_name} and {seen[name]!r} are the same tensor ({name}).")
            seen[name] = key
            begin, end = info["data_offsets"]
            tensors.append(
                _SourceTensor(key, name, info["dtype"], list(info["shape"]), data_start + begin, end - begin)
            )
        shards.append(_SourceShard(path, metadata, tensors))
    return shards


def load_instruction_encoder(folder: Path, dtype: torch.dtype | None):
    """(encoder model, its tokenizer) from a sentence-encoder folder (e.g. all-mpnet-base-v2)."""
    try:
        encoder = AutoModel.from_pretrained(folder, dtype=dtype or "auto")
        tokenizer = AutoTokenizer.from_pretrained(folder)
    except Exception as error:
        raise ConversionError(
            f"--instruction-encoder {folder} could not be loaded as a text encoder with AutoModel and AutoTokenizer "
            f"({type(error).__name__}: {error}). Give a sentence encoder such as "
            "sentence-transformers/all-mpnet-base-v2."
        ) from error
    return encoder.eval(), tokenizer


# -------------------------------------------------------------------------------------------------------- planning


def _tensor_bytes(tensor: torch.Tensor):
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _output_tensor(name: str, tensor: torch.Tensor) -> _OutputTensor:
    if tensor.dtype not in _TORCH_TO_SAFETENSORS:
        raise ConversionError(f"Tensor {name} has dtype {tensor.dtype}, which safetensors cannot store.")
    return _OutputTensor(
        name, _TORCH_TO_SAFETENSORS[tensor.dtype], list(tensor.shape), tensor.numel() * tensor.element_size(),
        tensor=tensor,
    )


def _plan_source_tensor(source: _SourceTensor, config: FusedLlavaConfig, dtype: torch.dtype | None) -> _OutputTensor:
    """The output of one source tensor: its bytes unchanged, cast to `dtype` (when given and floating), and the
    projector's input weight widened."""
    target = _TORCH_TO_SAFETENSORS[dtype] if dtype is not None and source.dtype in _CASTABLE else source.dtype
    shape = list(source.shape)
    if source.name == PROJECTOR_INPUT_KEY:
        probe = expand_projector_input(torch.empty(shape, dtype=torch.float32, device="meta"), config)
        shape = list(probe.shape)

        def transform(tensor):
            return expand_projector_input(tensor, config).to(_SAFETENSORS_DTYPES[target])

    elif target != source.dtype:

        def transform(tensor):
            return tensor.to(_SAFETENSORS_DTYPES[target])

    else:
        transform = None
    nbytes = math.prod(shape) * _SAFETENSORS_DTYPES[target].itemsize
    return _OutputTensor(source.name, target, shape, nbytes, source=source, transform=transform)


def plan_mismatches(
    config: FusedLlavaConfig, planned: list[PlannedShard]
) -> tuple[list[str], list[str], list[tuple[str, list[int], list[int]]]]:
    """How a plan differs from the fused model's tensors: (unexpected names, missing names, (name, planned shape,
    expected shape) of wrong shapes). A tied parameter may be stored under one of its names only."""
    with torch.device("meta"):
        model = FusedLlavaForConditionalGeneration(config)
    state = model.state_dict(keep_vars=True)
    aliases = {}
    for name, tensor in state.items():
        aliases.setdefault(id(tensor), []).append(name)
    shapes = {entry.name: entry.shape for shard in planned for entry in shard.entries}
    unexpected = sorted(set(shapes) - set(state))
    missing = [
        name for name in sorted(set(state) - set(shapes)) if not any(a in shapes for a in aliases[id(state[name])])
    ]
    wrong = [
        (name, shapes[name], list(state[name].shape))
        for name in sorted(set(shapes) & set(state))
        if shapes[name] != list(state[name].shape)
    ]
    return unexpected, missing, wrong


def _check_against_model(config: FusedLlavaConfig, planned: list[PlannedShard]) -> None:
    """Refuse a plan whose tensors are not exactly the fused model's (names and shapes), before anything is written."""
    unexpected, missing, wrong = plan_mismatches(config, planned)
    if unexpected or missing or wrong:
        details = []
        if unexpected:
            details.append(f"{len(unexpected)} tensors the fused model does not have (e.g. {unexpected[0]})")
        if missing:
            details.append(f"{len(missing)} parameters the checkpoint lacks (e.g. {missing[0]})")
        if wrong:
            name, planned_shape, expected_shape = wrong[0]
            details.append(
                f"{len(wrong)} tensors of the wrong shape (e.g. {name}: {planned_shape}, expected {expected_shape})"
            )
        raise ConversionError(
            "The source checkpoint does not match its config.json: " + "; ".join(details) + ". Convert an unmodified "
            "llava-hf LlavaForConditionalGeneration checkpoint."
        )


# --------------------------------------------------------------------------------------------------------- writing


def _write_shard(path: Path, entries: list[_OutputTensor], metadata: dict | None, source_path: Path | None, progress):
    """Write one safetensors file tensor by tensor: bytes of unchanged tensors are copied in chunks from the source
    file, transformed and new tensors are serialised one at a time (aligned, largest items first, as safetensors)."""
    entries = sorted(
        entries,
        key=lambda entry: (-_SAFETENSORS_DTYPES[entry.dtype].itemsize, entry.source.begin if entry.source else 0),
    )
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for entry in entries:
        header[entry.name] = {
            "dtype": entry.dtype, "shape": entry.shape, "data_offsets": [offset, offset + entry.nbytes]
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    buffer = memoryview(bytearray(_COPY_CHUNK))
    source_context = open(source_path, "rb") if source_path else contextlib.nullcontext()
    with open(path, "wb") as out, source_context as source_file:
        transformed_sources = any(entry.transform and entry.tensor is None for entry in entries)
        reader = safe_open(source_path, framework="pt") if source_path and transformed_sources else None
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for entry in entries:
            if entry.tensor is not None or entry.transform is not None:
                tensor = entry.tensor if entry.tensor is not None else reader.get_tensor(entry.source.key)
                if entry.transform is not None:
                    tensor = entry.transform(tensor)
                data = _tensor_bytes(tensor)
                if data.nbytes != entry.nbytes:
                    raise ConversionError(
                        f"Internal error: {entry.name} has {data.nbytes} bytes, planned {entry.nbytes}."
                    )
                out.write(data)
                progress.update(entry.nbytes)
                continue
            source_file.seek(entry.source.begin)
            remaining = entry.nbytes
            while remaining:
                count = source_file.readinto(buffer[: min(remaining, _COPY_CHUNK)])
                if not count:
                    raise ConversionError(
                        f"{source_path} ended early while reading {entry.source.key}: re-download it."
                    )
                out.write(buffer[:count])
                remaining -= count
                progress.update(count)


def _shard_name(index: int, total: int) -> str:
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def write_shards(folder: Path, planned: list[PlannedShard], progress: bool) -> int:
    """Write the shards and their index into `folder`; returns the bytes written."""
    total_bytes = sum(entry.nbytes for shard in planned for entry in shard.entries)
    weight_map = {}
    with tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress,
              desc="Converting") as bar:
        for index, shard in enumerate(planned):
            name = _shard_name(index + 1, len(planned))
            bar.set_description(f"Shard {index + 1}/{len(planned)}")
            _write_shard(folder / name, shard.entries, shard.metadata, shard.source_path, bar)
            weight_map.update({entry.name: name for entry in shard.entries})
    index_data = {
        "metadata": {
            "total_size": total_bytes,
            "total_parameters": sum(math.prod(entry.shape) for shard in planned for entry in shard.entries),
        },
        "weight_map": dict(sorted(weight_map.items())),
    }
    (folder / SAFETENSORS_INDEX).write_text(json.dumps(index_data, indent=2) + "\n", encoding="utf-8")
    return total_bytes


def staging_folder(output: Path) -> Path:
    """A new hidden folder beside `output` (same file system, so the final move is a rename), with the mode a plain
    mkdir would give."""
    output.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{output.name}.converting-", dir=output.parent))
    umask = os.umask(0)
    os.umask(umask)
    staging.chmod(0o777 & ~umask)  # mkdtemp's 0700 would become the output's mode
    return staging


def _write_remote_code(config: FusedLlavaConfig, folder: Path) -> None:
    """config.json with `auto_map` for AutoConfig, AutoModel and AutoModelForImageTextToText, and the model code
    (the modeling module and every module it imports relatively) for `trust_remote_code=True`."""
    model_class = FusedLlavaForConditionalGeneration
    class_path = f"{model_class.__module__.rsplit('.', 1)[-1]}.{model_class.__name__}"
    config.auto_map = {
        **(getattr(config, "auto_map", None) or {}),
        "AutoConfig": f"{FusedLlavaConfig.__module__.rsplit('.', 1)[-1]}.{FusedLlavaConfig.__name__}",
        "AutoModel": class_path,
        "AutoModelForImageTextToText": class_path,
    }
    config.save_pretrained(folder)
    custom_object_save(model_class, folder)


def _write_processor(source: Path, folder: Path, instruction_tokenizer) -> FusedLlavaProcessor:
    try:
        llava_processor = AutoProcessor.from_pretrained(source)
    except Exception as error:
        raise ConversionError(
            f"Could not load the source's processor from {source} ({type(error).__name__}: {error}): a llava-hf "
            "checkpoint ships its image processor, tokenizer and chat template; download them with the weights."
        ) from error
    if not isinstance(llava_processor, LlavaProcessor):
        raise ConversionError(
            f"{source} has no LlavaProcessor (AutoProcessor gave {type(llava_processor).__name__}): the checkpoint "
            "needs processor_config.json / preprocessor_config.json and its tokenizer files."
        )
    processor = FusedLlavaProcessor.from_llava_processor(llava_processor, instruction_tokenizer=instruction_tokenizer)
    processor.save_pretrained(folder)
    return processor


def _source_license(source: Path) -> tuple[str | None, str | None]:
    readme = source / "README.md"
    if not readme.is_file():
        return None, None
    try:
        data = ModelCard.load(readme).data
    except Exception:  # a malformed source card only costs the license line
        return None, None
    return data.get("license"), data.get("license_link")


def render_model_card(
    config: FusedLlavaConfig,
    *,
    model_id: str,
    base_model: str | None,
    license: str | None,
    license_link: str | None,
    instruction_encoder: str | None,
    new_parameters: int,
    convert_command: str,
    training_summary: str | None = None,
    imported_from: str | None = None,
) -> ModelCard:
    """The model card of a converted checkpoint, from `model_cards/fused_llava.md`; with `training_summary`
    (markdown), the card of a fine-tuned one, `convert_command` then being the training command; with `imported_from`
    (the code it was trained with), the card of a trained checkpoint imported from the original LLaVA format."""
    fuser = config.fuser_type
    described = fuser_class(fuser)
    tags = ["llava", "fused-llava", "multi-layer-visual-fusion", f"fuser-{fuser}", "custom_code"]
    if described.reads_instruction:
        tags.append("instruction-guided")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        license=license,
        license_link=license_link,
        tags=tags,
    )
    layers = config.fuser_layers if "fuser_layers" in described.layer_fields else None
    groups = config.fuser_layer_groups if "fuser_layer_groups" in described.layer_fields else None
    return ModelCard.from_template(
        card_data,
        template_path=str(model_card_template()),
        model_id=model_id,
        fuser_type=fuser,
        fuser_title=described.title,
        fuser_description=described.description,
        parity_reason=described.parity,
        base_layer=config.base_layer,
        fuser_layers=layers,
        fuser_layer_groups=groups,
        instruction_encoder=instruction_encoder,
        new_parameters=f"{new_parameters:,}",
        dtype=str(config.dtype).removeprefix("torch.") if config.dtype is not None else "as the base model",
        widened=described.projector_slots(config)[1] > 1,
        convert_command=convert_command,
        training_summary=training_summary,
        imported_from=imported_from,
    )


def model_card_template() -> Path:
    """`model_cards/fused_llava.md` of the source tree (the converter runs from a checkout or an editable install)."""
    package = Path(__file__).resolve().parent
    for folder in (package / "model_cards", package.parent / "model_cards"):
        if (folder / _MODEL_CARD_TEMPLATE).is_file():
            return folder / _MODEL_CARD_TEMPLATE
    raise ConversionError(
        f"The model card template {_MODEL_CARD_TEMPLATE} was not found next to the package: run the converter from "
        "a checkout of hf-fusedvlm (or an editable install, `pip install -e .`)."
    )


# --------------------------------------------------------------------------------------------------------- verify


def verification_image(size: int = 64):
    """A deterministic non-square RGB test image (no download)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(size, size * 3 // 4, 3, generator=generator) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


def build_prompt(processor, question: str) -> str:
    """The chat-template prompt of one image and `question` (LLaVA-1.5's format without a template)."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: {processor.image_token}\n{question} ASSISTANT:"


def verify_conversion(source: Path, output: Path, dtype: torch.dtype | None = None) -> tuple[float, float]:
    """Run one image and prompt through the source LLaVA and the converted model (loaded from `output` as users load
    it, `trust_remote_code=True`); raise `VerificationError` unless the logits match. Returns (max |diff|, tolerance).

    The models are loaded one after the other, so memory peaks at one model."""
    dtype = dtype or torch.float32
    tolerance = VERIFY_TOLERANCES[dtype]
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    llava_processor = AutoProcessor.from_pretrained(source)
    image, prompt = verification_image(), build_prompt(processor, VERIFY_QUESTION)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    llava_inputs = llava_processor(images=image, text=prompt, return_tensors="pt")
    for name in ("input_ids", "pixel_values"):
        if not torch.equal(inputs[name], llava_inputs[name]):
            raise VerificationError(f"--verify: the converted processor gives other {name} than the source's.")
    with torch.inference_mode():
        model = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype).eval()
        expected = model(**llava_inputs).logits.float()
        del model
        model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True, dtype=dtype).eval()
        actual = model(**inputs).logits.float()
        del model
    difference = (actual - expected).abs()
    max_diff = difference.max().item()
    if not bool((difference <= tolerance * expected.abs().clamp_min(1.0)).all()):
        raise VerificationError(
            f"--verify failed: the converted model's logits differ from the source's by up to {max_diff:.3g} "
            f"(tolerance {tolerance:g} x max(1, |logit|) in {str(dtype).removeprefix('torch.')}). The output was not "
            "written; please report this with the command you ran."
        )
    return max_diff, tolerance


# --------------------------------------------------------------------------------------------------------- convert


def _check_output(output: Path, overwrite: bool, sources: list[Path]) -> None:
    for source in sources:
        if output == source or source.is_relative_to(output):
            raise ConversionError(f"--output {output} would overwrite the input {source}: choose another folder.")
    if output.exists() and not output.is_dir():
        raise ConversionError(f"--output {output} is a file: give a folder path.")
    if output.is_dir() and any(output.iterdir()) and not overwrite:
        raise ConversionError(
            f"--output {output} is not empty: pass --overwrite to replace it, or choose another folder."
        )


def _move_into_place(staging: Path, output: Path) -> None:
    if output.is_dir():
        old = output.parent / f".{output.name}.replaced-{uuid.uuid4().hex[:8]}"
        output.rename(old)
        staging.rename(output)
        shutil.rmtree(old, ignore_errors=True)
    else:
        staging.rename(output)


def convert_llava_checkpoint(
    input: str | os.PathLike,
    output: str | os.PathLike,
    fuser_type: str,
    *,
    fuser_layers: list[int] | None = None,
    fuser_layer_groups: list[list[int]] | None = None,
    fuser_options: dict | None = None,
    instruction_encoder: str | os.PathLike | None = None,
    dtype: str | torch.dtype | None = None,
    verify: bool = False,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    base_model: str | None = None,
    progress: bool = True,
) -> ConversionResult:
    """Convert a llava-hf `LlavaForConditionalGeneration` checkpoint into a fused one; see the module docstring.

    Args:
        input: checkpoint folder or Hub repo id.
        output: folder to create (must not exist or be empty, unless `overwrite`).
        fuser_type: one of `FUSER_TYPES`.
        fuser_layers, fuser_layer_groups: `FusedLlavaConfig` fields (defaults scale the papers' layouts to the tower).
        fuser_options: further `FusedLlavaConfig` fuser fields (`FUSER_OPTIONS`), e.g. `{"fuser_num_heads": 8}`.
        instruction_encoder: folder or Hub repo id of igva's sentence encoder (e.g. all-mpnet-base-v2).
        dtype: `"float32"`, `"bfloat16"` or `"float16"` to cast floating tensors; default keeps the source's bytes.
        verify: compare the logits of source and result for one image and prompt before moving the output in place.
        push_to_hub: repo id to upload the result to in one commit (token from `HF_TOKEN` or `hf auth login`).
        private: create the Hub repo private.
        base_model: Hub id of the source for the model card, when `input` is a local folder.
        progress: show a progress bar of shards and bytes.
    """
    if fuser_type not in FUSERS:
        raise ConversionError(f"Unknown fuser {fuser_type!r}: choose one of {', '.join(FUSERS)}.")
    reads_instruction = FUSERS[fuser_type].reads_instruction
    if isinstance(dtype, str):
        if dtype not in DTYPES:
            raise ConversionError(f"Unknown dtype {dtype!r}: choose one of {', '.join(DTYPES)}.")
        dtype = DTYPES[dtype]
    if reads_instruction and instruction_encoder is None:
        raise ConversionError(
            f"--fuser {fuser_type} embeds the user's instruction: pass --instruction-encoder with a sentence encoder "
            "folder or Hub repo id (IGVA uses sentence-transformers/all-mpnet-base-v2)."
        )
    if not reads_instruction and instruction_encoder is not None:
        raise ConversionError(
            f"--instruction-encoder is only used by --fuser {', '.join(n for n, f in FUSERS.items() if f.reads_instruction)}, not {fuser_type}: "
            "drop it."
        )
    output = Path(output).expanduser().resolve()
    local_input = Path(input).expanduser()
    _check_output(output, overwrite, [local_input.resolve()] if local_input.is_dir() else [])

    source, repo_id = resolve_checkpoint(input)
    llava_config = read_llava_config(source)
    encoder = encoder_tokenizer = encoder_name = None
    if instruction_encoder is not None:
        encoder_folder, encoder_repo = resolve_checkpoint(instruction_encoder, "--instruction-encoder")
        encoder, encoder_tokenizer = load_instruction_encoder(encoder_folder, dtype)
        encoder_name = encoder_repo or Path(instruction_encoder).name
    unknown = sorted(set(fuser_options or {}) - set(FUSER_OPTIONS))
    if unknown:
        raise ConversionError(f"Unknown fuser options {unknown}: choose among {', '.join(FUSER_OPTIONS)}.")
    fuser_kwargs = dict(fuser_options or {})
    if fuser_layers is not None:
        fuser_kwargs["fuser_layers"] = fuser_layers
    if fuser_layer_groups is not None:
        fuser_kwargs["fuser_layer_groups"] = fuser_layer_groups
    try:
        config = fused_config_from_llava(
            llava_config, fuser_type, instruction_encoder_config=encoder.config if encoder else None, **fuser_kwargs
        )
    except ValueError as error:
        raise ConversionError(f"Invalid fuser settings for this checkpoint: {error}") from error
    if dtype is not None:
        config.dtype = dtype

    source_shards = read_source_shards(source)
    try:
        planned = [
            PlannedShard([_plan_source_tensor(tensor, config, dtype) for tensor in shard.tensors], shard.path,
                         shard.metadata)
            for shard in source_shards
        ]
    except ValueError as error:
        raise ConversionError(f"Cannot widen the projector for --fuser {fuser_type}: {error}") from error
    new_tensors = [_output_tensor(name, tensor) for name, tensor in new_fuser_tensors(config, seed=0).items()]
    new_parameters = sum(math.prod(entry.shape) for entry in new_tensors)
    if encoder is not None:
        new_tensors += [
            _output_tensor(INSTRUCTION_ENCODER_PREFIX + name, tensor) for name, tensor in encoder.state_dict().items()
        ]
    if new_tensors:
        planned.append(PlannedShard(new_tensors))
    _check_against_model(config, planned)

    staging = staging_folder(output)
    try:
        total_bytes = write_shards(staging, planned, progress)
        _write_remote_code(config, staging)
        if (source / "generation_config.json").is_file():
            generation_config = GenerationConfig.from_pretrained(source)
        else:
            generation_config = GenerationConfig.from_model_config(llava_config)
        generation_config.save_pretrained(staging)
        _write_processor(source, staging, encoder_tokenizer)
        license, license_link = _source_license(source)
        card = render_model_card(
            config,
            model_id=push_to_hub or output.name,
            base_model=base_model or repo_id,
            license=license,
            license_link=license_link,
            instruction_encoder=encoder_name,
            new_parameters=new_parameters,
            convert_command=_card_command(base_model or repo_id or source.name, fuser_type, fuser_layers,
                                          fuser_layer_groups, fuser_options, encoder_name, dtype),
        )
        card.save(staging / "README.md")
        result = ConversionResult(
            output=output,
            fuser_type=fuser_type,
            num_shards=len(planned),
            num_tensors_copied=sum(len(shard.tensors) for shard in source_shards),
            num_new_tensors=len(new_tensors),
            new_parameters=new_parameters,
            total_bytes=total_bytes,
            dtype=str(config.dtype).removeprefix("torch.") if config.dtype is not None else None,
        )
        if verify:
            verify_dtype = config.dtype if isinstance(config.dtype, torch.dtype) else DTYPES.get(str(config.dtype))
            result.verify_max_abs_diff, result.verify_tolerance = verify_conversion(source, staging, verify_dtype)
        _check_output(output, overwrite, [])  # nothing appeared there meanwhile
        _move_into_place(staging, output)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    origin = base_model or repo_id or source.name
    return publish_result(result, push_to_hub, private, f"Add {fuser_type} fused LLaVA from {origin}")


def publish_result(result: ConversionResult, push_to_hub: str | None, private: bool, commit_message: str):
    """List the files of a finished conversion and, with `push_to_hub`, upload its folder in one commit."""
    output = result.output
    result.files = sorted(path.relative_to(output).as_posix() for path in output.rglob("*") if path.is_file())
    if push_to_hub:
        from .hub import push_folder_to_hub

        try:
            commit = push_folder_to_hub(output, push_to_hub, private=private, commit_message=commit_message)
        except Exception as error:
            raise ConversionError(
                f"The conversion succeeded ({output}) but pushing to {push_to_hub} failed "
                f"({type(error).__name__}: {error}). Log in with `hf auth login` (or set HF_TOKEN) and upload it with "
                f"`hf upload {push_to_hub} {output} .`."
            ) from error
        result.commit_url = commit.commit_url
    return result


def _card_command(input, fuser_type, fuser_layers, fuser_layer_groups, fuser_options, instruction_encoder,
                  dtype) -> str:
    """The conversion command for the model card, naming Hub ids (or folder names), never local paths."""
    parts = ["fusedvlm-convert", "--input", str(input), "--output", "OUTPUT", "--fuser", fuser_type]
    if fuser_layers is not None:
        parts += ["--fuser-layers", ",".join(map(str, fuser_layers))]
    if fuser_layer_groups is not None:
        parts += ["--fuser-groups", ";".join(",".join(map(str, group)) for group in fuser_layer_groups)]
    for name, value in (fuser_options or {}).items():
        parts += ["--fuser-option", f"{name}={json.dumps(value)}"]
    if instruction_encoder is not None:
        parts += ["--instruction-encoder", str(instruction_encoder)]
    if dtype is not None:
        parts += ["--dtype", str(dtype).removeprefix("torch.")]
    return shlex.join(parts)


# ------------------------------------------------------------------------------------------------------------ CLI


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="fusedvlm-convert",
        description=(
            "Convert a llava-hf LLaVA checkpoint (LlavaForConditionalGeneration, safetensors) into a fused LLaVA "
            "loadable with trust_remote_code=True. The new fuser starts so that the result computes exactly what the "
            "source computes. With --demo and no --input it converts a built-in tiny LLaVA (no download), loads the "
            "result with AutoModel + AutoProcessor and answers a question about an image."
        ),
        epilog=(
            "Example: fusedvlm-convert --input llava-hf/llava-1.5-7b-hf --output ./llava-1.5-7b-mmfuser "
            "--fuser mmfuser --verify. Negative layer indices need '=': --fuser-layers=-22,-17,-12,-7,-2."
        ),
    )
    parser.add_argument("--input", help="llava-hf checkpoint folder or Hub repo id (e.g. llava-hf/llava-1.5-7b-hf)")
    parser.add_argument("--output", help="folder to create (a temporary one with --demo when omitted)")
    parser.add_argument("--fuser", choices=list(FUSERS), default=None, help="fuser type (default with --demo: mmfuser)")
    parser.add_argument("--fuser-layers", help="vision hidden-state indices for mmfuser/concat, e.g. 3,8,13,18,23")
    parser.add_argument("--fuser-groups", help='layer groups for igva/average, e.g. "1,2,3;4,5,6"')
    parser.add_argument("--fuser-option", action="append", metavar="NAME=VALUE",
                        help=f"other fuser config fields, repeatable: {', '.join(FUSER_OPTIONS)}")
    parser.add_argument("--instruction-encoder", help="sentence encoder folder or Hub repo id (igva)")
    parser.add_argument("--dtype", choices=tuple(DTYPES), help="cast floating weights (default: keep the source's)")
    parser.add_argument("--verify", action="store_true", help="check source and result give the same logits")
    parser.add_argument("--overwrite", action="store_true", help="replace a non-empty --output")
    parser.add_argument("--push-to-hub", metavar="REPO_ID", help="upload the result to this Hub repo in one commit")
    parser.add_argument("--private", action="store_true", help="create the Hub repo private (with --push-to-hub)")
    parser.add_argument("--base-model", metavar="REPO_ID", help="Hub id of a local --input, for the model card")
    parser.add_argument("--no-progress", action="store_true", help="hide the progress bar")
    demo = parser.add_argument_group("demo")
    demo.add_argument("--demo", action="store_true",
                      help="convert (the built-in tiny LLaVA without --input), then load and generate")
    demo.add_argument("--image", help="image file for --demo (default: a generated test image)")
    demo.add_argument("--question", default="What is shown in the image?", help="question for --demo")
    demo.add_argument("--max-new-tokens", type=int, default=12, help="tokens to generate in --demo")
    return parser


def _sigterm_to_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_conversion_command(convert) -> int:
    """Run `convert()` (which returns a `ConversionResult`) as a command: report the result, or print the error and
    return the exit status (1 verification failed, 2 bad input, 130 interrupted, also by SIGTERM)."""
    previous = signal.signal(signal.SIGTERM, _sigterm_to_interrupt)
    try:
        _report(convert())
        return 0
    except VerificationError as error:
        print(f"error: {error}", file=sys.stderr)
        return 1
    except ConversionError as error:
        print(f"error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; nothing was written to --output.", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.demo:
        run_demo(args)
        return 0
    required = (("--input", args.input), ("--output", args.output), ("--fuser", args.fuser))
    missing = [flag for flag, value in required if value is None]
    if missing:
        parser.error(f"{', '.join(missing)} required (or --demo for the built-in example)")
    if args.private and not args.push_to_hub:
        parser.error("--private only applies with --push-to-hub")
    return run_conversion_command(
        lambda: convert_llava_checkpoint(
            args.input,
            args.output,
            args.fuser,
            fuser_layers=parse_layers(args.fuser_layers),
            fuser_layer_groups=parse_groups(args.fuser_groups),
            fuser_options=parse_fuser_options(args.fuser_option),
            instruction_encoder=args.instruction_encoder,
            dtype=args.dtype,
            verify=args.verify,
            overwrite=args.overwrite,
            push_to_hub=args.push_to_hub,
            private=args.private,
            base_model=args.base_model,
            progress=not args.no_progress,
        )
    )


def _report(result: ConversionResult) -> None:
    print(f"Converted to {result.output} (fuser {result.fuser_type}, dtype {result.dtype or 'as source'}):")
    print(f"  {result.num_tensors_copied} source tensors copied, {result.num_new_tensors} new tensors "
          f"({result.new_parameters:,} fuser parameters), {result.num_shards} shards, "
          f"{result.total_bytes / 2**20:.1f} MiB")
    if result.verify_max_abs_diff is not None:
        print(f"  verified: max |logit difference| = {result.verify_max_abs_diff:.3g} "
              f"(tolerance {result.verify_tolerance:g})")
    if result.commit_url:
        print(f"  pushed: {result.commit_url}")


# ----------------------------------------------------------------------------------------------------------- demo


def run_demo(args) -> None:
    """`--demo`: convert (by default the built-in tiny LLaVA, no download), load the result the way users do and
    generate an answer to `--question` about `--image`."""
    from .tiny import build_tiny_instruction_encoder, build_tiny_llava

    fuser = args.fuser or "mmfuser"
    with tempfile.TemporaryDirectory(prefix="fusedvlm-demo-") as work:
        work = Path(work)
        source, encoder = args.input, args.instruction_encoder
        if source is None:
            print("[1/4] Building the built-in tiny LLaVA (deterministic random weights, no download)")
            llava, llava_processor = build_tiny_llava(seed=0)
            source = work / "tiny-llava"
            llava.save_pretrained(source, max_shard_size="600KB")
            llava_processor.save_pretrained(source)
            shards = sorted(path.name for path in source.glob("*.safetensors"))
            print(f"      saved a llava-hf checkpoint in {len(shards)} shards to {source}")
            if FUSERS[fuser].reads_instruction and encoder is None:
                text_encoder, text_tokenizer = build_tiny_instruction_encoder(seed=0)
                encoder = work / "tiny-instruction-encoder"
                text_encoder.save_pretrained(encoder)
                text_tokenizer.save_pretrained(encoder)
                print(f"      and a tiny sentence encoder for {fuser} to {encoder}")
        else:
            print(f"[1/4] Source: {source}")
        output = Path(args.output) if args.output else work / f"fused-{fuser}"
        print(f"[2/4] Converting to fuser {fuser!r} with --verify")
        result = convert_llava_checkpoint(
            source,
            output,
            fuser,
            fuser_layers=parse_layers(args.fuser_layers),
            fuser_layer_groups=parse_groups(args.fuser_groups),
            fuser_options=parse_fuser_options(args.fuser_option),
            instruction_encoder=encoder,
            dtype=args.dtype,
            verify=True,
            overwrite=args.overwrite,
            base_model=args.base_model,
            progress=not args.no_progress,
        )
        _report(result)
        print(f"[3/4] Loading {output} with AutoModel + AutoProcessor (trust_remote_code=True)")
        model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
        processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
        print(f"      {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
              f"fuser {model.config.fuser_type} over vision layers {model.config.vision_layers_needed}")
        if args.image:
            from PIL import Image

            image = Image.open(args.image).convert("RGB")
        else:
            image = verification_image()
        prompt = build_prompt(processor, args.question)
        inputs = processor(images=image, text=prompt, return_tensors="pt")
        print(f"[4/4] Generating for {args.image or 'a generated test image'} and {args.question!r}")
        with torch.inference_mode():
            generated = model.generate(**inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
        answer = processor.decode(generated[0, inputs["input_ids"].shape[1]:], skip_special_tokens=True)
        print(f"      prompt: {prompt!r}")
        noise = "  (random tiny weights: the text is noise)" if args.input is None else ""
        print(f"      answer: {answer!r}{noise}")
        if args.input is None:  # the built-in model is small enough to show the parity in tokens too
            llava_inputs = AutoProcessor.from_pretrained(source)(images=image, text=prompt, return_tensors="pt")
            with torch.inference_mode():
                expected = llava.generate(**llava_inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            print(f"      same tokens as the source LLaVA: {torch.equal(expected, generated)}")
        if args.output is None:
            print("      (the converted checkpoint was written to a temporary folder; pass --output to keep it)")
    print(
        "To convert a real checkpoint: fusedvlm-convert --input llava-hf/llava-1.5-7b-hf --output ./llava-1.5-7b-"
        f"{fuser} --fuser {fuser}"
        + (" --instruction-encoder sentence-transformers/all-mpnet-base-v2" if FUSERS[fuser].reads_instruction else "")
        + " --verify  (add --demo to also load it and answer --question about --image)"
    )


if __name__ == "__main__":
    sys.exit(main())
