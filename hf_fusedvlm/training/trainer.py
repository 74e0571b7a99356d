"""[`FusedLlavaTrainer`]: `transformers.Trainer` whose every save is a fused checkpoint with its processor, a JSON
record of the run (no pickle, no secret) and, for the Hub, the package's model card with a training summary."""

import json
import os
import shutil
from pathlib import Path

from huggingface_hub import ModelCard
from transformers import Trainer
from transformers.trainer import TRAINER_STATE_NAME
from transformers.trainer_utils import PREFIX_CHECKPOINT_DIR, HubStrategy
from transformers.utils.hub import PushInProgress, hf_api

from ..publishing.folders import replacing_fused_files
from ..publishing.model_card import render_model_card
from .errors import InvalidTrainingInput
from .recording import recorded_arguments, shown_path
from .saving import gathered, save_fused_checkpoint
from .stages import STAGES, format_parameter_table, parameter_learning_rate, trainable_parameters


ARGUMENTS_RECORD_NAME = "training_args.json"
# Files torch.save / pickle writes into a checkpoint (optimizer, scheduler, RNG and scaler states, Trainer's
# arguments, FSDP's distributed checkpoints, DeepSpeed's states): never uploaded, since loading a pickle runs code.
# With --hub_strategy checkpoint the Hub's last-checkpoint/ is the model and trainer_state.json, so a run resumed
# from it starts a new optimizer state (Trainer loads the states only when their files are there).
PICKLE_PATTERNS = ("*.bin", "*.pt", "*.pth", "*.pkl", "*.pickle", "*.distcp", "*.metadata")


class FusedLlavaTrainer(Trainer):
    """`Trainer` whose checkpoints and final save are fused checkpoints (see [`save_fused_checkpoint`]) with the
    processor, and whose Hub card is the package's model card with a training summary.

    Args:
        stage (`str`): the training stage (a key of [`STAGES`]), for the card.
        source (`str`): the checkpoint training started from (folder or Hub id).
        command (`str`): the training command as the card records it (secrets already removed).
        run_arguments (`dict`, *optional*): the model and data arguments, written with the training arguments to
            `training_args.json` (secrets removed) instead of Trainer's pickled `training_args.bin`.
        parameter_learning_rates (`list[tuple[str, float]]`, *optional*): `(name_part, learning_rate)` pairs: a
            parameter whose name contains `name_part` trains at that rate (the first pair that matches), the others at
            `args.learning_rate` (see `arguments.parse_parameter_learning_rates`).
    """

    def __init__(
        self,
        *args,
        stage: str,
        source: str,
        command: str,
        run_arguments: dict | None = None,
        parameter_learning_rates: list[tuple[str, float]] | None = None,
        **kwargs,
    ):
        super().__init__(*args, **kwargs)
        self.stage, self.source, self.command = stage, source, command
        self.run_arguments = run_arguments or {}
        self.parameter_learning_rates = list(parameter_learning_rates or [])
        # Counted before training: FSDP and DeepSpeed replace the parameters by shards once the model is prepared.
        self.parameter_counts = trainable_parameters(self.model)

    def create_optimizer(self, model=None):
        """Trainer's optimizer, its parameter groups split by [`parameter_learning_rate`] when
        `parameter_learning_rates` are given (the scheduler, made afterwards, scales every group's rate alike)."""
        if self.optimizer is not None or not self.parameter_learning_rates:
            return super().create_optimizer(model)
        optimizer = super().create_optimizer(model)
        names = {id(parameter): name for name, parameter in (self.model if model is None else model).named_parameters()}
        groups, optimizer.param_groups = optimizer.param_groups, []  # nothing stepped yet: no state to carry over
        matched = set()
        for group in groups:
            by_rate: dict[float | None, list] = {}
            for parameter in group["params"]:
                name = names[id(parameter)]
                rate = parameter_learning_rate(name, self.parameter_learning_rates)
                matched.update(part for part, _ in self.parameter_learning_rates if part in name)
                by_rate.setdefault(rate, []).append(parameter)
            settings = {key: value for key, value in group.items() if key != "params"}
            for rate, parameters in by_rate.items():
                optimizer.add_param_group({**settings, "params": parameters, **({} if rate is None else {"lr": rate})})
        unmatched = [part for part, _ in self.parameter_learning_rates if part not in matched]
        if unmatched:  # e.g. a wrapper that renames or flattens the parameters
            raise InvalidTrainingInput(
                f"--parameter_learning_rates: the optimizer holds no parameter whose name contains {unmatched[0]!r} "
                "(the model is wrapped so that its parameter names changed): train without --parameter_learning_rates "
                "under this set-up."
            )
        return self.optimizer

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        # Under FSDP and DeepSpeed `state_dict` is the full state dict Trainer gathered from the shards (on every rank;
        # complete on the writing one); the live parameters are shards then, so the weights must come from it.
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if state_dict is not None:
            state_dict = gathered(state_dict)  # collective: before the non-writing ranks leave
        if not self.args.should_save:
            return
        with replacing_fused_files(output_dir) as staging:
            model = self.accelerator.unwrap_model(self.model, keep_torch_compile=False)
            save_fused_checkpoint(model, staging, state_dict=state_dict)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(staging)
            record = {
                **recorded_arguments(self.run_arguments, self.args),
                "world_size": self.args.world_size,
                "parallel_mode": self.args.parallel_mode.value,
                "distributed_type": self.accelerator.distributed_type.value,
            }
            Path(staging, ARGUMENTS_RECORD_NAME).write_text(json.dumps(record, indent=2, sort_keys=True) + "\n")

    def _push_from_checkpoint(self, checkpoint_folder: str) -> None:
        # Trainer's version copies only weights and configs into output_dir (the pushed config's auto_map would name
        # remote-code files the repo lacks) and writes the pickled arguments there, which may hold --hub_token. A
        # checkpoint of this trainer is a whole fused checkpoint: copy its files (not Trainer's resume state), the
        # processor and the card, and upload without any pickle.
        if not self.is_world_process_zero() or self.args.hub_strategy == HubStrategy.END:
            return
        if not self.args.hub_always_push and self.push_in_progress is not None and not self.push_in_progress.is_done():
            return
        self.callback_handler.on_push_begin(self.args, self.state, self.control)
        with replacing_fused_files(self.args.output_dir) as staging:
            for path in Path(checkpoint_folder).iterdir():
                if (
                    path.is_file()
                    and path.suffix in (".json", ".safetensors", ".py")
                    and path.name != TRAINER_STATE_NAME
                ):
                    shutil.copy(path, staging / path.name)
            if self.processing_class is not None:
                self.processing_class.save_pretrained(staging)
        self.create_model_card()
        message = f"Training in progress, step {self.state.global_step}"
        upload = {
            "repo_id": self.hub_model_id,
            "token": self.args.hub_token,
            "run_as_future": True,
            "revision": self.args.hub_revision,
            "ignore_patterns": ["_*", f"{PREFIX_CHECKPOINT_DIR}-*", *PICKLE_PATTERNS],
        }
        jobs = [hf_api().upload_folder(folder_path=self.args.output_dir, commit_message=message, **upload)]
        if self.args.hub_strategy in (HubStrategy.CHECKPOINT, HubStrategy.ALL_CHECKPOINTS):
            in_repo = (
                "last-checkpoint" if self.args.hub_strategy == HubStrategy.CHECKPOINT else Path(checkpoint_folder).name
            )
            upload["ignore_patterns"] = list(PICKLE_PATTERNS)  # the resume state stays local (see below)
            jobs.append(
                hf_api().upload_folder(
                    folder_path=checkpoint_folder,
                    path_in_repo=in_repo,
                    commit_message=message + ", checkpoint",
                    **upload,
                )
            )
        if self.push_in_progress is None or self.push_in_progress.is_done():
            self.push_in_progress = PushInProgress(jobs)
        else:
            self.push_in_progress.jobs.extend(jobs)

    def training_summary(self) -> str:
        """Markdown: stage, data, steps, final loss and the trainable parameters per part."""
        history = [entry["loss"] for entry in self.state.log_history if "loss" in entry]
        args = self.args
        lines = [
            (
                f"- stage: `{self.stage}` (trainable parts: {', '.join(STAGES[self.stage])}); started from "
                f"`{shown_path(self.source)}`"
            ),
            (
                f"- {self.state.global_step} optimizer steps, {args.per_device_train_batch_size} samples per device "
                f"and step, {args.gradient_accumulation_steps} accumulation steps, learning rate {args.learning_rate:g}"
            ),
        ]
        if args.world_size > 1:
            lines.append(f"- {args.world_size} processes ({self.accelerator.distributed_type.value})")
        if history:
            lines.append(f"- training loss: {history[0]:.4f} (first log) -> {history[-1]:.4f} (last log)")
        lines += ["", format_parameter_table(self.parameter_counts)]
        return "\n".join(lines)

    def create_model_card(self, **kwargs) -> None:
        """Write the package's model card (with the training summary) to `output_dir/README.md`."""
        if not self.is_world_process_zero():
            return
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
            instruction_encoder=(
                config.instruction_encoder_config.model_type if base.model.instruction_encoder is not None else None
            ),
            new_parameters=self.parameter_counts.get("fuser", (0, 0))[1],
            convert_command=self.command,
            training_summary=self.training_summary(),
        )
        card.save(os.path.join(self.args.output_dir, "README.md"))
