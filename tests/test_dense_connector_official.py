"""An imported Dense Connector checkpoint against the official code itself (HJYao00/DenseConnector), not a re-derivation.

`fixtures/dense_connector_official/` holds a tiny `dci` checkpoint and the SigLIP tower it names, both written with
the official classes (random non-zero weights), two images, and what the official code computes from them: the
prompt's input ids, a sample of the pixels, `encode_images` (image features after the projector) and the first-step
logits. `official/make_dense_connector_fixture.py` wrote it (see the fixture's README.md). Here the checkpoint goes
through `fusedvlm-convert` and is run through `AutoModel` with `trust_remote_code=True` where `hf_fusedvlm` cannot
be imported.
"""

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import load_file
from test_dense_connector import relative_error

from hf_fusedvlm.conversion import main

from conftest import run_without_package


FIXTURE = Path(__file__).resolve().parent / "fixtures" / "dense_connector_official"
OFFICIAL_IMAGE_TOKEN = -200  # IMAGE_TOKEN_INDEX: the official prompt's one placeholder per image

REMOTE_OUTPUTS = """
import torch
from PIL import Image
from safetensors.torch import save_file
from transformers import AutoModel, AutoProcessor

model = AutoModel.from_pretrained(%(folder)r, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained(%(folder)r, trust_remote_code=True)
images = [Image.open(path).convert("RGB") for path in %(images)r]
conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": %(question)r}]}]
prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
inputs = processor(images=images, text=[prompt] * len(images), return_tensors="pt")
with torch.no_grad():
    features = model.get_image_features(inputs["pixel_values"]).pooler_output
    logits = model(**inputs).logits
outputs = {
    "input_ids": inputs["input_ids"],
    "pixel_values_every_16th": inputs["pixel_values"][:, :, ::16, ::16].contiguous(),
    "image_features": torch.stack(list(features)),
    "first_step_logits": logits[:, -1].contiguous(),
}
save_file(outputs, %(outputs)r)
print(type(model).__module__)
"""


def official_prompt(input_ids: torch.Tensor, image_token_index: int) -> list[int]:
    """The processor's ids as the official code writes them: each run of `<image>` tokens one -200."""
    ids = input_ids.tolist()
    return [
        OFFICIAL_IMAGE_TOKEN if token == image_token_index else token
        for position, token in enumerate(ids)
        if token != image_token_index or position == 0 or ids[position - 1] != image_token_index
    ]


def test_converted_checkpoint_computes_what_the_official_code_computes(tmp_path):
    """The official features and first-step logits, to 1e-5, from the converted model loaded without the package."""
    official = load_file(FIXTURE / "official_outputs.safetensors")
    with safe_open(FIXTURE / "official_outputs.safetensors", "pt") as file:
        metadata = file.metadata()
    converted = tmp_path / "converted"
    arguments = ["--input", str(FIXTURE / "dense-connector"), "--output", str(converted), "--no-progress"]
    assert main([*arguments, "--vision-tower", str(FIXTURE / "siglip-so400m-patch14-384")]) == 0
    config = json.loads((converted / "config.json").read_text())
    assert (config["fuser_type"], config["dense_connector_type"]) == ("dense_connector", "dci")

    images = [str(FIXTURE / "images" / f"{name}.png") for name in json.loads(metadata["images"])]
    code = REMOTE_OUTPUTS % {
        "folder": str(converted),
        "images": images,
        "question": metadata["question"],
        "outputs": str(tmp_path / "outputs.safetensors"),
    }
    result = run_without_package(code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-3000:]
    assert result.stdout.split()[-1].startswith("transformers_modules")
    actual = load_file(tmp_path / "outputs.safetensors")

    # The same prompt (the vicuna_v1 conversation) and the same pixels (expand2square, 384 px bicubic) first, so a
    # difference below is the model's.
    for input_ids in actual["input_ids"]:
        assert official_prompt(input_ids, config["image_token_index"]) == official["input_ids"].tolist()
    assert relative_error(actual["pixel_values_every_16th"], official["pixel_values_every_16th"]) <= 1e-6
    assert actual["image_features"].shape == official["image_features"].shape == (2, 729, 32)
    assert relative_error(actual["image_features"], official["image_features"]) <= 1e-5
    # The converted vocabulary adds <image> and <pad> rows; the official one is the first 100.
    vocab = official["first_step_logits"].shape[-1]
    assert relative_error(actual["first_step_logits"][:, :vocab], official["first_step_logits"]) <= 1e-5
