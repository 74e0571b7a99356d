"""The streaming converter (`fusedvlm-convert`), its model card, and publishing to a local fake Hub."""

import json
import os
import shutil
import signal
import subprocess
import sys
from importlib.metadata import entry_points
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard, ModelCardData
from safetensors import safe_open
from safetensors.torch import save_file

import hf_fusedvlm.conversion.writing as writing_module
from hf_fusedvlm import FusedLlavaConfig, fuser_class
from hf_fusedvlm.conversion import (
    VERIFY_TOLERANCES,
    ConversionError,
    convert_checkpoint,
    llava_checkpoint_key,
    main,
)
from hf_fusedvlm.publishing.hub import folder_files

from conftest import FUSER_TYPES, reads_instruction, run_without_package
from hub_server import FakeHub, Repo


REPO_ROOT = Path(__file__).resolve().parent.parent
PROMPT = "USER: <image>\nWhat is shown in the image? ASSISTANT:"
BASE_MODEL = "llava-hf/tiny-llava"
TOKEN = "hf_fake_token_never_printed_123"
SMALL_IGVA = {"aggregator_hidden_size": 64, "aggregator_num_layers": 2}  # the paper's 1024 x 4 is 25M parameters

# Run in a fresh interpreter: greedy tokens of the source LLaVA and of converted checkpoints loaded as remote code.
GENERATE_CODE = f"""
import json, os, sys
import numpy as np, torch
from PIL import Image
from transformers import AutoModel, AutoProcessor, LlavaForConditionalGeneration
source, targets = sys.argv[1], json.loads(sys.argv[2])
image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype("uint8"))
prompt = {PROMPT!r}
def generate(model, processor):
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        return model.generate(**inputs, max_new_tokens=8, do_sample=False)[0].tolist()
llava = LlavaForConditionalGeneration.from_pretrained(source)
result = {{"source": generate(llava, AutoProcessor.from_pretrained(source))}}
for name, path in targets.items():
    model = AutoModel.from_pretrained(path, trust_remote_code=True)
    processor = AutoProcessor.from_pretrained(path, trust_remote_code=True)
    assert type(model).__module__.startswith("transformers_modules"), type(model).__module__
    assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
    result[name] = generate(model, processor)
print("RESULT" + json.dumps(result))
"""


def run_generate(source, targets: dict, cwd, hub_url: str | None = None) -> dict:
    code = GENERATE_CODE
    if hub_url is not None:  # run_without_package forces offline mode: let this process reach the fake Hub only
        code = f"import os\nos.environ['HF_HUB_OFFLINE'] = '0'\nos.environ['HF_ENDPOINT'] = {hub_url!r}\n" + code
    arguments = json.dumps({name: str(path) for name, path in targets.items()})
    code = f"import sys\nsys.argv = ['-', {str(source)!r}, {arguments!r}]\n" + code
    completed = run_without_package(code, cwd)
    assert completed.returncode == 0, completed.stderr[-4000:]
    line = next(line for line in completed.stdout.splitlines() if line.startswith("RESULT"))
    return json.loads(line.removeprefix("RESULT"))


def staging_leftovers(folder: Path) -> list[str]:
    return sorted(path.name for path in folder.iterdir() if ".converting-" in path.name or ".replaced-" in path.name)


def read_checkpoint(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a safetensors checkpoint folder, keyed as in the files."""
    tensors = {}
    for shard in sorted(folder.glob("*.safetensors")):
        with safe_open(shard, framework="pt") as file:
            tensors.update({key: file.get_tensor(key) for key in file.keys()})
    return tensors


def add_vision_model_level(folder: Path) -> None:
    """Rename `vision_tower.X` to `vision_tower.vision_model.X` in every shard and the index, as in the checkpoints
    published on the Hub (saved before transformers 5 dropped that level)."""

    def rename(key: str) -> str:
        return (
            "vision_tower.vision_model." + key.removeprefix("vision_tower.") if key.startswith("vision_tower.") else key
        )

    for shard in folder.glob("*.safetensors"):
        with safe_open(shard, "pt") as handle:
            tensors = {rename(key): handle.get_tensor(key) for key in handle.keys()}
            metadata = handle.metadata()
        save_file(tensors, shard, metadata=metadata)
    index_path = folder / "model.safetensors.index.json"
    index = json.loads(index_path.read_text())
    index["weight_map"] = {rename(key): shard for key, shard in index["weight_map"].items()}
    index_path.write_text(json.dumps(index, indent=2))


# ------------------------------------------------------------------------------------------------------ fixtures


@pytest.fixture(scope="module")
def workdir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("conversion")


@pytest.fixture(scope="module")
def source(workdir, tiny_llava) -> Path:
    """The tiny LLaVA saved as a published llava-hf checkpoint is laid out (legacy names, the vision tower under
    `vision_tower.vision_model.`) in >= 3 shards, with a card carrying a license."""
    llava, processor = tiny_llava
    folder = workdir / "tiny-llava"
    llava.save_pretrained(folder, max_shard_size="500KB")
    add_vision_model_level(folder)
    processor.save_pretrained(folder)
    (folder / "README.md").write_text("---\nlicense: apache-2.0\n---\n# tiny llava\n", encoding="utf-8")
    assert len(list(folder.glob("*.safetensors"))) >= 3
    return folder


@pytest.fixture(scope="module")
def encoder_dir(workdir, tiny_instruction_encoder) -> Path:
    encoder, tokenizer = tiny_instruction_encoder
    folder = workdir / "tiny-encoder"
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def converted(workdir, source, encoder_dir) -> dict:
    """Every fuser converted from the sharded source with --verify."""
    return {
        fuser: convert_checkpoint(
            source,
            workdir / f"fused-{fuser}",
            fuser,
            instruction_encoder=encoder_dir if reads_instruction(fuser) else None,
            fuser_options=SMALL_IGVA if fuser == "igva" else None,
            verify=True,
            progress=False,
            base_model=BASE_MODEL,
        )
        for fuser in FUSER_TYPES
    }


@pytest.fixture
def hf_home(tmp_path, monkeypatch):
    """A private Hugging Face cache (remote-code modules included) for subprocesses."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    return tmp_path / "hf-home"


# --------------------------------------------------------------------------------------------------------- tests


def test_every_fuser_converts_verifies_and_keeps_source_tensors(converted, source, tiny_instruction_encoder):
    source_tensors = {llava_checkpoint_key(key): tensor for key, tensor in read_checkpoint(source).items()}
    encoder_state = tiny_instruction_encoder[0].state_dict()
    for fuser, result in converted.items():
        output = result.output
        assert result.verify_max_abs_diff <= VERIFY_TOLERANCES[torch.float32], fuser
        index = json.loads((output / "model.safetensors.index.json").read_text())
        shards = sorted(output.glob("*.safetensors"))
        assert len(shards) == len(set(index["weight_map"].values())) >= 3
        tensors = read_checkpoint(output)
        assert set(tensors) == set(index["weight_map"])
        assert index["metadata"]["total_size"] == sum(t.numel() * t.element_size() for t in tensors.values())
        for name, expected in source_tensors.items():
            actual = tensors[name]
            slot, num_slots = fuser_class(fuser).projector_slots(FusedLlavaConfig.from_pretrained(output))
            if name == "model.multi_modal_projector.linear_1.weight" and num_slots > 1:
                width = expected.shape[1]
                assert torch.equal(actual[:, slot * width : (slot + 1) * width], expected)
                assert actual.count_nonzero() == expected.count_nonzero()
            else:  # bit-identical
                assert actual.dtype == expected.dtype
                assert torch.equal(actual.view(torch.uint8), expected.view(torch.uint8))
        new = {name for name in tensors if name.startswith("model.fuser.")}
        assert (len(new) > 0) == (fuser in ("mmfuser", "igva")), fuser
        if fuser == "mmfuser":
            gammas = [tensors[name] for name in new if "gamma" in name]
            assert gammas and all(gamma.count_nonzero() == 0 for gamma in gammas)
        encoder_keys = {name for name in tensors if name.startswith("model.instruction_encoder.")}
        assert bool(encoder_keys) == reads_instruction(fuser)
        for name in encoder_keys:
            assert torch.equal(tensors[name], encoder_state[name.removeprefix("model.instruction_encoder.")])

        config = json.loads((output / "config.json").read_text())
        assert config["model_type"] == "fused_llava" and config["fuser_type"] == fuser
        assert config["auto_map"] == {
            "AutoConfig": "configuration_fused_llava.FusedLlavaConfig",
            "AutoModel": "modeling_fused_llava.FusedLlavaForConditionalGeneration",
            "AutoModelForImageTextToText": "modeling_fused_llava.FusedLlavaForConditionalGeneration",
        }
        files = set(folder_files(output))
        code = {
            "configuration_fused_llava.py",
            "modeling_fused_llava.py",
            "modeling_fusion.py",
            "checkpoint_checks.py",
            "fusers.py",
            "fuser_registry.py",
            "deformable_attention.py",
            "processing_fused_llava.py",
        }
        assert code <= files
        assert {
            "generation_config.json",
            "processor_config.json",
            "tokenizer.json",
            "chat_template.jinja",
            "README.md",
        } <= files
        assert any(path.startswith("instruction_tokenizer/") for path in files) == reads_instruction(fuser)
        processor_config = json.loads((output / "processor_config.json").read_text())
        assert processor_config["auto_map"]["AutoProcessor"] == "processing_fused_llava.FusedLlavaProcessor"
        assert staging_leftovers(output.parent) == []


def test_model_card_metadata_and_content(converted):
    for fuser, result in converted.items():
        card = ModelCard.load(result.output / "README.md")
        data = card.data.to_dict()
        assert ModelCardData(**data).to_dict() == data  # round-trips through huggingface_hub's metadata model
        assert data["library_name"] == "transformers"
        assert data["pipeline_tag"] == "image-text-to-text"
        assert data["base_model"] == BASE_MODEL
        assert data["license"] == "apache-2.0"  # carried from the source card
        assert f"fuser-{fuser}" in data["tags"] and "llava" in data["tags"]
        text = card.text
        assert "untrained" in text.lower() or "not been trained" in text
        for needle in ("trust_remote_code=True", "load_in_4bit=True", "2410.11829", "2501.08443", f"`{fuser}`"):
            assert needle in text, (fuser, needle)


def test_push_round_trip_and_loading_without_the_package(converted, source, encoder_dir, workdir, hf_home, tmp_path):
    """CLI: download the source from a local fake Hub, convert to igva with --verify, push in one commit. Then one
    fresh process without the package loads every local conversion and the pushed repo (model and processor, with
    trust_remote_code=True) and generates the source LLaVA's greedy tokens."""
    output = tmp_path / "pushed"
    target = "me/tiny-llava-igva"
    with FakeHub() as hub:
        hub.repos[BASE_MODEL] = Repo(
            BASE_MODEL, private=False, files={path: (source / path).read_bytes() for path in folder_files(source)}
        )
        hub.repos[target] = Repo(target, private=False, files={"stale.bin": b"from an earlier upload"})
        env = {
            **os.environ,
            "HF_ENDPOINT": hub.url,
            "HF_TOKEN": TOKEN,
            "HF_HUB_OFFLINE": "0",
            "HF_HUB_DISABLE_TELEMETRY": "1",
            "PYTHONPATH": str(REPO_ROOT),
        }
        command = [
            sys.executable,
            "-m",
            "conversion.convert_llava_to_fused",
            "--input",
            BASE_MODEL,
            "--output",
            str(output),
            "--fuser",
            "igva",
            "--instruction-encoder",
            str(encoder_dir),
            "--fuser-option",
            "aggregator_hidden_size=64",
            "--fuser-option",
            "aggregator_num_layers=2",
            "--verify",
            "--no-progress",
            "--push-to-hub",
            target,
            "--private",
        ]
        completed = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
        assert completed.returncode == 0, completed.stderr[-4000:]
        assert "pushed:" in completed.stdout and "verified" in completed.stdout
        assert TOKEN not in completed.stdout + completed.stderr

        repo = hub.repos[target]
        local = folder_files(output)
        assert sorted(repo.files) == local  # exactly the local output's files (the stale one deleted) ...
        assert all(repo.files[path] == (output / path).read_bytes() for path in local)  # ... byte for byte
        assert len(repo.commits) == 1 and repo.commits[0].deleted == ["stale.bin"]
        assert repo.commits[0].authorization == f"Bearer {TOKEN}"
        assert hub.created == [
            {"name": "tiny-llava-igva", "organization": "me", "visibility": "private", "type": "model"}
        ]
        assert not any(TOKEN.encode() in data for data in repo.files.values())
        assert not any(TOKEN in path.read_text(errors="ignore") for path in output.rglob("*") if path.is_file())
        assert ModelCard(repo.files["README.md"].decode()).data.base_model == BASE_MODEL

        targets = {fuser: result.output for fuser, result in converted.items()}
        tokens = run_generate(source, {**targets, "hub": target}, cwd=workdir, hub_url=hub.url)
        for name in [*FUSER_TYPES, "hub"]:
            assert tokens[name] == tokens["source"], name
        assert hub.unhandled == []


def test_bfloat16_single_file_current_layout_source(tiny_llava, tmp_path):
    """A single-file checkpoint with current (non-legacy) key names, cast to bf16 with --verify's bf16 tolerance."""
    llava, processor = tiny_llava
    folder = tmp_path / "single"
    llava.config.save_pretrained(folder)
    processor.save_pretrained(folder)
    save_file(
        {k: v.contiguous() for k, v in llava.state_dict().items()},
        folder / "model.safetensors",
        metadata={"format": "pt"},
    )
    result = convert_checkpoint(folder, tmp_path / "out", "average", dtype="bfloat16", verify=True, progress=False)
    assert result.verify_tolerance == VERIFY_TOLERANCES[torch.bfloat16]
    tensors = read_checkpoint(result.output)
    assert {t.dtype for t in tensors.values()} == {torch.bfloat16}
    assert json.loads((result.output / "config.json").read_text())["dtype"] == "bfloat16"
    expected = llava.state_dict()["model.language_model.embed_tokens.weight"].to(torch.bfloat16)
    assert torch.equal(tensors["model.language_model.embed_tokens.weight"], expected)


def _copy(source: Path, target: Path) -> Path:
    shutil.copytree(source, target)
    return target


def test_bad_inputs_are_clear_errors_and_leave_nothing(source, encoder_dir, tmp_path, capsys):
    out = tmp_path / "out"

    def fails(match, input=source, fuser="mmfuser", **kwargs):
        with pytest.raises(ConversionError, match=match):
            convert_checkpoint(input, out, fuser, progress=False, **kwargs)
        assert not out.exists() and staging_leftovers(tmp_path) == []

    not_llava = tmp_path / "not-llava"
    not_llava.mkdir()
    (not_llava / "config.json").write_text(json.dumps({"model_type": "llama", "architectures": ["LlamaForCausalLM"]}))
    fails("is not a LLaVA checkpoint.*model_type 'llama'", input=not_llava)
    empty = tmp_path / "empty"
    empty.mkdir()
    fails("has no config.json", input=empty)

    missing = _copy(source, tmp_path / "missing")
    sorted(missing.glob("model-*.safetensors"))[1].unlink()
    fails("missing 1 of the .* shards", input=missing)

    truncated = _copy(source, tmp_path / "truncated")
    shard = sorted(truncated.glob("model-*.safetensors"))[-1]
    shard.write_bytes(shard.read_bytes()[:-100])
    fails("is truncated", input=truncated)
    shard.write_bytes(b"\x01\x02")
    fails("is truncated", input=truncated)

    fails("outside the vision tower's hidden states", fuser="concat", fuser_layers=[3, 5, 40])
    fails("outside the vision tower's hidden states", fuser="average", fuser_layer_groups=[[1, 2], [9]])
    fails("needs --instruction-encoder|pass --instruction-encoder", fuser="igva")
    fails("only used by --fuser igva", fuser="none", instruction_encoder=encoder_dir)

    out.mkdir()
    (out / "keep.txt").write_text("user data")
    # --overwrite replaces only an earlier fused output: a folder of other files is refused with or without it.
    for overwrite in (False, True):
        with pytest.raises(ConversionError, match="is not empty and is not a fused LLaVA checkpoint"):
            convert_checkpoint(source, out, "none", overwrite=overwrite, progress=False)
    assert (out / "keep.txt").read_text() == "user data"

    # The command line reports the same errors without a traceback.
    assert main(["--input", str(not_llava), "--output", str(tmp_path / "cli"), "--fuser", "none"]) == 2
    assert (
        main(["--input", str(source), "--output", str(tmp_path / "cli"), "--fuser", "igva", "--fuser-groups", "1,2;x"])
        == 2
    )
    assert (
        main(
            ["--input", str(source), "--output", str(tmp_path / "cli"), "--fuser", "igva", "--fuser-option", "hidden=3"]
        )
        == 2
    )
    err = capsys.readouterr().err
    assert "error:" in err and "Traceback" not in err and "not a LLaVA" in err
    assert "--fuser-groups" in err and "--fuser-option takes NAME=VALUE" in err
    assert not (tmp_path / "cli").exists()


def test_interrupted_conversion_leaves_no_partial_output(source, tmp_path, monkeypatch):
    out = tmp_path / "out"
    convert_checkpoint(source, out, "none", progress=False)  # an earlier conversion, which --overwrite replaces
    (out / "model-00009-of-00009.safetensors").write_text("a stale shard of a previous conversion")
    before = sorted(p.name for p in out.iterdir())
    real_write_shard, calls = writing_module.write_shard, []

    def write_then_interrupt(how):
        def write_shard(*args, **kwargs):
            calls.append(args[0])
            if len(calls) == 2:  # one shard is already on disk
                if how == "signal":
                    os.kill(os.getpid(), signal.SIGTERM)
                raise KeyboardInterrupt
            return real_write_shard(*args, **kwargs)

        return write_shard

    # Ctrl-C in the middle: the staging folder goes, the existing output (even with --overwrite) stays as it was.
    monkeypatch.setattr(writing_module, "write_shard", write_then_interrupt("keyboard"))
    with pytest.raises(KeyboardInterrupt):
        convert_checkpoint(source, out, "mmfuser", overwrite=True, progress=False)
    assert calls[0].parent.name.startswith(".out.converting-") and not calls[0].exists()
    assert sorted(p.name for p in out.iterdir()) == before and staging_leftovers(tmp_path) == []

    # SIGTERM (e.g. `kill`) to the command line: same, exit status 130.
    calls.clear()
    monkeypatch.setattr(writing_module, "write_shard", write_then_interrupt("signal"))
    fresh = tmp_path / "fresh"
    assert main(["--input", str(source), "--output", str(fresh), "--fuser", "none", "--no-progress"]) == 130
    assert not fresh.exists() and staging_leftovers(tmp_path) == []

    # A completed conversion with --overwrite replaces the old content.
    monkeypatch.setattr(writing_module, "write_shard", real_write_shard)
    convert_checkpoint(source, out, "none", overwrite=True, progress=False)
    assert not (out / "model-00009-of-00009.safetensors").exists() and (out / "config.json").is_file()


def test_demo_command_and_console_script(hf_home):
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    completed = subprocess.run(
        [sys.executable, "-m", "conversion.convert_llava_to_fused", "--demo", "--no-progress", "--max-new-tokens", "4"],
        cwd=REPO_ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert completed.returncode == 0, completed.stderr[-4000:]
    out = completed.stdout
    for needle in (
        "tiny LLaVA",
        "verified",
        "AutoModel + AutoProcessor",
        "answer:",
        "same tokens as the source LLaVA: True",
        "fusedvlm-convert --input llava-hf/llava-1.5-7b-hf",
    ):
        assert needle in out, needle
    # The console script is declared in pyproject.toml and points at the same main().
    scripts = {ep.name: ep for ep in entry_points(group="console_scripts")}
    if "fusedvlm-convert" not in scripts:
        pytest.skip("fusedvlm-convert is not installed: re-run `pip install -e .` to register the console script")
    assert scripts["fusedvlm-convert"].load() is main


def test_a_source_without_chat_template_converts_with_a_warning(source, encoder_dir, tmp_path, capsys):
    """The converted processor has nothing to render conversations with: the converter says so, and for a fuser that
    reads the instruction also what the fuser would read instead."""
    bare = _copy(source, tmp_path / "no-template")
    for name in ("chat_template.jinja", "chat_template.json"):
        (bare / name).unlink(missing_ok=True)
    convert_checkpoint(bare, tmp_path / "concat", "concat", progress=False)
    printed = capsys.readouterr().out
    assert "warning: the source's processor has no chat template" in printed and "role words" not in printed
    convert_checkpoint(
        bare, tmp_path / "igva", "igva", instruction_encoder=encoder_dir, fuser_options=SMALL_IGVA, progress=False
    )
    assert "role words such as 'USER:' included" in capsys.readouterr().out
    convert_checkpoint(source, tmp_path / "templated", "concat", progress=False)
    assert "chat template" not in capsys.readouterr().out
