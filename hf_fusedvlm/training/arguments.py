"""`fusedvlm-train`'s own arguments (the model and data ones; the rest are `transformers.TrainingArguments`) and its
help. The stdlib only: `--help` and the checks of these arguments answer before torch or Trainer is imported."""

from dataclasses import dataclass, field

from .errors import InvalidTrainingInput


# Which parts of a fused model train in each stage (parts: see `stages.PARTS`).
STAGES = {
    "stage1": ("fuser", "projector"),
    "stage2": ("fuser", "projector", "language_model"),
    "stage2-lora": ("fuser", "projector", "lora"),
    "qlora": ("fuser", "projector", "lora"),
}
LORA_STAGES = ("stage2-lora", "qlora")

DESCRIPTION = (
    "Train a fused LLaVA (a fusedvlm-convert output or a trained one) with transformers.Trainer on LLaVA conversation "
    "JSON: stage1 trains the fuser and the projector, stage2 adds the LLM, stage2-lora and qlora put LoRA adapters on "
    "it instead (qlora on a 4-bit base). Every save is a fused checkpoint that loads with AutoModel.from_pretrained(..., "
    "trust_remote_code=True)."
)
# A few of the `transformers.TrainingArguments` options, named in `--help` (tests check that each is one of them).
COMMON_TRAINER_OPTIONS = (
    "output_dir",
    "num_train_epochs",
    "max_steps",
    "per_device_train_batch_size",
    "gradient_accumulation_steps",
    "learning_rate",
    "bf16",
    "gradient_checkpointing",
    "save_steps",
    "logging_steps",
    "report_to",
    "push_to_hub",
    "resume_from_checkpoint",
)
TRAINER_OPTIONS_EPILOG = (
    "Trainer options: every transformers.TrainingArguments option is accepted as well, e.g. "
    + ", ".join(f"--{name}" for name in COMMON_TRAINER_OPTIONS)
    + ". `fusedvlm-train --help-all` lists them all (it imports torch and Trainer, which takes a few seconds)."
)
HELP_ALL = "--help-all"


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
    overwrite_output_dir: bool = field(
        default=False,
        metadata={
            "help": "Replace the fused model an --output_dir already holds (its model files only; other files stay)."
        },
    )


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


def wants_help_all(argv: list[str]) -> bool:
    """Whether the command line asks for `--help-all` (before any `--`, where argparse reads options)."""
    return HELP_ALL in (argv[: argv.index("--")] if "--" in argv else argv)


def own_arguments_parser():
    """The parser of the model and data arguments, with the package's description and an epilog on the Trainer
    options: `--help`, and the first check of a command line. Imports transformers' `HfArgumentParser` (torch-free),
    not Trainer."""
    from transformers import HfArgumentParser

    parser = HfArgumentParser(
        (ModelArguments, DataArguments),
        description=DESCRIPTION,
        epilog=TRAINER_OPTIONS_EPILOG,
    )
    parser.add_argument(
        HELP_ALL, action="store_true", help="List every option, the TrainingArguments ones included, and exit."
    )
    return parser
