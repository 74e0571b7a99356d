"""The original LLaVA format (haotian-liu/LLaVA, LLaVA-1.5 and LLaVA-1.6, and its forks, among them the official
MMFuser and IGVA code): see `original_layout` for the variants and the config, `original_processor` for the tokenizer
and image processor.

The vision tower is named by the config's `mm_vision_tower` and only stored in the checkpoint when it was trained
(`model.vision_tower.vision_tower.*`); its config, image processor and, otherwise, its weights come from
`--vision-tower`. plan: read the shards (safetensors bytes stay on disk, `.bin` shards are memory-mapped), rename the
keys of the variant, grow the embeddings for `<image>` and `<pad>`, widen the projector for a parity fuser, add the
tower and the new tensors, and check the plan against the fused model. write: shards and companions into a staging
folder. verify (optional): text-only logits against the source LLM. Then the folder moves into place."""

from pathlib import Path

import torch

from ..configuration_fused_llava import FusedLlavaConfig
from ..parity import PROJECTOR_INPUT_KEY, new_fuser_tensors
from .checkpoint import resolve_checkpoint
from .errors import ConversionError, listed
from .original_layout import (
    CLIP_TEXT_PARTS,
    EMBEDDING_KEYS,
    RECOMPUTED_BUFFER,
    TOWER_PREFIX,
    VARIANTS,
    check_original_config,
    detect_variant,
    fused_config_from_original,
    fuser_for_variant,
    map_original_key,
    names_siglip_tower,
    original_key,
    text_config_from_original,
)
from .original_processor import (
    CHATML_DIRECT_CHAT_TEMPLATE,
    LLAMA_3_CHAT_TEMPLATE,
    LLAVA_V1_CHAT_TEMPLATE,
    MISTRAL_INSTRUCT_CHAT_TEMPLATE,
    VICUNA_V1_CHAT_TEMPLATE,
    add_llava_tokens,
    any_resolution_image_processor,
    is_chatml_tokenizer,
    is_llama_3_tokenizer,
    load_llm_tokenizer,
    read_vision_tower,
    write_companions,
)
from .request import Plan, Request, Source, check_fuser_choice, fuser_class_or_error
from .shards import StoredShard, known_keys, read_shards
from .verify import verify_against_llm, verify_dense_connector
from .writing import PlannedShard, new_tensors_shard, plan_projector_input, plan_renamed_shards, plan_tensor


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
    widens = VARIANTS[variant].plain and fuser_class_or_error(config.fuser_type).projector_slots(config)[1] > 1

    def plan_entry(name, tensor):
        if name in EMBEDDING_KEYS and tensor.shape[0] == source_vocab and new_vocab > source_vocab:
            return plan_tensor(name, tensor, dtype, [new_vocab, *tensor.shape[1:]], append_mean_rows(new_vocab))
        if name == PROJECTOR_INPUT_KEY and widens:
            return plan_projector_input(name, tensor, config, dtype)
        return plan_tensor(name, tensor, dtype)

    return plan_renamed_shards(shards, lambda key: map_original_key(key, variant), plan_entry)


def plan_vision_tower(
    shards: list[StoredShard], dtype, config: FusedLlavaConfig, present: set[str]
) -> list[PlannedShard]:
    """The vision tensors of a CLIP or SigLIP checkpoint (a full CLIPModel / SiglipModel, or its vision model with or
    without the `vision_model.` prefix of older transformers) as the fused tower, leaving out the tensors already in
    `present` (the checkpoint's own copy of the tower, which wins) and a pooling head the fused tower does not have."""
    has_head = getattr(config.vision_config, "vision_use_head", False)

    def tower_name(key: str) -> str | None:
        name = TOWER_PREFIX + key.removeprefix("vision_model.")
        if key.split(".")[0] in CLIP_TEXT_PARTS or RECOMPUTED_BUFFER.search(key) or name in present:
            return None
        return name if has_head or not name.startswith(TOWER_PREFIX + "head.") else None

    return plan_renamed_shards(shards, tower_name, lambda name, tensor: plan_tensor(name, tensor, dtype))


# ------------------------------------------------------------------------------------------------ the format


def require_vision_tower(vision_tower, raw: dict, keys, source: Path):
    if vision_tower is not None:
        return
    where = (
        "its tower weights are inside, but not the tower's config and image processor"
        if any(key.startswith("model.vision_tower.vision_tower.") for key in keys)
        else "it holds no vision tower (no model.vision_tower.vision_tower.* weights)"
    )
    raise ConversionError(
        f"{source}: {where}. Its config names mm_vision_tower {raw.get('mm_vision_tower')!r}: pass --vision-tower "
        "with that CLIP model's folder or Hub id (e.g. --vision-tower openai/clip-vit-large-patch14-336)."
    )


def chat_template(variant: str, tokenizer, raw: dict) -> str:
    """The conversation the checkpoint was trained with: `llava_v1` for the LLaVA code and the MMFuser and IGVA forks;
    for LLaVA-1.6, the one the LLaVA code picks for its LLM: `mistral_instruct` for Mistral, `chatml_direct` for the
    34B's ChatML tokenizer, `llava_v1` for Vicuna; for Dense Connector, `vicuna_v1` or, with a Llama-3 LLM,
    `llama_3`, with any resolution too."""
    if variant == "llava-next":
        if raw.get("model_type") == "llava_mistral":
            return MISTRAL_INSTRUCT_CHAT_TEMPLATE
        return CHATML_DIRECT_CHAT_TEMPLATE if is_chatml_tokenizer(tokenizer) else LLAVA_V1_CHAT_TEMPLATE
    if not VARIANTS[variant].dense_connector:
        return LLAVA_V1_CHAT_TEMPLATE
    return LLAMA_3_CHAT_TEMPLATE if is_llama_3_tokenizer(tokenizer) else VICUNA_V1_CHAT_TEMPLATE


def fused_config(source: Source, request: Request, keys: dict, tower: Path, vocab=None) -> tuple:
    """(variant, fused config, image processor) of the checkpoint with the tower in `tower` (its JSON files are
    enough) and the request; `vocab` is (image token id, pad token id, vocabulary size) once the tokenizer is read,
    else the config's vocabulary stands in for it."""
    raw = source.raw
    variant = detect_variant(raw, set(keys))
    fuser_type = fuser_for_variant(variant, request.fuser_type)
    trained = f" (the checkpoint was trained with {raw['sentence_embedder']})" if raw.get("sentence_embedder") else ""
    check_fuser_choice(fuser_type, request.encoder, trained)
    if not VARIANTS[variant].plain and request.fixes_layers:
        raise ConversionError(
            f"The layers of a trained {variant} checkpoint are fixed by its config: drop "
            "--fuser-layers and --fuser-groups."
        )
    require_vision_tower(request.vision_tower, raw, keys, source.folder)
    dense = VARIANTS[variant].dense_connector
    siglip_named = raw.get("mm_vision_tower") if dense and names_siglip_tower(raw) else None
    vision_config, image_processor = read_vision_tower(tower, str(request.vision_tower), siglip_named)
    # Before the tokenizer is read, `<image>` and `<pad>` stand after the config's vocabulary.
    source_vocab = raw.get("vocab_size", 32000)
    image_token_index, pad_token_id, vocab_size = vocab or (source_vocab, source_vocab + 1, source_vocab + 64)
    text_config = text_config_from_original(raw, vocab_size, pad_token_id)
    config = fused_config_from_original(
        raw, variant, keys, text_config, vision_config, image_token_index, fuser_type, request.encoder, request.settings
    )
    if VARIANTS[variant].any_resolution:
        image_processor = any_resolution_image_processor(image_processor, config.image_grid_pinpoints)
    else:
        image_processor.do_pad = raw.get("image_aspect_ratio") == "pad"
    source_dtype = raw.get("torch_dtype") or raw.get("dtype")
    config.dtype = request.dtype or (
        getattr(torch, source_dtype) if source_dtype in ("float32", "float16", "bfloat16") else None
    )
    return variant, config, image_processor


def check(source: Source, request: Request) -> FusedLlavaConfig:
    """The fused config from the checkpoint's config.json (and its keys as far as known), the tower's JSON files and
    the request, before any weights are downloaded."""
    check_original_config(source.raw, source.folder)
    keys = known_keys(source.folder, allow_pickles=True)
    require_vision_tower(request.vision_tower, source.raw, keys, source.folder)
    tower, _ = resolve_checkpoint(request.vision_tower, "--vision-tower", metadata_only=True)
    return fused_config(source, request, keys, tower)[1]


def plan(source: Source, request: Request) -> Plan:
    """The checkpoint's tensors renamed (embeddings grown for `<image>` and `<pad>`), the tower's where the
    checkpoint lacks them, fresh fuser tensors for a plain LLaVA, the encoder's when the checkpoint holds no copy."""
    shards = read_shards(source.folder, "--input", allow_pickles=True)
    keys = {tensor.key: tensor.shape for shard in shards for tensor in shard.tensors}
    if EMBED_KEY not in keys:
        raise ConversionError(f"{source.folder} has no {EMBED_KEY}: it is not a LLaVA checkpoint ({listed(keys)}).")
    tower, tower_repo = resolve_checkpoint(request.vision_tower, "--vision-tower", allow_pickles=True)
    tokenizer = load_llm_tokenizer(source.folder)
    source_vocab = keys[EMBED_KEY][0]
    vocab = add_llava_tokens(tokenizer, source_vocab)
    variant, config, image_processor = fused_config(source, request, keys, tower, vocab)
    text_config = config.text_config

    planned = plan_checkpoint(shards, variant, config, source_vocab, request.dtype)
    # A trained checkpoint may hold its tower, whole (CLIP) or as the official code runs it (Dense Connector's SigLIP
    # without its last layer): --vision-tower gives whatever it lacks.
    present = {entry.name for shard in planned for entry in shard.entries}
    tower_shards = read_shards(tower, "--vision-tower", allow_pickles=True)
    planned += plan_vision_tower(tower_shards, request.dtype, config, present)
    encoder = request.encoder
    new_tensors = new_fuser_tensors(config, seed=0) if VARIANTS[variant].plain else {}
    if encoder is not None and not any(key.startswith("model.sentence_embedder.") for key in keys):
        new_tensors.update(encoder.fused_tensors)
    planned = [shard for shard in planned if shard.entries] + new_tensors_shard(new_tensors, request.dtype)

    source_text_config = text_config_from_original(source.raw, source_vocab, source.raw.get("pad_token_id"))

    def verify(folder: Path) -> tuple[float, float]:
        if VARIANTS[variant].dense_connector:
            return verify_dense_connector(folder, source.folder, shards, source_text_config, request.dtype)
        return verify_against_llm(folder, source.folder, source_text_config, request.dtype)

    template = chat_template(variant, tokenizer, source.raw)
    return Plan(
        config=config,
        shards=planned,
        num_source_tensors=len(keys),
        num_new_tensors=len(new_tensors),
        source_name=lambda name: original_key(name, variant),
        layout=f"the {variant!r} layout its config.json describes ({VARIANTS[variant].origin})",
        fix=f"Supported layouts: {', '.join(VARIANTS)} (see 'The original format' in docs/conversion.md); a "
        "checkpoint of another LLaVA fork cannot be imported.",
        write_companions=lambda folder: write_companions(
            folder, source.folder, config, text_config, tokenizer, image_processor, encoder, template
        ),
        verify=verify,
        commit_message=f"Import {variant} LLaVA",
        card_fuser=config.fuser_type if VARIANTS[variant].plain and config.fuser_type != "none" else None,
        card_vision_tower=tower_repo or tower.name,
        imported_from=None if VARIANTS[variant].plain else VARIANTS[variant].origin,
    )
