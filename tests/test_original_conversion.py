"""Import of original-format LLaVA checkpoints (plain LLaVA-1.5, official MMFuser, official IGVA).

The tests write tiny checkpoints in each official layout themselves, from the documented key names and shapes and
with random non-zero weights (gammas included), convert them, and compare the converted model with an independent
float64 computation of the official math read straight from the official state dict (`reference_math.StateView`).
"""

import json
import math
from types import SimpleNamespace

import pytest
import torch
from safetensors.torch import save_file
from tokenizers import Tokenizer, models, pre_tokenizers, processors
from transformers import (
    AutoModel,
    AutoProcessor,
    CLIPConfig,
    CLIPModel,
    CLIPVisionModel,
    LlavaConfig,
    LlavaForConditionalGeneration,
    PreTrainedTokenizerFast,
)

from hf_fusedvlm.configuration_fused_llava import FusedLlavaConfig
from hf_fusedvlm.conversion import ConversionError, checkpoint_format, convert_checkpoint, main, main_original
from hf_fusedvlm.conversion.original_layout import parse_select_layer
from hf_fusedvlm.conversion.original_processor import LLAVA_V1_SYSTEM
from hf_fusedvlm.tiny import build_tiny_instruction_encoder, tiny_llava_config

from conftest import make_image, randomise, run_without_package
from reference_math import (
    StateView,
    igva_reference,
    mlp_projector_reference,
    mmfuser_reference,
)


ORIGINAL_VOCAB = 100  # the LLM's vocabulary before <image> and <pad>; 102 rows padded to 128
QUESTION = "What is shown in the image?"
MMFUSER_LAYERS = [-6, -5, -4, -3, -2]  # 4 levels and the query, as list-22/-17/-12/-7/-2 on CLIP-L
IGVA_GROUPS = [[1, 2], [3, 4], [5, 6]]
AGGREGATOR = {"hidden": 32, "heads": 4, "blocks": 2}
TOWER_NAME = "openai/clip-vit-large-patch14-336"  # what mm_vision_tower says; the tests pass a local folder
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


# ------------------------------------------------------------------------------------------ official checkpoints


def original_tokenizer() -> PreTrainedTokenizerFast:
    """A Llama-like tokenizer without <image> and <pad> (pad = unk, as the original LLaVA code saves it)."""
    words = [
        "USER",
        "ASSISTANT",
        ":",
        "A",
        "chat",
        "What",
        "is",
        "shown",
        "in",
        "the",
        "image",
        "?",
        "a",
        "red",
        "circle",
    ]
    words += [f"w{index}" for index in range(ORIGINAL_VOCAB - 3 - len(words))]
    vocab = {token: index for index, token in enumerate(["<unk>", "<s>", "</s>", *words])}
    tokenizer = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.WhitespaceSplit(), pre_tokenizers.Punctuation()])
    tokenizer.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tokenizer, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<unk>"
    )


def llava_hf_model(seed: int) -> LlavaForConditionalGeneration:
    """The llava-hf model equivalent to the plain original checkpoints: <image> = 100, <pad> = 101, 128 rows."""
    config = tiny_llava_config(original_tokenizer())
    config = LlavaConfig(
        text_config={**config.text_config.to_dict(), "vocab_size": 128, "pad_token_id": 101},
        vision_config=config.vision_config,
        image_token_index=100,
        image_seq_length=16,
        vision_feature_layer=-2,
        vision_feature_select_strategy="default",
    )
    model = LlavaForConditionalGeneration(config).eval()
    randomise(model, seed)
    return model


def write_tower(folder, vision_state: dict) -> None:
    """A CLIP checkpoint folder as openai publishes them: a full CLIPModel in pytorch_model.bin and an old-style
    preprocessor_config.json."""
    vision_config = tiny_llava_config(original_tokenizer()).vision_config
    clip = CLIPModel(
        CLIPConfig(
            vision_config=vision_config.to_dict(),
            text_config={
                "hidden_size": 64,
                "intermediate_size": 128,
                "num_hidden_layers": 1,
                "num_attention_heads": 4,
                "vocab_size": 99,
            },
        )
    )
    clip.vision_model.load_state_dict(vision_state)
    folder.mkdir(parents=True)
    clip.config.save_pretrained(folder)
    torch.save(clip.state_dict(), folder / "pytorch_model.bin")
    preprocessor = {
        "crop_size": 32,
        "do_center_crop": True,
        "do_normalize": True,
        "do_resize": True,
        "size": 32,
        "feature_extractor_type": "CLIPFeatureExtractor",
        "image_mean": CLIP_MEAN,
        "image_std": CLIP_STD,
        "resample": 3,
    }
    (folder / "preprocessor_config.json").write_text(json.dumps(preprocessor))


def original_config(llava: LlavaForConditionalGeneration, **mm_keys) -> dict:
    """A flat original config with the fields of liuhaotian/llava-v1.5-7b's config.json: the Llama config with the
    original vocabulary, `"model_type": "llava"` (saved before the `llava_llama` rename) and the `mm_*`, adapter and
    tokenizer keys of the LLaVA trainer."""
    config = llava.config.text_config.to_dict()
    for key in ("transformers_version", "architectures", "dtype", "pad_token_id"):
        config.pop(key, None)
    config.update(
        model_type="llava",
        architectures=["LlavaLlamaForCausalLM"],
        _name_or_path="./checkpoints/vicuna-7b-v1-5",
        vocab_size=ORIGINAL_VOCAB,
        pad_token_id=0,
        pretraining_tp=1,
        torch_dtype="float32",
        transformers_version="4.31.0",
        freeze_mm_mlp_adapter=False,
        tune_mm_mlp_adapter=False,
        mm_projector_lr=None,
        mm_vision_tower=TOWER_NAME,
        mm_hidden_size=64,
        mm_vision_select_layer=-2,
        mm_vision_select_feature="patch",
        mm_projector_type="mlp2x_gelu",
        image_aspect_ratio="pad",
        mm_use_im_start_end=False,
        mm_use_im_patch_token=False,
        mm_patch_merge_type="flat",
        use_mm_proj=True,
        tokenizer_model_max_length=2048,
        tokenizer_padding_side="right",
    )
    config.update(mm_keys)
    return config


def original_llm_state(llava: LlavaForConditionalGeneration) -> dict:
    """The LLM under its original names (`model.*`, `lm_head`), vocabulary cut to the original rows, plus the rotary
    buffer that older transformers saved."""
    state = {f"model.{key}": value for key, value in llava.model.language_model.state_dict().items()}
    state["model.embed_tokens.weight"] = state["model.embed_tokens.weight"][:ORIGINAL_VOCAB]
    state["lm_head.weight"] = llava.lm_head.weight[:ORIGINAL_VOCAB]
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    return state


def random_tensors(shapes: dict, seed: int) -> dict:
    generator = torch.Generator().manual_seed(seed)
    return {key: torch.randn(shape, generator=generator) * 0.3 for key, shape in shapes.items()}


def mmfuser_block_shapes(dim=64, heads=16, levels=4, points=4) -> dict:
    """The official MSCrossAttnBlock at `model.mm_projector.0`."""
    shapes = {}
    for attention, attention_levels in (("cross_attn", levels), ("self_attn", 1)):
        shapes.update(
            {
                f"{attention}.sampling_offsets.weight": (heads * attention_levels * points * 2, dim),
                f"{attention}.sampling_offsets.bias": (heads * attention_levels * points * 2,),
                f"{attention}.attention_weights.weight": (heads * attention_levels * points, dim),
                f"{attention}.attention_weights.bias": (heads * attention_levels * points,),
                f"{attention}.value_proj.weight": (dim, dim),
                f"{attention}.value_proj.bias": (dim,),
                f"{attention}.output_proj.weight": (dim, dim),
                f"{attention}.output_proj.bias": (dim,),
            }
        )
    for norm in ("query_norm", "feat_norm", "norm1"):
        shapes.update({f"{norm}.weight": (dim,), f"{norm}.bias": (dim,)})
    shapes.update({"gamma1": (dim,), "gamma2": (dim,)})
    return {f"model.mm_projector.0.{key}": shape for key, shape in shapes.items()}


def igva_aggregator_shapes(dim=64, sentence_dim=64) -> dict:
    """The official Aggregator at `model.vision_aggregator` (QueryTransformer blocks in `transformers`)."""
    hidden = AGGREGATOR["hidden"]
    shapes = {
        "sentence_proj.weight": (hidden, sentence_dim),
        "sentence_proj.bias": (hidden,),
        "cls_proj.weight": (hidden, dim),
        "cls_proj.bias": (hidden,),
        "linear.weight": (len(IGVA_GROUPS), hidden),
        "linear.bias": (len(IGVA_GROUPS),),
    }
    for block in range(AGGREGATOR["blocks"]):
        shapes.update(
            {
                f"transformers.{block}.cross_attention.in_proj_weight": (3 * hidden, hidden),
                f"transformers.{block}.cross_attention.in_proj_bias": (3 * hidden,),
                f"transformers.{block}.cross_attention.out_proj.weight": (hidden, hidden),
                f"transformers.{block}.cross_attention.out_proj.bias": (hidden,),
                f"transformers.{block}.ffn.0.weight": (hidden, hidden),
                f"transformers.{block}.ffn.0.bias": (hidden,),
                f"transformers.{block}.ffn.2.weight": (hidden, hidden),
                f"transformers.{block}.ffn.2.bias": (hidden,),
                f"transformers.{block}.norm1.weight": (hidden,),
                f"transformers.{block}.norm1.bias": (hidden,),
                f"transformers.{block}.norm2.weight": (hidden,),
                f"transformers.{block}.norm2.bias": (hidden,),
            }
        )
    return {f"model.vision_aggregator.{key}": shape for key, shape in shapes.items()}


def write_original(folder, config: dict, state: dict, weights_format: str = "safetensors", num_shards: int = 1):
    """Save an original-format checkpoint: config, tokenizer and the state dict in safetensors or .bin shards."""
    folder.mkdir(parents=True)
    (folder / "config.json").write_text(json.dumps(config))
    original_tokenizer().save_pretrained(folder)
    keys = sorted(state)
    parts = [keys[index::num_shards] for index in range(num_shards)]
    suffix = "safetensors" if weights_format == "safetensors" else "bin"
    stem = "model" if suffix == "safetensors" else "pytorch_model"
    weight_map = {}
    for index, part in enumerate(parts):
        name = f"{stem}-{index + 1:05d}-of-{num_shards:05d}.{suffix}" if num_shards > 1 else f"{stem}.{suffix}"
        tensors = {key: state[key].detach().contiguous().clone() for key in part}
        if suffix == "safetensors":
            save_file(tensors, folder / name, metadata={"format": "pt"})
        else:
            torch.save(tensors, folder / name)
        weight_map.update(dict.fromkeys(part, name))
    if num_shards > 1:
        (folder / f"{stem}.{suffix}.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def write_sentence_encoder(folder, encoder, tokenizer, pooling: str = "mean_tokens", normalize: bool = True):
    """A sentence-transformers folder (transformer at the root, Pooling, optional Normalize), written by hand."""
    encoder.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
        (folder / "2_Normalize").mkdir()
    (folder / "modules.json").write_text(json.dumps(modules))
    (folder / "1_Pooling").mkdir()
    modes = {
        f"pooling_mode_{mode}": mode == pooling
        for mode in (
            "cls_token",
            "mean_tokens",
            "max_tokens",
            "mean_sqrt_len_tokens",
            "weightedmean_tokens",
            "lasttoken",
        )
    }
    (folder / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": 64, **modes}))
    (folder / "sentence_bert_config.json").write_text(json.dumps({"max_seq_length": 32, "do_lower_case": False}))


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """Every official layout, its tower folders and sentence encoder, and the llava-hf model they correspond to."""
    root = tmp_path_factory.mktemp("original")
    llava = llava_hf_model(seed=1)
    tower_state = llava.model.vision_tower.state_dict()
    write_tower(root / "tower", tower_state)
    other_tower = CLIPVisionModel(llava.config.vision_config)
    randomise(other_tower, seed=2)
    write_tower(root / "other-tower", other_tower.state_dict())

    llm = original_llm_state(llava)
    projector = llava.model.multi_modal_projector
    plain = {
        **llm,
        "model.mm_projector.0.weight": projector.linear_1.weight,
        "model.mm_projector.0.bias": projector.linear_1.bias,
        "model.mm_projector.2.weight": projector.linear_2.weight,
        "model.mm_projector.2.bias": projector.linear_2.bias,
    }
    write_original(root / "llava", original_config(llava), plain, "bin", num_shards=2)
    # A self-trained (DeepSpeed) checkpoint: the tower inside, and --vision-tower then only gives config and processor.
    inside = {
        **plain,
        **{f"model.vision_tower.vision_tower.vision_model.{key}": value for key, value in tower_state.items()},
    }
    inside["model.vision_tower.vision_tower.vision_model.embeddings.position_ids"] = torch.arange(17)[None]
    write_original(root / "llava-tower-inside", original_config(llava), inside)

    mmfuser = {
        **llm,
        **random_tensors(mmfuser_block_shapes(), seed=3),
        **random_tensors(
            {
                "model.mm_projector.1.weight": (64, 64),
                "model.mm_projector.1.bias": (64,),
                "model.mm_projector.3.weight": (64, 64),
                "model.mm_projector.3.bias": (64,),
            },
            seed=4,
        ),
    }
    layers = "list" + "/".join(map(str, MMFUSER_LAYERS))
    write_original(
        root / "mmfuser", original_config(llava, model_type="llava_llama", mm_vision_select_layer=layers), mmfuser
    )

    encoder, encoder_tokenizer = build_tiny_instruction_encoder(seed=0)
    igva_projector = random_tensors(
        {
            "model.mm_projector.0.weight": (64, 128),
            "model.mm_projector.0.bias": (64,),
            "model.mm_projector.2.weight": (64, 64),
            "model.mm_projector.2.bias": (64,),
        },
        5,
    )
    embedder = {f"model.sentence_embedder.0.auto_model.{key}": value for key, value in encoder.state_dict().items()}
    igva = {**llm, **random_tensors(igva_aggregator_shapes(), seed=6), **igva_projector, **embedder}
    igva_keys = {
        "model_type": "llava_llama",
        "vit_base_layer": -2,
        "vit_aggregate_groups": str(IGVA_GROUPS),
        "sentence_embed_dim": 64,
        "sentence_embedder": "sentence-transformers/all-mpnet-base-v2",
    }
    igva_config = original_config(
        llava,
        **igva_keys,
        aggregate_by_average=False,
        aggregator_hidden_dim=AGGREGATOR["hidden"],
        aggregator_num_heads=AGGREGATOR["heads"],
        aggregator_num_transformers=AGGREGATOR["blocks"],
    )
    igva_config.pop("mm_vision_select_layer")  # the IGVA code no longer sets it
    write_original(root / "igva", igva_config, igva, "bin", num_shards=2)
    average = {**llm, **igva_projector}
    write_original(root / "igva-average", original_config(llava, **igva_keys, aggregate_by_average=True), average)
    # The sentence-transformers folder holds other weights than the checkpoint's frozen copy, which must win.
    folder_encoder, _ = build_tiny_instruction_encoder(seed=7)
    write_sentence_encoder(root / "sentence-encoder", folder_encoder, encoder_tokenizer)
    return SimpleNamespace(
        root=root,
        llava=llava,
        states={"mmfuser": mmfuser, "igva": igva, "igva-average": average},
        encoder=encoder,
        encoder_tokenizer=encoder_tokenizer,
    )


@pytest.fixture(scope="module")
def converted(checkpoints):
    """Each official checkpoint converted: {name: output folder}."""
    root, outputs = checkpoints.root, {}
    for name, options in {
        "llava": {},
        "llava-tower-inside": {"fuser_type": "mmfuser"},
        "mmfuser": {},
        "igva": {"instruction_encoder": root / "sentence-encoder"},
        "igva-average": {},
    }.items():
        outputs[name] = root / f"{name}-fused"
        tower = root / ("other-tower" if name == "llava-tower-inside" else "tower")
        convert_checkpoint(root / name, outputs[name], vision_tower=tower, progress=False, **options)
    return outputs


def load(folder):
    model = AutoModel.from_pretrained(folder, trust_remote_code=True).eval()
    return model, AutoProcessor.from_pretrained(folder, trust_remote_code=True)


def pixel_inputs(processor):
    images = [make_image(0), make_image(1)]
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}],
        add_generation_prompt=True,
    )
    return processor(images=images, text=[prompt, prompt], return_tensors="pt")


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).abs().max() / expected.abs().max()).item()


def tower_hidden_states(llava, pixel_values) -> tuple:
    """The CLIP tower's hidden states, computed by transformers' CLIPVisionModel from the tower's weights."""
    tower = CLIPVisionModel(llava.config.vision_config).eval()
    tower.load_state_dict(llava.model.vision_tower.state_dict())
    with torch.no_grad():
        return tower(pixel_values, output_hidden_states=True).hidden_states


# -------------------------------------------------------------------------------------------------- equivalence


@pytest.mark.parametrize("name", ["llava", "llava-tower-inside"])
def test_plain_llava_matches_llava_hf(checkpoints, converted, name):
    model, processor = load(converted[name])
    inputs = pixel_inputs(processor)
    assert processor.tokenizer.convert_tokens_to_ids(["<image>", "<pad>"]) == [100, 101]
    assert (inputs["input_ids"] == 100).sum().item() == 2 * 16
    assert model.config.text_config.vocab_size == 128 and model.config.image_token_index == 100
    with torch.no_grad():
        actual = model(**inputs).logits
        expected = checkpoints.llava(
            input_ids=inputs["input_ids"], attention_mask=inputs["attention_mask"], pixel_values=inputs["pixel_values"]
        ).logits
    torch.testing.assert_close(actual[..., :ORIGINAL_VOCAB], expected[..., :ORIGINAL_VOCAB], rtol=1e-5, atol=1e-5)
    # New rows (<image>, <pad>, padding to 64) start as the mean of the original rows.
    for matrix in (model.get_input_embeddings().weight, model.lm_head.weight):
        assert matrix.shape[0] == 128
        expected_rows = matrix[:ORIGINAL_VOCAB].mean(0).expand(128 - ORIGINAL_VOCAB, -1)
        torch.testing.assert_close(matrix[ORIGINAL_VOCAB:], expected_rows)


def test_mmfuser_matches_official_math(checkpoints, converted):
    model, processor = load(converted["mmfuser"])
    assert model.config.fuser_type == "mmfuser" and model.config.fuser_layers == [1, 2, 3, 4, 5]
    pixel_values = pixel_inputs(processor)["pixel_values"]
    with torch.no_grad():
        actual = model.get_image_features(pixel_values).pooler_output
    official = StateView(checkpoints.states["mmfuser"], "model.mm_projector.", num_heads=16, num_points=4, eps=1e-6)
    hidden_states = tower_hidden_states(checkpoints.llava, pixel_values)
    for image, features in enumerate(actual):
        patches = [hidden_states[layer][image, 1:] for layer in MMFUSER_LAYERS]
        fused = mmfuser_reference(official[0], patches)
        expected = mlp_projector_reference(fused, official[1], official[3])
        assert relative_error(features, expected) <= 1e-5


def test_igva_matches_official_math(checkpoints, converted):
    model, processor = load(converted["igva"])
    config = model.config
    assert config.fuser_type == "igva" and config.instruction_pooling == "mean"
    assert config.instruction_embedding_normalize
    inputs = pixel_inputs(processor)
    # The processor's instruction is the question alone, tokenised by the sentence encoder's tokenizer.
    expected_ids = checkpoints.encoder_tokenizer([QUESTION] * 2, return_tensors="pt")["input_ids"]
    torch.testing.assert_close(inputs["instruction_input_ids"], expected_ids)
    assert processor.instruction_tokenizer.model_max_length == 32  # sentence_bert_config.json's max_seq_length
    with torch.no_grad():
        output = model.get_image_features(
            inputs["pixel_values"],
            instruction_input_ids=inputs["instruction_input_ids"],
            instruction_attention_mask=inputs["instruction_attention_mask"],
        )
        # The sentence embedding as sentence-transformers computes it with the checkpoint's frozen encoder.
        token_states = checkpoints.encoder(input_ids=expected_ids).last_hidden_state.double()
    sentence = torch.nn.functional.normalize(token_states.mean(1), dim=-1)
    state = checkpoints.states["igva"]
    aggregator = StateView(state, "model.vision_aggregator.", num_heads=AGGREGATOR["heads"], eps=1e-5)
    official = SimpleNamespace(
        sentence_proj=aggregator.sentence_proj,
        cls_proj=aggregator.cls_proj,
        blocks=list(aggregator.transformers),
        linear=aggregator.linear,
    )
    projector = StateView(state, "model.mm_projector.")
    hidden_states = tower_hidden_states(checkpoints.llava, inputs["pixel_values"])
    for image, features in enumerate(output.pooler_output):
        per_image = [state[image] for state in hidden_states]
        weights, fused = igva_reference(official, per_image, sentence[image], IGVA_GROUPS, base_layer=-2)
        assert relative_error(output.fusion_weights[image], weights) <= 1e-5
        assert relative_error(features, mlp_projector_reference(fused, projector[0], projector[2])) <= 1e-5


def test_igva_average_mode_matches_official_math(checkpoints, converted):
    model, processor = load(converted["igva-average"])
    assert model.config.fuser_type == "average" and model.base_model.instruction_encoder is None
    pixel_values = pixel_inputs(processor)["pixel_values"]
    with torch.no_grad():
        actual = model.get_image_features(pixel_values).pooler_output
    projector = StateView(checkpoints.states["igva-average"], "model.mm_projector.")
    hidden_states = tower_hidden_states(checkpoints.llava, pixel_values)
    for image, features in enumerate(actual):
        groups = [
            torch.stack([hidden_states[layer][image].double() for layer in group]).mean(0) for group in IGVA_GROUPS
        ]
        fused = torch.cat([hidden_states[-2][image, 1:].double(), torch.stack(groups).mean(0)[1:]], -1)
        assert relative_error(features, mlp_projector_reference(fused, projector[0], projector[2])) <= 1e-5


def test_processor_renders_the_llava_v1_conversation(converted):
    _, processor = load(converted["mmfuser"])
    conversation = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "What is shown?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A red circle."}]},
        {"role": "user", "content": [{"type": "text", "text": "Is it a chat?"}]},
    ]
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert prompt == (
        f"{LLAVA_V1_SYSTEM} USER: <image>\nWhat is shown? ASSISTANT: A red circle.</s>USER: Is it a chat? ASSISTANT:"
    )
    assert processor.image_processor.do_pad and processor.image_processor.crop_size["height"] == 32


def test_converted_checkpoint_generates_without_the_package(converted):
    code = (
        "import torch, numpy as np\n"
        "from PIL import Image\n"
        "from transformers import AutoModel, AutoProcessor\n"
        "model = AutoModel.from_pretrained('igva-fused', trust_remote_code=True).eval()\n"
        "processor = AutoProcessor.from_pretrained('igva-fused', trust_remote_code=True)\n"
        "image = Image.fromarray((np.random.RandomState(0).rand(32, 32, 3) * 255).astype('uint8'))\n"
        "conversation = [{'role': 'user', 'content': [{'type': 'image', 'image': image},\n"
        "                                             {'type': 'text', 'text': 'What is shown in the image?'}]}]\n"
        "inputs = processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,\n"
        "                                       return_dict=True, return_tensors='pt')\n"
        "output = model.generate(**inputs, max_new_tokens=4, do_sample=False)\n"
        "print(type(model).__module__, output.shape[1] - inputs['input_ids'].shape[1])\n"
    )
    result = run_without_package(code, cwd=converted["igva"].parent)
    assert result.returncode == 0, result.stderr[-3000:]
    module, new_tokens = result.stdout.split()[-2:]
    assert module.startswith("transformers_modules") and new_tokens == "4"


def test_model_card_names_the_official_code(converted):
    card = (converted["igva"] / "README.md").read_text()
    assert "YiZheng-zy/IGVA" in card and "fusedvlm-convert-original" in card and "Untrained" not in card
    assert "Untrained fuser" in (converted["llava"] / "README.md").read_text()


# ----------------------------------------------------------------------------------------------- sentence encoder


@pytest.mark.parametrize("pooling", ["cls", "max"])
def test_embed_instructions_pooling_modes(fused_models, tiny_instruction_encoder, pooling):
    model = fused_models["igva"].model
    encoder, tokenizer = tiny_instruction_encoder
    batch = tokenizer(["a red circle", "What is shown in the image?"], padding=True, return_tensors="pt")
    with torch.no_grad():
        states = encoder(**batch).last_hidden_state
    if pooling == "cls":
        expected = states[:, 0]
    else:  # the maximum over each sample's real tokens only
        expected = torch.stack(
            [states[row, mask.bool()].max(0).values for row, mask in enumerate(batch["attention_mask"])]
        )
    expected = torch.nn.functional.normalize(expected, dim=-1)
    original = model.config.instruction_pooling
    model.config.instruction_pooling = pooling
    try:
        actual = model.embed_instructions(batch["input_ids"], batch["attention_mask"])
    finally:
        model.config.instruction_pooling = original
    torch.testing.assert_close(actual, expected)


def test_config_rejects_unknown_pooling(fused_models):
    fields = {**fused_models["igva"].config.to_dict(), "instruction_pooling": "weightedmean"}
    with pytest.raises(ValueError, match="instruction_pooling 'weightedmean'.*mean, cls, max"):
        FusedLlavaConfig(**{k: v for k, v in fields.items() if k not in ("model_type", "transformers_version")})


# -------------------------------------------------------------------------------------------------------- errors


def test_select_layer_formats():
    assert parse_select_layer("list-22/-17/-12/-7/-2") == [-22, -17, -12, -7, -2]
    assert parse_select_layer([-22, -2]) == [-22, -2] and parse_select_layer("-2") == -2
    with pytest.raises(ConversionError, match="neither a layer index"):
        parse_select_layer("last")


def _rewrite(checkpoints, name, tmp_path, config_changes=None, state_changes=None, weights_format="safetensors"):
    """A copy of an official checkpoint with config keys and tensors changed (None removes)."""
    source = checkpoints.root / name
    config = json.loads((source / "config.json").read_text())
    state = dict(checkpoints.states.get(name) or {})
    if not state:
        raise ValueError(name)
    for changes, target in ((config_changes, config), (state_changes, state)):
        for key, value in (changes or {}).items():
            if value is None:
                target.pop(key, None)
            else:
                target[key] = value
    folder = tmp_path / name
    write_original(folder, config, state, weights_format)
    return folder


def test_unknown_and_missing_keys_are_listed(checkpoints, tmp_path):
    removed = "model.mm_projector.0.cross_attn.value_proj.weight"
    folder = _rewrite(
        checkpoints,
        "mmfuser",
        tmp_path,
        state_changes={
            removed: None,
            "model.image_newline": torch.zeros(64),
            "model.mm_projector.0.extra_gate": torch.zeros(1),
        },
    )
    with pytest.raises(ConversionError) as error:
        convert_checkpoint(folder, tmp_path / "out", vision_tower=checkpoints.root / "tower", progress=False)
    message = str(error.value)
    assert "'mmfuser' layout" in message
    assert "2 unexpected keys: model.image_newline, model.mm_projector.0.extra_gate" in message
    assert f"1 missing keys: {removed}" in message
    assert not (tmp_path / "out").exists()


def test_wrong_shapes_are_named(checkpoints, tmp_path):
    folder = _rewrite(
        checkpoints, "igva-average", tmp_path, state_changes={"model.mm_projector.0.weight": torch.zeros(64, 64)}
    )
    with pytest.raises(
        ConversionError,
        match=r"wrong shape: model\.mm_projector\.0\.weight \[64, 64\] \(expected "
        r"\[64, 128\]\)",
    ):
        convert_checkpoint(folder, tmp_path / "out", vision_tower=checkpoints.root / "tower", progress=False)


def test_a_tensor_stored_under_both_names_is_refused(checkpoints, tmp_path):
    """A checkpoint that holds a tensor under its original name and under its fused one (half re-saved) would write
    the tensor twice: refused by name before anything is written."""
    norm = checkpoints.states["igva-average"]["model.norm.weight"]
    folder = _rewrite(checkpoints, "igva-average", tmp_path, state_changes={"model.language_model.norm.weight": norm})
    with pytest.raises(ConversionError, match=r"'model\.(language_model\.)?norm\.weight' in .* are the same tensor"):
        convert_checkpoint(folder, tmp_path / "out", vision_tower=checkpoints.root / "tower", progress=False)
    assert not (tmp_path / "out").exists()


def test_missing_vision_tower_names_the_config_entry(checkpoints, tmp_path):
    with pytest.raises(ConversionError, match=f"holds no vision tower.*mm_vision_tower '{TOWER_NAME}'.*--vision-tower"):
        convert_checkpoint(checkpoints.root / "mmfuser", tmp_path / "out", progress=False)


def test_igva_needs_the_instruction_encoder(checkpoints, tmp_path):
    with pytest.raises(ConversionError, match="--instruction-encoder.*all-mpnet-base-v2"):
        convert_checkpoint(
            checkpoints.root / "igva", tmp_path / "out", vision_tower=checkpoints.root / "tower", progress=False
        )


def test_unsupported_pooling_is_refused(checkpoints, tmp_path):
    encoder_folder = tmp_path / "encoder"
    write_sentence_encoder(
        encoder_folder, checkpoints.encoder, checkpoints.encoder_tokenizer, pooling="weightedmean_tokens"
    )
    with pytest.raises(ConversionError, match="pooling modes \\['weightedmean_tokens'\\]"):
        convert_checkpoint(
            checkpoints.root / "igva",
            tmp_path / "out",
            vision_tower=checkpoints.root / "tower",
            instruction_encoder=encoder_folder,
            progress=False,
        )


def test_trained_fusion_keeps_its_fuser_and_cli_reports_errors(checkpoints, tmp_path, capsys):
    code = main(
        [
            "--input",
            str(checkpoints.root / "mmfuser"),
            "--output",
            str(tmp_path / "out"),
            "--vision-tower",
            str(checkpoints.root / "tower"),
            "--fuser",
            "igva",
            "--no-progress",
        ]
    )
    assert code == 2
    assert "trained mmfuser model" in capsys.readouterr().err


def test_arguments_of_the_other_format_are_refused(checkpoints, tiny_llava, tmp_path):
    tiny_llava[0].config.save_pretrained(tmp_path / "hf")
    with pytest.raises(ConversionError, match="llava-hf checkpoint.*choose the fuser to add with --fuser"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out", progress=False)
    with pytest.raises(ConversionError, match="llava-hf checkpoint, which holds its vision tower: drop --vision-tower"):
        convert_checkpoint(tmp_path / "hf", tmp_path / "out", "none", vision_tower=checkpoints.root / "tower")


def test_cli_converts_and_verifies(checkpoints, tmp_path, capsys):
    code = main(
        [
            "--input",
            str(checkpoints.root / "llava"),
            "--output",
            str(tmp_path / "out"),
            "--vision-tower",
            str(checkpoints.root / "tower"),
            "--fuser",
            "average",
            "--verify",
            "--no-progress",
        ]
    )
    report = capsys.readouterr().out
    assert code == 0, report
    assert "verified: max |logit difference|" in report
    assert json.loads((tmp_path / "out" / "config.json").read_text())["fuser_type"] == "average"
    assert math.isfinite(float(report.split("difference| = ")[1].split()[0]))


def test_formats_are_told_apart_by_structure(checkpoints, tiny_llava, tmp_path):
    """liuhaotian/llava-v1.5-7b saves `"model_type": "llava"` in a flat config, the model type of llava-hf's nested
    one: the structure decides."""
    raw = json.loads((checkpoints.root / "llava" / "config.json").read_text())
    assert raw["model_type"] == "llava" and raw["architectures"] == ["LlavaLlamaForCausalLM"]
    assert checkpoint_format(raw, checkpoints.root / "llava") == "original"
    tiny_llava[0].config.save_pretrained(tmp_path / "hf")
    assert checkpoint_format(json.loads((tmp_path / "hf" / "config.json").read_text()), tmp_path / "hf") == "llava-hf"
    # The old command name converts llava-hf checkpoints too.
    tiny_llava[1].save_pretrained(tmp_path / "hf")
    tiny_llava[0].save_pretrained(tmp_path / "hf")
    assert (
        main_original(
            ["--input", str(tmp_path / "hf"), "--output", str(tmp_path / "out"), "--fuser", "none", "--no-progress"]
        )
        == 0
    )
