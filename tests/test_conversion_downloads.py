"""Every argument is checked before any weights are downloaded: `fusedvlm-convert` against a local fake Hub that
counts the bytes it serves. A refused conversion reads only JSON files (configs, shard indexes, sentence-transformers
settings); a good one downloads each weight file once."""

import json
from pathlib import Path

import pytest
from huggingface_hub import constants
from transformers import BertConfig

from hf_fusedvlm.conversion import main
from hf_fusedvlm.publishing.hub import folder_files

from hub_server import FakeHub, Repo


LLAVA = "llava-hf/tiny-llava"
ENCODER = "org/tiny-encoder"
ENCODER_WITHOUT_TOKENIZER = "org/tiny-encoder-without-tokenizer"
ORIGINAL_IGVA = "org/tiny-igva-original"
ORIGINAL_LLAVA = "org/tiny-llava-original"
ORIGINAL_NEXT = "org/tiny-llava-v1.6-original"
NOT_A_TOWER = "org/bert"
JUNK_WEIGHTS = b"\0" * 300_000  # never a valid shard: reading it at all would be a failure of these tests


def repo_of(repo_id: str, folder: Path) -> Repo:
    return Repo(repo_id, private=False, files={path: (folder / path).read_bytes() for path in folder_files(folder)})


def junk_weight_repo(repo_id: str, config: dict) -> Repo:
    """A repo whose config.json and shard index are real and whose weights are junk bytes."""
    index = {"metadata": {}, "weight_map": {"model.embed_tokens.weight": "model-00001-of-00001.safetensors"}}
    files = {
        "config.json": json.dumps(config).encode(),
        "model.safetensors.index.json": json.dumps(index).encode(),
        "model-00001-of-00001.safetensors": JUNK_WEIGHTS,
    }
    return Repo(repo_id, private=False, files=files)


def original_config(llava, **mm_keys) -> dict:
    """A flat original-format config (as haotian-liu/LLaVA saves one) around the tiny LLaVA's LLM."""
    config = llava.config.text_config.to_dict()
    config.update(
        model_type="llava",
        architectures=["LlavaLlamaForCausalLM"],
        mm_vision_tower="openai/clip-vit-large-patch14-336",
        mm_hidden_size=llava.config.vision_config.hidden_size,
        mm_vision_select_layer=-2,
        mm_projector_type="mlp2x_gelu",
        image_aspect_ratio="pad",
        **mm_keys,
    )
    return config


@pytest.fixture(scope="module")
def hub(tmp_path_factory, tiny_llava, tiny_instruction_encoder):
    work = tmp_path_factory.mktemp("downloads")
    llava, processor = tiny_llava
    llava.save_pretrained(work / "llava", max_shard_size="500KB")
    processor.save_pretrained(work / "llava")
    encoder, tokenizer = tiny_instruction_encoder
    encoder.save_pretrained(work / "encoder")
    tokenizer.save_pretrained(work / "encoder")
    bert = {**BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=2).to_dict(), "model_type": "bert"}
    with FakeHub() as hub:
        hub.repos[LLAVA] = repo_of(LLAVA, work / "llava")
        hub.repos[ENCODER] = repo_of(ENCODER, work / "encoder")
        config_only = {
            "config.json": (work / "encoder" / "config.json").read_bytes(),
            "model.safetensors": JUNK_WEIGHTS,
        }
        hub.repos[ENCODER_WITHOUT_TOKENIZER] = Repo(ENCODER_WITHOUT_TOKENIZER, private=False, files=config_only)
        igva = original_config(llava, vit_aggregate_groups="[[1, 2], [3]]", sentence_embedder="all-mpnet-base-v2")
        hub.repos[ORIGINAL_IGVA] = junk_weight_repo(ORIGINAL_IGVA, igva)
        hub.repos[ORIGINAL_LLAVA] = junk_weight_repo(ORIGINAL_LLAVA, original_config(llava))
        next_config = original_config(llava, mm_patch_merge_type="spatial_unpad")
        next_config["image_aspect_ratio"] = "anyres"  # LLaVA-1.6 without its image_grid_pinpoints
        hub.repos[ORIGINAL_NEXT] = junk_weight_repo(ORIGINAL_NEXT, next_config)
        hub.repos[NOT_A_TOWER] = junk_weight_repo(NOT_A_TOWER, bert)
        yield hub


@pytest.fixture
def online(hub, tmp_path, monkeypatch):
    """The Hub client pointed at the fake Hub, with an empty cache of its own."""
    monkeypatch.setattr(constants, "ENDPOINT", hub.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", hub.url + "/{repo_id}/resolve/{revision}/{filename}")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    hub.served.clear()
    return hub


def weight_bytes_served(hub) -> dict[str, int]:
    return {f"{repo}/{path}": count for (repo, path), count in hub.served.items() if not path.endswith(".json")}


REFUSED = {
    "igva without an instruction encoder": (
        ["--input", LLAVA, "--fuser", "igva"],
        "--fuser igva embeds the user's instruction: pass --instruction-encoder",
    ),
    "layer out of range": (["--input", LLAVA, "--fuser", "concat", "--fuser-layers", "1,2,40"], "fuser settings"),
    "a LLaVA as the instruction encoder": (
        ["--input", LLAVA, "--fuser", "igva", "--instruction-encoder", LLAVA],
        "not a text encoder",
    ),
    "an instruction encoder without tokenizer files": (
        ["--input", LLAVA, "--fuser", "igva", "--instruction-encoder", ENCODER_WITHOUT_TOKENIZER],
        "lacks the tokenizer files",
    ),
    "a vision tower for a llava-hf checkpoint": (
        ["--input", LLAVA, "--fuser", "none", "--vision-tower", NOT_A_TOWER],
        "drop --vision-tower",
    ),
    "trained IGVA without its instruction encoder": (
        ["--input", ORIGINAL_IGVA, "--vision-tower", NOT_A_TOWER],
        "(the checkpoint was trained with all-mpnet-base-v2)",
    ),
    "another fuser for a trained IGVA": (
        ["--input", ORIGINAL_IGVA, "--vision-tower", NOT_A_TOWER, "--fuser", "mmfuser"],
        "it converts to fuser igva, not mmfuser",
    ),
    "a BERT as the vision tower": (
        ["--input", ORIGINAL_LLAVA, "--vision-tower", NOT_A_TOWER, "--fuser", "concat"],
        "is a 'bert' model",
    ),
    "no vision tower": (["--input", ORIGINAL_LLAVA], "pass --vision-tower"),
    "LLaVA-1.6 without pinpoints": (
        ["--input", ORIGINAL_NEXT, "--vision-tower", NOT_A_TOWER, "--fuser", "mmfuser"],
        "image_aspect_ratio 'anyres' but no image_grid_pinpoints",
    ),
    "a push without a token": (
        ["--input", LLAVA, "--fuser", "none", "--push-to-hub", "me/fused"],
        "no Hugging Face token is set",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_refused_before_any_weights_are_downloaded(case, online, tmp_path, capsys):
    argv, message = REFUSED[case]
    code = main([*argv, "--output", str(tmp_path / "out"), "--no-progress"])
    error = capsys.readouterr().err
    assert code == 2, error
    assert message in error
    assert weight_bytes_served(online) == {}
    assert not (tmp_path / "out").exists()


def test_a_good_conversion_downloads_each_weight_file_once(online, tmp_path, capsys):
    argv = ["--input", LLAVA, "--fuser", "igva", "--instruction-encoder", ENCODER, "--output", str(tmp_path / "out")]
    assert main([*argv, "--no-progress"]) == 0, capsys.readouterr().err
    expected = {
        f"{repo}/{path}": len(data)
        for repo in (LLAVA, ENCODER)
        for path, data in online.repos[repo].files.items()
        if path.endswith((".safetensors", ".bin"))
    }
    assert len(expected) >= 4  # several shards of the LLaVA and the encoder's weights
    assert weight_bytes_served(online) | expected == weight_bytes_served(online)
    assert {key: weight_bytes_served(online)[key] for key in expected} == expected
    assert (tmp_path / "out" / "config.json").is_file()
