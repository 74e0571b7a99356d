"""`fusedvlm-train`: the command-line arguments, the checks of what they name (before anything loads or trains) and
`main`.

The module imports the stdlib only: `--help` and bad arguments answer before torch, Trainer (and the peft and
bitsandbytes it imports) or the model classes are imported, and the package registers its Auto classes only once the
arguments are parsed (`hf_fusedvlm.auto_registration_deferred`)."""

import sys
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING

from .. import auto_registration_deferred
from .arguments import (
    LORA_STAGES,
    DataArguments,
    ModelArguments,
    own_arguments_parser,
    parse_parameter_learning_rates,
    wants_help_all,
)
from .errors import InvalidTrainingInput


if TYPE_CHECKING:
    from transformers import TrainingArguments

    from .trainer import FusedLlavaTrainer


def parse_arguments(argv: list[str] | None = None) -> tuple[ModelArguments, DataArguments, "TrainingArguments"]:
    """The model, data and Trainer arguments of a command line (`sys.argv[1:]` by default). `--help` lists the
    package's own options and the most used Trainer ones without importing torch; `--help-all` every option. The
    package's own options are checked first, so that their errors (a missing `--data_path`, an unknown `--stage`)
    answer before Trainer is imported."""
    argv = sys.argv[1:] if argv is None else list(argv)
    help_all = wants_help_all(argv)
    if not help_all:
        own_arguments_parser().parse_known_args(argv)  # exits after printing the help, or an error in these options
    from transformers import HfArgumentParser, TrainingArguments

    parser = HfArgumentParser((ModelArguments, DataArguments, TrainingArguments))
    if help_all:
        parser.print_help()
        raise SystemExit(0)
    model_args, data_args, training_args, unknown = parser.parse_args_into_dataclasses(
        args=argv, return_remaining_strings=True
    )
    if unknown:
        raise InvalidTrainingInput(
            f"unrecognized arguments: {' '.join(unknown)} (`fusedvlm-train --help-all` lists every option)."
        )
    # The collator builds the model inputs from the raw records; Trainer must not drop their columns.
    training_args.remove_unused_columns = False
    return model_args, data_args, training_args


def _looks_like_hub_id(name: str) -> bool:
    return not Path(name).is_absolute() and not name.startswith((".", "~")) and name.count("/") == 1


def check_source(model_name_or_path: str) -> None:
    """Refuse a `--model_name_or_path` that is not a fused checkpoint, naming the command that makes one: from a
    plain LLaVA, `FusedLlavaForConditionalGeneration` would build a randomly initialised model and train that."""
    from transformers import PretrainedConfig

    from ..configuration_fused_llava import FusedLlavaConfig
    from ..publishing.hub import hub_connection_error, unreachable_hub_message

    path = Path(model_name_or_path)
    if path.is_file():
        raise InvalidTrainingInput(
            f"--model_name_or_path {model_name_or_path} is a file: pass the checkpoint folder that holds config.json."
        )
    if not path.exists() and not _looks_like_hub_id(model_name_or_path):
        raise InvalidTrainingInput(
            f"--model_name_or_path {model_name_or_path} does not exist: pass a fused checkpoint folder (made by "
            "fusedvlm-convert) or a Hub repo id."
        )
    if not path.exists():
        unreachable = hub_connection_error()
        if unreachable:
            raise InvalidTrainingInput(unreachable_hub_message("--model_name_or_path", model_name_or_path, unreachable))
    try:
        config, _ = PretrainedConfig.get_config_dict(model_name_or_path)
    except OSError as error:
        raise InvalidTrainingInput(
            f"--model_name_or_path {model_name_or_path}: cannot read its config.json ({error}). Pass a fused "
            "checkpoint folder (made by fusedvlm-convert) or a reachable Hub repo id."
        ) from None
    if config.get("model_type") == FusedLlavaConfig.model_type:
        from ..checkpoint_checks import missing_weight_files

        missing = missing_weight_files(model_name_or_path)
        if missing:
            raise InvalidTrainingInput(f"--model_name_or_path {missing}.")
        return
    fused = f"{path.name or 'model'}-fused"
    if "text_config" in config and "vision_config" in config:
        raise InvalidTrainingInput(
            f"--model_name_or_path {model_name_or_path} is a plain llava-hf LLaVA (model_type "
            f"{config.get('model_type')!r}), not a fused checkpoint: training it would start from a random model. "
            f"Convert it first: `fusedvlm-convert --input {model_name_or_path} --output {fused} --fuser igva` (or "
            f"mmfuser, concat, average, none), then train --model_name_or_path {fused}."
        )
    if "mm_vision_tower" in config:
        raise InvalidTrainingInput(
            f"--model_name_or_path {model_name_or_path} is an original-format LLaVA checkpoint, not a fused one. "
            f"Convert it first: `fusedvlm-convert-original --input {model_name_or_path} --output {fused} "
            f"--vision-tower {config['mm_vision_tower']}`, then train --model_name_or_path {fused}."
        )
    raise InvalidTrainingInput(
        f"--model_name_or_path {model_name_or_path} has model_type {config.get('model_type')!r}, not "
        f"{FusedLlavaConfig.model_type!r}: pass a fused checkpoint (made by fusedvlm-convert)."
    )


def check_output_dir(output_dir: str, model_name_or_path: str, overwrite: bool = False, resuming: bool = False) -> None:
    """Refuse an output folder that is the source checkpoint or inside it (saving would overwrite the shards training
    reads), a file, or one that holds another fused model, unless `overwrite` (`--overwrite_output_dir`) or
    `resuming` (the model there is this run's). The final save replaces an earlier model's files, never others."""
    from ..publishing.folders import is_fused_output

    source, output = Path(model_name_or_path), Path(output_dir)
    if source.is_dir():
        source, resolved = source.resolve(), output.resolve()
        if resolved == source or resolved.is_relative_to(source):
            raise InvalidTrainingInput(
                f"--output_dir {output_dir} is {'the' if resolved == source else 'inside the'} --model_name_or_path "
                f"{model_name_or_path} folder: saving there would overwrite the checkpoint being trained. Choose a "
                "folder outside it."
            )
    if output.exists() and not output.is_dir():
        raise InvalidTrainingInput(f"--output_dir {output_dir} is a file: give a folder path.")
    if output.is_dir() and is_fused_output(output) and not (overwrite or resuming):
        raise InvalidTrainingInput(
            f"--output_dir {output_dir} already holds a fused model (config.json with model_type 'fused_llava' and "
            "its weights), which training would replace. Choose another folder, or pass --overwrite_output_dir to "
            "replace that model (its model files only; other files in the folder stay)."
        )


def check_distributed(trainer: "FusedLlavaTrainer", stage: str) -> None:
    """Refuse the distributed set-ups whose saves could not be fused checkpoints."""
    if (trainer.is_fsdp_enabled or trainer.is_deepspeed_enabled) and stage == "qlora":
        raise InvalidTrainingInput(
            "--stage qlora does not run under FSDP or DeepSpeed here (the 4-bit base is not sharded): use DDP "
            "(`accelerate launch --multi_gpu ...`) or --stage stage2-lora."
        )
    if trainer.is_fsdp_enabled and "FULL_STATE_DICT" not in str(trainer.accelerator.state.fsdp_plugin.state_dict_type):
        raise InvalidTrainingInput(
            "FSDP must save a full state dict to write fused checkpoints: set `fsdp_state_dict_type: FULL_STATE_DICT` "
            "in the accelerate config."
        )


def _hub_transport_errors() -> tuple[type[Exception], ...]:
    """The exceptions huggingface_hub's HTTP client raises when the Hub cannot be reached (httpx for huggingface_hub
    1.x, its successor httpx2 later)."""
    errors = []
    for module in ("httpx", "httpx2"):
        try:
            errors.append(__import__(module).TransportError)
        except (ImportError, AttributeError):
            pass
    return tuple(errors) or (ConnectionError,)


def build_trainer(model, training_args, **kwargs) -> "FusedLlavaTrainer":
    """The trainer; with --push_to_hub Trainer creates the Hub repo here, so an unreachable Hub fails here, clearly."""
    from .trainer import FusedLlavaTrainer

    try:
        return FusedLlavaTrainer(model=model, args=training_args, **kwargs)
    except _hub_transport_errors() as error:
        from huggingface_hub import constants

        raise InvalidTrainingInput(
            f"--push_to_hub: the Hub at {constants.ENDPOINT} could not be reached ({type(error).__name__}: {error}). "
            "Check the network and HF_ENDPOINT, or train without --push_to_hub and upload the output folder later "
            "(`hf upload REPO OUTPUT_DIR`)."
        ) from None


def main(argv: list[str] | None = None) -> int:
    with auto_registration_deferred():
        model_args, data_args, training_args = parse_arguments(argv)
    if model_args.stage in LORA_STAGES and training_args.resume_from_checkpoint:
        raise InvalidTrainingInput(
            f"--resume_from_checkpoint is not supported with --stage {model_args.stage}: its checkpoints hold merged "
            "weights, not adapters. Start a new run from the checkpoint (--model_name_or_path CHECKPOINT) instead."
        )
    parameter_learning_rates = parse_parameter_learning_rates(model_args.parameter_learning_rates)
    check_source(model_args.model_name_or_path)
    check_output_dir(
        training_args.output_dir,
        model_args.model_name_or_path,
        overwrite=data_args.overwrite_output_dir,
        resuming=bool(training_args.resume_from_checkpoint),
    )
    if training_args.push_to_hub:
        from ..publishing.hub import hub_connection_error

        unreachable = hub_connection_error()
        if unreachable:
            raise InvalidTrainingInput(
                f"--push_to_hub: {unreachable}. Check your connection (and HF_ENDPOINT or HTTPS_PROXY), or train "
                "without --push_to_hub and upload the output folder later (`hf upload REPO OUTPUT_DIR`)."
            )
    # Imported here, after the arguments are parsed, so that `--help` and bad arguments answer without loading them.
    from transformers import AutoProcessor

    from .data import FusedLlavaDataCollator, LlavaConversationDataset
    from .recording import recorded_command
    from .stages import format_parameter_table, load_model_for_stage, trainable_parameters

    processor = AutoProcessor.from_pretrained(model_args.model_name_or_path)
    is_main = training_args.process_index == 0
    dataset = LlavaConversationDataset(
        data_args.data_path,
        data_args.image_folder,
        processor.image_token,
        progress=is_main and not training_args.disable_tqdm,
    )
    model = load_model_for_stage(model_args, training_args)
    if is_main:
        print(f"Stage {model_args.stage}: trainable parameters per part")
        print(format_parameter_table(trainable_parameters(model)))
    trainer = build_trainer(
        model,
        training_args,
        train_dataset=dataset,
        data_collator=FusedLlavaDataCollator(processor, add_eos=data_args.add_eos),
        processing_class=processor,
        stage=model_args.stage,
        source=model_args.model_name_or_path,
        command=recorded_command("fusedvlm-train", sys.argv[1:] if argv is None else argv),
        run_arguments={**asdict(model_args), **asdict(data_args)},
        parameter_learning_rates=parameter_learning_rates,
    )
    check_distributed(trainer, model_args.stage)
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    if training_args.push_to_hub:
        trainer.push_to_hub()  # saves the final model to output_dir, writes the card and uploads
    else:
        trainer.save_model()
        trainer.create_model_card()
    return 0


def console_main() -> int:
    """`fusedvlm-train` / `python -m hf_fusedvlm.training`: [`main`], a bad input reported as one line, not a
    traceback."""
    try:
        return main()
    except InvalidTrainingInput as error:
        print(f"fusedvlm-train: error: {error}", file=sys.stderr)
        return 2
