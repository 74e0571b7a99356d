"""Write `tests/fixtures/dense_connector_official/` with the official Dense Connector code (HJYao00/DenseConnector).

Run with the Python environment the official code pins (transformers 4.36.2) and a checkout of that repository:

    python tests/official/make_dense_connector_fixture.py /path/to/DenseConnector

The official classes build a tiny `dci` model (a 27-layer SigLIP of width 8 that reads 384 px images, as the official
tower requires 729 patches, and a 2-layer Llama of width 32) with random non-zero weights; it is saved and loaded
again as the official code loads it, and its image features (`encode_images`) and first-step logits on two images
are saved beside it. The official code is imported from the checkout, never copied.
"""

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors


FIXTURE = Path(__file__).resolve().parent.parent / "fixtures" / "dense_connector_official"
# What the released checkpoints' config.json says; the official code finds SigLIP towers by this name.
TOWER_NAME = "google/siglip-so400m-patch14-384"
TOWER_FOLDER = "siglip-so400m-patch14-384"
QUESTION = "What is shown in the image?"
# SigLIP-so400m's geometry (384 px, patch 14: the 729 patches the official tower asserts) at width 8.
TOWER = {
    "hidden_size": 8,
    "intermediate_size": 16,
    "num_hidden_layers": 27,
    "num_attention_heads": 2,
    "image_size": 384,
    "patch_size": 14,
}
LLM = {
    "hidden_size": 32,
    "intermediate_size": 64,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-5,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "pad_token_id": 0,
}
VOCAB_SIZE = 100
# The `mm_*` keys the official trainer writes for the released `dci` models. `mm_hidden_size` is set here: the
# official `initialize_vision_modules` reads the width of a default (so400m) SigLipVisionConfig, not the tower's.
MM_KEYS = {
    "mm_vision_tower": TOWER_NAME,
    "mm_dense_connector_type": "dci",
    "mm_hidden_size": 3 * TOWER["hidden_size"],
    "mm_projector_type": "mlp2x_gelu",
    "mm_vision_select_layer": -2,
    "mm_vision_select_feature": "patch",
    "mm_patch_merge_type": "flat",
    "mm_use_im_start_end": False,
    "mm_use_im_patch_token": False,
    "mm_projector_lr": None,
    "image_aspect_ratio": "pad",
    "freeze_mm_mlp_adapter": False,
    "tune_mm_mlp_adapter": False,
    "use_mm_proj": True,
    "tokenizer_model_max_length": 2048,
    "tokenizer_padding_side": "right",
}


def randomise(parameters, seed: int) -> None:
    """Non-zero random weights everywhere (norm weights and biases included), so no term hides behind a zero."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in parameters:
            parameter.copy_(torch.randn(parameter.shape, generator=generator) * 0.3)


def vicuna_like_tokenizer():
    """A word-level tokenizer with Llama's <unk>, <s>, </s> and the words of the vicuna_v1 prompt, VOCAB_SIZE tokens."""
    from transformers import PreTrainedTokenizerFast

    words = (
        "A chat between a curious user and an artificial intelligence assistant . The gives helpful , detailed "
        "polite answers to the ' s questions USER : ASSISTANT What is shown in image ?"
    ).split()
    words += [f"w{index}" for index in range(VOCAB_SIZE - 3 - len(words))]
    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    # As LLaVA saves Vicuna's tokenizer: pad is unk.
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def images() -> dict[str, Image.Image]:
    """A wide and a tall image, so the official `expand2square` pads along each side."""
    random = np.random.RandomState(0)
    return {
        name: Image.fromarray((random.rand(height, width, 3) * 255).astype("uint8"))
        for name, (width, height) in {"wide": (48, 30), "tall": (26, 40)}.items()
    }


def write_tower(folder: Path) -> None:
    """The SigLIP folder google publishes, at tiny size: the official SigLipVisionTransformer whole (27 layers and the
    pooling head, which the official SigLipVisionModel deletes when it loads it) under `vision_model.`."""
    from dc.model.multimodal_encoder.siglip_encoder import SigLipVisionConfig, SigLipVisionTransformer

    config = SigLipVisionConfig(**TOWER, architectures=["SiglipVisionModel"])
    tower = SigLipVisionTransformer(config)
    randomise(tower.parameters(), seed=1)
    config.save_pretrained(folder)
    state = {f"vision_model.{key}": value.contiguous() for key, value in tower.state_dict().items()}
    save_file(state, folder / "model.safetensors", metadata={"format": "pt"})


def write_checkpoint(folder: Path, tower_folder: Path) -> None:
    """A Dense Connector checkpoint as the official LlavaLlamaForCausalLM saves itself once trained: its tower loaded
    (so the 26 layers it runs are inside), the projector and the LLM random."""
    from dc.model import LlavaConfig, LlavaLlamaForCausalLM

    config = LlavaConfig(**LLM, vocab_size=VOCAB_SIZE, **{**MM_KEYS, "mm_vision_tower": str(tower_folder)})
    model = LlavaLlamaForCausalLM(config)
    model.get_vision_tower().load_model()
    llm_and_projector = (p for name, p in model.named_parameters() if not name.startswith("model.vision_tower."))
    randomise(llm_and_projector, seed=2)
    model.config.mm_vision_tower = TOWER_NAME
    model.save_pretrained(folder, safe_serialization=True)
    vicuna_like_tokenizer().save_pretrained(folder)


def load_official(folder: Path, tower_folder: Path):
    """`dc/model/builder.py`'s `load_pretrained_model` for a LLaVA checkpoint, in float32 (it casts to float16), the
    tower read from the local SigLIP folder instead of the Hub."""
    from dc.model import LlavaLlamaForCausalLM
    from transformers import AutoTokenizer
    from transformers.utils import logging

    # The checkpoint's tower tensors are listed as unused (checked below); the list would drown the output.
    logging.set_verbosity_error()
    tokenizer = AutoTokenizer.from_pretrained(folder, use_fast=False)
    model, loading = LlavaLlamaForCausalLM.from_pretrained(
        folder,
        low_cpu_mem_usage=True,
        torch_dtype=torch.float32,
        mm_vision_tower=str(tower_folder),
        output_loading_info=True,
    )
    # The official model builds its tower on demand, so the checkpoint's copy is left unread, as in the builder.
    assert not loading["missing_keys"], loading["missing_keys"]
    assert all(key.startswith("model.vision_tower.") for key in loading["unexpected_keys"])
    vision_tower = model.get_vision_tower()
    if not vision_tower.is_loaded:
        vision_tower.load_model()
    return tokenizer, model.eval(), vision_tower.image_processor


def official_outputs(folder: Path, tower_folder: Path, pictures: list[Image.Image]) -> dict[str, torch.Tensor]:
    """The official evaluation's prompt and preprocessing (`model_vqa_loader.py`, `--conv-mode vicuna_v1`), then
    `encode_images` and the first-step logits of the official forward."""
    from dc.constants import DEFAULT_IMAGE_TOKEN, IMAGE_TOKEN_INDEX
    from dc.conversation import conv_templates
    from dc.mm_utils import process_images, tokenizer_image_token

    tokenizer, model, image_processor = load_official(folder, tower_folder)
    conversation = conv_templates["vicuna_v1"].copy()
    conversation.append_message(conversation.roles[0], DEFAULT_IMAGE_TOKEN + "\n" + QUESTION)
    conversation.append_message(conversation.roles[1], None)
    input_ids = tokenizer_image_token(conversation.get_prompt(), tokenizer, IMAGE_TOKEN_INDEX, return_tensors="pt")
    pixel_values = process_images(pictures, image_processor, model.config)
    with torch.no_grad():
        image_features = model.encode_images(pixel_values)
        logits = model(input_ids=input_ids.repeat(len(pictures), 1), images=pixel_values).logits
    return {
        "input_ids": input_ids,
        # Every 16th pixel row and column: enough to tell preprocessing apart from the model's math, at 1/256 of the size.
        "pixel_values_every_16th": pixel_values[:, :, ::16, ::16].contiguous(),
        "image_features": image_features.contiguous(),
        "first_step_logits": logits[:, -1].contiguous(),
    }


def official_commit(checkout: Path) -> str:
    result = subprocess.run(["git", "-C", str(checkout), "rev-parse", "HEAD"], capture_output=True, text=True)
    return result.stdout.strip() if result.returncode == 0 else "unknown"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("official_checkout", type=Path, help="a checkout of github.com/HJYao00/DenseConnector")
    parser.add_argument("--official-commit", help="the checkout's commit, when it is not a git work tree")
    parser.add_argument("--output", type=Path, default=FIXTURE)
    args = parser.parse_args()
    sys.path.insert(0, str(args.official_checkout.resolve()))

    output = args.output
    (output / "images").mkdir(parents=True, exist_ok=True)
    pictures = images()
    for name, picture in pictures.items():
        picture.save(output / "images" / f"{name}.png")
    # The official code recognises a SigLIP tower by "siglip" in its path, so the tower folder keeps so400m's name.
    with tempfile.TemporaryDirectory() as scratch:
        tower_folder = Path(scratch) / TOWER_FOLDER
        write_tower(tower_folder)
        write_checkpoint(output / "dense-connector", tower_folder)
        outputs = official_outputs(output / "dense-connector", tower_folder, list(pictures.values()))
        (output / TOWER_FOLDER).mkdir(exist_ok=True)
        for file in tower_folder.iterdir():
            (output / TOWER_FOLDER / file.name).write_bytes(file.read_bytes())

    import transformers

    metadata = {
        "official_commit": args.official_commit or official_commit(args.official_checkout),
        "images": json.dumps(list(pictures)),
        "question": QUESTION,
        "conv_mode": "vicuna_v1",
        "torch": torch.__version__,
        "transformers": transformers.__version__,
    }
    save_file(outputs, output / "official_outputs.safetensors", metadata=metadata)
    for name, tensor in outputs.items():
        print(f"{name}: {tuple(tensor.shape)}")


if __name__ == "__main__":
    main()
