"""Synthetic fine-grained VQA tasks: small images with tiny details and one-word answers, in LLaVA's data format.

Two scenes. **glyphs** (the default, 32 px): every image holds a small coloured square near one edge, a few dark dots
and a tiny digit drawn in a 3x5 pixel font (scaled with the image). **digits** (32 px, a 4x4 grid of 8 px cells, the
fusion-evidence scene): a coloured square in a random edge cell, one real handwritten digit (scikit-learn's bundled
8x8 `load_digits` images, no download) and a small outlined shape, each in a fixed inner cell; the handwritten digits are
split into disjoint `train`, `validation` and `test` pools, so held-out questions show unseen handwriting.

| kind | scenes | example question | answers |
|---|---|---|---|
| `colour` | both | What colour is the small square? | red, green, blue, yellow |
| `position` | both | Where is the small square? | left, right, top, bottom |
| `count` | glyphs | How many dots are there? | one, two, three, four |
| `digit` | both | Which digit is written in the image? | zero ... nine |
| `shape` | digits | Which small outline is drawn? | circle, line, star, triangle |

Since one image carries every detail, only the question says which one matters: a fuser that reads the instruction
(`igva`) can pick different vision layers per question kind. Everything is drawn from `random.Random` seeded per
sample, so the same arguments give the same images and texts on every machine.

`write_llava_dataset` writes the LLaVA conversation JSON (`image`, `conversations` with `from: human|gpt`, the human
turn starting with `<image>`) plus an image folder, the format `fusedvlm-train` reads; each record also names its
question `kind` and `answer` for evaluation.
"""

import argparse
import json
import random
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw


QUESTION_KINDS = ("colour", "count", "digit", "position")  # the glyphs scene's kinds
DIGIT_SCENE_KINDS = ("colour", "position", "digit", "shape")
COLOURS = {"red": (220, 30, 30), "green": (20, 160, 50), "blue": (30, 60, 230), "yellow": (240, 200, 0)}
NUMBER_WORDS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine")
POSITIONS = ("left", "right", "top", "bottom")
MAX_DOTS = 4
QUESTIONS = {
    "colour": ("What colour is the small square?", "Which colour does the little square have?"),
    "count": ("How many dots are there?", "Count the dots in the image."),
    "digit": ("Which digit is written in the image?", "What is the tiny digit?"),
    "position": ("Where is the small square?", "On which side is the little square?"),
    "shape": ("Which small outline is drawn?", "What shape is the little outline?"),
}
BACKGROUND = (235, 235, 235)
INK = (20, 20, 20)
# 3x5 bitmaps, rows top to bottom, "#" = ink.
DIGIT_FONT = {
    0: ("###", "#.#", "#.#", "#.#", "###"),
    1: (".#.", "##.", ".#.", ".#.", "###"),
    2: ("###", "..#", "###", "#..", "###"),
    3: ("###", "..#", ".##", "..#", "###"),
    4: ("#.#", "#.#", "###", "..#", "..#"),
    5: ("###", "#..", "###", "..#", "###"),
    6: ("###", "#..", "###", "#.#", "###"),
    7: ("###", "..#", ".#.", ".#.", ".#."),
    8: ("###", "#.#", "###", "#.#", "###"),
    9: ("###", "#.#", "###", "..#", "###"),
}
# 8x8 outlines of the digits scene, rows top to bottom.
SHAPES = {
    "circle": ("..####..", ".#....#.", "#......#", "#......#", "#......#", "#......#", ".#....#.", "..####.."),
    "line": ("#.......", ".#......", "..#.....", "...#....", "....#...", ".....#..", "......#.", ".......#"),
    "star": ("...#....", "#..#..#.", ".#.#.#..", "..###...", "#######.", "..###...", ".#.#.#..", "#..#..#."),
    "triangle": ("...##...", "...##...", "..#..#..", "..#..#..", ".#....#.", ".#....#.", "#......#", "########"),
}
CELL, GRID = 8, 4  # the digits scene: 32 px, a 4x4 grid of 8 px cells (one vision patch each at patch size 8)
# The fine details sit in fixed inner cells: the tiny LLM of the experiments learns to read a detail from its image
# token, but not (within their budget) to search 16 cells for it.
DIGIT_CELL, SHAPE_CELL = (1, 1), (2, 2)
# Disjoint slices of scikit-learn's 1,797 handwritten digits, so that held-out questions show unseen handwriting.
HANDWRITING_SPLITS = {"train": (0, 1000), "validation": (1000, 1400), "test": (1400, 1797)}


@dataclass
class SyntheticSample:
    """One image with its question.

    image: the `image_size` x `image_size` RGB image.
    kind: the question kind, one of `QUESTION_KINDS`.
    question: the question text (no image token).
    answer: the one-word answer.
    details: what the image holds: `colour`, `position`, `dots` (count), `digit`.
    """

    image: Image.Image
    kind: str
    question: str
    answer: str
    details: dict


def _overlaps(box, boxes, margin: int) -> bool:
    left, top, right, bottom = box
    return any(
        left < other_right + margin
        and other_left < right + margin
        and top < other_bottom + margin
        and other_top < bottom + margin
        for other_left, other_top, other_right, other_bottom in boxes
    )


def _place(rng: random.Random, width: int, height: int, area: tuple[int, int, int, int], taken: list, margin: int):
    """A free `width` x `height` box `(left, top, right, bottom)` (exclusive ends) inside `area`, marked as taken."""
    left_min, top_min, right_max, bottom_max = area
    for _ in range(1000):
        left = rng.randint(left_min, right_max - width)
        top = rng.randint(top_min, bottom_max - height)
        box = (left, top, left + width, top + height)
        if not _overlaps(box, taken, margin):
            taken.append(box)
            return box
    raise RuntimeError("Could not place a detail without overlap: use a larger image_size.")


def _edge_area(position: str, size: int, depth: int) -> tuple[int, int, int, int]:
    """The band along one edge where the square goes, leaving the corners out so that the side is unambiguous."""
    inner = (depth, size - depth)
    return {
        "left": (0, inner[0], depth, inner[1]),
        "right": (size - depth, inner[0], size, inner[1]),
        "top": (inner[0], 0, inner[1], depth),
        "bottom": (inner[0], size - depth, inner[1], size),
    }[position]


def draw_details(rng: random.Random, image_size: int = 32) -> tuple[Image.Image, dict]:
    """An image with a coloured square near a random edge, 1 to `MAX_DOTS` dots and a digit; returns it and its
    `details`. Details scale with `image_size // 32` (a 3x5 digit and 2x2 dots at 32 pixels)."""
    if image_size < 32:
        raise ValueError(f"image_size must be at least 32 pixels to hold the details, got {image_size}.")
    scale = image_size // 32
    details = {
        "colour": rng.choice(sorted(COLOURS)),
        "position": rng.choice(POSITIONS),
        "dots": rng.randint(1, MAX_DOTS),
        "digit": rng.randint(0, 9),
    }
    image = Image.new("RGB", (image_size, image_size), BACKGROUND)
    draw = ImageDraw.Draw(image)
    taken: list = []
    square = 4 * scale
    depth = image_size // 4
    left, top, right, bottom = _place(rng, square, square, _edge_area(details["position"], image_size, depth), taken, 0)
    draw.rectangle((left, top, right - 1, bottom - 1), fill=COLOURS[details["colour"]])
    centre = (depth, depth, image_size - depth, image_size - depth)
    left, top, _, _ = _place(rng, 3 * scale, 5 * scale, centre, taken, scale)
    for row, line in enumerate(DIGIT_FONT[details["digit"]]):
        for column, pixel in enumerate(line):
            if pixel == "#":
                x, y = left + column * scale, top + row * scale
                draw.rectangle((x, y, x + scale - 1, y + scale - 1), fill=INK)
    dot = 2 * scale
    for _ in range(details["dots"]):
        left, top, right, bottom = _place(rng, dot, dot, (1, 1, image_size - 1, image_size - 1), taken, 2 * scale)
        draw.rectangle((left, top, right - 1, bottom - 1), fill=INK)
    return image, details


def handwritten_digits():
    """scikit-learn's bundled 8x8 handwritten digits: `(images, labels)`, images as floats in [0, 1] of shape
    `(1797, 8, 8)` (1 = ink). Needs scikit-learn (`pip install hf-fusedvlm[evidence]`)."""
    global _HANDWRITING
    if _HANDWRITING is None:
        try:
            from sklearn.datasets import load_digits
        except ImportError as error:
            raise ImportError(
                "The digits scene draws scikit-learn's bundled handwritten digits: pip install scikit-learn "
                "(or hf-fusedvlm[evidence])."
            ) from error
        digits = load_digits()
        _HANDWRITING = (digits.images / 16.0, [int(label) for label in digits.target])
    return _HANDWRITING


_HANDWRITING = None


def _handwriting_index(rng: random.Random, split: str) -> int:
    if split not in HANDWRITING_SPLITS:
        raise ValueError(f"Unknown split {split!r}: choose one of {', '.join(HANDWRITING_SPLITS)}.")
    return rng.randrange(*HANDWRITING_SPLITS[split])


def digit_scene_details(rng: random.Random, split: str = "train") -> dict:
    """The details of one digits-scene image: the square's `colour`, `position` and `square_cell`; the handwritten
    `digit`, its `handwriting` index and `digit_cell`; the `shape` and its `shape_cell` (cells are `(row, column)`)."""
    position = rng.choice(POSITIONS)
    inner = range(1, GRID - 1)
    edge = {
        "left": [(row, 0) for row in inner],
        "right": [(row, GRID - 1) for row in inner],
        "top": [(0, column) for column in inner],
        "bottom": [(GRID - 1, column) for column in inner],
    }[position]
    details = {
        "colour": rng.choice(sorted(COLOURS)),
        "position": position,
        "square_cell": rng.choice(edge),
        "digit_cell": DIGIT_CELL,
        "shape_cell": SHAPE_CELL,
    }
    return resample_fine_details(rng, details, split)


def resample_fine_details(rng: random.Random, details: dict, split: str = "train") -> dict:
    """`details` with a new handwritten digit and shape in the same cells: the same coarse content, other fine
    content (what a tower that ignores the fine details cannot tell apart)."""
    handwriting = _handwriting_index(rng, split)
    return {
        **details,
        "handwriting": handwriting,
        "digit": handwritten_digits()[1][handwriting],
        "shape": rng.choice(sorted(SHAPES)),
    }


def draw_digit_scene(details: dict) -> Image.Image:
    """The 32 px image of [`digit_scene_details`]: each detail fills one 8 px cell of a light background."""
    image = Image.new("RGB", (CELL * GRID, CELL * GRID), BACKGROUND)
    row, column = details["square_cell"]
    image.paste(COLOURS[details["colour"]], (column * CELL, row * CELL, (column + 1) * CELL, (row + 1) * CELL))
    glyph = handwritten_digits()[0][details["handwriting"]]
    outline = [[float(pixel == "#") for pixel in line] for line in SHAPES[details["shape"]]]
    for (row, column), ink in ((details["digit_cell"], glyph), (details["shape_cell"], outline)):
        for y in range(CELL):
            for x in range(CELL):
                shade = tuple(round(b + (i - b) * float(ink[y][x])) for b, i in zip(BACKGROUND, INK))
                image.putpixel((column * CELL + x, row * CELL + y), shade)
    return image


def answer_for(kind: str, details: dict) -> str:
    """The one-word answer to a question of `kind` about an image with `details`."""
    if kind == "colour":
        return details["colour"]
    if kind == "count":
        return NUMBER_WORDS[details["dots"]]
    if kind == "digit":
        return NUMBER_WORDS[details["digit"]]
    if kind == "position":
        return details["position"]
    if kind == "shape" and "shape" in details:
        return details["shape"]
    raise ValueError(f"Unknown question kind {kind!r}: choose one of {', '.join(QUESTION_KINDS)}.")


SCENES = {"glyphs": QUESTION_KINDS, "digits": DIGIT_SCENE_KINDS}  # scene -> its question kinds


def make_sample(
    seed: int,
    index: int,
    image_size: int | None = None,
    kinds: tuple[str, ...] | None = None,
    *,
    scene: str = "glyphs",
    split: str = "train",
) -> SyntheticSample:
    """Sample `index` of the set `seed`: its kind cycles through `kinds` (balanced, default: all of the scene's), the
    rest is random. `image_size` (glyphs scene only, default 32) scales the details; the digits scene is 32 px and
    draws its handwritten digit from the `split` pool (`train`, `validation` or `test`)."""
    if scene not in SCENES:
        raise ValueError(f"Unknown scene {scene!r}: choose one of {', '.join(SCENES)}.")
    kinds = SCENES[scene] if kinds is None else tuple(kinds)
    unknown = sorted(set(kinds) - set(SCENES[scene]))
    if unknown or not kinds:
        raise ValueError(
            f"Unknown question kinds {unknown or kinds!r} for the {scene} scene: choose from {', '.join(SCENES[scene])}."
        )
    if scene == "digits":
        if image_size not in (None, CELL * GRID):
            raise ValueError(f"The digits scene is {CELL * GRID} pixels; got image_size={image_size}: leave it unset.")
        rng = random.Random(f"synthetic-vqa/digits/{seed}/{index}")
        details = digit_scene_details(rng, split)
        image = draw_digit_scene(details)
    else:
        rng = random.Random(f"synthetic-vqa/{seed}/{index}")
        image, details = draw_details(rng, 32 if image_size is None else image_size)
    kind = kinds[index % len(kinds)]
    return SyntheticSample(image, kind, rng.choice(QUESTIONS[kind]), answer_for(kind, details), details)


def generate_samples(
    num_samples: int,
    seed: int = 0,
    image_size: int | None = None,
    kinds: tuple[str, ...] | None = None,
    *,
    scene: str = "glyphs",
    split: str = "train",
) -> list[SyntheticSample]:
    """`num_samples` samples of the set `seed` (sets with different seeds are disjoint draws, e.g. train / test;
    options as for [`make_sample`])."""
    return [make_sample(seed, index, image_size, kinds, scene=scene, split=split) for index in range(num_samples)]


def llava_record(sample: SyntheticSample, sample_id: str, image_path: str, follow_up: SyntheticSample | None = None):
    """The LLaVA conversation record of `sample`; with `follow_up` (a second question about the same image), a
    two-round conversation whose second human turn has no image token."""
    conversations = [
        {"from": "human", "value": f"<image>\n{sample.question}"},
        {"from": "gpt", "value": sample.answer},
    ]
    if follow_up is not None:
        conversations += [
            {"from": "human", "value": follow_up.question},
            {"from": "gpt", "value": follow_up.answer},
        ]
    kind, answer = (follow_up.kind, follow_up.answer) if follow_up is not None else (sample.kind, sample.answer)
    return {"id": sample_id, "image": image_path, "conversations": conversations, "kind": kind, "answer": answer}


def write_llava_dataset(
    output_dir: str | Path,
    num_samples: int,
    seed: int = 0,
    image_size: int | None = None,
    kinds: tuple[str, ...] | None = None,
    multi_turn_every: int = 0,
    json_name: str = "data.json",
    *,
    scene: str = "glyphs",
    split: str = "train",
) -> Path:
    """Write `num_samples` samples as `output_dir/images/*.png` and the LLaVA JSON `output_dir/json_name` (image
    paths relative to `output_dir`); returns the JSON path.

    With `multi_turn_every=n > 0`, every n-th record is a two-round conversation about its image (the second question
    of another kind, answered from the same details); `kind` and `answer` then describe the last round.
    """
    output_dir = Path(output_dir)
    (output_dir / "images").mkdir(parents=True, exist_ok=True)
    records = []
    sample_kinds = SCENES[scene] if kinds is None else tuple(kinds)
    for index, sample in enumerate(generate_samples(num_samples, seed, image_size, kinds, scene=scene, split=split)):
        image_path = f"images/{seed}-{index:06d}.png"
        sample.image.save(output_dir / image_path)
        follow_up = None
        if multi_turn_every and index % multi_turn_every == multi_turn_every - 1:
            kind = sample_kinds[(index + 1) % len(sample_kinds)]
            rng = random.Random(f"synthetic-vqa/{seed}/{index}/follow-up")
            follow_up = SyntheticSample(
                sample.image, kind, rng.choice(QUESTIONS[kind]), answer_for(kind, sample.details), sample.details
            )
        records.append(llava_record(sample, f"{seed}-{index:06d}", image_path, follow_up))
    json_path = output_dir / json_name
    json_path.write_text(json.dumps(records, indent=1))
    return json_path


def question_prompt(processor, question: str) -> str:
    """The chat-template prompt asking `question` about one image, ending where the answer starts."""
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    return processor.apply_chat_template(conversation, add_generation_prompt=True)


def first_word(text: str) -> str:
    """The first word of a generated answer, lower-cased and without punctuation ("" when there is none)."""
    words = text.strip().split()
    return words[0].strip(".,!?;:").lower() if words else ""


def answer_questions(model, processor, samples: list[SyntheticSample], batch_size: int = 32, max_new_tokens: int = 4):
    """Greedy answers of `model` to `samples` (batched, left padding) and, for fusers that weight layer groups,
    each sample's group weights. Returns `(answers, weights)`: one first word per sample, and a
    `(num_samples, num_groups)` tensor or `None`."""
    import torch

    answers, weights = [], []
    for start in range(0, len(samples), batch_size):
        batch = samples[start : start + batch_size]
        inputs = processor(
            images=[sample.image for sample in batch],
            text=[question_prompt(processor, sample.question) for sample in batch],
            padding=True,
            padding_side="left",
            return_tensors="pt",
        ).to(model.device)
        with torch.inference_mode():
            output = model.generate(
                **inputs, max_new_tokens=max_new_tokens, do_sample=False, return_dict_in_generate=True
            )
            image_inputs = {
                key: inputs[key] for key in ("instruction_input_ids", "instruction_attention_mask") if key in inputs
            }
            fusion_weights = model.get_image_features(inputs["pixel_values"], **image_inputs).fusion_weights
        new_tokens = output.sequences[:, inputs["input_ids"].shape[1] :]
        answers += [first_word(text) for text in processor.batch_decode(new_tokens, skip_special_tokens=True)]
        if fusion_weights is not None:
            weights.append(fusion_weights.float().cpu())
    return answers, (torch.cat(weights) if weights else None)


def score_answers(samples: list[SyntheticSample], answers: list[str], weights=None) -> dict:
    """Accuracy per question kind (and `all`) and, with `weights`, the mean group weights per kind:
    `{"accuracy": {kind: float}, "count": {kind: int}, "group_weights": {kind: [float, ...]} or None}`."""
    kinds = list(dict.fromkeys(sample.kind for sample in samples))  # in order of first appearance
    accuracy, count, group_weights = {}, {}, {} if weights is not None else None
    for kind in [*kinds, "all"]:
        rows = [index for index, sample in enumerate(samples) if kind in ("all", sample.kind)]
        count[kind] = len(rows)
        accuracy[kind] = sum(answers[row] == samples[row].answer for row in rows) / len(rows)
        if weights is not None:
            group_weights[kind] = weights[rows].mean(0).tolist()
    return {"accuracy": accuracy, "count": count, "group_weights": group_weights}


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description="Write a synthetic fine-grained VQA set in LLaVA's JSON format.")
    parser.add_argument("--output", required=True, help="folder for data.json and images/")
    parser.add_argument("--num-samples", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0, help="use different seeds for training and test sets")
    parser.add_argument("--scene", choices=sorted(SCENES), default="glyphs")
    parser.add_argument(
        "--split",
        choices=sorted(HANDWRITING_SPLITS),
        default="train",
        help="digits scene: the pool of handwritten digits to draw from",
    )
    parser.add_argument(
        "--image-size",
        type=int,
        default=None,
        help="glyphs scene: pixels (at least 32, default 32); details scale with it",
    )
    parser.add_argument("--kinds", default=None, help="comma-separated question kinds (default: all of the scene's)")
    parser.add_argument("--multi-turn-every", type=int, default=0, help="make every n-th sample two rounds")
    args = parser.parse_args(argv)
    kinds = tuple(kind.strip() for kind in args.kinds.split(",") if kind.strip()) if args.kinds else None
    path = write_llava_dataset(
        args.output,
        args.num_samples,
        args.seed,
        args.image_size,
        kinds,
        args.multi_turn_every,
        scene=args.scene,
        split=args.split,
    )
    print(f"wrote {args.num_samples} samples to {path}")
    return 0


__all__ = [
    "DIGIT_SCENE_KINDS",
    "QUESTION_KINDS",
    "SCENES",
    "SyntheticSample",
    "answer_for",
    "answer_questions",
    "digit_scene_details",
    "draw_details",
    "draw_digit_scene",
    "generate_samples",
    "handwritten_digits",
    "make_sample",
    "question_prompt",
    "resample_fine_details",
    "score_answers",
    "write_llava_dataset",
]


if __name__ == "__main__":
    raise SystemExit(main())
