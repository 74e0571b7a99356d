"""The verify step (`--verify`): the converted folder, loaded as users load it (`trust_remote_code=True`), computes
what the source computes. Runs on the staging folder, before the result is moved into place."""

from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import safe_open
from transformers import (
    AutoConfig,
    AutoModel,
    AutoModelForCausalLM,
    AutoModelForImageTextToText,
    AutoProcessor,
)

from ..fusers import fuser_class
from .errors import VerificationError
from .shards import StoredShard


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
    for name in llava_inputs:
        if not torch.equal(inputs[name], llava_inputs[name]):
            raise VerificationError(f"--verify: the converted processor gives other {name} than the source's.")
    with torch.inference_mode():
        model = AutoModelForImageTextToText.from_pretrained(source, dtype=dtype).eval()
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


def stored_tensors(shards: list[StoredShard], prefix: str) -> dict[str, torch.Tensor]:
    """The tensors of `shards` whose keys start with `prefix`, under the rest of their key (read from disk)."""
    tensors = {}
    for shard in shards:
        wanted = [tensor for tensor in shard.tensors if tensor.key.startswith(prefix)]
        if not wanted:
            continue
        if shard.is_safetensors:
            with safe_open(shard.path, framework="pt") as reader:
                tensors.update({tensor.key.removeprefix(prefix): reader.get_tensor(tensor.key) for tensor in wanted})
        else:
            tensors.update({tensor.key.removeprefix(prefix): tensor.tensor for tensor in wanted})
    return tensors


def dense_connector_source_features(config, tower_state: dict, projector: dict, pixel_values, dtype) -> torch.Tensor:
    """The image features `(num_images, num_patches, text_hidden)` as the official Dense Connector code computes them:
    transformers' vision model run as the official code runs it (SigLIP without its last layer), the main features
    and the Dense Connector features concatenated on channels, then the source's `mm_projector` (Linear, GELU,
    Linear)."""
    fuser = fuser_class(config.fuser_type)
    vision_config = config.vision_config.to_dict()
    vision_config["num_hidden_layers"] = fuser.official_tower_depth(config)
    tower = AutoModel.from_config(AutoConfig.for_model(**vision_config), dtype=dtype).eval()
    tower.load_state_dict(tower_state, strict=False)  # the official tower lacks the deleted last layer
    hidden_states = tower(pixel_values.to(dtype), output_hidden_states=True).hidden_states
    start = 1 if config.vision_feature_select_strategy == "default" else 0
    features = [hidden_states[config.base_layer][:, start:]] + [
        torch.stack([hidden_states[layer][:, start:] for layer in group]).mean(0)
        for group in fuser.dense_layer_groups(config)
    ]
    hidden = torch.cat(features, dim=-1)
    hidden = F.linear(hidden, projector["0.weight"].to(dtype), projector["0.bias"].to(dtype))
    return F.linear(F.gelu(hidden), projector["2.weight"].to(dtype), projector["2.bias"].to(dtype))


def verify_dense_connector(
    output: Path, source: Path, source_shards: list[StoredShard], text_config, dtype: torch.dtype | None = None
) -> tuple[float, float]:
    """Dense Connector sources: one image prompt through the converted model gives the logits of the source
    computation (`dense_connector_source_features` spliced into the source LLM's text embeddings, as the official
    code's `prepare_inputs_labels_for_multimodal` does), over the source's vocabulary. With any resolution, the
    features of every crop are packed with the source's `model.image_newline` as LLaVA-NeXT packs them."""
    dtype = dtype or torch.float32
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    inputs = processor(images=verification_image(), text=build_prompt(processor, VERIFY_QUESTION), return_tensors="pt")
    with torch.inference_mode():
        model = AutoModelForImageTextToText.from_pretrained(output, trust_remote_code=True, dtype=dtype).eval()
        actual = model(**inputs).logits.float()[..., : text_config.vocab_size]
        config, tower_state = model.config, model.model.vision_tower.state_dict()
        projector = stored_tensors(source_shards, "model.mm_projector.")
        pixel_values, image_sizes = inputs["pixel_values"], inputs.get("image_sizes")
        if image_sizes is None:
            features = dense_connector_source_features(config, tower_state, projector, pixel_values, dtype)
        else:
            crops, counts = model.model.crops_of_images(pixel_values, image_sizes)
            features = dense_connector_source_features(config, tower_state, projector, crops, dtype)
            newline = stored_tensors(source_shards, "model.image_newline")[""].to(dtype)
            features, _ = model.model.pack_image_features(
                torch.split(features, counts), image_sizes, config.vision_feature_select_strategy, newline
            )
            features = torch.cat(features)
        del model
        llm = AutoModelForCausalLM.from_pretrained(source, config=text_config, dtype=dtype).eval()
        input_ids = inputs["input_ids"]
        is_image = input_ids == config.image_token_id
        embeds = torch.zeros(*input_ids.shape, text_config.hidden_size, dtype=dtype)
        embeds[~is_image] = llm.get_input_embeddings()(input_ids[~is_image])
        embeds[is_image] = features.reshape(-1, features.shape[-1])
        expected = llm(inputs_embeds=embeds, attention_mask=inputs["attention_mask"]).logits.float()
        del llm
    return compare_logits(actual, expected, dtype, "for an image prompt, the converted model's logits and the source's")
