"""A table of the mistakes users make with `fusedvlm-convert`: each gets exit status 2 and a message that names the
problem and the fix, and nothing on disk is lost or half-written. Plus the accepted spellings and the clean-up of
staging folders left by a killed conversion."""

import contextlib
import errno
import io
import json
import os
import re
import shutil
import subprocess
import sys

import pytest
from transformers import SiglipVisionConfig

import hf_fusedvlm.conversion.staging as staging_module
import hf_fusedvlm.conversion.writing as writing_module
from hf_fusedvlm.conversion import convert_checkpoint, main
from hf_fusedvlm.tiny import build_tiny_instruction_encoder


TOKEN = "hf_fake_token_never_printed_456"


@pytest.fixture(scope="module")
def source(tmp_path_factory, tiny_llava):
    llava, processor = tiny_llava
    folder = tmp_path_factory.mktemp("bad-inputs") / "tiny-llava"
    llava.save_pretrained(folder, max_shard_size="500KB")
    processor.save_pretrained(folder)
    return folder


def leftovers(folder):
    return sorted(path.name for path in folder.iterdir() if ".converting-" in path.name or ".replaced-" in path.name)


def snapshot(folder):
    return {path.relative_to(folder).as_posix(): path.read_bytes() for path in folder.rglob("*") if path.is_file()}


# Each row: (setup(tmp_path, source, monkeypatch) -> argv, the message). `OUT` stands for tmp_path / "out".
def _user_folder_as_output(tmp, source, monkeypatch):
    (tmp / "notes.txt").write_text("my notes")
    (tmp / "data").mkdir()
    (tmp / "data" / "a.json").write_text("{}")
    monkeypatch.chdir(tmp)
    return ["--input", str(source), "--output", ".", "--fuser", "none", "--overwrite"]


def _output_inside_input(tmp, source, monkeypatch):
    copy = shutil.copytree(source, tmp / "copy")
    return ["--input", str(copy), "--output", str(copy / "fused"), "--fuser", "none"]


def _input_inside_output(tmp, source, monkeypatch):
    copy = shutil.copytree(source, tmp / "work" / "llava")
    return ["--input", str(copy), "--output", str(tmp / "work"), "--fuser", "none", "--overwrite"]


def _non_encoder_as_instruction_encoder(tmp, source, monkeypatch):
    return ["--input", str(source), "--output", "OUT", "--fuser", "igva", "--instruction-encoder", str(source)]


def _folder_without_config_as_instruction_encoder(tmp, source, monkeypatch):
    (tmp / "empty").mkdir()
    return ["--input", str(source), "--output", "OUT", "--fuser", "igva", "--instruction-encoder", str(tmp / "empty")]


def _demo_into_non_empty_output(tmp, source, monkeypatch):
    (tmp / "out").mkdir()
    (tmp / "out" / "keep.txt").write_text("keep")
    return ["--demo", "--output", "OUT"]


def _demo_with_missing_image(tmp, source, monkeypatch):
    return ["--demo", "--image", str(tmp / "missing.png"), "--output", "OUT"]


def _demo_with_non_image(tmp, source, monkeypatch):
    (tmp / "notes.png").write_text("not an image")
    return ["--demo", "--image", str(tmp / "notes.png"), "--output", "OUT"]


def _disk_full(tmp, source, monkeypatch):
    def full(*args, **kwargs):
        raise OSError(errno.ENOSPC, "No space left on device", str(args[0]))

    monkeypatch.setattr(writing_module, "write_shard", full)
    return ["--input", str(source), "--output", "OUT", "--fuser", "none"]


def _read_only_parent(tmp, source, monkeypatch):
    def read_only(*args, **kwargs):  # the tests run as root, which chmod cannot stop
        raise OSError(errno.EROFS, "Read-only file system", str(tmp))

    monkeypatch.setattr(staging_module.tempfile, "mkdtemp", read_only)
    return ["--input", str(source), "--output", "OUT", "--fuser", "none"]


def _truncated_shard(tmp, source, monkeypatch):
    copy = shutil.copytree(source, tmp / "truncated")
    shard = sorted(copy.glob("model-*.safetensors"))[1]
    shard.write_bytes(shard.read_bytes()[:-64])
    return ["--input", str(copy), "--output", "OUT", "--fuser", "none"]


def _config_json_as_input(tmp, source, monkeypatch):
    return ["--input", str(source / "config.json"), "--output", "OUT", "--fuser", "none"]


def _unreachable_hub(tmp, source, monkeypatch):
    import huggingface_hub.constants as constants

    monkeypatch.setattr(constants, "ENDPOINT", "http://127.0.0.1:9")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_TOKEN", TOKEN)
    return ["--input", str(source), "--output", "OUT", "--fuser", "none", "--push-to-hub", "me/model"]


def _empty_groups(tmp, source, monkeypatch):
    return ["--input", str(source), "--output", "OUT", "--fuser", "average", "--fuser-groups", "1,2;;"]


def _fused_checkpoint_as_input(tmp, source, monkeypatch):
    convert_checkpoint(source, tmp / "fused", "none", progress=False)
    return ["--input", str(tmp / "fused"), "--output", "OUT", "--fuser", "mmfuser"]


def _vision_tower_for_llava_hf(tmp, source, monkeypatch):
    return ["--input", str(source), "--output", "OUT", "--fuser", "none", "--vision-tower", str(source)]


def _llava_hf_without_fuser(tmp, source, monkeypatch):
    return ["--input", str(source), "--output", "OUT"]


def _save_quietly(model, folder):
    with contextlib.redirect_stderr(io.StringIO()):  # the progress bar is not the command's output
        model.save_pretrained(folder)


def _instruction_encoder_without_tokenizer(tmp, source, monkeypatch):
    encoder, _ = build_tiny_instruction_encoder(seed=0)
    _save_quietly(encoder, tmp / "encoder")  # config and weights, no tokenizer files
    return ["--input", str(source), "--output", "OUT", "--fuser", "igva", "--instruction-encoder", str(tmp / "encoder")]


def _instruction_encoder_without_pooling(tmp, source, monkeypatch):
    encoder, tokenizer = build_tiny_instruction_encoder(seed=0)
    _save_quietly(encoder, tmp / "encoder")
    tokenizer.save_pretrained(tmp / "encoder")
    modules = [{"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"}]
    (tmp / "encoder" / "modules.json").write_text(json.dumps(modules))
    return ["--input", str(source), "--output", "OUT", "--fuser", "igva", "--instruction-encoder", str(tmp / "encoder")]


def _overwrite_an_output_holding_user_files(tmp, source, monkeypatch):
    convert_checkpoint(source, tmp / "out", "none", progress=False)
    (tmp / "out" / "notes.txt").write_text("my notes")
    (tmp / "out" / "checkpoint-500").mkdir()
    (tmp / "out" / "checkpoint-500" / "optimizer.pt").write_bytes(b"state")
    return ["--input", str(source), "--output", "OUT", "--fuser", "average", "--overwrite"]


def _original_llava_1_6(**changes):
    """An original-format LLaVA-1.6 folder whose config.json has `changes` (None removes a key); it holds no weights:
    these mistakes are refused from the config alone."""

    def setup(tmp, source, monkeypatch):
        config = {
            **json.loads((source / "config.json").read_text())["text_config"],
            "model_type": "llava",
            "architectures": ["LlavaLlamaForCausalLM"],
            "mm_vision_tower": "openai/clip-vit-large-patch14-336",
            "mm_vision_select_layer": -2,
            "mm_projector_type": "mlp2x_gelu",
            "image_aspect_ratio": "anyres",
            "image_grid_pinpoints": [[336, 672], [672, 336], [672, 672]],
            "mm_patch_merge_type": "spatial_unpad",
            **changes,
        }
        folder = tmp / "llava-v1.6"
        folder.mkdir()
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))
        return ["--input", str(folder), "--output", "OUT", "--vision-tower", str(source)]

    return setup


def _dense_connector_anyres_with_clip_pinpoints(tmp, source, monkeypatch):
    """Dense Connector's AnyRes config (SigLIP tower, three widths into the projector) with LLaVA-1.6's pinpoints,
    multiples of CLIP-L's 336 px, which 384 px SigLIP crops cannot tile; refused from the configs alone."""
    argv = _original_llava_1_6(
        model_type="llava_llama",
        mm_vision_tower="google/siglip-so400m-patch14-384",
        mm_dense_connector_type="dci",
        mm_hidden_size=3 * 64,
    )(tmp, source, monkeypatch)
    SiglipVisionConfig(
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=27,
        num_attention_heads=4,
        image_size=384,
        patch_size=14,
    ).save_pretrained(tmp / "siglip")
    return argv[:-1] + [str(tmp / "siglip")]


BAD_INPUTS = {
    "output-is-a-user-folder-with-overwrite": (_user_folder_as_output, "is not a fused LLaVA checkpoint .*notes.txt"),
    "output-inside-input": (_output_inside_input, "--output .* is inside the input"),
    "input-inside-output": (_input_inside_output, "--output .* contains the input"),
    "instruction-encoder-is-a-llava": (_non_encoder_as_instruction_encoder, "is a 'llava' model .*not a text encoder"),
    "instruction-encoder-without-config": (_folder_without_config_as_instruction_encoder, "has no config.json"),
    "demo-into-non-empty-output": (_demo_into_non_empty_output, "is not empty and is not a fused LLaVA checkpoint"),
    "demo-with-missing-image": (_demo_with_missing_image, "--image .*missing.png does not exist"),
    "demo-with-non-image": (_demo_with_non_image, "--image .*notes.png is not an image"),
    "disk-full": (_disk_full, "Could not write .*No space left on device.*Free some space"),
    "read-only-parent": (_read_only_parent, "Could not write .*Read-only file system.*writable folder"),
    "truncated-shard": (_truncated_shard, r"model-00002-of-\d+\.safetensors is truncated"),
    "config-json-as-input": (_config_json_as_input, "config.json is a file: give its folder"),
    "unreachable-hub": (_unreachable_hub, "--push-to-hub me/model: the Hub at http://127.0.0.1:9 could not be reached"),
    "empty-fuser-group": (_empty_groups, "group 2 is empty"),
    "fused-checkpoint-as-input": (_fused_checkpoint_as_input, "already a fused LLaVA checkpoint"),
    "vision-tower-for-llava-hf": (_vision_tower_for_llava_hf, "drop --vision-tower"),
    "llava-hf-without-fuser": (_llava_hf_without_fuser, "choose the fuser to add with --fuser"),
    "instruction-encoder-without-tokenizer": (
        _instruction_encoder_without_tokenizer,
        r"its tokenizer reads every word as '\[UNK\]' .*lacks the tokenizer files",
    ),
    "instruction-encoder-without-pooling": (_instruction_encoder_without_pooling, "modules.json lists no Pooling"),
    "overwrite-an-output-holding-user-files": (
        _overwrite_an_output_holding_user_files,
        "is an earlier fused LLaVA output but also holds checkpoint-500/, notes.txt, which .*Move them elsewhere",
    ),
    "original-1.6-without-pinpoints": (
        _original_llava_1_6(image_grid_pinpoints=None),
        "'anyres' but no image_grid_pinpoints.*add them to config.json",
    ),
    "original-1.6-pinpoints-as-grids": (
        _original_llava_1_6(image_grid_pinpoints="(1x1),...,(3x3)"),
        r"image_grid_pinpoints '\(1x1\),...,\(3x3\)' is not a list of \(width, height\) pairs",
    ),
    "original-1.6-spatial-without-unpad": (
        _original_llava_1_6(mm_patch_merge_type="spatial"),
        "mm_patch_merge_type 'spatial': fused LLaVA imports .*'spatial_unpad' with 'anyres'",
    ),
    "original-anyres-with-flat-merge": (
        _original_llava_1_6(mm_patch_merge_type=None),
        "image_aspect_ratio 'anyres' with mm_patch_merge_type 'flat'",
    ),
    "original-unpad-without-anyres": (
        _original_llava_1_6(image_aspect_ratio="pad"),
        "image_aspect_ratio 'pad' with mm_patch_merge_type 'spatial_unpad'",
    ),
    "original-1.6-with-class-token": (
        _original_llava_1_6(mm_vision_select_feature="cls_patch"),
        "LLaVA-1.6 packs each crop's patches as a square grid .*must be 'patch', not 'cls_patch'",
    ),
    "original-anyres-max": (_original_llava_1_6(image_aspect_ratio="anyres_max_9"), "'anyres_max_9' with"),
    "original-1.6-trained-mmfuser": (
        _original_llava_1_6(mm_vision_select_layer="list-6/-2"),
        "trained mmfuser model .*only plain LLaVA-1.6 and Dense Connector checkpoints import as LLaVA-NeXT",
    ),
    "dense-connector-anyres-with-clip-pinpoints": (
        _dense_connector_anyres_with_clip_pinpoints,
        r"image_grid_pinpoints \[\[336, 672\], \[672, 336\], \[672, 672\]\] are not multiples of the vision "
        r"tower's image size \(384\).*SigLIP-so400m tiles 384 px",
    ),
}


@pytest.mark.parametrize("case", BAD_INPUTS, ids=list(BAD_INPUTS))
def test_bad_input_is_a_clear_error_and_loses_nothing(case, source, tmp_path, monkeypatch, capsys):
    setup, message = BAD_INPUTS[case]
    argv = setup(tmp_path, source, monkeypatch)
    argv = [str(tmp_path / "out") if item == "OUT" else item for item in argv] + ["--no-progress"]
    before, source_before = snapshot(tmp_path), snapshot(source)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and "Traceback" not in err and TOKEN not in err
    assert re.search(message, err), err
    after = snapshot(tmp_path)
    assert {path: data for path, data in after.items() if path in before} == before  # nothing lost or changed
    assert leftovers(tmp_path) == [] and snapshot(source) == source_before
    if case not in ("demo-into-non-empty-output", "overwrite-an-output-holding-user-files"):
        assert not (tmp_path / "out").exists()


def test_negative_layers_need_no_equals_sign(source, tmp_path):
    assert (
        main(
            [
                "--input",
                str(source),
                "--output",
                str(tmp_path / "out"),
                "--fuser",
                "concat",
                "--fuser-layers",
                "-5,-3,-2",
                "--no-progress",
            ]
        )
        == 0
    )
    assert json.loads((tmp_path / "out" / "config.json").read_text())["fuser_layers"] == [2, 4, 5]  # of 7 hidden states


def test_overwrite_replaces_an_earlier_fused_output(source, tmp_path):
    out = tmp_path / "out"
    convert_checkpoint(source, out, "none", progress=False)
    assert (
        main(["--input", str(source), "--output", str(out), "--fuser", "average", "--overwrite", "--no-progress"]) == 0
    )
    assert json.loads((out / "config.json").read_text())["fuser_type"] == "average"
    (tmp_path / "empty").mkdir()
    assert main(["--input", str(source), "--output", str(tmp_path / "empty"), "--fuser", "none", "--no-progress"]) == 0


def test_stale_staging_folders_are_removed_or_reported(source, tmp_path, capsys):
    out = tmp_path / "out"
    stale = tmp_path / ".out.converting-dead1234"
    stale.mkdir()
    (stale / "model-00001-of-00002.safetensors").write_bytes(b"half a shard")
    # The owner file of a process that has exited (this interpreter's pid can only be alive, so take a finished one).
    finished = subprocess.run(
        [sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True
    ).stdout.strip()
    (stale / staging_module.OWNER_FILE).write_text(
        json.dumps({"host": staging_module.socket.gethostname(), "pid": int(finished)})
    )
    unknown = tmp_path / ".out.converting-unknown1"
    unknown.mkdir()
    running = tmp_path / ".out.converting-running1"
    running.mkdir()
    (running / staging_module.OWNER_FILE).write_text(
        json.dumps({"host": staging_module.socket.gethostname(), "pid": os.getpid()})
    )
    assert main(["--input", str(source), "--output", str(out), "--fuser", "none", "--no-progress"]) == 0
    printed = capsys.readouterr().out
    assert not stale.exists() and f"removed {stale}" in printed
    assert unknown.exists() and f"rm -rf {unknown}" in printed
    assert running.exists() and str(running) not in printed  # another conversion still writing it
    assert not (out / staging_module.OWNER_FILE).exists()


def test_an_interrupted_replacement_is_recovered_by_the_next_run(source, tmp_path, capsys):
    """The states a kill -9 inside `move_into_place` leaves, as the next run finds them."""
    out = tmp_path / "out"
    argv = ["--input", str(source), "--output", str(out), "--fuser", "none", "--no-progress"]
    # Killed between the two renames: the earlier output set aside, no output, the finished staging folder (its
    # owner gone) beside it.
    aside = tmp_path / ".out.replaced-0dead000"
    convert_checkpoint(source, aside, "average", progress=False)
    staging = tmp_path / ".out.converting-0dead000"
    shutil.copytree(aside, staging)
    finished = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    owner = {"host": staging_module.socket.gethostname(), "pid": int(finished.stdout)}
    (staging / staging_module.OWNER_FILE).write_text(json.dumps(owner))
    assert main(argv) == 2  # the earlier output is back, and --overwrite is needed to replace it
    captured = capsys.readouterr()
    assert f"restored {out} from {aside}" in captured.out and "pass --overwrite" in captured.err
    assert json.loads((out / "config.json").read_text())["fuser_type"] == "average"
    assert leftovers(tmp_path) == []
    # Killed while deleting the replaced output: the new output in place, the old one half deleted.
    half = tmp_path / ".out.replaced-0dead001"
    half.mkdir()
    (half / "model-00002-of-00003.safetensors").write_bytes(b"the rest of a shard")
    assert main([*argv, "--overwrite"]) == 0
    assert f"removed {half}, an earlier output of {out} whose deletion was interrupted" in capsys.readouterr().out
    assert leftovers(tmp_path) == [] and json.loads((out / "config.json").read_text())["fuser_type"] == "none"
    # A whole earlier model beside the new output is named, never deleted unasked.
    whole = tmp_path / ".out.replaced-0dead002"
    shutil.copytree(out, whole)
    assert main([*argv, "--overwrite"]) == 0
    assert f"If you do not need the earlier one, remove it with: rm -rf {whole}" in capsys.readouterr().out
    shutil.rmtree(whole)
    # A part of an output and no output: nothing to restore; named with the command to remove it.
    shutil.rmtree(out)
    half.mkdir()
    (half / "notes.txt").write_text("not a model")
    assert main(argv) == 0
    assert f"remove it with: rm -rf {half}" in capsys.readouterr().out and half.exists()
