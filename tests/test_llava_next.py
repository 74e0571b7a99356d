"""Fused LLaVA-NeXT: every fuser from its parity start computes what transformers' `LlavaNextForConditionalGeneration`
computes on images of several aspect ratios (logits, greedy tokens), loads with remote code without the package, and
is fed by `FusedLlavaNextProcessor` exactly as `LlavaNextProcessor` feeds LLaVA-NeXT, plus the instruction."""

import copy
import json
import logging

import pytest
import torch
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForImageTextToText,
    AutoProcessor,
    BitsAndBytesConfig,
    LlavaNextForConditionalGeneration,
)
from transformers.models.llava_next.modeling_llava_next import image_size_to_num_patches
from transformers.utils import logging as transformers_logging

from hf_fusedvlm import (
    FusedLlavaNextConfig,
    FusedLlavaNextForConditionalGeneration,
    FusedLlavaNextProcessor,
)
from hf_fusedvlm.conversion import convert_checkpoint
from hf_fusedvlm.parity import fused_from_llava
from hf_fusedvlm.publishing.folders import foreign_files
from hf_fusedvlm.tiny import build_tiny_llava_next, tiny_image_grid_pinpoints

from conftest import FUSER_TYPES, make_image, reads_instruction, run_without_package


PROMPTS = ["USER: <image>\nWhat is shown in the image? ASSISTANT:", "USER: <image>\nDescribe the colours. ASSISTANT:"]
# (height, width): wide, tall and square images tile to different grids.
IMAGE_SHAPES = [(40, 90), (70, 24), (50, 50)]


def images_of(shapes):
    return [make_image(seed).resize((width, height)) for seed, (height, width) in enumerate(shapes)]


@pytest.fixture(scope="module")
def llava_next():
    return build_tiny_llava_next(seed=0)


@pytest.fixture(scope="module")
def processor(llava_next, tiny_instruction_encoder):
    return FusedLlavaNextProcessor.from_llava_processor(
        llava_next[1], instruction_tokenizer=tiny_instruction_encoder[1]
    )


@pytest.fixture(scope="module")
def fused(llava_next, tiny_instruction_encoder):
    encoder = tiny_instruction_encoder[0]
    return {
        fuser: fused_from_llava(llava_next[0], fuser, instruction_encoder=encoder if reads_instruction(fuser) else None)
        for fuser in FUSER_TYPES
    }


@pytest.fixture(scope="module")
def batch(processor):
    """Two samples, images of two aspect ratios, left-padded for generation."""
    return processor(images=images_of(IMAGE_SHAPES[:2]), text=PROMPTS, return_tensors="pt", padding=True)


def crop_counts(inputs) -> list[int]:
    """The crops of each image (the base view and its tiles), as LLaVA-NeXT counts them from the image size."""
    pinpoints, size = tiny_image_grid_pinpoints(), 32
    return [image_size_to_num_patches(image_size, pinpoints, size) for image_size in inputs["image_sizes"]]


def plain_inputs(batch):
    return {key: value for key, value in batch.items() if not key.startswith("instruction_")}


@pytest.mark.parametrize("fuser", FUSER_TYPES)
def test_parity_start_computes_llava_next(fuser, fused, llava_next, batch):
    model = fused[fuser]
    assert isinstance(model, FusedLlavaNextForConditionalGeneration)
    inputs = batch if reads_instruction(fuser) else plain_inputs(batch)
    with torch.inference_mode():
        expected = llava_next[0](**plain_inputs(batch)).logits
        actual = model(**inputs)
    torch.testing.assert_close(actual.logits, expected, rtol=0, atol=1e-6)
    if actual.fusion_weights is not None:  # igva, average: one row of group weights per crop
        assert actual.fusion_weights.shape[0] == sum(crop_counts(batch))


@pytest.mark.parametrize("fuser", ["mmfuser", "igva"])
def test_greedy_tokens_equal_llava_next(fuser, fused, llava_next, processor):
    inputs = processor(images=images_of(IMAGE_SHAPES[2:]), text=PROMPTS[:1], return_tensors="pt")
    plain = plain_inputs(inputs)
    expected = llava_next[0].generate(**plain, max_new_tokens=6, do_sample=False)
    actual = fused[fuser].generate(**(inputs if reads_instruction(fuser) else plain), max_new_tokens=6, do_sample=False)
    assert torch.equal(actual, expected)


def test_igva_shares_each_image_instruction_across_its_crops(fused, processor):
    model = fused["igva"]
    seen = []
    hook = model.model.fuser.register_forward_hook(lambda module, args, output: seen.append(args[1]))
    try:
        inputs = processor(images=images_of(IMAGE_SHAPES[:2]), text=PROMPTS, return_tensors="pt", padding=True)
        with torch.inference_mode():
            model(**inputs)
    finally:
        hook.remove()
    (instruction_embeds,) = seen
    crops = crop_counts(inputs)
    assert instruction_embeds.shape[0] == sum(crops)
    first, second = instruction_embeds.split(crops)
    assert torch.equal(first, first[:1].expand_as(first)) and torch.equal(second, second[:1].expand_as(second))
    assert not torch.equal(first[0], second[0])  # two questions, two embeddings


def test_processor_feeds_llava_next_and_the_instruction(processor, llava_next, batch):
    expected = llava_next[1](images=images_of(IMAGE_SHAPES[:2]), text=PROMPTS, return_tensors="pt", padding=True)
    for key, value in expected.items():
        assert torch.equal(batch[key], value), key
    assert processor.get_instruction(PROMPTS[1]) == "Describe the colours."
    words = processor.instruction_tokenizer.batch_decode(batch["instruction_input_ids"], skip_special_tokens=True)
    assert [" ".join(text.split()) for text in words] == ["what is shown in the image?", "describe the colours."]


def test_saved_model_loads_with_remote_code_without_the_package(fused, processor, batch, tmp_path):
    model = fused["igva"]
    model.save_pretrained(tmp_path / "fused")
    processor.save_pretrained(tmp_path / "fused")
    with torch.inference_mode():
        expected = model(**batch).logits
    torch.save(expected, tmp_path / "expected.pt")
    torch.save(dict(batch), tmp_path / "inputs.pt")
    code = f"""
import torch
from transformers import AutoModel, AutoProcessor
model = AutoModel.from_pretrained({str(tmp_path / "fused")!r}, trust_remote_code=True).eval()
processor = AutoProcessor.from_pretrained({str(tmp_path / "fused")!r}, trust_remote_code=True)
inputs = torch.load({str(tmp_path / "inputs.pt")!r})
with torch.inference_mode():
    logits = model(**inputs).logits
torch.testing.assert_close(logits, torch.load({str(tmp_path / "expected.pt")!r}), rtol=0, atol=1e-6)
print(type(model).__name__, type(processor).__name__)
"""
    completed = run_without_package(code, tmp_path)
    assert completed.returncode == 0, completed.stderr[-3000:]
    assert completed.stdout.split() == ["FusedLlavaNextForConditionalGeneration", "FusedLlavaNextProcessor"]
    config = json.loads((tmp_path / "fused" / "config.json").read_text())
    assert config["model_type"] == "fused_llava_next"
    assert config["auto_map"]["AutoModel"] == "modeling_fused_llava_next.FusedLlavaNextForConditionalGeneration"
    assert (tmp_path / "fused" / "modeling_fusion.py").is_file()


def test_auto_classes_know_the_config(fused):
    config = fused["concat"].config
    assert type(AutoConfig.for_model("fused_llava_next")) is FusedLlavaNextConfig
    assert type(AutoModel.from_config(config)) is FusedLlavaNextForConditionalGeneration
    assert type(AutoModelForImageTextToText.from_config(config)) is FusedLlavaNextForConditionalGeneration


def test_bad_inputs_are_named(fused, batch, llava_next):
    with pytest.raises(ValueError, match="image_sizes is required with pixel_values"):
        fused["none"](input_ids=batch["input_ids"], pixel_values=batch["pixel_values"])
    fields = {**fused["none"].config.to_dict(), "image_grid_pinpoints": [[32, 50]]}
    fields.pop("model_type")
    with pytest.raises(ValueError, match=r"image_grid_pinpoints holds \[32, 50\].*multiples of the vision tower"):
        FusedLlavaNextConfig(**fields)


def test_the_processor_checks_images_and_the_chat_template_as_for_llava(processor, caplog):
    """FusedProcessorMixin's checks hold for LLaVA-NeXT's processor too: 16-bit grayscale scaled to 8 bits (not
    clipped), pixel values above 255 refused, and a processor without chat template warns that the instruction is the
    whole prompt."""
    from PIL import Image

    gray = images_of(IMAGE_SHAPES[:1])[0].convert("L")
    expected = processor(images=gray, text=PROMPTS[0], return_tensors="pt")["pixel_values"]
    sixteen_bit = Image.frombytes("I;16", gray.size, bytes(byte for value in gray.tobytes() for byte in (value, value)))
    actual = processor(images=sixteen_bit, text=PROMPTS[0], return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"pixel values up to 1000: the processor expects 8-bit values"):
        processor(images=torch.full((3, 32, 32), 1000.0), text=PROMPTS[0])
    bare = copy.deepcopy(processor)
    bare.chat_template = None
    assert bare.get_instruction(PROMPTS[1]) == "USER: Describe the colours. ASSISTANT:"
    transformers_logging.get_logger("hf_fusedvlm.processing_fused_llava").warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        bare(images=gray, text=PROMPTS[1])
    assert "no chat template, so the instruction the fuser reads is the whole prompt" in caplog.text


def test_llava_next_class_on_a_fused_checkpoint_is_not_silent(fused, tmp_path):
    """As for LLaVA: `LlavaNextForConditionalGeneration.from_pretrained(<fused>)` drops the fuser, and transformers'
    own warnings name the model type and every dropped fuser weight."""
    from transformers.testing_utils import CaptureLogger

    fused["mmfuser"].save_pretrained(tmp_path)
    config_logger = transformers_logging.get_logger("transformers.configuration_utils")
    report_logger = transformers_logging.get_logger("transformers.modeling_utils")
    with CaptureLogger(config_logger) as config_log, CaptureLogger(report_logger) as report_log:
        plain = LlavaNextForConditionalGeneration.from_pretrained(tmp_path)
    assert "model of type `fused_llava_next` to instantiate a model of type `llava_next`" in config_log.out
    fuser_keys = [key for key in fused["mmfuser"].state_dict() if key.startswith("model.fuser.")]
    assert fuser_keys and all(f"{key} " in report_log.out for key in fuser_keys)
    assert "UNEXPECTED" in report_log.out and not hasattr(plain.model, "fuser")


def test_a_checkpoint_missing_a_shard_is_one_sentence(fused, tmp_path):
    fused["mmfuser"].save_pretrained(tmp_path / "sharded", max_shard_size="300KB")
    sorted((tmp_path / "sharded").glob("model-*.safetensors"))[1].unlink()
    with pytest.raises(
        OSError, match=r"sharded is incomplete: .*names model-00002-of-\d+.safetensors, which is missing"
    ):
        AutoModel.from_pretrained(tmp_path / "sharded")


@pytest.mark.parametrize("fuser", ["mmfuser", "igva"])
def test_llava_hf_checkpoint_converts_with_parity(fuser, llava_next, tiny_instruction_encoder, tmp_path):
    """A saved llava-hf LLaVA-NeXT (sharded, as transformers writes it) converts, `--verify` passes, and the result
    loaded back gives LLaVA-NeXT's logits and greedy tokens."""
    model, plain_processor = llava_next
    model.save_pretrained(tmp_path / "source", max_shard_size="500KB")
    plain_processor.save_pretrained(tmp_path / "source")
    options = {}
    if reads_instruction(fuser):
        encoder, tokenizer = tiny_instruction_encoder
        encoder.save_pretrained(tmp_path / "encoder")
        tokenizer.save_pretrained(tmp_path / "encoder")
        options["instruction_encoder"] = tmp_path / "encoder"
    result = convert_checkpoint(tmp_path / "source", tmp_path / "out", fuser, verify=True, progress=False, **options)
    assert result.verify_max_abs_diff <= 1e-6
    assert foreign_files(tmp_path / "out") == []  # every file is one --overwrite may replace
    converted = AutoModel.from_pretrained(tmp_path / "out", trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert isinstance(converted, FusedLlavaNextForConditionalGeneration)
    assert isinstance(processor, FusedLlavaNextProcessor)
    inputs = processor(images=images_of(IMAGE_SHAPES[1:2]), text=PROMPTS[:1], return_tensors="pt")
    plain = plain_inputs(inputs)
    with torch.inference_mode():
        torch.testing.assert_close(converted(**inputs).logits, model(**plain).logits, rtol=0, atol=1e-6)
    expected = model.generate(**plain, max_new_tokens=5, do_sample=False)
    assert torch.equal(converted.generate(**inputs, max_new_tokens=5, do_sample=False), expected)


def test_four_bit_generate_keeps_the_fuser_unquantised(fused, llava_next, processor, tmp_path):
    """4-bit: a fused LLaVA-NeXT quantises the modules LLaVA-NeXT's do, into the same tensors, keeps the fuser and
    the instruction encoder in float32, and generates LLaVA-NeXT's greedy tokens from its parity start."""
    quantization = BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4")
    llava_next[0].save_pretrained(tmp_path / "plain")
    fused["mmfuser"].save_pretrained(tmp_path / "fused")
    plain = LlavaNextForConditionalGeneration.from_pretrained(tmp_path / "plain", quantization_config=quantization)
    model = AutoModel.from_pretrained(tmp_path / "fused", quantization_config=quantization)
    quantized = {name for name, module in model.named_modules() if type(module).__module__.startswith("bitsandbytes")}
    assert quantized and not any(name.startswith(("model.fuser", "model.instruction_encoder")) for name in quantized)
    assert {parameter.dtype for parameter in model.model.fuser.parameters()} == {torch.float32}
    plain_state = plain.state_dict()
    for name, tensor in model.state_dict().items():
        if name in plain_state:
            assert torch.equal(tensor, plain_state[name]), name
    inputs = plain_inputs(processor(images=images_of(IMAGE_SHAPES[:1]), text=PROMPTS[:1], return_tensors="pt"))
    expected = plain.generate(**inputs, max_new_tokens=5, do_sample=False)
    assert torch.equal(model.generate(**inputs, max_new_tokens=5, do_sample=False), expected)
