"""Import of original-format LLaVA-1.6 checkpoints (liuhaotian/llava-v1.6-* layout: a flat config with
`image_aspect_ratio: anyres`, `image_grid_pinpoints` as (width, height) pairs, `mm_patch_merge_type: spatial_unpad`,
the tower and `model.image_newline` among the weights) into fused LLaVA-NeXT checkpoints.

The source is a tiny `LlavaNextForConditionalGeneration` (`build_tiny_llava_next`) whose keys are written back into
the original layout; every fuser, converted by the command from its parity start, gives that model's logits on images
of several aspect ratios and its greedy tokens. The crop grids are checked against the original code's own rule for
choosing a pinpoint (width, height order), so a converter that forgot to turn the pairs around would fail."""

import json
from types import SimpleNamespace

import pytest
import torch
from test_original_conversion import (
    ORIGINAL_VOCAB,
    original_config,
    original_llm_state,
    original_tokenizer,
    write_original,
    write_sentence_encoder,
    write_tower,
)
from tokenizers import AddedToken
from transformers import (
    AutoModel,
    AutoProcessor,
    CLIPVisionModel,
    LlavaNextConfig,
    LlavaNextForConditionalGeneration,
    LlavaNextImageProcessorPil,
    LlavaNextProcessor,
)
from transformers.models.llava_next.modeling_llava_next import get_anyres_image_grid_shape

from hf_fusedvlm import FusedLlavaNextConfig, FusedLlavaNextForConditionalGeneration, FusedLlavaNextProcessor
from hf_fusedvlm.conversion import ConversionError, convert_checkpoint, main
from hf_fusedvlm.conversion.original_processor import (
    CHATML_DIRECT_CHAT_TEMPLATE,
    LLAVA_V1_CHAT_TEMPLATE,
    LLAVA_V1_SYSTEM,
    MISTRAL_INSTRUCT_CHAT_TEMPLATE,
)
from hf_fusedvlm.tiny import build_tiny_instruction_encoder, build_tiny_llava_next

from conftest import FUSER_TYPES, make_image, randomise, reads_instruction


TILE = 32  # the tiny CLIP tower's image size
# (height, width) for transformers; the original config lists the same layouts as (width, height). The 3x1 layout has
# no 1x3 twin, so reading the pairs the wrong way round tiles tall images differently.
PINPOINTS = [[32, 64], [64, 32], [64, 64], [96, 32]]
ORIGINAL_PINPOINTS = [[width, height] for height, width in PINPOINTS]
# (height, width): wide, tall (3x1 tiles), small square (two equally good layouts: the first listed wins), square.
IMAGE_SHAPES = [(40, 90), (100, 30), (20, 20), (50, 50)]
QUESTIONS = ["What is shown in the image?", "Is it a red circle?"]


def images_of(shapes):
    return [make_image(seed).resize((width, height)) for seed, (height, width) in enumerate(shapes)]


def llava_next_source() -> LlavaNextForConditionalGeneration:
    """`build_tiny_llava_next` with LLaVA-1.6's vocabulary layout for `original_tokenizer` (<image> = 100,
    <pad> = 101, 128 rows), pinpoints `PINPOINTS`, and the rows after the original vocabulary equal to the mean of
    the original rows, as the conversion makes them: the converted model must then compute exactly this model."""
    tiny, _ = build_tiny_llava_next(seed=0)
    fields = tiny.config.to_dict()
    for key in ("model_type", "transformers_version", "architectures"):
        fields.pop(key, None)
    fields.update(
        text_config={**tiny.config.text_config.to_dict(), "vocab_size": 128, "pad_token_id": 101},
        image_token_index=100,
        image_grid_pinpoints=PINPOINTS,
    )
    model = LlavaNextForConditionalGeneration(LlavaNextConfig(**fields)).eval()
    state = tiny.state_dict()
    with torch.no_grad():
        for name, tensor in model.state_dict().items():
            if tensor.shape == state[name].shape:
                tensor.copy_(state[name])
            else:  # the vocabulary-sized matrices: the original rows, then their mean
                rows = state[name][:ORIGINAL_VOCAB]
                tensor.copy_(torch.cat([rows, rows.float().mean(0, keepdim=True).expand(128 - ORIGINAL_VOCAB, -1)]))
    model.generation_config.pad_token_id = 101
    return model


def original_next_state(model: LlavaNextForConditionalGeneration) -> dict:
    """The model's tensors under the original LLaVA-1.6 names: the LLM as in LLaVA-1.5, the projector at
    `model.mm_projector.0/.2`, the fine-tuned tower at `model.vision_tower.vision_tower.vision_model.*`, and
    `model.image_newline`."""
    projector = model.model.multi_modal_projector
    tower = model.model.vision_tower.state_dict()
    return {
        **original_llm_state(model),
        "model.mm_projector.0.weight": projector.linear_1.weight,
        "model.mm_projector.0.bias": projector.linear_1.bias,
        "model.mm_projector.2.weight": projector.linear_2.weight,
        "model.mm_projector.2.bias": projector.linear_2.bias,
        "model.image_newline": model.model.image_newline,
        **{f"model.vision_tower.vision_tower.vision_model.{key}": value for key, value in tower.items()},
    }


def original_next_config(model, **changes) -> dict:
    """liuhaotian/llava-v1.6-vicuna-7b's config.json fields around the tiny LLM."""
    next_keys = {
        "image_aspect_ratio": "anyres",
        "image_grid_pinpoints": ORIGINAL_PINPOINTS,
        "mm_patch_merge_type": "spatial_unpad",
        "tokenizer_model_max_length": 4096,
    }
    return original_config(model, **{**next_keys, **changes})


def original_grid(image, pinpoints, tile: int) -> tuple[int, int]:
    """(rows, columns) of tiles as the original code chooses them (`select_best_resolution` on PIL's (width, height)
    and the config's (width, height) pairs): the most effective pixels, then the fewest wasted, the first on a tie."""
    width, height = image.size
    best, best_key = None, None
    for pin_width, pin_height in pinpoints:
        scale = min(pin_width / width, pin_height / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        key = (effective, -(pin_width * pin_height - effective))
        if best_key is None or key > best_key:
            best, best_key = (pin_width, pin_height), key
    return best[1] // tile, best[0] // tile


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("original-next")
    model = llava_next_source()
    # --vision-tower gives the config and image processor; its weights lose to the checkpoint's fine-tuned tower.
    other_tower = CLIPVisionModel(model.config.vision_config)
    randomise(other_tower, seed=5)
    write_tower(root / "tower", other_tower.state_dict())
    write_original(root / "llava-v1.6", original_next_config(model), original_next_state(model), num_shards=2)
    encoder, tokenizer = build_tiny_instruction_encoder(seed=0)
    write_sentence_encoder(root / "sentence-encoder", encoder, tokenizer)
    return SimpleNamespace(root=root, model=model, source=root / "llava-v1.6", tower=root / "tower")


def convert(checkpoint, fuser: str, output, *extra) -> int:
    argv = ["--input", str(checkpoint.source), "--output", str(output), "--vision-tower", str(checkpoint.tower)]
    argv += ["--fuser", fuser, *extra, "--no-progress"]
    if reads_instruction(fuser):
        argv += ["--instruction-encoder", str(checkpoint.root / "sentence-encoder")]
    return main(argv)


@pytest.fixture(scope="module")
def converted(checkpoint):
    """Each fuser's conversion of the LLaVA-1.6 checkpoint, loaded as users load it: {fuser: (model, processor)}."""
    loaded = {}
    for fuser in FUSER_TYPES:
        output = checkpoint.root / f"fused-{fuser}"
        assert convert(checkpoint, fuser, output) == 0
        model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
        loaded[fuser] = model, AutoProcessor.from_pretrained(output, trust_remote_code=True)
    return loaded


def prompt_inputs(processor, shapes):
    prompts = [
        processor.apply_chat_template(
            [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}],
            add_generation_prompt=True,
        )
        for question in QUESTIONS[: len(shapes)]
    ]
    return processor(images=images_of(shapes), text=prompts, return_tensors="pt", padding=True)


def plain(inputs):
    return {key: value for key, value in inputs.items() if not key.startswith("instruction_")}


@pytest.mark.parametrize("fuser", FUSER_TYPES)
def test_every_fuser_computes_the_llava_next_source(fuser, converted, checkpoint):
    model, processor = converted[fuser]
    assert isinstance(model, FusedLlavaNextForConditionalGeneration) and isinstance(model.config, FusedLlavaNextConfig)
    assert isinstance(processor, FusedLlavaNextProcessor) and model.config.fuser_type == fuser
    for shapes in (IMAGE_SHAPES[:2], IMAGE_SHAPES[2:]):
        inputs = prompt_inputs(processor, shapes)
        with torch.inference_mode():
            expected = checkpoint.model(**plain(inputs)).logits
            actual = model(**(inputs if reads_instruction(fuser) else plain(inputs))).logits
        assert actual.shape == expected.shape
        assert (actual - expected).abs().max().item() <= 1e-6


@pytest.mark.parametrize("fuser", ["none", "mmfuser", "igva"])
def test_greedy_tokens_equal_the_source(fuser, converted, checkpoint):
    model, processor = converted[fuser]
    for shape in IMAGE_SHAPES[1:3]:
        inputs = prompt_inputs(processor, [shape])
        expected = checkpoint.model.generate(**plain(inputs), max_new_tokens=6, do_sample=False)
        actual = model.generate(
            **(inputs if reads_instruction(fuser) else plain(inputs)), max_new_tokens=6, do_sample=False
        )
        assert torch.equal(actual, expected)


def test_tiles_are_chosen_as_the_original_code_chooses_them(converted):
    model, processor = converted["none"]
    assert model.config.image_grid_pinpoints == PINPOINTS
    grids = []
    for image in images_of(IMAGE_SHAPES):
        image_size = processor(images=image, text="<image>", return_tensors="pt")["image_sizes"][0]
        grid = get_anyres_image_grid_shape(image_size, model.config.image_grid_pinpoints, TILE)
        assert tuple(grid) == original_grid(image, ORIGINAL_PINPOINTS, TILE)
        grids.append(tuple(grid))
    assert grids == [(1, 2), (3, 1), (1, 2), (2, 2)]  # the small square's tie goes to the first layout listed


def test_processor_is_llava_next_with_the_tower_settings(converted, checkpoint):
    """The tokenizer gets <image> and <pad> as transformers' converter adds them, the image processor is
    LLaVA-NeXT's with the tower's CLIP settings for each tile, the chat template is `llava_v1` (Vicuna)."""
    model, processor = converted["none"]
    tokenizer = original_tokenizer()
    tokenizer.add_tokens([AddedToken("<image>", special=True, normalized=False)], special_tokens=True)
    tokenizer.add_special_tokens({"pad_token": "<pad>"})
    tokenizer.padding_side = "left"
    image_processor = LlavaNextImageProcessorPil(
        size={"shortest_edge": TILE},
        crop_size={"height": TILE, "width": TILE},
        image_grid_pinpoints=PINPOINTS,
        resample=3,
    )
    reference = LlavaNextProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        patch_size=8,
        vision_feature_select_strategy="default",
        num_additional_image_tokens=1,
        chat_template=LLAVA_V1_CHAT_TEMPLATE,
    )
    assert processor.chat_template == LLAVA_V1_CHAT_TEMPLATE
    prompts = [f"{LLAVA_V1_SYSTEM} USER: <image>\n{question} ASSISTANT:" for question in QUESTIONS]
    expected = reference(images=images_of(IMAGE_SHAPES[:2]), text=prompts, return_tensors="pt", padding=True)
    actual = prompt_inputs(processor, IMAGE_SHAPES[:2])
    assert set(plain(actual)) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key
    assert model.config.text_config.vocab_size == 128 and model.config.image_token_index == 100


def test_verify_passes_the_card_names_the_fuser_and_overwrite_replaces_it(checkpoint, tmp_path, capsys):
    assert convert(checkpoint, "average", tmp_path / "out", "--verify") == 0
    report = capsys.readouterr().out
    assert "verified: max |logit difference| = 0" in report
    config = json.loads((tmp_path / "out" / "config.json").read_text())
    assert config["model_type"] == "fused_llava_next" and config["fuser_type"] == "average"
    assert "Untrained fuser" in (tmp_path / "out" / "README.md").read_text()
    # --overwrite replaces it: every file of a fused LLaVA-NeXT output is one the converter writes.
    assert convert(checkpoint, "concat", tmp_path / "out", "--overwrite") == 0
    assert json.loads((tmp_path / "out" / "config.json").read_text())["fuser_type"] == "concat"


def _rewrite(checkpoint, folder, config_changes: dict):
    """A copy of the LLaVA-1.6 checkpoint with config keys changed."""
    write_original(
        folder, original_next_config(checkpoint.model, **config_changes), original_next_state(checkpoint.model)
    )
    return folder


@pytest.mark.parametrize(
    ("model_type", "tokens", "template", "prompt"),
    [
        ("llava_mistral", (), MISTRAL_INSTRUCT_CHAT_TEMPLATE, "[INST] <image>\nWhat is shown? [/INST]"),
        (
            "llava",
            ("<|im_start|>", "<|im_end|>"),
            CHATML_DIRECT_CHAT_TEMPLATE,
            "<|im_start|>system\nAnswer the questions.<|im_end|><|im_start|>user\n<image>\nWhat is shown?<|im_end|>"
            "<|im_start|>assistant\n",
        ),
    ],
    ids=["mistral-7b", "34b"],
)
def test_chat_template_follows_the_llm(checkpoint, tmp_path, model_type, tokens, template, prompt):
    """llava-v1.6-mistral-7b (`llava_mistral`) gets `mistral_instruct`, llava-v1.6-34b (a ChatML tokenizer)
    `chatml_direct`, whose turns end with <|im_end|>: generation stops there too."""
    source = tmp_path / "source"
    state = original_next_state(checkpoint.model)
    if tokens:  # the 34B's vocabulary holds the ChatML tokens: two more rows
        extra = len(tokens)
        for key in ("model.embed_tokens.weight", "lm_head.weight"):
            state[key] = torch.cat([state[key], state[key][:extra]])
    config = original_next_config(checkpoint.model, model_type=model_type)
    write_original(source, config, state)
    if tokens:
        tokenizer = original_tokenizer()
        tokenizer.add_tokens([AddedToken(token, special=True, normalized=False) for token in tokens])
        tokenizer.save_pretrained(source)
        config["vocab_size"] = ORIGINAL_VOCAB + len(tokens)
        (source / "config.json").write_text(json.dumps(config))
    convert_checkpoint(source, tmp_path / "out", vision_tower=checkpoint.tower, progress=False)
    processor = AutoProcessor.from_pretrained(tmp_path / "out", trust_remote_code=True)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]}]
    assert processor.chat_template == template
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == prompt
    saved = json.loads((tmp_path / "out" / "config.json").read_text())
    assert saved["text_config"]["model_type"] == ("mistral" if model_type == "llava_mistral" else "llama")
    eos = json.loads((tmp_path / "out" / "generation_config.json").read_text())["eos_token_id"]
    if tokens:
        assert processor.tokenizer.convert_tokens_to_ids("<|im_end|>") in eos
        assert processor.tokenizer.convert_tokens_to_ids("<image>") == ORIGINAL_VOCAB + len(tokens)


# ------------------------------------------------------------------------------------------------------ errors


def test_pinpoints_must_fit_the_tower(checkpoint, tmp_path):
    source = _rewrite(checkpoint, tmp_path / "source", {"image_grid_pinpoints": [[32, 64], [48, 32]]})
    with pytest.raises(ConversionError, match=r"image_grid_pinpoints \[\[48, 32\]\] are not multiples .* \(32\)"):
        convert_checkpoint(source, tmp_path / "out", vision_tower=checkpoint.tower, progress=False)
    assert not (tmp_path / "out").exists()


def test_a_trained_fusion_with_any_resolution_is_named(checkpoint, tmp_path):
    source = _rewrite(checkpoint, tmp_path / "source", {"mm_vision_select_layer": "list-6/-5/-4/-3/-2"})
    with pytest.raises(
        ConversionError, match="trained mmfuser model .* only plain LLaVA-1.6 and Dense Connector checkpoints import"
    ):
        convert_checkpoint(source, tmp_path / "out", vision_tower=checkpoint.tower, progress=False)


def test_newline_missing_from_the_weights_is_listed(checkpoint, tmp_path):
    config = original_next_config(checkpoint.model)
    state = original_next_state(checkpoint.model)
    del state["model.image_newline"]
    write_original(tmp_path / "source", config, state)
    with pytest.raises(ConversionError, match="'llava-next' layout .*1 missing keys: model.image_newline"):
        convert_checkpoint(tmp_path / "source", tmp_path / "out", vision_tower=checkpoint.tower, progress=False)
