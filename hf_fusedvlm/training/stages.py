"""Training stages: which parts of a fused LLaVA train (see [`STAGES`]), LoRA / QLoRA set-up, and loading the model
ready for its stage."""

from dataclasses import dataclass, field

import torch
from transformers import BitsAndBytesConfig, TrainingArguments

from ..modeling_fused_llava import FusedLlavaForConditionalGeneration
from .errors import InvalidTrainingInput


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


@dataclass
class ModelArguments:
    """What to train and how: the starting checkpoint, the stage and its LoRA settings."""

    model_name_or_path: str = field(metadata={"help": "A fused checkpoint (fusedvlm-convert output or a trained one)."})
    stage: str = field(default="stage1", metadata={"help": "Which parts train.", "choices": list(STAGES)})
    balance_loss_weight: float | None = field(
        default=None, metadata={"help": "IGVA's balance loss weight; overrides the checkpoint's (0 disables it)."}
    )
    parameter_learning_rates: str | None = field(
        default=None,
        metadata={
            "help": (
                "Comma-separated NAME=LR pairs: a trainable parameter whose name contains NAME trains at LR (the first "
                "pair that matches), every other one at --learning_rate; the schedule scales all rates alike. "
                "MMFuser's official stage 1 trains its block at a tenth of the projector's rate (`model.fuser.=1e-4` "
                "with --learning_rate 1e-3), Deformable DETR its sampling offsets (`sampling_offsets=1e-4`)."
            )
        },
    )
    lora_r: int = field(default=16, metadata={"help": "LoRA rank (stage2-lora, qlora)."})
    lora_alpha: int = field(default=32, metadata={"help": "LoRA alpha (scaling alpha / r)."})
    lora_dropout: float = field(default=0.05, metadata={"help": "Dropout on the LoRA input."})
    lora_target_modules: str = field(
        default="q_proj,k_proj,v_proj,o_proj,gate_proj,up_proj,down_proj",
        metadata={"help": "Comma-separated names of the LLM's linear layers that get LoRA adapters."},
    )
    bnb_4bit_quant_type: str = field(default="nf4", metadata={"help": "qlora: nf4 or fp4.", "choices": ["nf4", "fp4"]})


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
    if quant_state is not None:
        return quant_state.shape.numel()
    return getattr(parameter, "ds_numel", None) or parameter.numel()  # DeepSpeed ZeRO-3 leaves an empty placeholder


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


def parse_parameter_learning_rates(text: str | None) -> list[tuple[str, float]]:
    """`--parameter_learning_rates` as `[(name_part, learning_rate), ...]`, in the order given."""
    rates = []
    for pair in (text or "").split(","):
        if not pair.strip():
            continue
        name, _, value = pair.partition("=")
        try:
            rate = float(value)
        except ValueError:
            rate = -1.0
        if not name.strip() or not rate >= 0:
            raise InvalidTrainingInput(
                f"--parameter_learning_rates: {pair.strip()!r} is not NAME=LR with LR a number >= 0 (e.g. "
                "`model.fuser.=1e-4,sampling_offsets=1e-5`)."
            )
        rates.append((name.strip(), rate))
    return rates


def parameter_learning_rate(name: str, rates: list[tuple[str, float]]) -> float | None:
    """The learning rate `rates` (see [`parse_parameter_learning_rates`]) give the parameter `name`: that of the
    first pair whose NAME is part of it, `None` (the default rate) when none is."""
    return next((rate for part, rate in rates if part in name), None)


def check_parameter_learning_rates(model: torch.nn.Module, rates: list[tuple[str, float]]) -> None:
    """Refuse a `--parameter_learning_rates` NAME that names no trainable parameter (a typo would train everything
    at the default rate without a word)."""
    trainable = [name for name, parameter in model.named_parameters() if parameter.requires_grad]
    for part, _ in rates:
        if not any(part in name for name in trainable):
            raise InvalidTrainingInput(
                f"--parameter_learning_rates: no trainable parameter's name contains {part!r} in this stage. "
                f"Trainable parameters are named like {', '.join(trainable[:3])}, ..."
            )


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
        raise ImportError(f'--stage {model_args.stage} needs PEFT: run `pip install "hf-fusedvlm[train]"`.') from error
    names = [name.strip() for name in model_args.lora_target_modules.split(",") if name.strip()]
    if not names or not all(name.isidentifier() for name in names):
        raise ValueError(
            f"--lora_target_modules must be comma-separated layer names, got {model_args.lora_target_modules!r}."
        )
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
    check_parameter_learning_rates(model, parse_parameter_learning_rates(model_args.parameter_learning_rates))
    return model
