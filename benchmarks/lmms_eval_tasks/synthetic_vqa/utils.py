"""lmms-eval task helpers for the synthetic fine-grained VQA held-out set (`fusedvlm-synthetic-vqa` output).

Each document is a record of the set's `data.json` (`image`, `conversations`, `kind`, `answer`); the image path is
relative to the JSON's folder, which the task YAML passes as `image_folder` in `lmms_eval_specific_kwargs`. A
response is correct when its first word (lower-cased, punctuation stripped) is the answer, the rule of
`hf_fusedvlm.synthetic_vqa.score_answers`. As a multiple-choice task (`output_type: multiple_choice`), the choices are the
answers a question of the document's kind can have (`doc_to_choice`) and the target is the answer's index among them.
"""

import os

from PIL import Image


KINDS = ("colour", "count", "digit", "position", "shape")  # both scenes of hf_fusedvlm.synthetic_vqa
CHOICES = {
    "colour": ("red", "green", "blue", "yellow"),
    "count": ("one", "two", "three", "four"),
    "digit": ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine"),
    "position": ("left", "right", "top", "bottom"),
    "shape": ("circle", "line", "star", "triangle"),
}


def _question(doc):
    return doc["conversations"][0]["value"].replace("<image>", "").strip()


def _image(doc, lmms_eval_specific_kwargs=None):
    folder = (lmms_eval_specific_kwargs or {}).get("image_folder", "")
    with Image.open(os.path.join(folder, doc["image"])) as image:
        return image.convert("RGB")


def doc_to_visual(doc, lmms_eval_specific_kwargs=None):
    return [_image(doc, lmms_eval_specific_kwargs)]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return _question(doc)


def doc_to_messages(doc, lmms_eval_specific_kwargs=None):
    return [
        {
            "role": "user",
            "content": [
                {"type": "image", "url": _image(doc, lmms_eval_specific_kwargs)},
                {"type": "text", "text": _question(doc)},
            ],
        }
    ]


def doc_to_choice(doc):
    return list(CHOICES[doc["kind"]])


def doc_to_choice_index(doc):
    return CHOICES[doc["kind"]].index(doc["answer"])


def first_word(text):
    words = text.strip().split()
    return words[0].strip(".,!?;:").lower() if words else ""


def process_results(doc, results):
    outcome = {"kind": doc["kind"], "correct": first_word(results[0]) == doc["answer"]}
    return {f"accuracy_{kind}": outcome for kind in (*KINDS, "all")}


def _accuracy(outcomes, kind):
    rows = [outcome["correct"] for outcome in outcomes if kind in ("all", outcome["kind"])]
    return sum(rows) / len(rows) if rows else float("nan")


def aggregate_colour(outcomes):
    return _accuracy(outcomes, "colour")


def aggregate_count(outcomes):
    return _accuracy(outcomes, "count")


def aggregate_digit(outcomes):
    return _accuracy(outcomes, "digit")


def aggregate_position(outcomes):
    return _accuracy(outcomes, "position")


def aggregate_shape(outcomes):
    return _accuracy(outcomes, "shape")


def aggregate_all(outcomes):
    return _accuracy(outcomes, "all")
