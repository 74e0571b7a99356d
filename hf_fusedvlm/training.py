"""Training a fused LLaVA with `transformers.Trainer` (`fusedvlm-train`): from a converted checkpoint to a published one.

The recipe of the papers in Transformers terms:

- Data: LLaVA conversation JSON (`image`, `conversations` with `from: human|gpt`, `<image>` marking the image in the
  human turn), images from a folder. [`FusedLlavaDataCollator`] renders each conversation with the processor's chat
  template, sends the user's instruction to the fuser (`instruction_input_ids`), pads on the right and keeps in
  `labels` only the assistant answers.
- Stages ([`STAGES`]): `stage1` trains the fuser and the projector (LLaVA pre-training / alignment); `stage2` adds the
  whole LLM (instruction tuning); `stage2-lora` puts LoRA adapters (PEFT) on the LLM's linear layers instead;
  `qlora` does the same on a 4-bit bitsandbytes base, the fuser and projector kept in full precision. The vision tower
  and the instruction encoder are always frozen. The trainable parameters per part are printed before training.
- Saving: every checkpoint and the final model are fused checkpoints (weights, config, remote code, processor) that
  load with `AutoModel.from_pretrained(..., trust_remote_code=True)`. LoRA adapters are merged into the LLM weights at
  save time (for `qlora` into the dequantised base weights), so every stage saves the same kind of full-precision
  checkpoint; load it with a `BitsAndBytesConfig` to run it in 4-bit again. `--push_to_hub` uses Trainer's own upload
  and writes the package's model card with a training summary.

Distributed training is accelerate's: `accelerate launch [--num_processes N] -m hf_fusedvlm.training ...` runs the
same command under DDP, FSDP or DeepSpeed, as configured with `accelerate config`.
"""

import copy
import json
import os
import shlex
import sys
from dataclasses import dataclass, field
from pathlib import Path

import torch
from huggingface_hub import ModelCard
from PIL import Image
from torch.utils.data import Dataset
from transformers import (
    AutoProcessor,
    BitsAndBytesConfig,
    HfArgumentParser,
    Trainer,
    TrainingArguments,
)
from transformers.trainer import TRAINING_ARGS_NAME

from .modeling_fused_llava import FusedLlavaForConditionalGeneration
from .processing_fused_llava import instruction_from_conversation


IGNORE_INDEX = -100
ROLES = {"human": "user", "gpt": "assistant", "system": "system"}
# Parts of a fused model, by parameter-name prefix (PEFT's `base_model.model.` removed); LoRA weights are their own part.
PARTS = {
    "vision_tower": ("model.vision_tower.",),
    "instruction_encoder": ("model.instruction_encoder.",),
    "fuser": ("model.fuser.",),
    "projector": ("model.multi_modal_projector.",),
    "language_model": ("model.language_model.", "lm_head."),
}
STAGES = {
    "stage1": ("fuser", "projector"),
    "stage2": ("fuser", "projector", "language_model"),
    "stage2-lora": ("fuser", "projector", "lora"),
    "qlora": ("fuser", "projector", "lora"),
}
LORA_STAGES = ("stage2-lora", "qlora")
# Left out of 4-bit quantisation in `qlora`, besides the model class's fuser and instruction encoder: the projector
# trains in full precision, and lm_head stays as bitsandbytes leaves it by default (naming skips replaces its default).
QLORA_SKIP_MODULES = ["model.multi_modal_projector", "lm_head", "model.fuser", "model.instruction_encoder"]
PEFT_PREFIX = "base_model.model."


# ------------------------------------------------------------------------------------------------------- arguments


@dataclass
class ModelArguments:
    """What to train and how: the starting checkpoint, the stage and its LoRA settings."""

    model_name_or_path: str = field(metadata={"help": "A fused checkpoint (fusedvlm-convert output or a trained one)."})
    stage: str = field(default="stage1", metadata={"help": "Which parts train.", "choices": list(STAGES)})
    balance_loss_weight: float | None = field(
        default=None, metadata={"help": "IGVA's balance loss weight; overrides the checkpoint's (0 disables it)."}
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (stage2-lora, qlora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated names of the LLM's linear layers that get LoRA adapters."},
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "qlora: nf4 or fp4.", "choices": ["nf4", "fp4"]})


@dataclass
class DataArguments:
    """Where the LLaVA-format data is and how conversations become model inputs."""

    data_path: str = field(metadata={"help": "LLaVA conversation JSON (a list of records)."})
    image_folder: str | None = field(
        default=None, metadata={"help": "Folder the records' image paths are relative to (default: the JSON's folder)."}
    )
    add_eos: bool = field(
        default=True,
        metadata={"help": "Append the EOS token to the last answer (and learn it) when the chat template does not."},
    )


# ------------------------------------------------------------------------------------------------------------- data


class LlavaConversationDataset(Dataset):
    """The records of a LLaVA conversation JSON; each item is the record with `images`, its images loaded as RGB.

    A record has `conversations` (a list of `{"from": "human" | "gpt" | "system", "value": str}`) and optionally
    `image`, a path or a list of paths relative to `image_folder`.
    """

    def __init__(self, data_path: str | os.PathLike, image_folder: str | os.PathLike | None = None):
        data_path = Path(data_path)
        if not data_path.is_file():
            raise FileNotFoundError(f"--data_path {data_path} does not exist: pass a LLaVA conversation JSON file.")
        self.records = json.loads(data_path.read_text())
        if not isinstance(self.records, list) or not self.records:
            raise ValueError(f"{data_path} must hold a non-empty JSON list of LLaVA records.")
        self.image_folder = Path(image_folder) if image_folder is not None else data_path.parent
        for index, record in enumerate(self.records):
            if not record.get("conversations"):
                raise ValueError(f"Record {index} of {data_path} has no `conversations`.")

    def __len__(self) -> int:
        return len(self.records)

    def __getitem__(self, index: int) -> dict:
        record = self.records[index]
        paths = record.get("image") or []
        paths = [paths] if isinstance(paths, str) else list(paths)
        images = []
        for path in paths:
            full_path = self.image_folder / path
            if not full_path.is_file():
                raise FileNotFoundError(
                    f"Image {full_path} of record {index} not found: pass --image_folder, the folder the paths in the "
                    "JSON are relative to."
                )
            with Image.open(full_path) as image:
                images.append(image.convert("RGB"))
        return {"conversations": record["conversations"], "images": images}


def conversation_to_messages(conversations: list[dict], num_images: int, image_token: str = "<image>") -> list[dict]:
    """LLaVA turns as chat messages: `human` -> `user` (one image block per image token, then the text without image
    tokens), `gpt` -> `assistant`. As LLaVA's own preprocessing, a sample with images but no image token gets them at
    the start of its first user turn."""
    turns = [dict(turn) for turn in conversations]
    found = sum(turn["value"].count(image_token) for turn in turns if turn["from"] == "human")
    if found == 0 and num_images:
        first_user = next(turn for turn in turns if turn["from"] == "human")
        first_user["value"] = image_token * num_images + "\n" + first_user["value"]
        found = num_images
    if found != num_images:
        raise ValueError(
            f"A sample has {num_images} images but {found} {image_token} tokens in its human turns: give one token per "
            "image (or none, to put all images before the first question)."
        )
    messages = []
    for turn in turns:
        role = ROLES.get(turn["from"])
        if role is None:
            raise ValueError(f"Unknown speaker {turn['from']!r} in a conversation: use one of {', '.join(ROLES)}.")
        text = turn["value"]
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


# ----------------------------------------------------------------------------------------------------------- stages


def parameter_part(name: str) -> str:
    """The part (`vision_tower`, `instruction_encoder`, `fuser`, `projector`, `language_model`, `lora`) a parameter
    of a fused model, or of a PEFT model around one, belongs to."""
    name = name.removeprefix(PEFT_PREFIX)
    if ".lora_" in name:
        return "lora"
    for part, prefixes in PARTS.items():
        if name.startswith(prefixes):
            return part
    raise ValueError(f"Parameter {name} belongs to no known part of a fused LLaVA.")


def _num_elements(parameter: torch.nn.Parameter) -> int:
    quant_state = getattr(parameter, "quant_state", None)  # bitsandbytes 4-bit: packed storage, original shape here
    return quant_state.shape.numel() if quant_state is not None else parameter.numel()


def freeze_for_stage(model: torch.nn.Module, stage: str) -> None:
    """Make exactly the parameters of `stage`'s parts trainable (see [`STAGES`]) and freeze every other one."""
    trainable_parts = STAGES[stage]
    for name, parameter in model.named_parameters():
        parameter.requires_grad_(parameter_part(name) in trainable_parts)
    if not any(parameter.requires_grad for parameter in model.parameters()):
        raise ValueError(f"Stage {stage!r} leaves nothing to train in this model.")


def trainable_parameters(model: torch.nn.Module) -> dict[str, tuple[int, int]]:
    """`{part: (trainable, total)}` parameter counts (4-bit weights counted at their unpacked size)."""
    counts: dict[str, list[int]] = {}
    for name, parameter in model.named_parameters():
        part = counts.setdefault(parameter_part(name), [0, 0])
        size = _num_elements(parameter)
        part[1] += size
        if parameter.requires_grad:
            part[0] += size
    return {part: (trainable, total) for part, (trainable, total) in counts.items()}


def format_parameter_table(counts: dict[str, tuple[int, int]]) -> str:
    """A markdown table of [`trainable_parameters`]."""
    lines = ["| part | trainable | total |", "|---|---:|---:|"]
    for part, (trainable, total) in counts.items():
        lines.append(f"| {part} | {trainable:,} | {total:,} |")
    trainable, total = (sum(column) for column in zip(*counts.values()))
    lines.append(f"| **all** | {trainable:,} ({100 * trainable / total:.1f} %) | {total:,} |")
    return "\n".join(lines)


def set_balance_loss_weight(model: FusedLlavaForConditionalGeneration, weight: float) -> None:
    """Override IGVA's balance loss weight in the config (saved with the checkpoint) and in the live fuser."""
    if weight < 0:
        raise ValueError(f"--balance_loss_weight must be >= 0, got {weight}.")
    model.config.balance_loss_weight = weight
    if hasattr(model.model.fuser, "balance_loss_weight"):
        model.model.fuser.balance_loss_weight = weight


def lora_config(model_args: ModelArguments):
    """PEFT's `LoraConfig` for the LLM's linear layers named in `--lora_target_modules` (never the vision tower's or
    the instruction encoder's)."""
    try:
        from peft import LoraConfig
    except ImportError as error:
        raise ImportError(
            f'--stage {model_args.stage} needs PEFT: run `pip install "hf-fusedvlm[train]"`.'
        ) from error
    names = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
    if not names or not all(name.isidentifier() for name in names):
        raise ValueError(f"--lora_target_modules must be comma-separated layer names, got {model_args.lora_target_modules!r}.")
    return LoraConfig(
        r=model_args.lora_r,
        lora_alpha=model_args.lora_alpha,
        lora_dropout=model_args.lora_dropout,
        target_modules=rf"model\.language_model\..*\.(?:{'|'.join(names)})",
        bias="none",
    )


def load_model_for_stage(model_args: ModelArguments, training_args: TrainingArguments):
    """The model of `model_args.model_name_or_path` ready for its stage: loaded (in 4-bit for `qlora`), LoRA
    attached for the LoRA stages, balance loss weight set, parameters frozen as the stage says."""
    quantization_config = None
    if model_args.stage == "qlora":
        quantization_config = BitsAndBytesConfig(
            load_in_4bit=True,
            bnb_4bit_quant_type=model_args.bnb_4bit_quant_type,
            bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=torch.bfloat16 if training_args.bf16 else torch.float32,
            llm_int8_skip_modules=QLORA_SKIP_MODULES,
        )
    model = FusedLlavaForConditionalGeneration.from_pretrained(
        model_args.model_name_or_path, dtype=torch.float32, quantization_config=quantization_config
    )
    if model_args.balance_loss_weight is not None:
        set_balance_loss_weight(model, model_args.balance_loss_weight)
    if model_args.stage in LORA_STAGES:
        from peft import get_peft_model

        model = get_peft_model(model, lora_config(model_args))
    freeze_for_stage(model, model_args.stage)
    return model


# ----------------------------------------------------------------------------------------------------------- saving


def _is_4bit(weight) -> bool:
    return getattr(weight, "quant_state", None) is not None


def _dense_weight(linear: torch.nn.Module) -> torch.Tensor:
    """A linear layer's weight in full precision (bitsandbytes 4-bit weights dequantised by transformers' helper)."""
    if _is_4bit(linear.weight):
        from transformers.integrations.bitsandbytes import dequantize_bnb_weight

        return dequantize_bnb_weight(linear.weight)
    return linear.weight.detach()


def full_precision_state_dict(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The state dict of the plain fused model inside `model` (a fused model, or a PEFT model around one, possibly
    on a 4-bit base): LoRA deltas merged into their base weights, 4-bit weights dequantised, keys as in a fused
    checkpoint. The model itself is left unchanged."""
    from peft.tuners.lora import LoraLayer

    base = model.get_base_model() if hasattr(model, "get_base_model") else model
    state = {}

    def visit(module: torch.nn.Module, prefix: str) -> None:
        if isinstance(module, LoraLayer):
            linear = module.get_base_layer()
            weight = _dense_weight(linear).clone()
            for adapter in module.active_adapters:
                if adapter in module.lora_A:
                    weight += module.get_delta_weight(adapter).to(weight.dtype)
            state[prefix + "weight"] = weight
            if linear.bias is not None:
                state[prefix + "bias"] = linear.bias.detach()
            return
        if _is_4bit(getattr(module, "weight", None)):
            state[prefix + "weight"] = _dense_weight(module)
            if getattr(module, "bias", None) is not None:
                state[prefix + "bias"] = module.bias.detach()
            return
        for name, parameter in module.named_parameters(recurse=False):
            state[prefix + name] = parameter.detach()
        for name, buffer in module.named_buffers(recurse=False):
            if name not in module._non_persistent_buffers_set:
                state[prefix + name] = buffer
        for name, child in module.named_children():
            visit(child, f"{prefix}{name}.")

    visit(base, "")
    return state


def save_fused_checkpoint(model: torch.nn.Module, output_dir: str | os.PathLike) -> None:
    """Save `model` as a fused checkpoint (weights, config with `auto_map`, remote code) to `output_dir`.

    A plain fused model is saved with `save_pretrained`. A PEFT model (LoRA, possibly on a 4-bit base) is saved as the
    fused model it computes: adapters merged, 4-bit weights dequantised, no `quantization_config`, built on the meta
    device so that memory holds the weights once."""
    if not hasattr(model, "get_base_model"):
        model.save_pretrained(output_dir)
        return
    base = model.get_base_model()
    config = copy.deepcopy(base.config)
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    state = full_precision_state_dict(model)
    with torch.device("meta"):
        plain = FusedLlavaForConditionalGeneration(config)
    plain.load_state_dict(state, strict=True, assign=True)
    plain.generation_config = copy.deepcopy(base.generation_config)
    plain.save_pretrained(output_dir)


class FusedLlavaTrainer(Trainer):
    """`Trainer` whose checkpoints and final save are fused checkpoints (see [`save_fused_checkpoint`]) with the
    processor, and whose Hub card is the package's model card with a training summary."""

    def __init__(self, *args, stage: str, source: str, command: str, **kwargs):
        super().__init__(*args, **kwargs)
        self.stage, self.source, self.command = stage, source, command

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        save_fused_checkpoint(self.accelerator.unwrap_model(self.model, keep_torch_compile=False), output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, TRAINING_ARGS_NAME))

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer copies only the weights and configs into output_dir before pushing; the remote code and the card
        # must go along, or the pushed config's auto_map names files the repo lacks.
        if self.is_world_process_zero():
            for path in Path(checkpoint_folder).glob("*.py"):
                (Path(self.args.output_dir) / path.name).write_bytes(path.read_bytes())
            self.create_model_card()
        super()._push_from_checkpoint(checkpoint_folder)

    def training_summary(self) -> str:
        """Markdown: stage, data, steps, final loss and the trainable parameters per part."""
        history = [entry["loss"] for entry in self.state.log_history if "loss" in entry]
        args = self.args
        lines = [
            (
                f"- stage: `{self.stage}` (trainable parts: {', '.join(STAGES[self.stage])}); started from "
                f"`{self.source}`"
            ),
            (
                f"- {self.state.global_step} optimizer steps, {args.per_device_train_batch_size} samples per device "
                f"and step, {args.gradient_accumulation_steps} accumulation steps, learning rate {args.learning_rate:g}"
            ),
        ]
        if history:
            lines.append(f"- training loss: {history[0]:.4f} (first log) -> {history[-1]:.4f} (last log)")
        lines += ["", format_parameter_table(trainable_parameters(self.model))]
        return "\n".join(lines)

    def create_model_card(self, **kwargs) -> None:
        """Write the package's model card (with the training summary) to `output_dir/README.md`."""
        if not self.is_world_process_zero():
            return
        from .conversion import render_model_card

        model = self.accelerator.unwrap_model(self.model)
        base = model.get_base_model() if hasattr(model, "get_base_model") else model
        config = base.config
        source_card = Path(self.source) / "README.md"
        card_data = ModelCard.load(source_card).data if source_card.is_file() else None
        is_hub_id = not Path(self.source).exists()
        card = render_model_card(
            config,
            model_id=self.hub_model_id or kwargs.get("model_name") or Path(self.args.output_dir).name,
            base_model=(card_data.get("base_model") if card_data else None) or (self.source if is_hub_id else None),
            license=card_data.get("license") if card_data else None,
            license_link=card_data.get("license_link") if card_data else None,
            instruction_encoder=(config.instruction_encoder_config.model_type if base.model.instruction_encoder
                                 is not None else None),
            new_parameters=sum(parameter.numel() for parameter in base.model.fuser.parameters()),
            convert_command=self.command,
            training_summary=self.training_summary(),
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))


# ------------------------------------------------------------------------------------------------------------- main


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, TrainingArguments]:
    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    model_args, data_args, training_args = parser.parse_args_into_dataclasses(args=argv)
    # The collator builds the model inputs from the raw records; Trainer must not drop their columns.
    training_args.remove_unused_columns = False
    return model_args, data_args, training_args


def main(argv: list[str] | None = None) -> int:
    model_args, data_args, training_args = parse_arguments(argv)
    if model_args.stage in LORA_STAGES and training_args.resume_from_checkpoint:
        raise ValueError(
            f"--resume_from_checkpoint is not supported with --stage {model_args.stage}: its checkpoints hold merged "
            "weights, not adapters. Start a new run from the checkpoint (--model_name_or_path CHECKPOINT) instead."
        )
    model = load_model_for_stage(model_args, training_args)
    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    if training_args.process_index == 0:
        print(f"Stage {model_args.stage}: trainable parameters per part")
        print(format_parameter_table(trainable_parameters(model)))
    dataset = LlavaConversationDataset(data_args.data_path, data_args.image_folder)
    command = "fusedvlm-train " + shlex.join(sys.argv[1:] if argv is None else argv)
    trainer = FusedLlavaTrainer(
        model=model,
        args=training_args,
        train_dataset=dataset,
        data_collator=FusedLlavaDataCollator(processor, add_eos=data_args.add_eos),
        processing_class=processor,
        stage=model_args.stage,
        source=model_args.model_name_or_path,
        command=command,
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.push_to_hub:
        trainer.push_to_hub()  # saves the final model to output_dir, writes the card and uploads
    else:
        trainer.save_model()
        trainer.create_model_card()
    return 0


__all__ = [
    "DataArguments",
    "FusedLlavaDataCollator",
    "FusedLlavaTrainer",
    "LlavaConversationDataset",
    "ModelArguments",
    "STAGES",
    "conversation_to_messages",
    "format_parameter_table",
    "freeze_for_stage",
    "full_precision_state_dict",
    "load_model_for_stage",
    "main",
    "parameter_part",
    "render_with_answer_spans",
    "save_fused_checkpoint",
    "trainable_parameters",
]


if __name__ == "__main__":
    raise SystemExit(main())
