"""The verify step (`--verify`): the converted folder, loaded as users load it (`trust_remote_code=True`), computes
what the source computes. Runs on the staging folder, before the result is moved into place."""

from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForImageTextToText, AutoProcessor, LlavaForConditionalGeneration

from .errors import VerificationError


# `--verify` passes when |fused - source| <= tolerance * max(1, |source|) for every logit. float32 runs the same
# arithmetic up to the order of the projector's sums (zero columns added); bf16 / fp16 round every layer's output, so
# one rounding step of difference in the projector can move a logit by a few units in the last place.
VERIFY_TOLERANCES = {torch.float32: 1e-6, torch.float16: 1e-2, torch.bfloat16: 5e-2}
VERIFY_QUESTION = "What is shown in this image?"


def verification_image(size: int = 64):
    """A deterministic non-square RGB test image (no download)."""
    from PIL import Image

    generator = torch.Generator().manual_seed(0)
    pixels = (torch.rand(size, size * 3 // 4, 3, generator=generator) * 255).to(torch.uint8)
    return Image.fromarray(pixels.numpy())


def build_prompt(processor, question: str) -> str:
    """The chat-template prompt of one image and `question` (LLaVA-1.5's format without a template)."""
    if getattr(processor, "chat_template", None):
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
        return processor.apply_chat_template(conversation, add_generation_prompt=True)
    return f"USER: {processor.image_token}\n{question} ASSISTANT:"


def compare_logits(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, what: str) -> tuple[float, float]:
    """(max |diff|, tolerance), or a `VerificationError` when a logit is off by more than the dtype's tolerance."""
    tolerance = VERIFY_TOLERANCES[dtype]
    difference = (actual - expected).abs()
    max_diff = difference.max().item()
    if not bool((difference <= tolerance * expected.abs().clamp_min(1.0)).all()):
        raise VerificationError(
            f"--verify failed: {what} differ by up to {max_diff:.3g} (tolerance {tolerance:g} x max(1, |logit|) in "
            f"{str(dtype).removeprefix('torch.')}). The output was not written; please report this with the command "
            "you ran."
        )
    return max_diff, tolerance


def verify_against_llava(source: Path, output: Path, dtype: torch.dtype | None = None) -> tuple[float, float]:
    """llava-hf sources: one image and prompt through the source LLaVA and the converted model give the same logits.
    The models are loaded one after the other, so memory peaks at one model."""
    dtype = dtype or torch.float32
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    llava_processor = AutoProcessor.from_pretrained(source)
    image, prompt = verification_image(), build_prompt(processor, VERIFY_QUESTION)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    llava_inputs = llava_processor(images=image, text=prompt, return_tensors="pt")
    for name in ("input_ids", "pixel_values"):
        if not torch.equal(inputs[name], llava_inputs[name]):
            raise VerificationError(f"--verify: the converted processor gives other {name} than the source's.")
    with torch.inference_mode():
        model = LlavaForConditionalGeneration.from_pretrained(source, dtype=dtype).eval()
        expected = model(**llava_inputs).logits.float()
        del model
        model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True, dtype=dtype).eval()
        actual = model(**inputs).logits.float()
        del model
    return compare_logits(actual, expected, dtype, "the converted model's logits and the source's")


def verify_against_llm(
    output: Path, source: Path, text_config, dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """Original-format sources (whose code is not at hand): the converted model answers an image prompt with finite
    logits, and on text alone gives the logits of the source's LLM loaded with transformers from the source folder
    (its original vocabulary, `text_config`)."""
    dtype = dtype or torch.float32
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    inputs = processor(images=verification_image(), text=build_prompt(processor, VERIFY_QUESTION), return_tensors="pt")
    text_ids = processor.tokenizer(VERIFY_QUESTION, return_tensors="pt")["input_ids"]
    with torch.inference_mode():
        model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True, dtype=dtype).eval()
        image_logits = model(**inputs).logits
        actual = model(input_ids=text_ids).logits.float()[..., : text_config.vocab_size]
        del model
        llm = AutoModelForCausalLM.from_pretrained(source, config=text_config, dtype=dtype).eval()
        expected = llm(input_ids=text_ids).logits.float()
        del llm
    if not torch.isfinite(image_logits).all():
        raise VerificationError("--verify: the converted model gives non-finite logits for an image and prompt.")
    return compare_logits(actual, expected, dtype, "on text alone, the converted model's logits and the source LLM's")
