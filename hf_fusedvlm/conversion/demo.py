"""`fusedvlm-convert --demo`: convert (by default a built-in tiny LLaVA, no download), load the result the way users
do (`AutoModel` + `AutoProcessor`, `trust_remote_code=True`) and answer `--question` about `--image`."""

import tempfile
from pathlib import Path

import torch
from transformers import AutoModel, AutoProcessor

from ..fuser_registry import fuser_class
from .errors import ConversionError
from .pipeline import convert_checkpoint
from .request import INSTRUCTION_ENCODER_EXAMPLE
from .staging import check_output
from .verify import build_prompt, verification_image


def load_demo_image(path: str | None):
    """The `--image` file as RGB (checked before any conversion), or the generated test image."""
    if path is None:
        return verification_image()
    from PIL import Image, UnidentifiedImageError

    try:
        with Image.open(path) as image:
            return image.convert("RGB")
    except FileNotFoundError:
        raise ConversionError(
            f"--image {path} does not exist: give an image file, or omit --image for a test image."
        ) from None
    except (UnidentifiedImageError, OSError) as error:
        raise ConversionError(f"--image {path} is not an image Pillow can read ({error}).") from error


def build_tiny_source(work: Path, fuser: str, encoder):
    """The built-in tiny LLaVA saved as a sharded llava-hf checkpoint (and a tiny sentence encoder for fusers that
    read the instruction); returns (llava model, source folder, encoder folder)."""
    from ..tiny import build_tiny_instruction_encoder, build_tiny_llava

    print("[1/4] Building the built-in tiny LLaVA (deterministic random weights, no download)")
    # Two text heads of size 32: vLLM's CPU attention refuses smaller heads, and the demo's output is meant to serve.
    llava, llava_processor = build_tiny_llava(seed=0, num_text_heads=2)
    source = work / "tiny-llava"
    llava.save_pretrained(source, max_shard_size="600KB")
    llava_processor.save_pretrained(source)
    print(f"      saved a llava-hf checkpoint in {len(list(source.glob('*.safetensors')))} shards to {source}")
    if fuser_class(fuser).reads_instruction and encoder is None:
        text_encoder, text_tokenizer = build_tiny_instruction_encoder(seed=0)
        encoder = work / "tiny-instruction-encoder"
        text_encoder.save_pretrained(encoder)
        text_tokenizer.save_pretrained(encoder)
        print(f"      and a tiny sentence encoder for {fuser} to {encoder}")
    return llava, source, encoder


def generate_answer(output: Path, image, question: str, max_new_tokens: int):
    """(prompt, generated ids, prompt length) of the converted model loaded as users load it."""
    print(f"[3/4] Loading {output} with AutoModel + AutoProcessor (trust_remote_code=True)")
    model = AutoModel.from_pretrained(output, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(output, trust_remote_code=True)
    print(
        f"      {type(model).__name__}, {sum(p.numel() for p in model.parameters()):,} parameters, "
        f"fuser {model.config.fuser_type} over vision layers {model.config.vision_layers_needed}"
    )
    prompt = build_prompt(processor, question)
    inputs = processor(images=image, text=prompt, return_tensors="pt")
    with torch.inference_mode():
        generated = model.generate(**inputs, max_new_tokens=max_new_tokens, do_sample=False)
    answer = processor.decode(generated[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True)
    return prompt, generated, answer


def run_demo(args, options: dict):
    """Run the demo for the parsed command line `args` and the conversion `options` of `cli.conversion_options`."""
    fuser = args.fuser or "mmfuser"
    fuser_class(fuser)
    image = load_demo_image(args.image)  # bad inputs are refused before anything is built or converted
    if args.output:
        check_output(Path(args.output).expanduser().resolve(), args.overwrite, [])
    with tempfile.TemporaryDirectory(prefix="fusedvlm-demo-") as work:
        work = Path(work)
        llava, source, encoder = None, args.input, options.pop("instruction_encoder")
        if source is None:
            llava, source, encoder = build_tiny_source(work, fuser, encoder)
        else:
            print(f"[1/4] Source: {source}")
        output = Path(args.output) if args.output else work / f"fused-{fuser}"
        print(f"[2/4] Converting to fuser {fuser!r} with --verify")
        result = convert_checkpoint(
            source, output, fuser, vision_tower=args.vision_tower, instruction_encoder=encoder, verify=True, **options
        )
        print(result.summary())
        prompt, generated, answer = generate_answer(output, image, args.question, args.max_new_tokens)
        print(f"[4/4] Generated for {args.image or 'a generated test image'} and {args.question!r}")
        print(f"      prompt: {prompt!r}")
        noise = "  (random tiny weights: the text is noise)" if args.input is None else ""
        print(f"      answer: {answer!r}{noise}")
        if llava is not None:  # the built-in model is small enough to show the parity in tokens too
            llava_inputs = AutoProcessor.from_pretrained(source)(images=image, text=prompt, return_tensors="pt")
            with torch.inference_mode():
                expected = llava.generate(**llava_inputs, max_new_tokens=args.max_new_tokens, do_sample=False)
            print(f"      same tokens as the source LLaVA: {torch.equal(expected, generated)}")
        if args.output is None:
            print("      (the converted checkpoint was written to a temporary folder; pass --output to keep it)")
    encoder_flag = (
        f" --instruction-encoder {INSTRUCTION_ENCODER_EXAMPLE}" if fuser_class(fuser).reads_instruction else ""
    )
    print(
        f"To convert a real checkpoint: fusedvlm-convert --input llava-hf/llava-1.5-7b-hf --output ./llava-1.5-7b-"
        f"{fuser} --fuser {fuser}{encoder_flag} --verify  (add --demo to also load it and answer --question about "
        "--image)"
    )
