"""The one conversion pipeline, for every source format: check -> read -> plan -> write -> verify.

Every argument is checked before any weights are downloaded: the output folder and the Hub login first, then the
source's metadata (config.json and shard index; for a Hub repo only its JSON files are fetched), and through it the
fused config the result will have, which the fuser settings, the vision tower's and the sentence encoder's configs
must fit. Only then are the weights read (downloaded) and planned, tensor by tensor, and the plan checked against
the fused model's tensors; the shards, remote code, companions (processor, generation config) and model card are
written into a staging folder, verified on request, and moved into place; the result is pushed on request.

A source format (`llava_hf`, `original`) contributes only what differs, as a module with
- `check(source, request) -> FusedLlavaConfig`: from metadata alone, the fused config (its vocabulary may still
  change once the tokenizer is read), or a `ConversionError`;
- `plan(source, request) -> Plan`: the tensors, companions and verification, once the weights are here.
"""

import os
from pathlib import Path

import torch
from huggingface_hub import HfApi, constants

from ..parity import FUSER_PREFIX
from ..publishing.hub import folder_files, hub_connection_error, push_folder_to_hub
from ..publishing.model_card import card_command, render_model_card, source_license
from . import llava_hf, original
from .checkpoint import LLAVA_HF, ORIGINAL, checkpoint_format, read_config_json, resolve_checkpoint
from .errors import ConversionError, listed, parse_dtype
from .request import Plan, Request, Source, fuser_class_or_error, fuser_settings
from .sentence_encoder import load_sentence_encoder
from .staging import check_output, check_writable, staged_output
from .writing import ConversionResult, count_parameters, plan_mismatches, write_remote_code, write_shards


FORMATS = {LLAVA_HF: llava_hf, ORIGINAL: original}
EXPECTED_INPUT = (
    "a LLaVA checkpoint folder (or Hub repo): llava-hf (e.g. llava-hf/llava-1.5-7b-hf) or original (e.g. "
    "liuhaotian/llava-v1.5-7b)"
)


# ------------------------------------------------------------------------------------------------------- steps


def check_hub_login(repo_id: str) -> None:
    """Before a long conversion: the Hub endpoint answers and a token is set, or a `ConversionError` with the fix
    (the token itself is never printed)."""
    unreachable = hub_connection_error()
    if unreachable:
        raise ConversionError(
            f"--push-to-hub {repo_id}: {unreachable}. Check your connection (and HF_ENDPOINT or HTTPS_PROXY), or drop "
            "--push-to-hub and upload later with `hf upload`. Nothing was converted."
        )
    api = HfApi()
    try:
        api.whoami()
    except Exception as error:  # httpx connection errors, 401s and missing tokens all stop the push the same way
        if api.token is None and not os.environ.get("HF_TOKEN"):
            reason = "no Hugging Face token is set"
        else:
            reason = (
                f"the Hub at {constants.ENDPOINT} could not be reached or refused the token ({type(error).__name__})"
            )
        raise ConversionError(
            f"--push-to-hub {repo_id}: {reason}. Log in with `hf auth login` (or set HF_TOKEN), check your connection "
            "and HF_ENDPOINT, or drop --push-to-hub and upload later with `hf upload`. Nothing was converted."
        ) from error


def publish_result(result: ConversionResult, push_to_hub: str | None, private: bool, commit_message: str):
    """List the files of a finished conversion and, with `push_to_hub`, upload its folder in one commit."""
    output = result.output
    result.files = folder_files(output)
    if push_to_hub:
        try:
            commit = push_folder_to_hub(output, push_to_hub, private=private, commit_message=commit_message)
        except Exception as error:
            raise ConversionError(
                f"The conversion succeeded ({output}) but pushing to {push_to_hub} failed "
                f"({type(error).__name__}: {error}). Log in with `hf auth login` (or set HF_TOKEN) and upload it with "
                f"`hf upload {push_to_hub} {output} .`."
            ) from error
        result.commit_url = commit.commit_url
    return result


def prepare_output(input, output, overwrite: bool, push_to_hub: str | None) -> Path:
    """The absolute `output`, checked before anything is read or downloaded: not the input nor inside it, a folder
    `--overwrite` may replace, a writable parent, and a reachable Hub when pushing."""
    output = Path(output).expanduser().resolve()
    local_input = Path(input).expanduser()
    check_output(output, overwrite, [local_input.resolve()] if local_input.exists() else [])
    check_writable(output)
    if push_to_hub:
        check_hub_login(push_to_hub)
    return output


def open_source(input) -> Source:
    """The source's folder and config.json (a Hub repo's JSON files only)."""
    folder, repo_id = resolve_checkpoint(input, "--input", metadata_only=True)
    return Source(str(input), folder, repo_id, read_config_json(folder, EXPECTED_INPUT), Path(input).exists())


def check_plan(plan: Plan) -> None:
    """Refuse, before anything is written, a plan that is not exactly the fused model's tensors: the error names the
    unexpected and the missing tensors (under their source names) and those of the wrong shape."""
    unexpected, missing, wrong = plan_mismatches(plan.config, plan.shards)
    details = []
    if unexpected:
        details.append(f"{len(unexpected)} unexpected keys: {listed(plan.source_name(n) for n in unexpected)}")
    if missing:
        details.append(f"{len(missing)} missing keys: {listed(plan.source_name(n) for n in missing)}")
    if wrong:
        shapes = [f"{plan.source_name(name)} {shape} (expected {expected})" for name, shape, expected in wrong]
        details.append(f"{len(wrong)} tensors of the wrong shape: {listed(shapes)}")
    if details:
        raise ConversionError(f"The checkpoint does not match {plan.layout}: " + "; ".join(details) + f". {plan.fix}")


def model_card(plan: Plan, source: Source, request: Request, model_id: str, origin: str | None):
    license, license_link = source_license(source.folder)
    encoder = request.encoder.name if request.encoder else None
    command = card_command(
        origin or source.folder.name,
        vision_tower=plan.card_vision_tower,
        fuser_type=plan.card_fuser,
        fuser_layers=request.fuser_layers,
        fuser_layer_groups=request.fuser_layer_groups,
        fuser_options=request.fuser_options,
        instruction_encoder=encoder,
        dtype=request.dtype,
    )
    return render_model_card(
        plan.config,
        model_id=model_id,
        base_model=origin,
        license=license,
        license_link=license_link,
        instruction_encoder=encoder,
        new_parameters=count_parameters(plan.shards, FUSER_PREFIX),
        convert_command=command,
        imported_from=plan.imported_from,
    )


def convert_checkpoint(
    input: str | os.PathLike,
    output: str | os.PathLike,
    fuser_type: str | None = None,
    *,
    vision_tower: str | os.PathLike | None = None,
    instruction_encoder: str | os.PathLike | None = None,
    fuser_layers: list[int] | None = None,
    fuser_layer_groups: list[list[int]] | None = None,
    fuser_options: dict | None = None,
    dtype: str | torch.dtype | None = None,
    verify: bool = False,
    overwrite: bool = False,
    push_to_hub: str | None = None,
    private: bool = False,
    base_model: str | None = None,
    progress: bool = True,
) -> ConversionResult:
    """Convert a LLaVA checkpoint, llava-hf or original format (told from its config.json), into a fused one.

    Args:
        input: checkpoint folder or Hub repo id.
        output: folder to create: new, empty, or with `overwrite` an earlier fused LLaVA output.
        fuser_type: a registered fuser (`hf_fusedvlm.FUSERS`): required for llava-hf checkpoints; for original ones
            `none` by default, and fixed by a trained fusion (MMFuser, IGVA, Dense Connector) checkpoint.
        vision_tower: original format only: folder or Hub id of the CLIP (Dense Connector: SigLIP) model named by
            the checkpoint's `mm_vision_tower`.
        instruction_encoder: sentence-transformers folder or Hub repo id, for the fusers that read the instruction
            (igva); its pooling and normalisation are carried into the config.
        fuser_layers, fuser_layer_groups: `FusedLlavaConfig` fields (defaults scale the papers' layouts to the tower;
            fixed by a trained fusion checkpoint).
        fuser_options: further `FusedLlavaConfig` fuser fields (`known_fuser_options()`), e.g. `{"fuser_num_heads": 8}`.
        dtype: `"float32"`, `"bfloat16"` or `"float16"` to cast floating tensors; default keeps the source's bytes.
        verify: check that the result computes what the source does before moving it into place.
        push_to_hub: repo id to upload the result to in one commit (token from `HF_TOKEN` or `hf auth login`).
        private: create the Hub repo private.
        base_model: Hub id of the source for the model card, when `input` is a local folder.
        progress: show a progress bar of shards and bytes.
    """
    dtype = parse_dtype(dtype)
    if fuser_type is not None:
        fuser_class_or_error(fuser_type)
    fuser_settings(fuser_layers, fuser_layer_groups, fuser_options)
    output = prepare_output(input, output, overwrite, push_to_hub)
    encoder = load_sentence_encoder(instruction_encoder, weights=False) if instruction_encoder is not None else None
    request = Request(fuser_type, fuser_layers, fuser_layer_groups, fuser_options, vision_tower, encoder, dtype)
    source = open_source(input)
    source_format = FORMATS[checkpoint_format(source.raw, source.folder)]
    source_format.check(source, request)

    if instruction_encoder is not None:  # its tokenizer is checked before any weights are downloaded
        request.encoder = load_sentence_encoder(instruction_encoder, dtype)
    source.download()
    plan = source_format.plan(source, request)
    check_plan(plan)

    origin = base_model or source.repo_id
    card = model_card(plan, source, request, push_to_hub or output.name, origin)
    with staged_output(output, overwrite) as staging:
        total_bytes = write_shards(staging, plan.shards, progress)
        write_remote_code(plan.config, staging)
        plan.write_companions(staging)
        card.save(staging / "README.md")
        config = plan.config
        result = ConversionResult(
            output=output,
            fuser_type=config.fuser_type,
            num_shards=len(plan.shards),
            num_tensors_copied=plan.num_source_tensors,
            num_new_tensors=plan.num_new_tensors,
            new_parameters=count_parameters(plan.shards, FUSER_PREFIX),
            total_bytes=total_bytes,
            dtype=str(config.dtype).removeprefix("torch.") if config.dtype is not None else None,
        )
        if verify:
            result.verify_max_abs_diff, result.verify_tolerance = plan.verify(staging)
    return publish_result(result, push_to_hub, private, f"{plan.commit_message} from {origin or source.folder.name}")
