"""LLaVA conversation data for training: the data set (checked record by record before training) and the collator that
turns its items into model inputs with labels on the answers only."""

import json
import os
from pathlib import Path

import torch
from PIL import Image
from torch.utils.data import Dataset
from tqdm.auto import tqdm

from ..processing_fused_llava import instruction_from_conversation
from .errors import InvalidTrainingInput


IGNORE_INDEX = -100
# Speakers of a LLaVA turn (`from`) and the chat role each one becomes; LLaVA writes human/gpt, many users user/assistant.
ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system"}


def unreadable_image(path: Path) -> str | None:
    """What is wrong with the image file `path` as far as its header tells (empty, not an image, an unknown format),
    or None. Only the header is read, so that checking a large data set stays quick; a file damaged further in is
    reported when it is loaded (see [`LlavaConversationDataset`])."""
    try:
        with Image.open(path) as image:
            image.size  # noqa: B018 (parsed from the header)
    except (OSError, SyntaxError, ValueError) as error:  # UnidentifiedImageError is an OSError
        return f"is not an image PIL can read ({type(error).__name__}: {error}): replace the file or remove the record"
    return None


def _check_record(record, image_folder: Path, image_token: str) -> tuple[str, str] | None:
    """The first problem of one LLaVA record as `(field, what is wrong and how to fix it)`, or None when it trains."""
    if not isinstance(record, dict):
        return "", (
            f"is a {type(record).__name__}, not an object: each record is "
            '{"image": ..., "conversations": [{"from": "human", "value": ...}, {"from": "gpt", "value": ...}]}'
        )
    conversations = record.get("conversations")
    if not isinstance(conversations, list) or not conversations:
        return "conversations", "is missing or not a non-empty list of turns"
    speakers = []
    for turn_index, turn in enumerate(conversations):
        where = f"conversations[{turn_index}]"
        if not isinstance(turn, dict):
            return where, f"is a {type(turn).__name__}, not an object with `from` and `value`"
        if turn.get("from") not in ROLES:
            return f"{where}.from", f"is {turn.get('from')!r}: use one of {', '.join(ROLES)}"
        if "value" not in turn:
            return f"{where}.value", "is missing: give the turn's text"
        if not isinstance(turn["value"], str):
            return f"{where}.value", f"is a {type(turn['value']).__name__}: give the turn's text as one string"
        speakers.append(ROLES[turn["from"]])
    if "user" not in speakers:
        return "conversations", "has no human (or user) turn: the model needs a question to answer"
    if "assistant" not in speakers:
        return "conversations", "has no gpt (or assistant) turn: there is no answer to learn"
    paths = record.get("image") or []
    paths = [paths] if isinstance(paths, str) else paths
    if not isinstance(paths, list) or not all(isinstance(path, str) for path in paths):
        return "image", "must be a path or a list of paths (relative to --image_folder)"
    for path in paths:
        if not (image_folder / path).is_file():
            return "image", (
                f"{image_folder / path} not found: pass --image_folder, the folder the paths in the JSON are relative to"
            )
        problem = unreadable_image(image_folder / path)
        if problem:
            return "image", f"{image_folder / path} {problem}"
    found = sum(turn["value"].count(image_token) for turn in conversations if ROLES[turn["from"]] == "user")
    if found not in (0, len(paths)):
        return "conversations", (
            f"has {found} {image_token} tokens in its human turns for {len(paths)} images: give one per image (or "
            "none, to put all images before the first question)"
        )
    return None


def validate_records(
    records, data_path: Path, image_folder: Path, image_token: str = "<image>", progress: bool = True
) -> None:
    """Check every record before training, so that a bad one fails here with its index and field, not mid-epoch (a
    StopIteration in the collator would end the epoch silently). Also refuses a data set whose answers are all empty,
    which would train on EOS only."""
    if not isinstance(records, list) or not records:
        raise InvalidTrainingInput(f"{data_path} must hold a non-empty JSON list of LLaVA records.")
    answered = 0
    for index, record in enumerate(tqdm(records, desc=f"Checking {data_path.name}", disable=not progress)):
        problem = _check_record(record, image_folder, image_token)
        if problem is not None:
            field, message = problem
            raise InvalidTrainingInput(
                f"Record {index} of {data_path}: `{field}` {message}."
                if field
                else f"Record {index} of {data_path} {message}."
            )
        answered += any(turn["value"].strip() for turn in record["conversations"] if ROLES[turn["from"]] == "assistant")
    if not answered:
        raise InvalidTrainingInput(
            f"Every answer (gpt turn) in {data_path} is empty: training would only learn to stop (EOS). Fill in the "
            "answers."
        )


def read_json(path: Path):
    """The parsed JSON of `path`; a syntax error names the file, line and column."""
    try:
        return json.loads(path.read_text())
    except json.JSONDecodeError as error:
        raise InvalidTrainingInput(
            f"{path} is not valid JSON: {error.msg} at line {error.lineno}, column {error.colno}."
        ) from None


class LlavaConversationDataset(Dataset):
    """The records of a LLaVA conversation JSON; each item is the record with `images`, its images loaded as RGB.

    A record has `conversations` (a list of `{"from": "human" | "gpt" | "user" | "assistant" | "system", "value": str}`)
    and optionally `image`, a path or a list of paths relative to `image_folder`. Every record is checked when the data
    set is built (see [`validate_records`]).
    """

    def __init__(
        self,
        data_path: str | os.PathLike,
        image_folder: str | os.PathLike | None = None,
        image_token: str = "<image>",
        progress: bool = True,
    ):
        data_path = Path(data_path)
        if not data_path.is_file():
            raise InvalidTrainingInput(f"--data_path {data_path} does not exist: pass a LLaVA conversation JSON file.")
        self.image_folder = Path(image_folder) if image_folder is not None else data_path.parent
        self.records = read_json(data_path)
        validate_records(self.records, data_path, self.image_folder, image_token, progress=progress)

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        paths = record.get("image") or []
        paths = [paths] if isinstance(paths, str) else list(paths)
        images = []
        for path in paths:
            try:
                with Image.open(self.image_folder / path) as image:
                    images.append(image.convert("RGB"))
            except (OSError, SyntaxError, ValueError) as error:  # e.g. a file truncated after a valid header
                raise InvalidTrainingInput(
                    f"Record {index}: the image {self.image_folder / path} could not be read ({type(error).__name__}: "
                    f"{error}). Replace the file or remove the record, then train again."
                ) from None
        return {"conversations": record["conversations"], "images": images}


def conversation_to_messages(conversations: list[dict], num_images: int, image_token: str = "<image>") -> list[dict]:
    """LLaVA turns as chat messages: `human` / `user` -> `user` (one image block per image token, then the text without
    image tokens), `gpt` / `assistant` -> `assistant`. As LLaVA's own preprocessing, a sample with images but no image
    token gets them at the start of its first user turn."""
    turns = [dict(turn) for turn in conversations]
    for turn in turns:
        if turn.get("from") not in ROLES:
            raise ValueError(f"Unknown speaker {turn.get('from')!r} in a conversation: use one of {', '.join(ROLES)}.")
    user_turns = [turn for turn in turns if ROLES[turn["from"]] == "user"]
    if not user_turns:
        raise ValueError("A conversation has no human (or user) turn: the model needs a question to answer.")
    found = sum(turn["value"].count(image_token) for turn in user_turns)
    if found == 0 and num_images:
        user_turns[0]["value"] = image_token * num_images + "\n" + user_turns[0]["value"]
        found = num_images
    if found != num_images:
        raise ValueError(
            f"A sample has {num_images} images but {found} {image_token} tokens in its human turns: give one token per "
            "image (or none, to put all images before the first question)."
        )
    messages = []
    for turn in turns:
        role, text = ROLES[turn["from"]], turn["value"]
        content = [{"type": "image"}] * text.count(image_token) if role == "user" else []
        content.append({"type": "text", "text": text.replace(image_token, "").strip()})
        messages.append({"role": role, "content": content})
    return messages


def render_with_answer_spans(processor, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The conversation rendered by the chat template and the character spans of the assistant answers in it.

    An answer's span runs from the end of the prompt that asks for it (the conversation before it, rendered with the
    generation prompt) to the end of the conversation rendered up to and including it, so it holds exactly what the
    template writes for the answer (its text and the end-of-turn markup).
    """
    if not processor.chat_template:
        raise ValueError("The processor has no chat template: training needs one to render the conversations.")

    def render(part, add_generation_prompt=False):
        return processor.apply_chat_template(part, add_generation_prompt=add_generation_prompt, tokenize=False)

    text = render(messages)
    spans = []
    for index, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        prompt, through_answer = render(messages[:index], add_generation_prompt=True), render(messages[: index + 1])
        if not (through_answer.startswith(prompt) and text.startswith(through_answer)):
            raise ValueError(
                "The chat template does not render conversations incrementally (a prefix of the conversation renders "
                "to something that is not a prefix of the whole), so the answers cannot be located."
            )
        spans.append((len(prompt), len(through_answer)))
    if not spans:
        raise ValueError("A conversation has no `gpt` turn: there is nothing to learn from it.")
    return text, spans


class FusedLlavaDataCollator:
    """Turns dataset items (`conversations`, `images`) into a batch for [`FusedLlavaForConditionalGeneration`].

    Each conversation is rendered by the processor's chat template; the processor expands the image tokens, prepares
    the images and, with an instruction tokenizer, encodes each sample's instruction for the fuser (the text of its
    last user turn). Sequences are padded on the right. `labels` copy `input_ids` on the assistant answers' tokens
    (located through the tokenizer's character offsets) and are `-100` everywhere else: system and user turns, image
    tokens, role markers and padding.

    Args:
        processor ([`FusedLlavaProcessor`]): the checkpoint's processor.
        add_eos (`bool`): append the EOS token after the last answer, when the template does not end with it, so
            that the model learns to stop.
    """

    def __init__(self, processor, add_eos: bool = True):
        self.processor = processor
        self.add_eos = add_eos

    def __call__(self, items: list[dict]) -> dict[str, torch.Tensor]:
        processor, tokenizer = self.processor, self.processor.tokenizer
        texts, spans, images, instructions = [], [], [], []
        for item in items:
            messages = conversation_to_messages(item["conversations"], len(item["images"]), processor.image_token)
            text, answer_spans = render_with_answer_spans(processor, messages)
            eos = tokenizer.eos_token
            if self.add_eos and eos and not text.rstrip().endswith(eos) and answer_spans[-1][1] == len(text):
                text += eos
                answer_spans[-1] = (answer_spans[-1][0], len(text))
            texts.append(text)
            spans.append(answer_spans)
            images.extend(item["images"])
            instructions.append(instruction_from_conversation(messages, processor.image_token))
        options = {"padding": True, "padding_side": "right", "return_offsets_mapping": True, "return_tensors": "pt"}
        if tokenizer.bos_token and all(text.startswith(tokenizer.bos_token) for text in texts):
            options["add_special_tokens"] = False  # the template already writes BOS (as apply_chat_template decides)
        if getattr(processor, "instruction_tokenizer", None) is not None:
            options["instructions"] = instructions
        batch = processor(images=images or None, text=texts, **options)
        offsets = batch.pop("offset_mapping")
        batch["labels"] = self._labels(batch, offsets, texts, spans)
        return dict(batch)

    def _labels(self, batch, offsets: torch.Tensor, texts: list[str], spans: list[list[tuple[int, int]]]):
        """`input_ids` on the tokens that start inside an answer span, `-100` elsewhere. The offsets refer to the
        prompt with every image token expanded to the image's patches, so spans are shifted past the expansions."""
        image_token = self.processor.image_token
        image_token_id = self.processor.tokenizer.convert_tokens_to_ids(image_token)
        labels = torch.full_like(batch["input_ids"], IGNORE_INDEX)
        for row, (text, answer_spans) in enumerate(zip(texts, spans)):
            input_ids = batch["input_ids"][row]
            num_images = text.count(image_token)
            tokens_per_image = int((input_ids == image_token_id).sum()) // num_images if num_images else 1
            extra_chars = (tokens_per_image - 1) * len(image_token)
            starts, ends = offsets[row, :, 0], offsets[row, :, 1]
            real = batch["attention_mask"][row].bool() & (ends > starts) & (input_ids != image_token_id)
            for start, end in answer_spans:
                start += text[:start].count(image_token) * extra_chars
                end += text[:end].count(image_token) * extra_chars
                inside = real & (starts >= start) & (starts < end)
                labels[row, inside] = input_ids[inside]
        return labels
