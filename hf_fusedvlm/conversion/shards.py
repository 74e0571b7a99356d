"""Reading a checkpoint's weights without loading them: safetensors headers (checked against the file sizes, the
bytes left on disk) and, for original-format checkpoints, `pytorch_model*.bin` shards (memory-mapped)."""

import json
import math
import pickle
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from .errors import ConversionError, listed


SAFETENSORS_INDEX = "model.safetensors.index.json"
SAFETENSORS_SINGLE = "model.safetensors"
PICKLE_INDEX = "pytorch_model.bin.index.json"
PICKLE_SINGLE = "pytorch_model.bin"
SAFETENSORS_DTYPES = {
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
TORCH_TO_SAFETENSORS = {dtype: name for name, dtype in SAFETENSORS_DTYPES.items()}
MAX_HEADER_BYTES = 100 * 1024 * 1024
_FIX = "re-download or re-save the checkpoint"


@dataclass
class StoredTensor:
    """One tensor of a source shard: its bytes in a safetensors file (`begin`, `nbytes`) or, for a `.bin` shard, a
    memory-mapped `tensor`."""

    key: str
    dtype: torch.dtype
    shape: list[int]
    begin: int | None = None  # absolute byte offset in the safetensors file
    nbytes: int = 0
    tensor: torch.Tensor | None = None


@dataclass
class StoredShard:
    path: Path
    metadata: dict | None
    tensors: list[StoredTensor]

    @property
    def is_safetensors(self) -> bool:
        return self.path.suffix == ".safetensors"


def read_safetensors_header(path: Path) -> tuple[dict | None, dict[str, dict], int]:
    """`(metadata, {key: {"dtype", "shape", "data_offsets"}}, data_start)` of a safetensors file, checked against the
    file's size so that truncated or corrupt shards are refused, by name, before anything is written."""
    size = path.stat().st_size
    with open(path, "rb") as file:
        prefix = file.read(8)
        if len(prefix) < 8:
            raise ConversionError(f"{path} is truncated ({size} bytes, not even a safetensors header): {_FIX}.")
        (header_size,) = struct.unpack("<Q", prefix)
        if header_size > min(size - 8, MAX_HEADER_BYTES):
            raise ConversionError(
                f"{path} is truncated or not a safetensors file (its header claims {header_size} bytes, the file has "
                f"{size}): {_FIX}."
            )
        try:
            header = json.loads(file.read(header_size))
        except (json.JSONDecodeError, UnicodeDecodeError) as error:
            raise ConversionError(f"{path} has a corrupt safetensors header ({error}): {_FIX}.") from error
    if not isinstance(header, dict):
        raise ConversionError(f"{path} has a corrupt safetensors header (not a JSON object): {_FIX}.")
    metadata = header.pop("__metadata__", None)
    data_start = 8 + header_size
    _check_spans(path, header, size - data_start)
    return metadata, header, data_start


def _check_spans(path: Path, header: dict, data_size: int) -> None:
    """Every tensor's byte span fits its shape, and the spans tile the data section exactly."""
    spans = []
    for key, info in header.items():
        try:
            dtype, shape, (begin, end) = info["dtype"], info["shape"], info["data_offsets"]
            expected = math.prod(shape) * SAFETENSORS_DTYPES[dtype].itemsize
        except (KeyError, TypeError, ValueError) as error:
            raise ConversionError(
                f"{path}: tensor {key!r} has a corrupt or unsupported entry {info!r}: {_FIX}."
            ) from error
        if end - begin != expected or begin < 0:
            raise ConversionError(
                f"{path}: tensor {key!r} spans {end - begin} bytes, its shape needs {expected}: {_FIX}."
            )
        spans.append((begin, end))
    position = 0
    for begin, end in sorted(spans):
        if begin != position:
            raise ConversionError(
                f"{path} has overlapping or missing tensor data (offset {begin}, expected {position}): {_FIX}."
            )
        position = end
    if position != data_size:
        state = "truncated" if position > data_size else "longer than its header says"
        raise ConversionError(
            f"{path} is {state}: its header needs {position} bytes of tensor data, the file has {data_size}: {_FIX}."
        )


def _read_index(index_file: Path) -> tuple[dict, list[str]]:
    """(weight map, sorted shard names) of an index file."""
    try:
        weight_map = json.loads(index_file.read_text(encoding="utf-8"))["weight_map"]
        return weight_map, sorted(set(weight_map.values()))
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, AttributeError) as error:
        raise ConversionError(f"{index_file} is corrupt ({error}): re-download the checkpoint.") from error


def _index_shard_names(folder: Path, index_name: str) -> tuple[dict, list[str]]:
    """(weight map, sorted shard names) of an index file, every listed shard present."""
    weight_map, names = _read_index(folder / index_name)
    missing = [name for name in names if not (folder / name).is_file()]
    if missing:
        raise ConversionError(
            f"{folder} is missing {len(missing)} of the {len(names)} shards listed in {index_name}: "
            f"{listed(missing)}. Download the complete checkpoint (e.g. `hf download REPO_ID`) and retry."
        )
    return weight_map, names


def read_safetensors_shards(folder: Path) -> list[StoredShard]:
    """The safetensors shards of `folder` (index or single file), every header checked."""
    if (folder / SAFETENSORS_INDEX).is_file():
        weight_map, names = _index_shard_names(folder, SAFETENSORS_INDEX)
    else:
        weight_map, names = None, [SAFETENSORS_SINGLE]
    shards = []
    for name in names:
        path = folder / name
        metadata, header, data_start = read_safetensors_header(path)
        if weight_map is not None:
            absent = [key for key, shard in weight_map.items() if shard == name and key not in header]
            if absent:
                raise ConversionError(
                    f"{path} lacks {len(absent)} tensors that {SAFETENSORS_INDEX} puts there (e.g. {absent[0]}): the "
                    "shard is corrupt or from another checkpoint; re-download it."
                )
        tensors = [
            StoredTensor(
                key,
                SAFETENSORS_DTYPES[info["dtype"]],
                list(info["shape"]),
                begin=data_start + info["data_offsets"][0],
                nbytes=info["data_offsets"][1] - info["data_offsets"][0],
            )
            for key, info in sorted(header.items(), key=lambda item: item[1]["data_offsets"][0])
        ]
        shards.append(StoredShard(path, metadata, tensors))
    return shards


def load_pickle_shard(path: Path) -> dict[str, torch.Tensor]:
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


def read_shards(folder: Path, what: str, allow_pickles: bool = False) -> list[StoredShard]:
    """The weights of `folder`: safetensors shards or, without any and with `allow_pickles`, `pytorch_model*.bin`
    shards (memory-mapped)."""
    if (folder / SAFETENSORS_INDEX).is_file() or (folder / SAFETENSORS_SINGLE).is_file():
        return read_safetensors_shards(folder)
    if allow_pickles and (folder / PICKLE_INDEX).is_file():
        names = _index_shard_names(folder, PICKLE_INDEX)[1]
    elif allow_pickles and (folder / PICKLE_SINGLE).is_file():
        names = [PICKLE_SINGLE]
    else:
        expected = [SAFETENSORS_INDEX, SAFETENSORS_SINGLE] + ([PICKLE_INDEX, PICKLE_SINGLE] if allow_pickles else [])
        pickles = sorted(path.name for path in folder.glob("*.bin"))
        hint = (
            f" It has PyTorch pickles ({listed(pickles, 3)}): load it with LlavaForConditionalGeneration and "
            "save_pretrained() it (safetensors is the default) first."
            if pickles and not allow_pickles
            else ""
        )
        raise ConversionError(f"{what} {folder} has no weights: expected {' or '.join(expected)}.{hint}")
    shards = []
    for name in names:
        state = load_pickle_shard(folder / name)
        tensors = [StoredTensor(key, value.dtype, list(value.shape), tensor=value) for key, value in state.items()]
        shards.append(StoredShard(folder / name, None, tensors))
    return shards


def known_keys(folder: Path, allow_pickles: bool = False) -> dict[str, list[int] | None]:
    """The tensor names of `folder`'s weights, as far as is known before they are downloaded, with their shapes where
    known: from the shards' headers when they are here, else from the shard index alone (shapes None), else none."""
    indexes = (SAFETENSORS_INDEX, PICKLE_INDEX) if allow_pickles else (SAFETENSORS_INDEX,)
    singles = (SAFETENSORS_SINGLE, PICKLE_SINGLE) if allow_pickles else (SAFETENSORS_SINGLE,)
    index = next((folder / name for name in indexes if (folder / name).is_file()), None)
    if index is not None:
        weight_map, names = _read_index(index)
        if not all((folder / name).is_file() for name in names):
            return dict.fromkeys(weight_map)
    elif not any((folder / name).is_file() for name in singles):
        return {}
    return {
        tensor.key: tensor.shape for shard in read_shards(folder, "--input", allow_pickles) for tensor in shard.tensors
    }
