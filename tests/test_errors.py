"""Bad input to the model, the processor and loading: each case gets an error that names the problem and the fix.

(Config values are covered by `test_configuration.py`, converters and the trainer by their own test files.)"""

import json
import shutil

import pytest
import torch
from transformers import AutoModel, AutoProcessor

from hf_fusedvlm import FusedLlavaForConditionalGeneration
from hf_fusedvlm.conversion import fused_from_llava
from hf_fusedvlm.processing_fused_llava import FusedLlavaProcessor

from conftest import instruction_inputs, run_without_package


PROMPT = "USER: <image>\nWhat colour is the square? ASSISTANT:"


@pytest.fixture(scope="module")
def saved(tmp_path_factory, fused_models, tiny_llava, tiny_instruction_encoder):
    """`root/mmfuser` and `root/igva`: saved checkpoints with their processors."""
    root = tmp_path_factory.mktemp("saved")
    for fuser_type in ("mmfuser", "igva"):
        fused_models[fuser_type].save_pretrained(root / fuser_type)
        instruction_tokenizer = tiny_instruction_encoder[1] if fuser_type == "igva" else None
        FusedLlavaProcessor.from_llava_processor(tiny_llava[1], instruction_tokenizer).save_pretrained(
            root / fuser_type
        )
    return root


def copy_checkpoint(saved, tmp_path, fuser_type="mmfuser"):
    return shutil.copytree(saved / fuser_type, tmp_path / "copy")


def edit_config(folder, **fields):
    config = json.loads((folder / "config.json").read_text())
    (folder / "config.json").write_text(json.dumps({**config, **fields}))


def truncate_weights(folder):
    weights = folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])


def image_sample_index_out_of_range(fused_models, tiny_llava, tiny_instruction_encoder, image, saved, tmp_path):
    inputs = tiny_llava[1](images=image, text=PROMPT, return_tensors="pt")
    instruction = instruction_inputs(tiny_instruction_encoder[1], ["What colour is the square?"])
    fused_models["igva"](**inputs, **instruction, image_sample_index=torch.tensor([3]))


def more_image_tokens_than_images(fused_models, tiny_llava, tiny_instruction_encoder, image, saved, tmp_path):
    inputs = tiny_llava[1](images=[image, image], text=PROMPT.replace("<image>", "<image><image>"), return_tensors="pt")
    fused_models["mmfuser"](input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"][:1])


def convert_a_fused_model(fused_models, tiny_llava, tiny_instruction_encoder, image, saved, tmp_path):
    fused_from_llava(fused_models["mmfuser"], "concat")


def igva_processor_without_instruction_tokenizer(
    fused_models, tiny_llava, tiny_instruction_encoder, image, saved, tmp_path
):
    folder = copy_checkpoint(saved, tmp_path, "igva")
    shutil.rmtree(folder / "instruction_tokenizer")
    AutoProcessor.from_pretrained(folder)


def config_json_as_model_path(fused_models, tiny_llava, tiny_instruction_encoder, image, saved, tmp_path):
    # Through AutoModel, AutoConfig reads the path first and transformers answers; the model class checks it itself.
    FusedLlavaForConditionalGeneration.from_pretrained(saved / "mmfuser" / "config.json")


def truncated_weights(fused_models, tiny_llava, tiny_instruction_encoder, image, saved, tmp_path):
    folder = copy_checkpoint(saved, tmp_path)
    truncate_weights(folder)
    AutoModel.from_pretrained(folder)


def fuser_type_edited_to_a_wider_fuser(fused_models, tiny_llava, tiny_instruction_encoder, image, saved, tmp_path):
    folder = copy_checkpoint(saved, tmp_path)
    edit_config(folder, fuser_type="concat")
    AutoModel.from_pretrained(folder)


def fuser_type_edited_to_none(fused_models, tiny_llava, tiny_instruction_encoder, image, saved, tmp_path):
    folder = copy_checkpoint(saved, tmp_path)
    edit_config(folder, fuser_type="none")
    AutoModel.from_pretrained(folder)


def save_with_a_shard_deleted(fused_models, folder):
    fused_models["mmfuser"].save_pretrained(folder, max_shard_size="300KB")
    sorted(folder.glob("model-*.safetensors"))[1].unlink()
    return folder


def shard_deleted(fused_models, tiny_llava, tiny_instruction_encoder, image, saved, tmp_path):
    AutoModel.from_pretrained(save_with_a_shard_deleted(fused_models, tmp_path / "sharded"))


def config_key_misspelt(fused_models, tiny_llava, tiny_instruction_encoder, image, saved, tmp_path):
    folder = copy_checkpoint(saved, tmp_path)
    config = json.loads((folder / "config.json").read_text())
    config["fusertype"] = config.pop("fuser_type")
    (folder / "config.json").write_text(json.dumps(config))
    AutoModel.from_pretrained(folder)


@pytest.mark.parametrize(
    "mistake, error, message",
    [
        (image_sample_index_out_of_range, ValueError, r"image_sample_index \[3\] points outside the 1 instructions"),
        (more_image_tokens_than_images, ValueError, r"32 image tokens \(2 images' worth\), but 1 images were given"),
        (convert_a_fused_model, TypeError, "converts a plain LLaVA or LLaVA-NeXT model; got a fused model"),
        (igva_processor_without_instruction_tokenizer, OSError, "no instruction_tokenizer/ folder"),
        (config_json_as_model_path, ValueError, "config.json is a file: pass the checkpoint's folder"),
        (truncated_weights, OSError, "model.safetensors cannot be read; download or save it again"),
        (fuser_type_edited_to_a_wider_fuser, ValueError, "was config.json edited"),
        (fuser_type_edited_to_none, ValueError, "holds fuser weights that fuser_type='none' does not have"),
        (
            shard_deleted,
            OSError,
            r"sharded is incomplete: its model.safetensors.index.json names model-00002-of-\d+.safetensors, which is "
            "missing; download or copy the whole checkpoint again",
        ),
        (config_key_misspelt, ValueError, "unknown keyword 'fusertype', which would be ignored: did you mean"),
    ],
    ids=lambda value: value.__name__ if callable(value) and not isinstance(value, type) else None,
)
def test_mistakes_get_clear_errors(
    mistake, error, message, fused_models, tiny_llava, tiny_instruction_encoder, image, saved, tmp_path
):
    with pytest.raises(error, match=message):
        mistake(fused_models, tiny_llava, tiny_instruction_encoder, image, saved, tmp_path)


def test_incomplete_checkpoints_through_remote_code_name_what_is_missing(fused_models, tmp_path):
    """Without the package: a deleted shard is the model code's one sentence; a deleted remote-code file and an
    `auto_map` naming a missing module fail inside transformers before any of the checkpoint's code runs, and
    transformers' own errors name the file."""
    folder = save_with_a_shard_deleted(fused_models, tmp_path / "sharded")
    no_code = shutil.copytree(folder, tmp_path / "no-fusers-py")
    (no_code / "fusers.py").unlink()
    bad_map = shutil.copytree(folder, tmp_path / "bad-auto-map")
    edit_config(
        bad_map,
        auto_map={
            "AutoConfig": "configuration_fused_llava.FusedLlavaConfig",
            "AutoModel": "modeling_fused_lava.FusedLlavaModel",
        },
    )
    code = (
        "from transformers import AutoModel\n"
        "for folder in ('sharded', 'no-fusers-py', 'bad-auto-map'):\n"
        "    try:\n"
        "        AutoModel.from_pretrained(folder, trust_remote_code=True)\n"
        "    except Exception as error:\n"
        "        print(folder, '->', type(error).__name__, error)\n"
    )
    completed = run_without_package(code, cwd=tmp_path)
    lines = completed.stdout.splitlines()
    assert completed.returncode == 0 and len(lines) == 3, completed.stderr[-3000:]
    assert lines[0].startswith("sharded -> OSError ") and "which is missing; download or copy the whole" in lines[0]
    assert lines[1].startswith("no-fusers-py -> FileNotFoundError") and "fusers.py" in lines[1]
    assert lines[2].startswith("bad-auto-map -> OSError") and "modeling_fused_lava.py" in lines[2]
