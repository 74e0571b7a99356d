"""The original LLaVA format (haotian-liu/LLaVA and its forks, among them the official MMFuser and IGVA code): see
`original_layout` for the variants and the config, `original_processor` for the tokenizer and image processor.

The vision tower is named by the config's `mm_vision_tower` and only stored in the checkpoint when it was trained
(`model.vision_tower.vision_tower.*`); its config, image processor and, otherwise, its weights come from
`--vision-tower`. plan: read the shards (safetensors bytes stay on disk, `.bin` shards are memory-mapped), rename the
keys of the variant, grow the embeddings for `<image>` and `<pad>`, widen the projector for a parity fuser, add the
tower and the new tensors, and check the plan against the fused model. write: shards and companions into a staging
folder. verify (optional): text-only logits against the source LLM. Then the folder moves into place."""

import os
from dataclasses import dataclass
from pathlib import Path

import torch

from ..configuration_fused_llava import FusedLlavaConfig
from ..parity import (
    FUSER_PREFIX,
    INSTRUCTION_ENCODER_PREFIX,
    PROJECTOR_INPUT_KEY,
    expand_projector_input,
    new_fuser_tensors,
)
from .checkpoint import resolve_checkpoint
from .errors import ConversionError, listed, parse_dtype
from .hub import publish_result
from .model_card import card_command, render_model_card, source_license
from .original_layout import (
    CLIP_TEXT_PARTS,
    EMBEDDING_KEYS,
    RECOMPUTED_BUFFER,
    TOWER_PREFIX,
    VARIANT_ORIGINS,
    VARIANTS,
    detect_variant,
    fused_config_from_original,
    fuser_for_variant,
    map_original_key,
    names_siglip_tower,
    original_key,
    read_original_config,
    text_config_from_original,
)
from .original_processor import (
    LLAMA_3_CHAT_TEMPLATE,
    LLAVA_V1_CHAT_TEMPLATE,
    VICUNA_V1_CHAT_TEMPLATE,
    add_llava_tokens,
    is_llama_3_tokenizer,
    load_llm_tokenizer,
    read_vision_tower,
    write_companions,
)
from .pipeline import check_fuser_choice, describe_result, fuser_class_or_error, fuser_settings, prepare_output
from .sentence_encoder import SentenceEncoder, load_sentence_encoder
from .shards import StoredShard, read_shards
from .staging import staged_output
from .verify import verify_against_llm, verify_dense_connector
from .writing import (
    PlannedShard,
    count_parameters,
    plan_mismatches,
    plan_new_tensors,
    plan_tensor,
    planned_shard,
    write_shards,
)


EMBED_KEY = "model.embed_tokens.weight"


# ----------------------------------------------------------------------------------------------------------- plan


def append_mean_rows(new_size: int):
    """Grow a `(vocab, hidden)` matrix to `new_size` rows with copies of its mean row: a deterministic start for the
    new tokens (llava-hf samples around the same mean); `<image>` rows are never read, `<pad>` ones masked out."""

    def grow(matrix: torch.Tensor) -> torch.Tensor:
        mean = matrix.float().mean(0, keepdim=True).to(matrix.dtype)
        return torch.cat([matrix, mean.expand(new_size - matrix.shape[0], -1)])

    return grow


def plan_checkpoint(
    shards: list[StoredShard], variant: str, config: FusedLlavaConfig, source_vocab: int, dtype
) -> list[PlannedShard]:
    """Per source shard, the fused entries of its tensors (renamed, embeddings grown, projector widened for a plain
    LLaVA converted to a wider fuser; a trained fusion's projector already has its width)."""
    new_vocab = config.text_config.vocab_size
    widens = variant == "llava" and fuser_class_or_error(config.fuser_type).projector_slots(config)[1] > 1
    planned = []
    for shard in shards:
        entries = []
        for tensor in shard.tensors:
            name = map_original_key(tensor.key, variant)
            if name is None:
                continue
            if name in EMBEDDING_KEYS and tensor.shape[0] == source_vocab and new_vocab > source_vocab:
                entry = plan_tensor(name, tensor, dtype, [new_vocab, *tensor.shape[1:]], append_mean_rows(new_vocab))
            elif name == PROJECTOR_INPUT_KEY and widens:
                try:
                    shape = expand_projector_input(torch.empty(tensor.shape, device="meta"), config).shape
                except ValueError as error:
                    raise ConversionError(
                        f"Cannot widen the projector for --fuser {config.fuser_type}: {error}"
                    ) from error
                entry = plan_tensor(name, tensor, dtype, shape, lambda weight: expand_projector_input(weight, config))
            else:
                entry = plan_tensor(name, tensor, dtype)
            entries.append(entry)
        planned.append(planned_shard(entries, shard))
    return planned


def plan_vision_tower(
    shards: list[StoredShard], dtype, config: FusedLlavaConfig, present: set[str]
) -> list[PlannedShard]:
    """The vision tensors of a CLIP or SigLIP checkpoint (a full CLIPModel / SiglipModel, or its vision model with or
    without the `vision_model.` prefix of older transformers) as the fused tower, leaving out the tensors already in
    `present` (the checkpoint's own copy of the tower, which wins) and a pooling head the fused tower does not have."""
    has_head = getattr(config.vision_config, "vision_use_head", False)

    def name(key: str) -> str:
        return TOWER_PREFIX + key.removeprefix("vision_model.")

    def wanted(key: str) -> bool:
        if key.split(".")[0] in CLIP_TEXT_PARTS or RECOMPUTED_BUFFER.search(key) or name(key) in present:
            return False
        return has_head or not name(key).startswith(TOWER_PREFIX + "head.")

    return [
        planned_shard(
            [plan_tensor(name(tensor.key), tensor, dtype) for tensor in shard.tensors if wanted(tensor.key)], shard
        )
        for shard in shards
    ]


def check_keys(config: FusedLlavaConfig, planned: list[PlannedShard], variant: str, folder: Path) -> None:
    """Refuse, before anything is written, a plan that is not exactly the fused model's tensors: the error lists the
    unexpected and the missing keys under their original names, and the tensors of the wrong shape."""
    unexpected, missing, wrong = plan_mismatches(config, planned)
    details = []
    if unexpected:
        details.append(f"{len(unexpected)} unexpected keys: {listed(original_key(n, variant) for n in unexpected)}")
    if missing:
        details.append(f"{len(missing)} missing keys: {listed(original_key(n, variant) for n in missing)}")
    if wrong:
        shapes = [f"{original_key(name, variant)} {shape} (expected {expected})" for name, shape, expected in wrong]
        details.append(f"{len(wrong)} tensors of the wrong shape: {listed(shapes)}")
    if details:
        raise ConversionError(
            f"{folder} does not match the {variant!r} layout its config.json describes ({VARIANT_ORIGINS[variant]}): "
            + "; ".join(details)
            + f". Supported layouts: {', '.join(VARIANTS)} (see 'The original format' in "
            "docs/conversion.md); a checkpoint of another LLaVA fork cannot be imported."
        )


def plan_conversion(shards, variant, keys, config, tower_folder, encoder, source_vocab, dtype, source: Path):
    """(planned shards, new tensor entries): the checkpoint's tensors, the tower's when the checkpoint lacks them,
    fresh fuser tensors for a plain LLaVA, the encoder's when the checkpoint holds no copy."""
    planned = plan_checkpoint(shards, variant, config, source_vocab, dtype)
    # A trained checkpoint may hold its tower, whole (CLIP) or as the official code runs it (Dense Connector's SigLIP
    # without its last layer): --vision-tower gives whatever it lacks.
    present = {entry.name for shard in planned for entry in shard.entries}
    tower_shards = read_shards(tower_folder, "--vision-tower", allow_pickles=True)
    planned += plan_vision_tower(tower_shards, dtype, config, present)
    new_tensors = []
    if variant == "llava":
        new_tensors += plan_new_tensors(new_fuser_tensors(config, seed=0), dtype)
    if encoder is not None and not any(key.startswith("model.sentence_embedder.") for key in keys):
        encoder_state = encoder.model.state_dict()
        new_tensors += plan_new_tensors({INSTRUCTION_ENCODER_PREFIX + k: v for k, v in encoder_state.items()}, dtype)
    planned = [shard for shard in planned if shard.entries]
    if new_tensors:
        planned.append(PlannedShard(new_tensors))
    check_keys(config, planned, variant, source)
    return planned, new_tensors


# ---------------------------------------------------------------------------------------------------------- write


# -------------------------------------------------------------------------------------------------------- convert


def require_vision_tower(vision_tower, raw: dict, keys, source: Path):
    if vision_tower is not None:
        return resolve_checkpoint(vision_tower, "--vision-tower", allow_pickles=True)
    where = (
        "its tower weights are inside, but not the tower's config and image processor"
        if any(key.startswith("model.vision_tower.vision_tower.") for key in keys)
        else "it holds no vision tower (no model.vision_tower.vision_tower.* weights)"
    )
    raise ConversionError(
        f"{source}: {where}. Its config names mm_vision_tower {raw.get('mm_vision_tower')!r}: pass --vision-tower "
        "with that CLIP model's folder or Hub id (e.g. --vision-tower openai/clip-vit-large-patch14-336)."
    )


@dataclass
class OriginalSource:
    """What the checkpoint says: its folder, config, shards (key -> shape in `keys`), variant and resulting fuser."""

    folder: Path
    repo_id: str | None
    raw: dict
    shards: list[StoredShard]
    keys: dict[str, list[int]]
    variant: str
    fuser_type: str

    @property
    def vocab_size(self) -> int:
        return self.keys[EMBED_KEY][0]


@dataclass
class FusedTarget:
    """What the result is made of besides the checkpoint's tensors: its config and processor parts."""

    config: FusedLlavaConfig
    text_config: object
    tokenizer: object
    image_processor: object
    tower_folder: Path
    tower_name: str
    encoder: SentenceEncoder | None


def read_source(input, fuser_type: str | None, instruction_encoder, fixed_layers: bool) -> OriginalSource:
    """Resolve and read the checkpoint, recognise its variant and check the fuser arguments against it."""
    folder, repo_id = resolve_checkpoint(input, "--input", allow_pickles=True)
    raw = read_original_config(folder)
    shards = read_shards(folder, "--input", allow_pickles=True)
    keys = {tensor.key: tensor.shape for shard in shards for tensor in shard.tensors}
    variant = detect_variant(raw, set(keys))
    fuser_type = fuser_for_variant(variant, fuser_type)
    trained = f" (the checkpoint was trained with {raw['sentence_embedder']})" if raw.get("sentence_embedder") else ""
    check_fuser_choice(fuser_type, instruction_encoder, trained)
    if variant != "llava" and fixed_layers:
        raise ConversionError(
            f"The layers of a trained {variant} checkpoint are fixed by its config: drop "
            "--fuser-layers and --fuser-groups."
        )
    if EMBED_KEY not in keys:
        raise ConversionError(f"{folder} has no {EMBED_KEY}: it is not a LLaVA checkpoint ({listed(keys)}).")
    return OriginalSource(folder, repo_id, raw, shards, keys, variant, fuser_type)


def build_target(source: OriginalSource, vision_tower, instruction_encoder, settings: dict, dtype) -> FusedTarget:
    """The fused config, tokenizer (with `<image>` and `<pad>`), image processor, tower and sentence encoder."""
    tower_folder, tower_repo = require_vision_tower(vision_tower, source.raw, source.keys, source.folder)
    siglip_named = (
        source.raw.get("mm_vision_tower")
        if source.variant == "dense-connector" and names_siglip_tower(source.raw)
        else None
    )
    vision_config, image_processor = read_vision_tower(tower_folder, str(vision_tower), siglip_named)
    image_processor.do_pad = source.raw.get("image_aspect_ratio") == "pad"
    encoder = load_sentence_encoder(instruction_encoder, dtype) if instruction_encoder is not None else None
    tokenizer = load_llm_tokenizer(source.folder)
    image_token_index, pad_token_id, new_vocab = add_llava_tokens(tokenizer, source.vocab_size)
    text_config = text_config_from_original(source.raw, new_vocab, pad_token_id)
    config = fused_config_from_original(
        source.raw,
        source.variant,
        source.keys,
        text_config,
        vision_config,
        image_token_index,
        source.fuser_type,
        encoder,
        settings,
    )
    source_dtype = source.raw.get("torch_dtype") or source.raw.get("dtype")
    config.dtype = dtype or (parse_dtype(source_dtype) if source_dtype in ("float32", "float16", "bfloat16") else None)
    return FusedTarget(
        config, text_config, tokenizer, image_processor, tower_folder, tower_repo or tower_folder.name, encoder
    )


def chat_template(variant: str, tokenizer) -> str:
    """The conversation the checkpoint was trained with: `llava_v1` for the LLaVA code and the MMFuser and IGVA forks;
    for Dense Connector, `vicuna_v1` or, with a Llama-3 LLM, `llama_3`."""
    if variant != "dense-connector":
        return LLAVA_V1_CHAT_TEMPLATE
    return LLAMA_3_CHAT_TEMPLATE if is_llama_3_tokenizer(tokenizer) else VICUNA_V1_CHAT_TEMPLATE


def original_card(
    source: OriginalSource, target: FusedTarget, model_id: str, origin: str | None, new_parameters: int, command: str
):
    license, license_link = source_license(source.folder)
    return render_model_card(
        target.config,
        model_id=model_id,
        base_model=origin,
        license=license,
        license_link=license_link,
        instruction_encoder=target.encoder.name if target.encoder else None,
        new_parameters=new_parameters,
        convert_command=command,
        imported_from=None if source.variant == "llava" else VARIANT_ORIGINS[source.variant],
    )


def convert_original_checkpoint(
    input: str | os.PathLike,
    output: str | os.PathLike,
    *,
    vision_tower: str | os.PathLike | None = None,
    instruction_encoder: str | os.PathLike | None = None,
    fuser_type: str | None = None,
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
):
    """Convert an original-format LLaVA checkpoint (plain, MMFuser, IGVA or Dense Connector) into a fused one; see
    the module docstring.

    Args:
        input: checkpoint folder or Hub repo id.
        output: folder to create: new, empty, or with `overwrite` an earlier fused LLaVA output.
        vision_tower: folder or Hub id of the CLIP (or, for Dense Connector, SigLIP) model named by the checkpoint's
            `mm_vision_tower` (config, image processor and the tower weights the checkpoint does not hold).
        instruction_encoder: sentence-transformers folder or Hub id of IGVA's sentence encoder.
        fuser_type: for a plain LLaVA, the fuser to add with parity initialisation (default `none`); for MMFuser and
            IGVA checkpoints it is fixed by the checkpoint.
        fuser_layers, fuser_layer_groups, fuser_options, dtype, push_to_hub, private, base_model, progress: as
            `convert_llava_checkpoint`.
        verify: check the result before moving it into place (see `verify.verify_against_llm`; Dense Connector:
            `verify.verify_dense_connector`, the whole image prompt against the source computation).

    Returns: a `ConversionResult`.
    """
    dtype = parse_dtype(dtype)
    if fuser_type is not None:
        fuser_class_or_error(fuser_type)
    settings = fuser_settings(fuser_layers, fuser_layer_groups, fuser_options)
    output = prepare_output(input, output, overwrite, push_to_hub)
    source = read_source(
        input, fuser_type, instruction_encoder, fixed_layers=fuser_layers is not None or fuser_layer_groups is not None
    )
    target = build_target(source, vision_tower, instruction_encoder, settings, dtype)
    planned, new_tensors = plan_conversion(
        source.shards,
        source.variant,
        source.keys,
        target.config,
        target.tower_folder,
        target.encoder,
        source.vocab_size,
        dtype,
        source.folder,
    )

    origin = base_model or source.repo_id
    # The fuser's size: fresh weights for a plain LLaVA, the trained ones for MMFuser and IGVA.
    new_parameters = count_parameters(planned, FUSER_PREFIX)
    command = card_command(
        origin or source.folder.name,
        vision_tower=target.tower_name,
        fuser_type=target.config.fuser_type if source.variant == "llava" and source.fuser_type != "none" else None,
        fuser_layers=fuser_layers,
        fuser_layer_groups=fuser_layer_groups,
        fuser_options=fuser_options,
        instruction_encoder=target.encoder.name if target.encoder else None,
        dtype=dtype,
    )
    card = original_card(
        source, target, output.name if push_to_hub is None else push_to_hub, origin, new_parameters, command
    )
    with staged_output(output, overwrite) as staging:
        total_bytes = write_shards(staging, planned, progress)
        write_companions(
            staging,
            source.folder,
            target.config,
            target.text_config,
            target.tokenizer,
            target.image_processor,
            target.encoder,
            card,
            chat_template(source.variant, target.tokenizer),
        )
        result = describe_result(
            output,
            target.config,
            planned,
            sum(len(shard.tensors) for shard in source.shards),
            len(new_tensors),
            new_parameters,
            total_bytes,
        )
        if verify:
            source_text_config = text_config_from_original(
                source.raw, source.vocab_size, source.raw.get("pad_token_id")
            )
            if source.variant == "dense-connector":
                result.verify_max_abs_diff, result.verify_tolerance = verify_dense_connector(
                    staging, source.folder, source.shards, source_text_config, dtype
                )
            else:
                result.verify_max_abs_diff, result.verify_tolerance = verify_against_llm(
                    staging, source.folder, source_text_config, dtype
                )
    origin = origin or source.folder.name
    return publish_result(result, push_to_hub, private, f"Import {source.variant} LLaVA from {origin}")
