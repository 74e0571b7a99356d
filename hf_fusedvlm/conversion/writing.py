"""The write step: a plan of output tensors per shard (bytes copied from a source file, or a tensor made or
transformed in memory), checked against the fused model, written as safetensors shards with their index; and the
fused config with `auto_map` and the remote-code files.

Unchanged tensors are copied in fixed-size chunks and transformed ones one at a time, so memory stays far below one
shard whatever the model size."""

import contextlib
import json
import math
import struct
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm
from transformers import GenerationConfig
from transformers.dynamic_module_utils import custom_object_save

from ..configuration_fused_llava import FusedLlavaConfig
from ..parity import FUSED_MODEL_CLASSES, expand_projector_input
from .errors import ConversionError
from .shards import SAFETENSORS_INDEX, TORCH_TO_SAFETENSORS, StoredShard, StoredTensor


COPY_CHUNK_BYTES = 64 * 1024 * 1024
# `--dtype` casts these; integer buffers and float8 weights keep their dtype.
CASTABLE_DTYPES = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass
class OutputTensor:
    """A tensor to write: copied from `source` (its bytes, or through `transform` when one is set) or given as
    `tensor` (through `transform` too, so that a memory-mapped tensor is only transformed when written)."""

    name: str
    dtype: torch.dtype
    shape: list[int]
    source: StoredTensor | None = None
    transform: Callable[[torch.Tensor], torch.Tensor] | None = None
    tensor: torch.Tensor | None = None

    @property
    def nbytes(self) -> int:
        return math.prod(self.shape) * self.dtype.itemsize

    @property
    def copies_bytes(self) -> bool:
        return self.tensor is None and self.transform is None


@dataclass
class PlannedShard:
    """One output shard: its entries, and the safetensors file (and metadata) the copied bytes come from, if any."""

    entries: list[OutputTensor]
    source_path: Path | None = None
    metadata: dict | None = None


@dataclass
class ConversionResult:
    """What a conversion wrote."""

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

    def summary(self) -> str:
        """What the command line prints."""
        lines = [
            f"Converted to {self.output} (fuser {self.fuser_type}, dtype {self.dtype or 'as source'}):",
            f"  {self.num_tensors_copied} source tensors copied, {self.num_new_tensors} new tensors "
            f"({self.new_parameters:,} fuser parameters), {self.num_shards} shards, {self.total_bytes / 2**20:.1f} MiB",
        ]
        if self.verify_max_abs_diff is not None:
            lines.append(
                f"  verified: max |logit difference| = {self.verify_max_abs_diff:.3g} "
                f"(tolerance {self.verify_tolerance:g})"
            )
        if self.commit_url:
            lines.append(f"  pushed: {self.commit_url}")
        return "\n".join(lines)


# -------------------------------------------------------------------------------------------------------- planning


def cast_dtype(dtype: torch.dtype | None, tensor_dtype: torch.dtype) -> torch.dtype:
    """The output dtype of a tensor: `dtype` for floating tensors when given, else its own."""
    return dtype if dtype is not None and tensor_dtype in CASTABLE_DTYPES else tensor_dtype


def plan_tensor(name: str, stored: StoredTensor, dtype: torch.dtype | None, shape=None, transform=None) -> OutputTensor:
    """The output of a source tensor under `name`: its bytes copied when unchanged, else read, passed through
    `transform` (which gives `shape`) and cast to `dtype` (floating tensors only)."""
    target = cast_dtype(dtype, stored.dtype)
    shape = list(shape if shape is not None else stored.shape)
    if transform is None and target == stored.dtype and stored.tensor is None:
        return OutputTensor(name, target, shape, source=stored)

    def convert(value: torch.Tensor) -> torch.Tensor:
        return (transform(value) if transform is not None else value).to(target)

    return OutputTensor(name, target, shape, source=stored, tensor=stored.tensor, transform=convert)


def plan_projector_input(name: str, stored: StoredTensor, config: FusedLlavaConfig, dtype) -> OutputTensor:
    """The projector's input weight, widened for the slots the fuser gives it (`parity.expand_projector_input`)."""
    try:
        shape = expand_projector_input(torch.empty(stored.shape, device="meta"), config).shape
    except ValueError as error:
        raise ConversionError(f"Cannot widen the projector for --fuser {config.fuser_type}: {error}") from error
    return plan_tensor(name, stored, dtype, shape, lambda weight: expand_projector_input(weight, config))


def plan_new_tensors(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> list[OutputTensor]:
    """Entries for tensors made in memory (fresh fuser weights, the sentence encoder's)."""
    entries = []
    for name, tensor in tensors.items():
        tensor = tensor.detach().to(cast_dtype(dtype, tensor.dtype)).contiguous()
        if tensor.dtype not in TORCH_TO_SAFETENSORS:
            raise ConversionError(f"Tensor {name} has dtype {tensor.dtype}, which safetensors cannot store.")
        entries.append(OutputTensor(name, tensor.dtype, list(tensor.shape), tensor=tensor))
    return entries


def planned_shard(entries: list[OutputTensor], shard: StoredShard) -> PlannedShard:
    """The output shard of a source shard's entries (copied bytes come from it when it is a safetensors file)."""
    if shard.is_safetensors:
        return PlannedShard(entries, shard.path, shard.metadata)
    return PlannedShard(entries)


def plan_renamed_shards(
    shards: list[StoredShard], rename: Callable[[str], str | None], plan: Callable[[str, StoredTensor], OutputTensor]
) -> list[PlannedShard]:
    """Per source shard, the output of its tensors: `rename(key)` is a tensor's fused name (None leaves it out),
    `plan(name, stored)` its output. Two keys renamed alike are refused: the checkpoint would hold a tensor twice."""
    seen, planned = {}, []
    for shard in shards:
        entries = []
        for tensor in shard.tensors:
            name = rename(tensor.key)
            if name is None:
                continue
            if name in seen:
                raise ConversionError(
                    f"{tensor.key!r} in {shard.path.name} and {seen[name]!r} are the same tensor "
                    f"({name}): the checkpoint is inconsistent; re-save it."
                )
            seen[name] = tensor.key
            entries.append(plan(name, tensor))
        planned.append(planned_shard(entries, shard))
    return planned


def new_tensors_shard(tensors: dict[str, torch.Tensor], dtype: torch.dtype | None) -> list[PlannedShard]:
    """The shard of the tensors made in memory (fresh fuser weights, the instruction encoder's); none without any."""
    entries = plan_new_tensors(tensors, dtype)
    return [PlannedShard(entries)] if entries else []


def plan_mismatches(
    config: FusedLlavaConfig, planned: list[PlannedShard]
) -> tuple[list[str], list[str], list[tuple[str, list[int], list[int]]]]:
    """How a plan differs from the fused model's tensors: (unexpected names, missing names, (name, planned shape,
    expected shape) of wrong shapes). A tied parameter may be stored under one of its names only."""
    with torch.device("meta"):
        model = FUSED_MODEL_CLASSES[type(config)](config)
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


def count_parameters(planned: list[PlannedShard], prefix: str) -> int:
    return sum(math.prod(entry.shape) for shard in planned for entry in shard.entries if entry.name.startswith(prefix))


# --------------------------------------------------------------------------------------------------------- writing


def _tensor_bytes(tensor: torch.Tensor):
    return tensor.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy()


def _copy_bytes(source_file, out, entry: OutputTensor, buffer: memoryview, progress) -> None:
    source_file.seek(entry.source.begin)
    remaining = entry.nbytes
    while remaining:
        count = source_file.readinto(buffer[: min(remaining, len(buffer))])
        if not count:
            raise ConversionError(f"{source_file.name} ended early while reading {entry.source.key}: re-download it.")
        out.write(buffer[:count])
        remaining -= count
        progress.update(count)


def write_shard(path: Path, entries: list[OutputTensor], metadata: dict | None, source_path: Path | None, progress):
    """Write one safetensors file tensor by tensor: bytes of unchanged tensors are copied in chunks from
    `source_path`, transformed and new tensors are serialised one at a time (aligned, largest items first, as
    safetensors orders them). `progress.update(nbytes)` is called as bytes are written."""
    entries = sorted(entries, key=lambda entry: (-entry.dtype.itemsize, entry.source.begin if entry.source else 0))
    header, offset = {"__metadata__": metadata or {"format": "pt"}}, 0
    for entry in entries:
        header[entry.name] = {
            "dtype": TORCH_TO_SAFETENSORS[entry.dtype],
            "shape": entry.shape,
            "data_offsets": [offset, offset + entry.nbytes],
        }
        offset += entry.nbytes
    raw = json.dumps(header, separators=(",", ":")).encode("utf-8")
    raw += b" " * (-len(raw) % 8)
    buffer = memoryview(bytearray(COPY_CHUNK_BYTES))
    source_context = open(source_path, "rb") if source_path else contextlib.nullcontext()
    with open(path, "wb") as out, source_context as source_file:
        reads_tensors = any(entry.tensor is None and entry.transform is not None for entry in entries)
        reader = safe_open(source_path, framework="pt") if reads_tensors else None
        out.write(struct.pack("<Q", len(raw)))
        out.write(raw)
        for entry in entries:
            if entry.copies_bytes:
                _copy_bytes(source_file, out, entry, buffer, progress)
                continue
            tensor = entry.tensor if entry.tensor is not None else reader.get_tensor(entry.source.key)
            if entry.transform is not None:
                tensor = entry.transform(tensor)
            data = _tensor_bytes(tensor)
            if data.nbytes != entry.nbytes:
                raise ConversionError(f"Internal error: {entry.name} has {data.nbytes} bytes, planned {entry.nbytes}.")
            out.write(data)
            progress.update(entry.nbytes)


def shard_name(index: int, total: int) -> str:
    """`model-00001-of-00003.safetensors` for `index` 1 of 3."""
    return f"model-{index:05d}-of-{total:05d}.safetensors"


def write_shards(folder: Path, planned: list[PlannedShard], progress: bool) -> int:
    """Write the shards and their index into `folder`; returns the bytes written."""
    total_bytes = sum(entry.nbytes for shard in planned for entry in shard.entries)
    weight_map = {}
    with tqdm(
        total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, disable=not progress, desc="Converting"
    ) as bar:
        for index, shard in enumerate(planned):
            name = shard_name(index + 1, len(planned))
            bar.set_description(f"Shard {index + 1}/{len(planned)}")
            write_shard(folder / name, shard.entries, shard.metadata, shard.source_path, bar)
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


def source_generation_config(source: Path, model_config) -> GenerationConfig:
    """The source checkpoint's generation config, or the one its model config implies."""
    if (source / "generation_config.json").is_file():
        return GenerationConfig.from_pretrained(source)
    return GenerationConfig.from_model_config(model_config)


def write_remote_code(config: FusedLlavaConfig, folder: Path) -> None:
    """config.json with `auto_map` for AutoConfig, AutoModel and AutoModelForImageTextToText, and the model code
    (the modeling module and every module it imports relatively) for `trust_remote_code=True`."""
    model_class = FUSED_MODEL_CLASSES[type(config)]
    class_path = f"{model_class.__module__.rsplit('.', 1)[-1]}.{model_class.__name__}"
    config.auto_map = {
        **(getattr(config, "auto_map", None) or {}),
        "AutoConfig": f"{type(config).__module__.rsplit('.', 1)[-1]}.{type(config).__name__}",
        "AutoModel": class_path,
        "AutoModelForImageTextToText": class_path,
    }
    config.save_pretrained(folder)
    custom_object_save(model_class, folder)
