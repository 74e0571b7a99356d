"""Import of Dense Connector's any-resolution checkpoints (HuanjinYao/DenseConnector-v1.5-SigLIP-7B-AnyRes layout: the
LLaVA-1.6 keys `image_aspect_ratio: anyres`, `image_grid_pinpoints`, `mm_patch_merge_type: spatial_unpad` and
`model.image_newline`, plus `mm_dense_connector_type` and `mm_hidden_size` = 3 x SigLIP width) into fused LLaVA-NeXT.

The reference is the official computation, step by step, on a tiny checkpoint with random non-zero weights: its
preprocessing (the best pinpoint chosen on (width, height), the image resized into it and padded with black, cut into
384 px tiles, the base view resized to 384 x 384, each crop through the SigLIP processor), its tower (transformers'
SigLIP without the last layer), the Dense Connector on every crop (`reference_math.dense_connector_reference`), the
projector, then its packing (tiles laid out as a grid, unpadded from the (width, height) size with the side truncated,
`image_newline` after each row, the base view first) and its LLM on the text around the image features."""

import math
from types import SimpleNamespace

import pytest
import torch
from PIL import Image
from test_dense_connector import (
    IMAGE_TOKEN,
    SIGLIP_NAME,
    SIGLIP_SO400M,
    reference_logits,
    relative_error,
    siglip_pixels,
    write_siglip_tower,
)
from test_original_conversion import (
    ORIGINAL_VOCAB,
    original_config,
    original_llm_state,
    original_tokenizer,
    random_tensors,
    write_original,
)
from test_original_next_conversion import original_grid
from transformers import (
    AutoConfig,
    AutoModel,
    AutoProcessor,
    LlavaConfig,
    LlavaForConditionalGeneration,
    SiglipVisionModel,
)

from hf_fusedvlm import FusedLlavaNextConfig, FusedLlavaNextProcessor
from hf_fusedvlm.conversion import convert_checkpoint
from hf_fusedvlm.conversion.original_processor import VICUNA_V1_CHAT_TEMPLATE
from hf_fusedvlm.tiny import tiny_llava_config

from conftest import make_image, randomise
from reference_math import StateView, dense_connector_reference, mlp_projector_reference


TILE = 384  # SigLIP-so400m's image size: every crop, the base view and each tile
SIDE = TILE // 14  # 27 patches a side, 729 per crop
# (width, height), as the official config lists them; the 3x1 layout has no 1x3 twin, so reading the pairs the wrong
# way round would tile the wide image differently.
ORIGINAL_PINPOINTS = [[768, 384], [384, 768], [768, 768], [1152, 384]]
# PIL (width, height): a wide image (1 x 3 tiles, rows unpadded) and a tall one (2 x 1 tiles, columns unpadded).
IMAGE_SIZES = [(1000, 300), (300, 700)]
PROMPT = "What is shown in the image?"


def images():
    return [make_image(seed, size=64).resize(size) for seed, size in enumerate(IMAGE_SIZES)]


@pytest.fixture(scope="module")
def anyres_checkpoint(tmp_path_factory):
    """A Dense Connector AnyRes checkpoint in the official layout (as the `dense_connector` fixture of
    test_dense_connector.py, plus the any-resolution keys and `model.image_newline`), converted with --verify."""
    root = tmp_path_factory.mktemp("dense-anyres")
    llm_config = tiny_llava_config(original_tokenizer())
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            text_config={**llm_config.text_config.to_dict(), "vocab_size": 128, "pad_token_id": 101},
            vision_config=llm_config.vision_config,
            image_token_index=IMAGE_TOKEN,
        )
    )
    randomise(llava, seed=13)
    tower = SiglipVisionModel(AutoConfig.for_model(**SIGLIP_SO400M)).eval()
    randomise(tower, seed=14)
    tower_state = tower.vision_model.state_dict() if hasattr(tower, "vision_model") else tower.state_dict()
    write_siglip_tower(root / "siglip", tower_state)
    run_tower = {
        f"model.vision_tower.vision_tower.vision_model.{key}": value
        for key, value in tower_state.items()
        if not key.startswith("encoder.layers.26.")
    }
    trained = random_tensors(
        {
            "model.mm_projector.0.weight": (64, 192),
            "model.mm_projector.0.bias": (64,),
            "model.mm_projector.2.weight": (64, 64),
            "model.mm_projector.2.bias": (64,),
            "model.image_newline": (64,),
        },
        seed=15,
    )
    state = {**original_llm_state(llava), **trained, **run_tower}
    config = original_config(
        llava,
        model_type="llava_llama",
        mm_vision_tower=SIGLIP_NAME,
        mm_hidden_size=192,
        mm_dense_connector_type="dci",
        image_aspect_ratio="anyres",
        image_grid_pinpoints=ORIGINAL_PINPOINTS,
        mm_patch_merge_type="spatial_unpad",
        tokenizer_model_max_length=4096,
    )
    write_original(root / "dense-connector-anyres", config, state)
    result = convert_checkpoint(
        root / "dense-connector-anyres", root / "fused", vision_tower=root / "siglip", verify=True, progress=False
    )
    model = AutoModel.from_pretrained(root / "fused", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(root / "fused", trust_remote_code=True)
    return SimpleNamespace(
        root=root, llava=llava, state=state, config=config, result=result, model=model, processor=processor
    )


# ------------------------------------------------------------------------------------- the official computation


def official_crops(image) -> tuple[torch.Tensor, tuple[int, int]]:
    """The official any-resolution preprocessing: (crops `(1 + rows * cols, 3, 384, 384)`, (rows, cols))."""
    rows, cols = original_grid(image, ORIGINAL_PINPOINTS, TILE)
    target_width, target_height = cols * TILE, rows * TILE
    width, height = image.size
    scale_width, scale_height = target_width / width, target_height / height
    if scale_width < scale_height:
        new_width, new_height = target_width, min(math.ceil(height * scale_width), target_height)
    else:
        new_width, new_height = min(math.ceil(width * scale_height), target_width), target_height
    canvas = Image.new("RGB", (target_width, target_height), (0, 0, 0))
    canvas.paste(
        image.resize((new_width, new_height)), ((target_width - new_width) // 2, (target_height - new_height) // 2)
    )
    tiles = [
        canvas.crop((col * TILE, row * TILE, (col + 1) * TILE, (row + 1) * TILE))
        for row in range(rows)
        for col in range(cols)
    ]
    # The official SigLIP processor's size is a (384, 384) tuple: the base view is resized to it, not padded.
    crops = [image.resize((TILE, TILE))] + tiles
    return torch.stack([siglip_pixels(crop) for crop in crops]), (rows, cols)


def official_packing(crop_features, image, grid, newline) -> torch.Tensor:
    """The official `spatial_unpad` packing of one image's crop features `(crops, 729, C)`: the base view's tokens,
    then the tiles' as one grid, unpadded (the original (width, height), the kept side truncated to an integer), each
    grid row ended by `newline`."""
    rows, cols = grid
    base, tiles = crop_features[0], crop_features[1:]
    channels = base.shape[-1]
    layout = tiles.reshape(rows, cols, SIDE, SIDE, channels).permute(0, 2, 1, 3, 4)
    layout = layout.reshape(rows * SIDE, cols * SIDE, channels)
    width, height = image.size
    grid_height, grid_width = layout.shape[:2]
    if width / height > grid_width / grid_height:
        kept = int(height * (grid_width / width))
        padding = (grid_height - kept) // 2
        layout = layout[padding : grid_height - padding]
    else:
        kept = int(width * (grid_height / height))
        padding = (grid_width - kept) // 2
        layout = layout[:, padding : grid_width - padding]
    layout = torch.cat([layout, newline.expand(layout.shape[0], 1, channels)], dim=1)
    return torch.cat([base, layout.reshape(-1, channels)])


def official_image_features(checkpoint, image) -> torch.Tensor:
    """The official image features of one image, float64: every crop through the tower as the official code runs it
    (without its last layer), the Dense Connector, the projector, then the packing."""
    crops, grid = official_crops(image)
    tower = SiglipVisionModel(AutoConfig.for_model(**{**SIGLIP_SO400M, "num_hidden_layers": 26})).eval()
    prefix = "model.vision_tower.vision_tower.vision_model."
    run_state = {key.removeprefix(prefix): value for key, value in checkpoint.state.items() if key.startswith(prefix)}
    (tower.vision_model if hasattr(tower, "vision_model") else tower).load_state_dict(run_state)
    with torch.no_grad():
        hidden_states = tower(crops, output_hidden_states=True).hidden_states
    projector = StateView(checkpoint.state, "model.mm_projector.")
    crop_features = torch.stack(
        [
            mlp_projector_reference(
                dense_connector_reference([state[crop] for state in hidden_states], "dci", is_siglip=True),
                projector[0],
                projector[2],
            )
            for crop in range(len(crops))
        ]
    )
    return official_packing(crop_features, image, grid, checkpoint.state["model.image_newline"].double())


@pytest.fixture(scope="module")
def official_features(anyres_checkpoint) -> list[torch.Tensor]:
    """`official_image_features` of each of `images()`."""
    return [official_image_features(anyres_checkpoint, image) for image in images()]


def prompt_inputs(processor, image):
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROMPT}]}], add_generation_prompt=True
    )
    return processor(images=image, text=prompt, return_tensors="pt")


# ------------------------------------------------------------------------------------------------------ tests


def test_converts_to_fused_llava_next_with_the_trained_dense_connector(anyres_checkpoint):
    model, processor = anyres_checkpoint.model, anyres_checkpoint.processor
    config = model.config
    assert isinstance(config, FusedLlavaNextConfig) and isinstance(processor, FusedLlavaNextProcessor)
    assert (config.fuser_type, config.dense_connector_type, config.base_layer) == ("dense_connector", "dci", 26)
    assert config.vision_feature_select_strategy == "full" and not config.vision_config.vision_use_head
    assert config.image_grid_pinpoints == [[384, 768], [768, 384], [768, 768], [384, 1152]]  # (height, width)
    torch.testing.assert_close(
        model.model.image_newline, anyres_checkpoint.state["model.image_newline"], rtol=0, atol=0
    )
    image_processor = processor.image_processor
    assert image_processor.crop_size["height"] == TILE and not image_processor.do_center_crop
    assert processor.chat_template == VICUNA_V1_CHAT_TEMPLATE
    # --verify compared an image prompt with the source computation (every crop, LLaVA-NeXT's packing).
    assert anyres_checkpoint.result.verify_tolerance == 1e-6 and anyres_checkpoint.result.verify_max_abs_diff < 1e-4
    card = (anyres_checkpoint.root / "fused" / "README.md").read_text()
    assert "trained and released by the authors of Dense Connector" in card and "any resolution" in card


def test_pixels_features_and_logits_are_the_official_codes(anyres_checkpoint, official_features):
    """For a wide and a tall image: the crops are the official preprocessing's, the packed image features the
    official computation's, and the first-step logits those of the official LLM on the text around them."""
    model, processor = anyres_checkpoint.model, anyres_checkpoint.processor
    grids = []
    for image, expected in zip(images(), official_features):
        inputs = prompt_inputs(processor, image)
        crops, grid = official_crops(image)
        grids.append(grid)
        assert inputs["image_sizes"][0].tolist() == [image.height, image.width]
        assert inputs["pixel_values"].shape[1] == len(crops)
        assert relative_error(inputs["pixel_values"][0], crops) <= 1e-6
        assert (inputs["input_ids"] == model.config.image_token_index).sum() == expected.shape[0]
        with torch.no_grad():
            features = model.get_image_features(inputs["pixel_values"], inputs["image_sizes"]).pooler_output[0]
            logits = model(**inputs).logits
        assert features.shape == expected.shape
        assert relative_error(features, expected) <= 1e-5
        reference = reference_logits(anyres_checkpoint.llava, inputs["input_ids"], expected)
        assert relative_error(logits[..., :ORIGINAL_VOCAB], reference[..., :ORIGINAL_VOCAB]) <= 1e-5
    assert grids == [(1, 3), (2, 1)]


def test_both_aspect_ratios_in_one_batch(anyres_checkpoint, official_features):
    """Two images of different crop counts in one call: the processor's padding crops are left out."""
    model, processor = anyres_checkpoint.model, anyres_checkpoint.processor
    batch = processor(images=images(), text=["<image>", "<image>"], return_tensors="pt", padding=True)
    with torch.no_grad():
        features = model.get_image_features(batch["pixel_values"], batch["image_sizes"]).pooler_output
    for actual, expected in zip(features, official_features):
        assert relative_error(actual, expected) <= 1e-5
