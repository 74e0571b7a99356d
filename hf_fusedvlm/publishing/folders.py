"""What a fused checkpoint folder holds, for the converter and the trainer alike: the files a fused output may have
(anything else in a folder is the user's and is never replaced), whether a folder is a fused output, and the trainer's
in-place replacement of an earlier model's files."""

import fnmatch
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path


# The model types of the checkpoints this package writes.
FUSED_MODEL_TYPES = ("fused_llava", "fused_llava_next")
# The owner file of a conversion's staging folder (host and process id), removed once the output is in place.
OWNER_FILE = ".fusedvlm-converting.json"
# What a fused output (converted or trained) holds; anything else in a folder is the user's.
FUSED_OUTPUT_FILES = (
    "config.json",
    "generation_config.json",
    "model.safetensors",
    "model-*-of-*.safetensors",
    "model.safetensors.index.json",
    "configuration_fused_llava.py",
    "configuration_fused_llava_next.py",
    "modeling_fused_llava.py",
    "modeling_fused_llava_next.py",
    "modeling_fusion.py",
    "checkpoint_checks.py",
    "processing_fused_llava.py",
    "processing_fused_llava_next.py",
    "fusers.py",
    "fuser_registry.py",
    "deformable_attention.py",
    "processor_config.json",
    "preprocessor_config.json",
    "chat_template.jinja",
    "chat_template.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "*.model",
    "*.tiktoken",
    "README.md",
    "training_args.json",
    OWNER_FILE,
)
FUSED_OUTPUT_FOLDERS = ("instruction_tokenizer",)


def is_fused_output_entry(path: Path) -> bool:
    """Whether `path`, an entry of a folder, is one that a fused output holds (see `FUSED_OUTPUT_FILES`)."""
    if path.is_dir() and not path.is_symlink():
        return path.name in FUSED_OUTPUT_FOLDERS
    return any(fnmatch.fnmatchcase(path.name, pattern) for pattern in FUSED_OUTPUT_FILES)


def foreign_files(folder: Path) -> list[str]:
    """The entries of `folder` that a fused output would not hold (folders with a trailing `/`), sorted."""
    return [
        path.name + ("/" if path.is_dir() else "")
        for path in sorted(folder.iterdir())
        if not is_fused_output_entry(path)
    ]


def is_fused_output(folder: Path) -> bool:
    """Whether `folder` is a fused LLaVA checkpoint (what the converter or the trainer writes): its config.json says
    model_type `fused_llava` or `fused_llava_next` and it holds safetensors weights."""
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    has_weights = (folder / "model.safetensors.index.json").is_file() or (folder / "model.safetensors").is_file()
    return isinstance(config, dict) and config.get("model_type") in FUSED_MODEL_TYPES and has_weights


@contextmanager
def replacing_fused_files(output_dir: str | os.PathLike):
    """Yield a staging folder inside `output_dir` for a fused checkpoint; when it is complete, remove the files of
    the fused model `output_dir` held before (shards, index, instruction_tokenizer/ ..., nothing else) and move the
    new ones in, so that no stale file of the earlier model stays."""
    output = Path(output_dir)
    output.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=".fusedvlm-saving-", dir=output))
    try:
        yield staging
        for path in output.iterdir():
            if path != staging and is_fused_output_entry(path):
                shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
        for path in staging.iterdir():
            path.rename(output / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)
