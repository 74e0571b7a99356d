"""The model card of a converted (or trained) checkpoint, from the template `model_cards/fused_llava.md`, and the
command line it records (Hub ids or folder names, never local paths or tokens)."""

import json
import shlex
from pathlib import Path

from huggingface_hub import ModelCard, ModelCardData

from ..configuration_fused_llava import FusedLlavaConfig
from ..fuser_registry import fuser_class


MODEL_CARD_TEMPLATE = "fused_llava.md"

# The benchmarks of Dense Connector's model zoo table (docs/ModelZoo.md of HJYao00/DenseConnector), in its order.
DENSE_CONNECTOR_BENCHMARKS = (
    "TextVQA",
    "SQA-IMG",
    "GQA",
    "LLaVA-Bench-in-the-Wild",
    "MMBench",
    "MM-Vet",
    "MMMU",
    "MathVista",
)
# Scores the Dense Connector authors report for their released checkpoints (not measured here), per Hub id.
REPORTED_SCORES = {
    "HuanjinYao/DenseConnector-v1.5-7B": (62.6, 70.5, 64.4, 67.4, 68.4, 35.4, 36.7, 25.5),
    "HuanjinYao/DenseConnector-v1.5-13B": (64.7, 73.0, 65.4, 73.6, 71.4, 41.6, 34.3, 29.6),
    "HuanjinYao/DenseConnector-v1.5-8B": (62.2, 75.2, 65.1, 68.8, 74.4, 34.6, 40.4, 28.6),
    "HuanjinYao/DenseConnector-v1.5-SigLIP-7B-AnyRes": (66.5, 69.3, 64.8, 70.7, 67.2, 34.8, 36.3, 27.0),
}
REPORTED_SCORES_SOURCE = "https://github.com/HJYao00/DenseConnector/blob/main/docs/ModelZoo.md"


def reported_scores(origin: str | None) -> dict[str, float] | None:
    """The authors' published scores of the checkpoint with Hub id `origin` (case-insensitive), if it is listed."""
    for repo_id, scores in REPORTED_SCORES.items():
        if origin is not None and origin.lower() == repo_id.lower():
            return dict(zip(DENSE_CONNECTOR_BENCHMARKS, scores))
    return None


def model_card_template() -> Path:
    """`model_cards/fused_llava.md`: installed as `hf_fusedvlm/model_cards/`, or in the source tree beside the
    package."""
    package = Path(__file__).resolve().parent.parent
    for folder in (package / "model_cards", package.parent / "model_cards"):
        if (folder / MODEL_CARD_TEMPLATE).is_file():
            return folder / MODEL_CARD_TEMPLATE
    raise FileNotFoundError(
        f"The model card template {MODEL_CARD_TEMPLATE} was not found next to the package: reinstall hf-fusedvlm "
        "(or run from a checkout, `pip install -e .`)."
    )


def source_license(source: Path) -> tuple[str | None, str | None]:
    """(license, license_link) of a source checkpoint's card, if it has one."""
    readme = source / "README.md"
    if not readme.is_file():
        return None, None
    try:
        data = ModelCard.load(readme).data
    except Exception:  # a malformed source card only costs the license line
        return None, None
    return data.get("license"), data.get("license_link")


def render_model_card(
    config: FusedLlavaConfig,
    *,
    model_id: str,
    base_model: str | None,
    license: str | None,
    license_link: str | None,
    instruction_encoder: str | None,
    new_parameters: int,
    convert_command: str,
    training_summary: str | None = None,
    imported_from: str | None = None,
) -> ModelCard:
    """The model card of a converted checkpoint; with `training_summary` (markdown), the card of a fine-tuned one,
    `convert_command` then being the training command; with `imported_from` (the code it was trained with), the card
    of a trained checkpoint imported from the original LLaVA format, with the authors' published scores when
    `base_model` is one of `REPORTED_SCORES`."""
    fuser = config.fuser_type
    described = fuser_class(fuser)
    tags = ["llava", "fused-llava", "multi-layer-visual-fusion", f"fuser-{fuser}", "custom_code"]
    if described.reads_instruction:
        tags.append("instruction-guided")
    card_data = ModelCardData(
        library_name="transformers",
        pipeline_tag="image-text-to-text",
        base_model=base_model,
        license=license,
        license_link=license_link,
        tags=tags,
    )
    layers = config.fuser_layers if "fuser_layers" in described.layer_fields else None
    groups = config.fuser_layer_groups if "fuser_layer_groups" in described.layer_fields else None
    return ModelCard.from_template(
        card_data,
        template_path=str(model_card_template()),
        model_id=model_id,
        fuser_type=fuser,
        fuser_title=described.title,
        fuser_description=described.description,
        parity_reason=described.parity,
        base_layer=config.base_layer,
        fuser_layers=layers,
        fuser_layer_groups=groups,
        fuser_rows=described.card_rows(config),
        instruction_encoder=instruction_encoder,
        new_parameters=f"{new_parameters:,}",
        dtype=str(config.dtype).removeprefix("torch.") if config.dtype is not None else "as the base model",
        widened=described.projector_slots(config)[1] > 1,
        convert_command=convert_command,
        training_summary=training_summary,
        imported_from=imported_from,
        reported_scores=reported_scores(base_model) if imported_from else None,
        reported_scores_source=REPORTED_SCORES_SOURCE,
    )


def card_command(
    input: str,
    *,
    fuser_type: str | None = None,
    fuser_layers: list[int] | None = None,
    fuser_layer_groups: list[list[int]] | None = None,
    fuser_options: dict | None = None,
    instruction_encoder: str | None = None,
    vision_tower: str | None = None,
    dtype=None,
) -> str:
    """The `fusedvlm-convert` command of a conversion, for the model card (callers pass Hub ids or folder names)."""
    parts = ["fusedvlm-convert", "--input", str(input), "--output", "OUTPUT"]
    if vision_tower is not None:
        parts += ["--vision-tower", str(vision_tower)]
    if fuser_type is not None:
        parts += ["--fuser", fuser_type]
    if fuser_layers is not None:
        parts += [f"--fuser-layers={','.join(map(str, fuser_layers))}"]
    if fuser_layer_groups is not None:
        parts += ["--fuser-groups", ";".join(",".join(map(str, group)) for group in fuser_layer_groups)]
    for name, value in (fuser_options or {}).items():
        parts += ["--fuser-option", f"{name}={json.dumps(value)}"]
    if instruction_encoder is not None:
        parts += ["--instruction-encoder", str(instruction_encoder)]
    if dtype is not None:
        parts += ["--dtype", str(dtype).removeprefix("torch.")]
    return shlex.join(parts)
