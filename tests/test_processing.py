import copy
import json
import logging

import pytest
import torch
from transformers import AutoProcessor, LlavaImageProcessorPil, pipeline
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER

from hf_fusedvlm import FusedLlavaProcessor, instruction_from_conversation, instruction_from_prompt
from hf_fusedvlm.tiny import LLAVA_CHAT_TEMPLATE

from conftest import FUSER_TYPES, instruction_inputs, make_image, reads_instruction, run_without_package


QUESTION = "What colour is the triangle?"
PROMPT = f"USER: <image>\n{QUESTION} ASSISTANT:"
CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' }}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>\n' }}"
    "{% else %}{{ content['text'] }}{% endif %}{% endfor %}{{ '<|im_end|>\n' }}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def user(*content) -> dict:
    """A user message: PIL images become image blocks, strings text blocks."""
    blocks = [
        {"type": "text", "text": part} if isinstance(part, str) else {"type": "image", "image": part}
        for part in content
    ]
    return {"role": "user", "content": blocks}


def text_message(role: str, text: str) -> dict:
    return {"role": role, "content": [{"type": "text", "text": text}]}


def assert_same_outputs(actual, expected):
    assert set(actual) == set(expected)
    for key, value in expected.items():
        assert torch.equal(actual[key], value), key


@pytest.fixture(scope="module")
def processor(tiny_llava, tiny_instruction_encoder):
    return FusedLlavaProcessor.from_llava_processor(tiny_llava[1], tiny_instruction_encoder[1])


@pytest.fixture(scope="module")
def plain_processor(tiny_llava):
    """Without instruction tokenizer, for fusers that read no instruction."""
    return FusedLlavaProcessor.from_llava_processor(tiny_llava[1])


@pytest.fixture(scope="module")
def images():
    return [make_image(seed) for seed in (1, 2, 3)]


@pytest.fixture(scope="module")
def checkpoint(fused_models, processor, images, tmp_path_factory):
    """A saved igva checkpoint with its processor, under `checkpoint/`, beside the images as PNG files."""
    root = tmp_path_factory.mktemp("fused_checkpoint")
    fused_models["igva"].save_pretrained(root / "checkpoint")
    processor.save_pretrained(root / "checkpoint")
    for index, image in enumerate(images):
        image.save(root / f"image_{index}.png")
    return root


def several_images_batch(processor, images):
    """Two samples: two images in the first prompt, one in the second."""
    prompts = ["USER: <image>\n<image>\nWhich one has more dots? ASSISTANT:", PROMPT]
    return processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")


def test_from_llava_processor_copies_the_llava_processor(tiny_llava, processor, plain_processor, image):
    _, llava_processor = tiny_llava
    for name in ("patch_size", "vision_feature_select_strategy", "num_additional_image_tokens", "image_token"):
        assert getattr(processor, name) == getattr(llava_processor, name), name
    assert processor.chat_template == llava_processor.chat_template
    assert processor.tokenizer is not llava_processor.tokenizer  # copies: saving one does not change the other
    expected = llava_processor(images=image, text=PROMPT, return_tensors="pt")
    assert_same_outputs(plain_processor(images=image, text=PROMPT, return_tensors="pt"), dict(expected))
    assert plain_processor.get_attributes() == ["image_processor", "tokenizer"]
    assert plain_processor.model_input_names == ["input_ids", "attention_mask", "pixel_values"]
    outputs = processor(images=image, text=PROMPT, return_tensors="pt")
    assert_same_outputs(outputs, {**expected, **instruction_inputs(processor.instruction_tokenizer, [QUESTION])})
    assert set(processor.model_input_names) == set(outputs) | {"image_sample_index"}


@pytest.mark.parametrize("chat_template", [LLAVA_CHAT_TEMPLATE, CHATML_TEMPLATE], ids=["llava", "chatml"])
def test_instruction_is_the_same_from_chat_prompt_and_argument(processor, image, chat_template):
    conversation = [text_message("system", "Answer in one word."), user(image, QUESTION)]
    processor = copy.deepcopy(processor)
    processor.chat_template = chat_template
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert instruction_from_conversation(conversation) == QUESTION
    assert processor.get_instruction(prompt) == QUESTION
    from_chat = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    from_prompt = processor(images=image, text=prompt, return_tensors="pt")
    explicit = processor(images=image, text=prompt, instructions=[QUESTION], return_tensors="pt")
    assert_same_outputs(from_prompt, dict(from_chat))
    assert_same_outputs(explicit, dict(from_chat))
    expected = instruction_inputs(processor.instruction_tokenizer, [QUESTION])
    assert torch.equal(from_chat["instruction_input_ids"], expected["instruction_input_ids"])


def test_role_markers_and_the_raw_prompt_rule(processor):
    assert processor.chat_role_markers() == ("USER:", "ASSISTANT:")
    without_template = copy.deepcopy(processor)
    without_template.chat_template = None
    assert without_template.chat_role_markers() == (None, None)
    assert without_template.get_instruction(f"<s>{PROMPT}") == f"USER: {QUESTION} ASSISTANT:"
    # A hand-written prompt in the template's format, with a system prefix and the BOS token.
    assert processor.get_instruction(f"<s>A helpful assistant. {PROMPT}") == QUESTION
    # Without markers in the prompt the whole prompt counts, without image and special tokens.
    assert processor.get_instruction(f"<image>\n  {QUESTION}\n") == QUESTION
    assert instruction_from_prompt(PROMPT) == f"USER: {QUESTION} ASSISTANT:"
    assert instruction_from_prompt(PROMPT, "USER:", "ASSISTANT:") == QUESTION


def test_multi_turn_uses_the_last_user_turn(processor, images):
    last_question = "How many dots are there?"
    conversation = [
        user(images[0], QUESTION),
        text_message("assistant", "The triangle is yellow."),
        user(last_question),
    ]
    assert instruction_from_conversation(conversation) == last_question
    prompt = processor.apply_chat_template(conversation, add_generation_prompt=True)
    assert processor.get_instruction(prompt) == last_question
    outputs = processor.apply_chat_template(
        conversation, add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    expected = instruction_inputs(processor.instruction_tokenizer, [last_question])
    assert torch.equal(outputs["instruction_input_ids"], expected["instruction_input_ids"])


def test_batched_chat_gives_one_instruction_row_per_conversation(processor, images):
    questions = [QUESTION, "Which digit is written in the corner?"]
    conversations = [[user(image, question)] for image, question in zip(images, questions)]
    from_chat = processor.apply_chat_template(
        conversations,
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
        processor_kwargs={"padding": True, "padding_side": "left"},
    )
    prompts = [f"USER: <image>\n{question} ASSISTANT:" for question in questions]
    from_prompts = processor(images=images[:2], text=prompts, padding=True, padding_side="left", return_tensors="pt")
    assert_same_outputs(from_chat, dict(from_prompts))
    assert "image_sample_index" not in from_chat  # one image per sample
    expected = instruction_inputs(processor.instruction_tokenizer, questions)
    assert torch.equal(from_chat["instruction_input_ids"], expected["instruction_input_ids"])
    assert torch.equal(from_chat["instruction_attention_mask"], expected["instruction_attention_mask"])


def test_batched_generation_matches_each_sample_alone(processor, trained_igva, images):
    questions = ["How many dots are there?", "Which digit is written in the large green corner?"]
    prompts = [f"USER: <image>\n{question} ASSISTANT:" for question in questions]
    batch = processor(images=images[:2], text=prompts, padding=True, padding_side="left", return_tensors="pt")
    assert batch["attention_mask"][0, 0] == 0 and batch["attention_mask"][:, -1].all()  # left padding
    generation = dict(max_new_tokens=4, do_sample=False)
    together = trained_igva.generate(**batch, **generation)
    prompt_length = batch["input_ids"].shape[1]
    for index in range(2):
        alone_inputs = processor(images=images[index], text=prompts[index], return_tensors="pt")
        alone = trained_igva.generate(**alone_inputs, **generation)
        assert torch.equal(together[index, prompt_length:], alone[0, alone_inputs["input_ids"].shape[1] :])
    with torch.no_grad():
        weights = trained_igva(**batch).fusion_weights
        swapped = trained_igva(
            **{
                **batch,
                "instruction_input_ids": batch["instruction_input_ids"].flip(0),
                "instruction_attention_mask": batch["instruction_attention_mask"].flip(0),
            }
        ).fusion_weights
    assert (weights - swapped).abs().max() > 1e-4  # each sample's own instruction reaches the fuser


def test_several_images_in_one_prompt_map_to_their_sample(processor, trained_igva, images):
    batch = several_images_batch(processor, images)
    assert batch["pixel_values"].shape[0] == 3 and batch["instruction_input_ids"].shape[0] == 2
    assert batch["image_sample_index"].tolist() == [0, 0, 1]
    assert batch["image_sample_index"].dtype == torch.long
    nested = several_images_batch(processor, [images[:2], images[2:]])  # images grouped per sample
    assert_same_outputs(nested, dict(batch))
    with torch.no_grad():
        features = trained_igva.get_image_features(
            batch["pixel_values"],
            instruction_input_ids=batch["instruction_input_ids"],
            instruction_attention_mask=batch["instruction_attention_mask"],
            image_sample_index=batch["image_sample_index"],
        )
        second_sample = processor(images=images[2], text=PROMPT, return_tensors="pt")
        alone = trained_igva.get_image_features(
            second_sample["pixel_values"],
            instruction_input_ids=second_sample["instruction_input_ids"],
            instruction_attention_mask=second_sample["instruction_attention_mask"],
        )
        logits = trained_igva(**batch).logits
    torch.testing.assert_close(features.fusion_weights[2:], alone.fusion_weights)
    assert logits.shape[:2] == batch["input_ids"].shape


def test_pad_to_square_passes_through_to_the_image_processor(processor):
    # LLaVA-1.5's pad-to-square is LlavaImageProcessor's `do_pad` (the tiny CLIP image processor has none).
    settings = processor.image_processor.to_dict()
    settings.pop("image_processor_type")
    image_processor = LlavaImageProcessorPil(**settings)
    padding_processor = FusedLlavaProcessor(
        image_processor=image_processor,
        tokenizer=processor.tokenizer,
        instruction_tokenizer=processor.instruction_tokenizer,
        patch_size=processor.patch_size,
        vision_feature_select_strategy=processor.vision_feature_select_strategy,
        num_additional_image_tokens=processor.num_additional_image_tokens,
    )
    wide = make_image(4, size=48).crop((0, 0, 48, 24))
    for do_pad in (True, False):
        outputs = padding_processor(images=wide, text=PROMPT, do_pad=do_pad, return_tensors="pt")
        pixel_values = outputs["pixel_values"]
        assert torch.equal(pixel_values, image_processor(wide, do_pad=do_pad, return_tensors="pt")["pixel_values"])
    assert not torch.equal(pixel_values, image_processor(wide, do_pad=True, return_tensors="pt")["pixel_values"])


@pytest.mark.parametrize("fuser_type", [fuser_type for fuser_type in FUSER_TYPES if not reads_instruction(fuser_type)])
def test_fusers_without_instruction_need_no_instruction_tokenizer(
    fuser_type, fused_models, processor, plain_processor, image
):
    model = fused_models[fuser_type]
    plain_inputs = plain_processor(images=image, text=PROMPT, return_tensors="pt")
    assert not set(plain_inputs) & {"instruction_input_ids", "instruction_attention_mask", "image_sample_index"}
    with torch.no_grad():
        expected = model(**plain_inputs).logits
        # A processor with an instruction tokenizer also works: the extra inputs are ignored.
        with_instruction = model(**several_images_batch(processor, [image, image, image])).logits[1]
    assert expected.shape[1:] == (plain_inputs["input_ids"].shape[1], model.config.text_config.vocab_size)
    torch.testing.assert_close(with_instruction[-expected.shape[1] :], expected[0])


def test_igva_model_with_a_processor_without_instruction_tokenizer_says_what_is_missing(
    fused_models, plain_processor, image
):
    inputs = plain_processor(images=image, text=PROMPT, return_tensors="pt")
    message = "pass instruction_input_ids .*FusedLlavaProcessor returns them when it has an instruction_tokenizer"
    with pytest.raises(ValueError, match=message):
        fused_models["igva"].generate(**inputs, max_new_tokens=1)


def test_too_long_instruction_is_truncated_with_a_warning(processor, image, caplog):
    limit = processor.instruction_tokenizer.model_max_length
    long_question = " ".join(["how many dots are there in the top left corner"] * 10)
    with caplog.at_level(logging.WARNING):
        outputs = processor(
            images=[image, image],
            text=[PROMPT, f"USER: <image>\n{long_question} ASSISTANT:"],
            padding=True,
            return_tensors="pt",
        )
    assert outputs["instruction_input_ids"].shape == (2, limit)
    assert outputs["instruction_attention_mask"].sum(-1)[1] == limit
    messages = [record.getMessage() for record in caplog.records if record.levelno == logging.WARNING]
    assert any("samples [1] are longer than the instruction tokenizer's limit of 64" in message for message in messages)
    caplog.clear()
    unlimited = copy.deepcopy(processor)
    unlimited.instruction_tokenizer.model_max_length = VERY_LARGE_INTEGER  # a tokenizer that sets no limit
    with caplog.at_level(logging.WARNING):
        processor(images=image, text=PROMPT, return_tensors="pt")
        outputs = unlimited(images=image, text=f"USER: <image>\n{long_question} ASSISTANT:", return_tensors="pt")
    assert not [record for record in caplog.records if "instruction" in record.getMessage()]
    assert outputs["instruction_input_ids"].shape[1] > limit


@pytest.mark.parametrize(
    "call, message",
    [
        (
            lambda p, image: p(images=[image, image], text=[PROMPT, PROMPT], instructions=["one"], padding=True),
            "Got 1 instructions for 2 prompts",
        ),
        (
            lambda p, image: p(images=image, text=f"USER: {QUESTION} ASSISTANT:"),
            "Found total 0 <image> tokens and 1 images",
        ),
        (lambda p, image: p(text=PROMPT), "Found 1 <image> tokens in the text but no images were passed"),
        (lambda p, image: p(images=image, instructions=[QUESTION]), "without prompts"),
        (
            lambda p, image: p.apply_chat_template([text_message("system", "Be brief.")], tokenize=True),
            "no message with role 'user'",
        ),
        (
            lambda p, image: p.apply_chat_template([user(image, QUESTION)], instructions=[QUESTION]),
            "only used when apply_chat_template tokenises",
        ),
        (
            lambda p, image: p(images=torch.full((3, 32, 32), 1000.0), text=PROMPT),
            r"pixel values up to 1000: the processor expects 8-bit values \(0..255\), or floats in \[0, 1\] with "
            "do_rescale=False",
        ),
        (
            lambda p, image: p(images=image.convert("L").convert("I").point(lambda v: v * 200), text=PROMPT),
            "PIL mode 'I' has pixel values up to .* would clip at 255",
        ),
    ],
    ids=[
        "instruction-count",
        "images-without-tokens",
        "tokens-without-images",
        "instructions-without-text",
        "chat-without-user",
        "instructions-without-tokenize",
        "pixel-values-above-255",
        "32-bit-image-above-255",
    ],
)
def test_bad_inputs_raise_clear_errors(processor, image, call, message):
    with pytest.raises(ValueError, match=message):
        call(processor, image)


def test_what_the_processor_expects_of_pixel_values(plain_processor, image, caplog):
    """8-bit images as they are; 16-bit grayscale scaled to 8 bits (PIL alone would clip it at 255); floats already
    in [0, 1] warned about (as transformers' image processors warn), and right with do_rescale=False."""
    from PIL import Image

    gray = image.convert("L")
    expected = plain_processor(images=gray, text=PROMPT, return_tensors="pt")["pixel_values"]
    sixteen_bit = Image.frombytes("I;16", gray.size, bytes(byte for value in gray.tobytes() for byte in (value, value)))
    assert sixteen_bit.getpixel((0, 0)) == gray.getpixel((0, 0)) * 257  # the same picture, 16 bits deep
    actual = plain_processor(images=sixteen_bit, text=PROMPT, return_tensors="pt")["pixel_values"]
    torch.testing.assert_close(actual, expected, rtol=0, atol=0)

    from transformers.utils import logging as transformers_logging

    rgb = plain_processor(images=image, text=PROMPT, return_tensors="pt")["pixel_values"]
    rescaled = torch.tensor(list(image.getdata()), dtype=torch.float32).reshape(image.height, image.width, 3) / 255
    transformers_logging.get_logger("hf_fusedvlm.processing_fused_llava").warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        plain_processor(images=rescaled.permute(2, 0, 1), text=PROMPT, return_tensors="pt")
    assert "float pixel values in [0, 1], which the image processor rescales by 1/255 again" in caplog.text
    assert "pass do_rescale=False" in caplog.text
    caplog.clear()
    with caplog.at_level(logging.WARNING):
        right = plain_processor(images=rescaled.permute(2, 0, 1), text=PROMPT, do_rescale=False, return_tensors="pt")
    assert not caplog.text
    torch.testing.assert_close(right["pixel_values"], rgb, rtol=0, atol=1e-5)


def test_instructions_without_instruction_tokenizer_raise(plain_processor, image):
    with pytest.raises(ValueError, match="no instruction_tokenizer: build it with the tokenizer"):
        plain_processor(images=image, text=PROMPT, instructions=[QUESTION])


def test_round_trip_in_process(processor, plain_processor, images, tmp_path):
    for name, original in (("with_instruction", processor), ("plain", plain_processor)):
        original.save_pretrained(tmp_path / name)
        loaded = AutoProcessor.from_pretrained(tmp_path / name)
        assert type(loaded) is FusedLlavaProcessor
        assert_same_outputs(several_images_batch(loaded, images), dict(several_images_batch(original, images)))
        saved = json.loads((tmp_path / name / "processor_config.json").read_text())
        assert saved["auto_map"] == {"AutoProcessor": "processing_fused_llava.FusedLlavaProcessor"}
        assert (tmp_path / name / "processing_fused_llava.py").exists()
    assert (tmp_path / "with_instruction" / "instruction_tokenizer" / "tokenizer_config.json").exists()
    # No subfolder: no instruction tokenizer (not the LLM tokenizer loaded in its place).
    assert not (tmp_path / "plain" / "instruction_tokenizer").exists()
    assert AutoProcessor.from_pretrained(tmp_path / "plain").instruction_tokenizer is None


def expected_generations(model, processor, image) -> dict:
    """Full generated sequences for the plain prompt and the chat, as the pipeline should produce them."""
    plain = processor(images=image, text=PROMPT, return_tensors="pt")
    chat = processor.apply_chat_template(
        [user(image, QUESTION)], add_generation_prompt=True, tokenize=True, return_dict=True, return_tensors="pt"
    )
    return {
        name: model.generate(**inputs, max_new_tokens=3, do_sample=False)[0].tolist()
        for name, inputs in (("plain", plain), ("chat", chat))
    }


def test_pipeline_in_process_plain_and_chat(checkpoint, fused_models, processor, images):
    pipe = pipeline("image-text-to-text", model=str(checkpoint / "checkpoint"), trust_remote_code=True)
    assert type(pipe.processor) is FusedLlavaProcessor and pipe.processor.instruction_tokenizer is not None
    generation = dict(max_new_tokens=3, do_sample=False, return_tensors=True)
    plain = pipe(images=images[0], text=PROMPT, **generation)[0]["generated_token_ids"].tolist()
    chat = pipe(text=[user(images[0], QUESTION)], **generation)[0]["generated_token_ids"].tolist()
    assert {"plain": plain, "chat": chat} == expected_generations(fused_models["igva"], processor, images[0])
    text = pipe(text=[user(images[0], QUESTION)], max_new_tokens=3)[0]["generated_text"]
    assert text[-1]["role"] == "assistant"


REMOTE_CODE = """
import json, os, torch
from PIL import Image
from transformers import AutoProcessor, LlavaImageProcessorPil, pipeline
from transformers.tokenization_utils_base import VERY_LARGE_INTEGER
prompt, question = %r, %r
processor = AutoProcessor.from_pretrained("checkpoint", trust_remote_code=True)
assert type(processor).__name__ == "FusedLlavaProcessor", type(processor)
assert type(processor).__module__.startswith("transformers_modules"), type(processor).__module__
images = [Image.open(f"image_{index}.png") for index in range(3)]
prompts = ["USER: <image>\\n<image>\\nWhich one has more dots? ASSISTANT:", prompt]
outputs = processor(images=images, text=prompts, padding=True, padding_side="left", return_tensors="pt")
torch.save(dict(outputs), "remote_outputs.pt")
pipe = pipeline("image-text-to-text", model="checkpoint", trust_remote_code=True)
assert type(pipe.model).__module__.startswith("transformers_modules"), type(pipe.model).__module__
generation = dict(max_new_tokens=3, do_sample=False, return_tensors=True)
chat = [{"role": "user", "content": [{"type": "image", "path": os.path.abspath("image_0.png")},
                                     {"type": "text", "text": question}]}]
result = {
    "plain": pipe(images=images[0], text=prompt, **generation)[0]["generated_token_ids"].tolist(),
    "chat": pipe(text=chat, **generation)[0]["generated_token_ids"].tolist(),
}
print("RESULT" + json.dumps(result))
""" % (PROMPT, QUESTION)


def test_processor_and_pipeline_with_remote_code_without_the_package(checkpoint, fused_models, processor, images):
    result = run_without_package(REMOTE_CODE, cwd=checkpoint)
    assert result.returncode == 0, result.stderr[-3000:]
    remote_outputs = torch.load(checkpoint / "remote_outputs.pt")
    assert_same_outputs(remote_outputs, dict(several_images_batch(processor, images)))
    line = next(line for line in result.stdout.splitlines() if line.startswith("RESULT"))
    assert json.loads(line[len("RESULT") :]) == expected_generations(fused_models["igva"], processor, images[0])


@pytest.mark.parametrize("which", ["processor", "plain_processor"])
def test_empty_video_and_audio_lists_of_generic_harnesses_are_ignored(which, request, image):
    # lmms-eval's generic `huggingface` model calls every processor with `videos=[]` and `audios=[]`.
    processor = request.getfixturevalue(which)
    expected = processor(images=image, text=PROMPT, return_tensors="pt")
    actual = processor(images=[image], text=[PROMPT], videos=[], audios=[], padding=True, return_tensors="pt")
    assert_same_outputs(actual, expected)
    with pytest.raises(ValueError, match="audios"):
        processor(images=image, text=PROMPT, audios=[[0.0, 0.1]], return_tensors="pt")


def test_a_processor_without_chat_template_says_what_the_instruction_becomes(processor, image, caplog):
    """IGVA's instruction is cut from the prompt at the chat template's role markers; without a template it is the
    whole prompt, role words included: the processor warns, and the converter has the message to print."""
    from transformers.utils import logging as transformers_logging

    from hf_fusedvlm.processing_fused_llava import missing_chat_template_message

    bare = copy.deepcopy(processor)
    bare.chat_template = None
    assert bare.get_instruction(PROMPT) == f"USER: {QUESTION} ASSISTANT:"  # what the fuser would read
    transformers_logging.get_logger("hf_fusedvlm.processing_fused_llava").warning_once.cache_clear()
    with caplog.at_level(logging.WARNING):
        bare(images=image, text=PROMPT)
    assert "no chat template, so the instruction the fuser reads is the whole prompt" in caplog.text
    assert missing_chat_template_message(processor, reads_instruction=True) is None
    assert "role words such as 'USER:' included" in missing_chat_template_message(bare, reads_instruction=True)
    message = missing_chat_template_message(bare, reads_instruction=False)
    assert "cannot render conversations" in message and "role words" not in message
