"""Bad training inputs (issue 14): each fails before training with a message naming the problem and the fix; none
trains silently on the wrong thing, loses data or writes a secret."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from hf_fusedvlm.conversion import fused_from_llava
from hf_fusedvlm.processing_fused_llava import FusedLlavaProcessor
from hf_fusedvlm.synthetic_vqa import write_llava_dataset
from hf_fusedvlm.training import FusedLlavaDataCollator, InvalidTrainingInput, LlavaConversationDataset, main
from hf_fusedvlm.training.cli import check_output_dir
from hf_fusedvlm.training.trainer import replacing_fused_files


REPO_ROOT = Path(__file__).resolve().parent.parent
QUESTION = {"from": "human", "value": "What colour is the square?"}
ANSWER = {"from": "gpt", "value": "red"}


@pytest.fixture(scope="module")
def folders(tmp_path_factory, tiny_llava):
    """`fused/` (a converted `none` checkpoint with processor), `llava-hf/` (the plain source) and `data/` (2 good
    synthetic records)."""
    root = tmp_path_factory.mktemp("training-errors")
    llava, llava_processor = tiny_llava
    fused_from_llava(llava, "none").save_pretrained(root / "fused")
    FusedLlavaProcessor.from_llava_processor(llava_processor).save_pretrained(root / "fused")
    llava.save_pretrained(root / "llava-hf")
    llava_processor.save_pretrained(root / "llava-hf")
    write_llava_dataset(root / "data", 2, seed=0)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not the rest of a PNG")
    shutil.copytree(root / "fused", root / "another-fused")  # an earlier training run's output
    (root / "a-file").write_text("not a folder")
    fused_from_llava(llava, "none").save_pretrained(root / "shard-missing", max_shard_size="200KB")
    shards = sorted((root / "shard-missing").glob("model-*.safetensors"))
    shards[1].unlink()
    return root


def data_file(root: Path, name: str, records) -> Path:
    path = root / f"{name}.json"
    path.write_text(records if isinstance(records, str) else json.dumps(records))
    return path


# (case, model folder, JSON data (None: the good synthetic set), extra arguments, expected message)
BAD_INPUTS = [
    (
        "no human turn",
        "fused",
        [[QUESTION, ANSWER], [{"from": "assistant", "value": "red"}]],
        [],
        r"Record 1 of .*: `conversations` has no human \(or user\) turn",
    ),
    (
        "all answers empty",
        "fused",
        [[QUESTION, {"from": "gpt", "value": ""}], [QUESTION, {"from": "assistant", "value": " "}]],
        [],
        r"Every answer \(gpt turn\) in .* is empty: training would only learn to stop",
    ),
    (
        "missing value",
        "fused",
        [[QUESTION, {"from": "gpt"}]],
        [],
        r"Record 0 of .*: `conversations\[1\].value` is missing",
    ),
    (
        "list value",
        "fused",
        [[{"from": "human", "value": ["a", "b"]}, ANSWER]],
        [],
        r"`conversations\[0\].value` is a list: give the turn's text as one string",
    ),
    ("string record", "fused", ["What colour is the square?"], [], r"Record 0 of .* is a str, not an object"),
    (
        "unknown speaker",
        "fused",
        [[{"from": "bot", "value": "hi"}, ANSWER]],
        [],
        r"`conversations\[0\].from` is 'bot': use one of human, user, gpt, assistant, system",
    ),
    (
        "missing image",
        "fused",
        [{"image": "nowhere.png", "conversations": [QUESTION, ANSWER]}],
        [],
        r"`image` .*nowhere.png not found: pass --image_folder",
    ),
    (
        "JSON syntax error",
        "fused",
        '[\n  {"conversations": []},\n  {"conversations": ]\n]',
        [],
        r"data-JSON syntax error.json is not valid JSON: .* at line 3, column",
    ),
    ("empty list", "fused", [], [], r"must hold a non-empty JSON list"),
    (
        "nonexistent model",
        "./no-such-checkpoint",
        None,
        [],
        r"no-such-checkpoint does not exist: pass a fused checkpoint",
    ),
    ("config.json as model", "fused/config.json", None, [], r"is a file: pass the checkpoint folder"),
    (
        "unconverted llava-hf",
        "llava-hf",
        None,
        [],
        r"plain llava-hf LLaVA .*random model\. Convert it first: `fusedvlm-convert --input .*llava-hf --output "
        r"llava-hf-fused --fuser igva`",
    ),
    (
        "learning rate not a number",
        "fused",
        None,
        ["--parameter_learning_rates", "model.fuser.=fast"],
        r"--parameter_learning_rates: 'model.fuser.=fast' is not NAME=LR",
    ),
    (
        "learning rate names no trainable parameter",
        "fused",
        None,
        ["--parameter_learning_rates", "vision_tower=1e-4"],
        r"--parameter_learning_rates: no trainable parameter's name contains 'vision_tower'",
    ),
    (
        "output is the source",
        "fused",
        None,
        ["--output_dir", "{root}/fused"],
        r"--output_dir .* is the --model_name_or_path .* folder: saving there would overwrite",
    ),
    (
        "output inside the source",
        "fused",
        None,
        ["--output_dir", "{root}/fused/run"],
        r"is inside the --model_name_or_path .* folder",
    ),
    (
        "output holds another fused model",
        "fused",
        None,
        ["--output_dir", "{root}/another-fused"],
        r"--output_dir .*another-fused already holds a fused model .*pass --overwrite_output_dir",
    ),
    (
        "shard deleted",
        "shard-missing",
        None,
        [],
        r"--model_name_or_path .*shard-missing is incomplete: its model.safetensors.index.json names "
        r"model-00002-of-\d+.safetensors, which is missing; download or copy the whole checkpoint again\.",
    ),
    ("output is a file", "fused", None, ["--output_dir", "{root}/a-file"], r"--output_dir .*a-file is a file"),
    (
        "corrupt image",
        "fused",
        [{"image": "corrupt.png", "conversations": [QUESTION, ANSWER]}],
        [],
        r"Record 0 of .*: `image` .*corrupt.png is not an image PIL can read \(UnidentifiedImageError: .*replace the "
        r"file or remove the record",
    ),
]


@pytest.mark.parametrize(
    ("case", "model", "records", "extra", "message"), BAD_INPUTS, ids=[row[0] for row in BAD_INPUTS]
)
def test_bad_input_is_refused_before_training(folders, case, model, records, extra, message):
    if records is None:
        data = folders / "data" / "data.json"
    else:
        rows = (
            [row if not isinstance(row, list) else {"conversations": row} for row in records]
            if isinstance(records, list)
            else records
        )
        data = data_file(folders, f"data-{case}", rows)
    model_path = model if model.startswith("./") else str(folders / model)
    extra = [argument.format(root=folders) for argument in extra]
    output = [] if "--output_dir" in extra else ["--output_dir", str(folders / f"out-{case}")]
    shards_before = {path: path.stat().st_mtime_ns for path in (folders / "fused").iterdir()}
    other_before = {path: path.stat().st_mtime_ns for path in (folders / "another-fused").iterdir()}
    with pytest.raises(InvalidTrainingInput, match=message):
        main(
            [
                "--model_name_or_path",
                model_path,
                "--data_path",
                str(data),
                *output,
                *extra,
                "--max_steps",
                "1",
                "--report_to",
                "none",
                "--use_cpu",
                "true",
            ]
        )
    assert not (folders / f"out-{case}").exists()  # refused before anything was written
    assert {path: path.stat().st_mtime_ns for path in (folders / "fused").iterdir()} == shards_before
    assert {path: path.stat().st_mtime_ns for path in (folders / "another-fused").iterdir()} == other_before


def test_user_and_assistant_roles_train(folders):
    """Records with `from: user / assistant` (what many users write) are LLaVA records too."""
    data = data_file(
        folders,
        "roles",
        [{"conversations": [{"from": "user", "value": "Colour?"}, {"from": "assistant", "value": "red"}]}],
    )
    processor = FusedLlavaProcessor.from_pretrained(folders / "fused")
    batch = FusedLlavaDataCollator(processor)([LlavaConversationDataset(data)[0]])
    labelled = processor.tokenizer.decode(batch["input_ids"][0][batch["labels"][0] != -100])
    assert labelled.split() == ["red", "</s>"]


def test_unreachable_hub_is_one_clear_line_and_never_shows_the_token(folders, tmp_path):
    """`--push_to_hub` with an endpoint nobody listens on: exit 2, one line naming the endpoint and the way out, no
    traceback, and the token appears nowhere."""
    command = [
        sys.executable,
        "-m",
        "hf_fusedvlm.training",
        "--model_name_or_path",
        str(folders / "fused"),
        "--data_path",
        str(folders / "data" / "data.json"),
        "--output_dir",
        str(tmp_path / "out"),
        "--max_steps",
        "1",
        "--report_to",
        "none",
        "--use_cpu",
        "true",
        "--push_to_hub",
        "--hub_model_id",
        "user/trained",
        "--hub_token",
        "hf_secret_value_42",
    ]
    env = {**os.environ, "HF_ENDPOINT": "http://127.0.0.1:9", "HF_HUB_OFFLINE": "0", "PYTHONPATH": str(REPO_ROOT)}
    completed = subprocess.run(command, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert completed.returncode == 2, completed.stderr[-3000:]
    assert "Traceback" not in completed.stderr
    assert (
        "fusedvlm-train: error: --push_to_hub: the Hub at http://127.0.0.1:9 could not be reached" in completed.stderr
    )
    assert "train without --push_to_hub" in completed.stderr
    assert "hf_secret_value_42" not in completed.stdout + completed.stderr


def test_replacing_a_fused_model_leaves_no_stale_file_and_keeps_the_others(tmp_path):
    """What --overwrite_output_dir (and every save of the trainer) does to a folder holding an earlier sharded igva
    model: its shards, index and instruction_tokenizer/ go, the user's files and checkpoints stay."""
    folder = tmp_path / "out"
    (folder / "instruction_tokenizer").mkdir(parents=True)
    (folder / "instruction_tokenizer" / "tokenizer.json").write_text("{}")
    for name in ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors", "config.json"):
        (folder / name).write_text("old")
    (folder / "model.safetensors.index.json").write_text("{}")
    (folder / "notes.txt").write_text("mine")
    (folder / "checkpoint-5").mkdir()
    with replacing_fused_files(folder) as staging:
        assert not (folder / "config.json").read_text() == "new"  # the earlier model stays until the new one is whole
        (staging / "config.json").write_text("new")
        (staging / "model.safetensors").write_text("new")
    assert sorted(path.name for path in folder.iterdir()) == [
        "checkpoint-5",
        "config.json",
        "model.safetensors",
        "notes.txt",
    ]
    assert (folder / "config.json").read_text() == "new"
    with pytest.raises(RuntimeError), replacing_fused_files(folder) as staging:  # a failed save changes nothing
        (staging / "config.json").write_text("broken")
        raise RuntimeError
    assert (folder / "config.json").read_text() == "new" and len(list(folder.iterdir())) == 4
    (folder / "config.json").write_text(json.dumps({"model_type": "fused_llava"}))
    with pytest.raises(InvalidTrainingInput, match="already holds a fused model"):
        check_output_dir(str(folder), str(tmp_path / "source"))
    check_output_dir(str(folder), str(tmp_path / "source"), overwrite=True)  # the flag lets training replace it
    check_output_dir(str(folder), str(tmp_path / "source"), resuming=True)  # so does resuming this run


def test_an_image_damaged_after_its_header_is_one_clear_line_when_loaded(tmp_path):
    """The check before training reads headers only; the rest of a damaged file fails where it is read, naming it."""
    Image.new("RGB", (64, 64), "red").save(tmp_path / "cut.png")
    data = (tmp_path / "cut.png").read_bytes()
    (tmp_path / "cut.png").write_bytes(data[: len(data) // 2])
    dataset = LlavaConversationDataset(
        data_file(tmp_path, "cut", [{"image": "cut.png", "conversations": [QUESTION, ANSWER]}])
    )
    with pytest.raises(InvalidTrainingInput, match=r"Record 0: the image .*cut.png could not be read \(OSError: "):
        dataset[0]
