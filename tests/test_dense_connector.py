"""The `dense_connector` fuser (Dense Connector, Yao et al., NeurIPS 2024) against the official code's math.

The official code needs its own environment (transformers 4.36), so here `reference_math.dense_connector_reference`
follows its `encode_images` and `dense_connector_dci` / `_sci` step by step, with their hard-coded indices; the towers
run as the official code runs them (SigLIP without its last layer) with transformers' own vision models.
`test_dense_connector_official.py` checks an imported `dci` checkpoint against outputs of the official code itself.
"""

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from test_original_conversion import (
    ORIGINAL_VOCAB,
    original_config,
    original_llm_state,
    original_tokenizer,
    random_tensors,
    write_original,
    write_tower,
)
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (
    AutoConfig,
    AutoModel,
    AutoProcessor,
    CLIPVisionModel,
    LlamaForCausalLM,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
    SiglipConfig,
    SiglipModel,
    SiglipVisionModel,
)
from transformers.image_transforms import convert_to_rgb, normalize, rescale, resize
from transformers.image_utils import ChannelDimension, PILImageResampling

from hf_fusedvlm import FusedLlavaConfig, FusedLlavaForConditionalGeneration, build_fuser
from hf_fusedvlm.conversion import ConversionError, convert_checkpoint, fused_from_llava, main
from hf_fusedvlm.conversion.cli import parse_fuser_options
from hf_fusedvlm.tiny import build_tiny_llava, tiny_llava_config

from conftest import make_image, randomise
from reference_math import StateView, dense_connector_reference, mlp_projector_reference


SIGLIP_SO400M = {
    "model_type": "siglip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 27,
    "num_attention_heads": 4,
    "image_size": 384,
    "patch_size": 14,
    "vision_use_head": False,
}
CLIP_L = {
    "model_type": "clip_vision_model",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 24,
    "num_attention_heads": 4,
    "image_size": 56,
    "patch_size": 14,
}
TEXT = {
    "model_type": "llama",
    "hidden_size": 64,
    "intermediate_size": 128,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "vocab_size": 128,
    "max_position_embeddings": 1024,
}
IMAGE_TOKEN = 100


def dense_config(vision: dict, variant: str = "dci", **fields) -> FusedLlavaConfig:
    siglip = vision["model_type"].startswith("siglip")
    return FusedLlavaConfig(
        vision_config=vision,
        text_config=TEXT,
        image_token_index=IMAGE_TOKEN,
        # The official SigLIP tower reads its last layer, the 26th of 27; CLIP towers read layer -2.
        vision_feature_layer=-2,
        vision_feature_select_strategy="full" if siglip else "default",
        fuser_type="dense_connector",
        dense_connector_type=variant,
        **fields,
    )


@pytest.mark.parametrize(
    ("vision", "variant", "groups", "base"),
    [
        (SIGLIP_SO400M, "dci", [list(range(13)), list(range(13, 26))], 26),
        (CLIP_L, "dci", [list(range(12)), list(range(12, 24))], 23),
        (SIGLIP_SO400M, "sci", [[7], [15]], 26),
        (CLIP_L, "sci", [[7], [15]], 23),
    ],
)
def test_hidden_states_are_the_official_codes(vision, variant, groups, base):
    config = dense_config(vision, variant)
    fuser = build_fuser(config)
    assert fuser.layer_groups == groups and fuser.base_layer == base
    assert config.vision_layers_needed == sorted({layer for group in groups for layer in group} | {base})
    assert fuser.output_size == 3 * 64 and not any(True for _ in fuser.parameters())


@pytest.mark.parametrize(
    ("vision", "fields", "message"),
    [
        (SIGLIP_SO400M, {"dense_connector_type": "sti"}, "'sti'.*image-token count"),
        (SIGLIP_SO400M, {"dense_connector_type": "dc"}, "Unknown dense_connector_type 'dc'"),
        ({**CLIP_L, "num_hidden_layers": 12}, {"dense_connector_type": "sci"}, r"hidden states \(7, 15\).*12 layers"),
        ({**SIGLIP_SO400M, "num_hidden_layers": 2}, {}, "runs only 1 layer .*leaves its last layer out"),
        (CLIP_L, {"vision_feature_select_strategy": "full"}, "drops the class token.*'default'"),
    ],
)
def test_unsupported_settings_are_refused_by_name(vision, fields, message):
    with pytest.raises(ValueError, match=message):
        config = dense_config(vision)
        FusedLlavaConfig(**{**config.to_dict(), **fields})


def official_tower(model, siglip: bool):
    """The fused model's tower as the official code runs it: transformers' model of the same weights, SigLIP's last
    layer deleted (`del self.vision_model.encoder.layers[-1:]`)."""
    config = model.config.vision_config.to_dict()
    if siglip:
        config["num_hidden_layers"] -= 1
    tower = AutoModel.from_config(AutoConfig.for_model(**config)).eval()
    missing, unexpected = tower.load_state_dict(model.model.vision_tower.state_dict(), strict=False)
    assert not missing and (not siglip or unexpected)
    return tower


def reference_logits(model, input_ids, image_features) -> torch.Tensor:
    """The official `prepare_inputs_labels_for_multimodal` for one sample and image: the text embedded around the
    image placeholder, the image features in its place, then the LLM (`model.model.language_model` and
    `model.lm_head` loaded into transformers' Llama)."""
    llm = LlamaForCausalLM(model.config.text_config).eval()
    llm.model.load_state_dict(model.model.language_model.state_dict())
    llm.lm_head.load_state_dict(model.lm_head.state_dict())
    ids = input_ids[0]
    first = int((ids == IMAGE_TOKEN).nonzero()[0])
    after = first + image_features.shape[0]
    embed = llm.get_input_embeddings()
    embeds = torch.cat([embed(ids[:first]), image_features.float(), embed(ids[after:])])
    with torch.no_grad():
        return llm(inputs_embeds=embeds[None]).logits


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected.double()).abs().max() / expected.double().abs().max()).item()


@pytest.mark.parametrize("variant", ["dci", "sci"])
@pytest.mark.parametrize("vision", [SIGLIP_SO400M, CLIP_L], ids=["siglip-so400m", "clip-l"])
def test_image_features_and_logits_match_the_official_math(vision, variant, tmp_path):
    """A fused model with random non-zero weights, saved and loaded through AutoModel with trust_remote_code, gives
    the official code's image features and first-step logits."""
    siglip = vision["model_type"].startswith("siglip")
    model = FusedLlavaForConditionalGeneration(dense_config(vision, variant)).eval()
    randomise(model, seed=0)
    model.save_pretrained(tmp_path)
    model = AutoModel.from_pretrained(tmp_path, trust_remote_code=True).eval()
    num_patches = (vision["image_size"] // vision["patch_size"]) ** 2
    assert num_patches == (729 if siglip else 16)
    pixel_values = torch.randn(
        1, 3, vision["image_size"], vision["image_size"], generator=torch.Generator().manual_seed(1)
    )
    input_ids = torch.tensor([[1, 5, 6, *[IMAGE_TOKEN] * num_patches, 7, 8, 9]])
    with torch.no_grad():
        features = model.get_image_features(pixel_values).pooler_output[0]
        logits = model(input_ids=input_ids, pixel_values=pixel_values).logits
        hidden_states = [
            state[0] for state in official_tower(model, siglip)(pixel_values, output_hidden_states=True).hidden_states
        ]
    projector = model.model.multi_modal_projector
    expected = mlp_projector_reference(
        dense_connector_reference(hidden_states, variant, is_siglip=siglip), projector.linear_1, projector.linear_2
    )
    assert features.shape == (num_patches, 64)
    assert relative_error(features, expected) <= 1e-5
    assert relative_error(logits, reference_logits(model, input_ids, expected)) <= 1e-5


# ------------------------------------------------------------------------------------------------------ import


SIGLIP_NAME = "google/siglip-so400m-patch14-384"


def write_siglip_tower(folder, vision_state: dict) -> None:
    """A SigLIP checkpoint folder as google publishes them: a full SiglipModel (with its pooling head) and its
    preprocessor_config.json."""
    text = {
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_hidden_layers": 1,
        "num_attention_heads": 4,
        "vocab_size": 99,
    }
    siglip = SiglipModel(
        SiglipConfig(
            vision_config={k: v for k, v in SIGLIP_SO400M.items() if k not in ("model_type", "vision_use_head")},
            text_config=text,
        )
    )
    randomise(siglip, seed=9)
    siglip.vision_model.load_state_dict(vision_state, strict=False)
    folder.mkdir(parents=True)
    siglip.save_pretrained(folder)
    preprocessor = {
        "do_normalize": True,
        "do_rescale": True,
        "do_resize": True,
        "image_mean": [0.5] * 3,
        "image_std": [0.5] * 3,
        "image_processor_type": "SiglipImageProcessor",
        "resample": 3,
        "rescale_factor": 1 / 255,
        "size": {"height": 384, "width": 384},
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))


def official_pixels(image) -> torch.Tensor:
    """The official preprocessing: LLaVA-1.5's `expand2square` with the image mean as background, then the SigLIP
    image processor (`siglip_pixels`)."""
    width, height = image.size
    side = max(width, height)
    background = tuple(int(x * 255) for x in (0.5, 0.5, 0.5))
    square = Image.new(image.mode, (side, side), background)
    square.paste(image, ((side - width) // 2, (side - height) // 2))
    return siglip_pixels(square)


def siglip_pixels(image) -> torch.Tensor:
    """The official SigLIP image processor: resize to 384 px (bicubic), rescale and normalise with mean and std 0.5."""
    array = np.array(convert_to_rgb(image))
    array = resize(array, size=(384, 384), resample=PILImageResampling.BICUBIC, data_format=ChannelDimension.FIRST)
    array = rescale(array, scale=1 / 255, data_format=ChannelDimension.FIRST)
    array = normalize(array, mean=(0.5, 0.5, 0.5), std=(0.5, 0.5, 0.5), data_format=ChannelDimension.FIRST)
    return torch.from_numpy(np.ascontiguousarray(array))


@pytest.fixture(scope="module")
def dense_checkpoint(tmp_path_factory):
    """A Dense Connector checkpoint in the official layout (Vicuna-like LLM, SigLIP tower named by the config, the
    tower's 26 run layers inside as the official trainer saves them) and the SigLIP folder google publishes."""
    root = tmp_path_factory.mktemp("dense")
    llm_config = tiny_llava_config(original_tokenizer())
    llava = LlavaForConditionalGeneration(
        LlavaConfig(
            text_config={**llm_config.text_config.to_dict(), "vocab_size": 128, "pad_token_id": 101},
            vision_config=llm_config.vision_config,
            image_token_index=100,
        )
    )
    randomise(llava, seed=3)
    tower = SiglipVisionModel(AutoConfig.for_model(**SIGLIP_SO400M)).eval()
    randomise(tower, seed=4)
    tower_state = tower.vision_model.state_dict() if hasattr(tower, "vision_model") else tower.state_dict()
    write_siglip_tower(root / "siglip", tower_state)
    run_tower = {
        f"model.vision_tower.vision_tower.vision_model.{key}": value
        for key, value in tower_state.items()
        if not key.startswith("encoder.layers.26.")
    }
    projector = random_tensors(
        {
            "model.mm_projector.0.weight": (64, 192),
            "model.mm_projector.0.bias": (64,),
            "model.mm_projector.2.weight": (64, 64),
            "model.mm_projector.2.bias": (64,),
        },
        seed=5,
    )
    state = {**original_llm_state(llava), **projector, **run_tower}
    config = original_config(
        llava,
        model_type="llava_llama",
        mm_vision_tower=SIGLIP_NAME,
        mm_hidden_size=192,
        mm_dense_connector_type="dci",
        mm_vision_select_layer=-2,
    )
    write_original(root / "dense-connector", config, state)
    result = convert_checkpoint(
        root / "dense-connector", root / "fused", vision_tower=root / "siglip", verify=True, progress=False
    )
    return SimpleNamespace(root=root, llava=llava, tower_state=tower_state, state=state, config=config, result=result)


def test_imported_checkpoint_computes_the_official_math(dense_checkpoint):
    folder = dense_checkpoint.root / "fused"
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    config = model.config
    assert (config.fuser_type, config.dense_connector_type, config.base_layer) == ("dense_connector", "dci", 26)
    assert config.vision_config.num_hidden_layers == 27 and not config.vision_config.vision_use_head
    assert config.vision_feature_select_strategy == "full" and config.image_seq_length == 729
    # Layer 26 (the official tower deletes it) comes from the SigLIP folder, the 26 run layers from the checkpoint.
    saved = model.model.vision_tower.state_dict()
    for key, value in dense_checkpoint.tower_state.items():
        if not key.startswith("head."):
            torch.testing.assert_close(saved[key], value, rtol=0, atol=0)

    image = make_image(0, size=48).crop((0, 0, 48, 30))  # not square: the official code pads it
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown in the image?"}]}],
        add_generation_prompt=True,
    )
    assert prompt.startswith("A chat between a curious user and an artificial intelligence assistant.")
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    assert (inputs["input_ids"] == config.image_token_index).sum() == 729
    assert relative_error(inputs["pixel_values"][0], official_pixels(image)) <= 1e-6

    with torch.no_grad():
        features = model.get_image_features(inputs["pixel_values"]).pooler_output[0]
        logits = model(**inputs).logits
        official = SiglipVisionModel(AutoConfig.for_model(**{**SIGLIP_SO400M, "num_hidden_layers": 26})).eval()
        run_state = {
            k.removeprefix("model.vision_tower.vision_tower.vision_model."): v
            for k, v in dense_checkpoint.state.items()
            if k.startswith("model.vision_tower.")
        }
        (official.vision_model if hasattr(official, "vision_model") else official).load_state_dict(run_state)
        hidden_states = [
            state[0] for state in official(official_pixels(image)[None], output_hidden_states=True).hidden_states
        ]
    projector = StateView(dense_checkpoint.state, "model.mm_projector.")
    expected = mlp_projector_reference(
        dense_connector_reference(hidden_states, "dci", is_siglip=True), projector[0], projector[2]
    )
    assert relative_error(features, expected) <= 1e-5
    # First-step logits: the official LLM (original vocabulary) on the text around the image features.
    reference = reference_logits(dense_checkpoint.llava, inputs["input_ids"], expected)
    assert relative_error(logits[..., :ORIGINAL_VOCAB], reference[..., :ORIGINAL_VOCAB]) <= 1e-5
    # --verify compared an image prompt with the source computation, in float32.
    assert dense_checkpoint.result.verify_tolerance == 1e-6 and dense_checkpoint.result.verify_max_abs_diff < 1e-4


def rewrite(dense_checkpoint, folder, **config_changes):
    """A copy of the Dense Connector checkpoint with config keys changed."""
    write_original(folder, {**dense_checkpoint.config, **config_changes}, dense_checkpoint.state)
    return folder


@pytest.mark.parametrize(
    ("changes", "tower", "message"),
    [
        ({}, "clip", r"'clip_vision_model' model, but the checkpoint names the SigLIP tower 'google/siglip-so400m"),
        ({"mm_dense_connector_type": "sti"}, "siglip", r"sparse token integration \(mm_dense_connector_type 'sti'\)"),
        (
            {"mm_hidden_size": 128},
            "siglip",
            r"mm_hidden_size=128 .* three widths of the --vision-tower \(64\), i\.e\. 192",
        ),
    ],
    ids=["clip-tower", "sti", "width"],
)
def test_bad_inputs_are_clear_errors_and_leave_nothing(dense_checkpoint, changes, tower, message, tmp_path):
    source = rewrite(dense_checkpoint, tmp_path / "source", **changes)
    if tower == "clip":
        write_tower(
            tmp_path / "clip", CLIPVisionModel(tiny_llava_config(original_tokenizer()).vision_config).state_dict()
        )
    tower_folder = tmp_path / "clip" if tower == "clip" else dense_checkpoint.root / "siglip"
    before = {path.name: path.stat().st_size for path in source.iterdir()}
    with pytest.raises(ConversionError, match=message):
        convert_checkpoint(source, tmp_path / "out", vision_tower=tower_folder, progress=False)
    assert not (tmp_path / "out").exists()
    assert {path.name: path.stat().st_size for path in source.iterdir()} == before


def llama_3_tokenizer() -> PreTrainedTokenizerFast:
    """A word-level tokenizer with Llama-3's special tokens in the original vocabulary's 100 rows."""
    specials = ["<|begin_of_text|>", "<|end_of_text|>", "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"]
    words = ["user", "system", "You", "are", "a", "What", "is", "shown", "in", "the", "image", "?"]
    words += [f"w{index}" for index in range(ORIGINAL_VOCAB - len(specials) - len(words))]
    tokenizer = Tokenizer(
        models.WordLevel({token: index for index, token in enumerate(specials + words)}, unk_token="w0")
    )
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.add_special_tokens(specials)
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<|begin_of_text|>", eos_token="<|end_of_text|>"
    )


def test_llama_3_checkpoint_gets_the_official_llama_3_conversation(dense_checkpoint, tmp_path):
    source = rewrite(dense_checkpoint, tmp_path / "source", bos_token_id=0, eos_token_id=1)
    llama_3_tokenizer().save_pretrained(source)
    convert_checkpoint(source, tmp_path / "out", vision_tower=dense_checkpoint.root / "siglip", progress=False)
    processor = AutoProcessor.from_pretrained(tmp_path / "out", trust_remote_code=True)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
    ]
    # conversation.py's conv_llama_3: the system text carries <|begin_of_text|> and its header; every message is
    # the role's header, the message and <|eot_id|>; the assistant's header names the role `system`.
    system = (
        "You are a helpful language and vision assistant. You are able to understand the visual content that "
        "the user provides, and assist the user with a variety of tasks using natural language."
    )
    header = "<|start_header_id|>{}<|end_header_id|>\n\n".format
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "<|begin_of_text|>"
        + header("system")
        + system
        + "<|eot_id|>"
        + header("user")
        + "<image>\nWhat is shown?<|eot_id|>"
        + header("system")
        + "A circle.<|eot_id|>"
        + header("user")
        + "Sure?<|eot_id|>"
        + header("system")
    )
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [1, 4]  # <|end_of_text|> and <|eot_id|>, as the official evaluation stops


def test_vicuna_checkpoint_gets_the_vicuna_v1_conversation(dense_checkpoint):
    processor = AutoProcessor.from_pretrained(dense_checkpoint.root / "fused", trust_remote_code=True)
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "Sure?"}]},
    ]
    # conversation.py's conv_vicuna_v1 (`--version v1`, `--conv-mode vicuna_v1`): separator style TWO.
    assert processor.apply_chat_template(conversation, add_generation_prompt=True) == (
        "A chat between a curious user and an artificial intelligence assistant. The assistant gives helpful, "
        "detailed, and polite answers to the user's questions. USER: <image>\nWhat is shown? ASSISTANT: A circle."
        "</s>USER: Sure? ASSISTANT:"
    )


def test_imported_checkpoint_in_4_bit_keeps_the_fuser_unquantised(dense_checkpoint):
    bnb = pytest.importorskip("bitsandbytes", reason="the quantization extra is not installed")
    from transformers import BitsAndBytesConfig

    folder = dense_checkpoint.root / "fused"
    model = AutoModel.from_pretrained(
        folder, trust_remote_code=True, quantization_config=BitsAndBytesConfig(load_in_4bit=True)
    )
    quantised = {name for name, module in model.named_modules() if isinstance(module, bnb.nn.Linear4bit)}
    assert not any(name.startswith("model.fuser") for name in quantised)
    assert any(name.startswith("model.multi_modal_projector.") for name in quantised)
    assert any(name.startswith("model.language_model.") for name in quantised)
    processor = AutoProcessor.from_pretrained(folder, trust_remote_code=True)
    inputs = processor(images=make_image(0), text="USER: <image>\nWhat is shown? ASSISTANT:", return_tensors="pt")
    output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
    assert output.shape[1] == inputs["input_ids"].shape[1] + 3


def test_model_card_credits_the_authors_and_marks_their_scores_as_reported(dense_checkpoint, tmp_path):
    card = (dense_checkpoint.root / "fused" / "README.md").read_text()
    assert "trained and released by the authors of Dense Connector" in card and "yao2024dense" in card
    assert "| variant (`dense_connector_type`) | dci |" in card
    assert "[[0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12], [13, 14, 15, 16, 17, 18, 19, 20, 21, 22, 23, 24, 25]]" in card
    assert "Results reported by the authors" not in card  # a local folder: which release it is is unknown
    code = main(
        [
            "--input",
            str(dense_checkpoint.root / "dense-connector"),
            "--output",
            str(tmp_path / "out"),
            "--vision-tower",
            str(dense_checkpoint.root / "siglip"),
            "--verify",
            "--no-progress",
            "--base-model",
            "HuanjinYao/DenseConnector-v1.5-13B",
        ]
    )
    assert code == 0
    card = (tmp_path / "out" / "README.md").read_text()
    assert "These scores are **reported by the original authors** for HuanjinYao/DenseConnector-v1.5-13B" in card
    assert "they were **not measured here**" in card
    assert "| TextVQA | SQA-IMG | GQA | LLaVA-Bench-in-the-Wild | MMBench | MM-Vet | MMMU | MathVista |" in card
    assert "| 64.7 | 73.0 | 65.4 | 73.6 | 71.4 | 41.6 | 34.3 | 29.6 |" in card


@pytest.mark.parametrize("variant", ["dci", "sci"])
@pytest.mark.parametrize("vision_model_type", ["clip_vision_model", "siglip_vision_model"])
def test_parity_start_from_a_plain_llava(variant, vision_model_type):
    """`fused_from_llava(llava, "dense_connector")` computes what the source computes (new projector columns 0)."""
    llava, processor = build_tiny_llava(seed=0, num_vision_layers=17, vision_model_type=vision_model_type)
    fused = fused_from_llava(llava, "dense_connector", dense_connector_type=variant)
    assert fused.config.dense_connector_type == variant and fused.model.fuser.output_size == 3 * 64
    inputs = processor(images=make_image(0), text="USER: <image>\nWhat is shown? ASSISTANT:", return_tensors="pt")
    with torch.no_grad():
        torch.testing.assert_close(fused(**inputs).logits, llava(**inputs).logits, rtol=0, atol=0)


def test_command_line_chooses_the_variant():
    assert parse_fuser_options(["dense_connector_type=sci"]) == {"dense_connector_type": "sci"}
    with pytest.raises(ConversionError, match="fuser_num_heads needs a number"):
        parse_fuser_options(["fuser_num_heads=many"])


def test_vision_tower_records_only_the_hidden_states_read():
    """On a 6-layer CLIP tower (base layer 5), dci reads hidden states 0..5: only the base layer is kept whole, the two
    ranges as running means."""
    llava, processor = build_tiny_llava(seed=0)
    fused = fused_from_llava(llava, "dense_connector")
    pixel_values = processor(images=make_image(0), text="<image>", return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        output = fused.get_image_features(pixel_values)
    recorded = [index for index, state in enumerate(output.hidden_states) if state is not None]
    assert fused.config.vision_layers_needed == [0, 1, 2, 3, 4, 5] and recorded == fused.config.vision_layers_kept == [
        5
    ]
    assert len(output.hidden_states) == 7
