"""Ask the trained toy model (`examples/toy-fused-llava/`) a question about a synthetic image it has not seen.

    python examples/ask_toy.py                          # writes toy_question.png, prints question, answer, truth
    python examples/ask_toy.py --seed 3000 --index 5 --image toy_question.png

The model is loaded the way a Hub user would load it (`AutoModel` / `AutoProcessor`, `trust_remote_code=True`); the
image and its true answer come from `hf_fusedvlm.synthetic_vqa` (held-out seed, colour and position questions, the
two kinds the toy was trained on).
"""

import argparse
from pathlib import Path

from transformers import AutoModel, AutoProcessor

from hf_fusedvlm.synthetic_vqa import answer_questions, make_sample


TOY_MODEL = Path(__file__).resolve().parent / "toy-fused-llava"
TOY_KINDS = ("colour", "position")


def ask(seed: int, index: int, image_path: Path, model_path: Path = TOY_MODEL) -> dict:
    """Draw sample `index` of the synthetic set `seed`, save its image (enlarged 8x, nearest neighbour, so the details
    are visible) to `image_path`, and answer its question with the toy model."""
    sample = make_sample(seed, index, kinds=TOY_KINDS)
    sample.image.resize((sample.image.width * 8, sample.image.height * 8), resample=0).save(image_path)
    model = AutoModel.from_pretrained(model_path, trust_remote_code=True).eval()
    processor = AutoProcessor.from_pretrained(model_path, trust_remote_code=True)
    (answer,), _ = answer_questions(model, processor, [sample])
    return {"image": str(image_path), "question": sample.question, "answer": answer, "truth": sample.answer}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seed", type=int, default=3000, help="synthetic set (the toy was trained on seed 0)")
    parser.add_argument("--index", type=int, default=0, help="sample of the set; even: colour, odd: position")
    parser.add_argument("--image", type=Path, default=Path("toy_question.png"), help="where to write the image")
    parser.add_argument("--model", type=Path, default=TOY_MODEL, help="the toy checkpoint folder")
    args = parser.parse_args(argv)
    result = ask(args.seed, args.index, args.image, args.model)
    print(f"image:    {result['image']}")
    print(f"question: {result['question']}")
    print(f"answer:   {result['answer']}")
    print(f"truth:    {result['truth']}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
