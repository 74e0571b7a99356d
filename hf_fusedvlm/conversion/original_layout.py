"""The original LLaVA layout: what haotian-liu/LLaVA and its forks (the official MMFuser and IGVA code) save, and how
its config becomes a fused config.

A flat Llama (or Mistral) config with `mm_*` keys: `model_type` `llava` for liuhaotian/llava-v1.5-* and v1.6 (they
predate the `llava_llama` rename), `llava_llama` / `llava_mistral` for code trained later. Variants, recognised from
the config and the keys (`VARIANTS`):

- `llava`: plain LLaVA-1.5 (`mm_projector_type` `mlp2x_gelu`, projector `model.mm_projector.0/.2`).
- `llava-next`: plain LLaVA-1.6 (`image_aspect_ratio` `anyres`, `image_grid_pinpoints`, `mm_patch_merge_type`
  `spatial_unpad`, the learned `model.image_newline`), a `FusedLlavaNextConfig`; the pinpoints, `(width, height)` pairs
  for the original code, are written `(height, width)` as transformers reads them, in the same order.
- `mmfuser`: MMFuser (`mm_vision_select_layer` such as `"list-22/-17/-12/-7/-2"`); the deformable block
  `model.mm_projector.0.*` becomes `model.fuser.*`, the MLP linears `model.mm_projector.1/.3` the projector.
- `igva`: IGVA (`vit_aggregate_groups`, `vit_base_layer`, `aggregate_by_average: false`, `aggregator_*`,
  `sentence_embed_dim`); `model.vision_aggregator.*` becomes `model.fuser.*` (its `transformers.N` blocks
  `blocks.N`), the frozen sentence encoder `model.sentence_embedder.0.auto_model.*` `model.instruction_encoder.*`.
- `igva-average`: IGVA's pre-training mode (`aggregate_by_average: true`), the `average` fuser.
- `dense-connector`: Dense Connector (`mm_dense_connector_type` `dci` or `sci`, `mm_hidden_size` three tower widths),
  the `dense_connector` fuser; the projector keeps its names. Its released checkpoints read a SigLIP tower, which the
  official code recognises by name (`siglip` in `mm_vision_tower`) and runs without its last layer.
- `dense-connector-anyres`: Dense Connector with LLaVA-1.6's any-resolution settings (HuanjinYao/DenseConnector-v1.5-
  SigLIP-7B-AnyRes): the official code runs the tower and the Dense Connector on every crop (the base view and the
  tiles), projects them and packs them as LLaVA-1.6 does, so it becomes a `FusedLlavaNextConfig` with the
  `dense_connector` fuser; the tiles are the tower's 384 px crops, the pinpoints multiples of 384.
"""

import ast
import re
from dataclasses import dataclass
from pathlib import Path

from transformers import CLIPVisionConfig, LlavaConfig, LlavaNextConfig
from transformers.models.auto.configuration_auto import CONFIG_MAPPING

from ..configuration_fused_llava import FusedLlavaConfig
from ..parity import FUSER_PREFIX, INSTRUCTION_ENCODER_PREFIX, fused_config_from_llava
from .errors import ConversionError
from .sentence_encoder import SentenceEncoder


# The Dense Connector variants the official code runs (`mm_dense_connector_type`); other values mean none.
DENSE_CONNECTOR_TYPES = ("sti", "sci", "dci")
# The original model types and the LLM config each one extends.
ORIGINAL_MODEL_TYPES = {"llava": "llama", "llava_llama": "llama", "llava_mistral": "mistral"}
# LLaVA-1.6's image settings: the only any-resolution packing transformers' LLaVA-NeXT computes (tiles unpadded,
# each row of features ended by `image_newline`, the base view first).
ANY_RESOLUTION = "anyres"
NEXT_MERGE_TYPE = "spatial_unpad"
LLAVA_1_6_PINPOINTS = "[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]"
# MSCrossAttnBlock of the official MMFuser code hard-codes these (and LayerNorm eps 1e-6).
MMFUSER_NUM_HEADS = 16
MMFUSER_NUM_POINTS = 4

# Buffers that older transformers saved and current ones recompute (rotary frequencies, position ids).
RECOMPUTED_BUFFER = re.compile(r"(^|\.)(rotary_emb\.inv_freq|position_ids)$")
_LLM_RENAMES = (
    ("model.vision_tower.vision_tower.vision_model.", "model.vision_tower."),
    ("model.embed_tokens.", "model.language_model.embed_tokens."),
    ("model.layers.", "model.language_model.layers."),
    ("model.norm.", "model.language_model.norm."),
    ("lm_head.", "lm_head."),
)
_MLP_PROJECTOR = (
    ("model.mm_projector.0.", "model.multi_modal_projector.linear_1."),
    ("model.mm_projector.2.", "model.multi_modal_projector.linear_2."),
)
_NEWLINE = (("model.image_newline", "model.image_newline"),)


@dataclass(frozen=True)
class Variant:
    """One layout of the original format: the code it comes from, the fuser it converts to (None for plain LLaVA:
    the user's choice, default none, starting as an exact no-op), its key renames ((original prefix, fused prefix),
    the first matching prefix wins), and whether it becomes a fused LLaVA-NeXT (any resolution) and is a Dense
    Connector model."""

    origin: str
    renames: tuple[tuple[str, str], ...]
    fuser: str | None = None
    any_resolution: bool = False
    dense_connector: bool = False

    @property
    def plain(self) -> bool:
        return self.fuser is None


VARIANTS = {
    "llava": Variant("haotian-liu/LLaVA", _LLM_RENAMES + _MLP_PROJECTOR),
    "llava-next": Variant(
        "haotian-liu/LLaVA, LLaVA-1.6 any resolution", _LLM_RENAMES + _MLP_PROJECTOR + _NEWLINE, any_resolution=True
    ),
    "mmfuser": Variant(
        "the official MMFuser code (yuecao0119/MMFuser)",
        _LLM_RENAMES
        + (
            ("model.mm_projector.0.", FUSER_PREFIX),
            ("model.mm_projector.1.", "model.multi_modal_projector.linear_1."),
            ("model.mm_projector.3.", "model.multi_modal_projector.linear_2."),
        ),
        "mmfuser",
    ),
    "igva": Variant(
        "the official IGVA code (YiZheng-zy/IGVA)",
        _LLM_RENAMES
        + _MLP_PROJECTOR
        + (
            ("model.vision_aggregator.transformers.", FUSER_PREFIX + "blocks."),
            ("model.vision_aggregator.", FUSER_PREFIX),
            ("model.sentence_embedder.0.auto_model.", INSTRUCTION_ENCODER_PREFIX),
        ),
        "igva",
    ),
    "igva-average": Variant(
        "the official IGVA code (YiZheng-zy/IGVA), pre-training mode", _LLM_RENAMES + _MLP_PROJECTOR, "average"
    ),
    "dense-connector": Variant(
        "the official Dense Connector code (HJYao00/DenseConnector)",
        _LLM_RENAMES + _MLP_PROJECTOR,
        "dense_connector",
        dense_connector=True,
    ),
    "dense-connector-anyres": Variant(
        "the official Dense Connector code (HJYao00/DenseConnector), any resolution",
        _LLM_RENAMES + _MLP_PROJECTOR + _NEWLINE,
        "dense_connector",
        any_resolution=True,
        dense_connector=True,
    ),
}
# The variants whose code also runs any-resolution inputs, and the variant each is then.
FUSION_ANY_RESOLUTION = {"llava": "llava-next", "dense-connector": "dense-connector-anyres"}
TOWER_PREFIX = "model.vision_tower."
# The parts of a full CLIPModel / SiglipModel checkpoint that the vision tower does not use.
CLIP_TEXT_PARTS = ("text_model", "text_projection", "visual_projection", "logit_scale", "logit_bias")
EMBEDDING_KEYS = ("model.language_model.embed_tokens.weight", "lm_head.weight")


def check_original_config(raw: dict, folder: Path) -> None:
    """Refuse, by name, the original-format configs fused LLaVA cannot import."""
    model_type = raw.get("model_type")
    if model_type not in ORIGINAL_MODEL_TYPES:
        raise ConversionError(
            f"{folder} has model_type {model_type!r}: original-format LLaVA checkpoints with a "
            f"{', '.join(ORIGINAL_MODEL_TYPES)} language model can be imported (LLaVA-MPT and others cannot)."
        )
    unsupported = []
    if raw.get("mm_use_im_start_end") or raw.get("mm_use_im_patch_token"):
        unsupported.append("image start/end or patch tokens (mm_use_im_start_end / mm_use_im_patch_token)")
    if raw.get("mm_projector_type", "linear") != "mlp2x_gelu":
        unsupported.append(f"mm_projector_type {raw.get('mm_projector_type', 'linear')!r} (only mlp2x_gelu)")
    if unsupported:
        raise ConversionError(f"{folder} uses {'; '.join(unsupported)}, which fused LLaVA does not support.")
    if is_any_resolution(raw):
        check_any_resolution(raw, folder)


def is_any_resolution(raw: dict) -> bool:
    """Whether the config asks for LLaVA-NeXT style inputs: several crops per image or a spatial packing."""
    aspect = raw.get("image_aspect_ratio")
    several_crops = isinstance(aspect, str) and aspect.startswith(ANY_RESOLUTION)
    return several_crops or raw.get("mm_patch_merge_type", "flat") != "flat"


def check_any_resolution(raw: dict, folder: Path) -> None:
    """Refuse, by name, any-resolution settings other than LLaVA-1.6's (`anyres`, `spatial_unpad`, pinpoints)."""
    aspect, merge = raw.get("image_aspect_ratio"), raw.get("mm_patch_merge_type", "flat")
    if aspect != ANY_RESOLUTION or merge != NEXT_MERGE_TYPE:
        raise ConversionError(
            f"{folder} has image_aspect_ratio {aspect!r} with mm_patch_merge_type {merge!r}: fused LLaVA imports "
            f"LLaVA-1.5 ('flat', image_aspect_ratio 'pad' or none) and LLaVA-1.6 ({NEXT_MERGE_TYPE!r} with "
            f"{ANY_RESOLUTION!r}: tiles unpadded, each row ended by image_newline, as transformers' LLaVA-NeXT packs "
            "them); other packings ('spatial', crops flattened with 'flat', 'maxpool2x2', 'anyres_max_N') cannot be "
            "imported."
        )
    select_feature = raw.get("mm_vision_select_feature", "patch")
    if select_feature != "patch":
        raise ConversionError(
            "LLaVA-1.6 packs each crop's patches as a square grid (the original code asserts it): "
            f"mm_vision_select_feature must be 'patch', not {select_feature!r}."
        )
    original_pinpoints(raw)


def original_pinpoints(raw: dict) -> list[list[int]]:
    """`image_grid_pinpoints` as the original code reads it: a list (or its Python literal) of (width, height)."""
    value = raw.get("image_grid_pinpoints")
    if value is None:
        raise ConversionError(
            "The config has image_aspect_ratio 'anyres' but no image_grid_pinpoints, the tile layouts the model was "
            f"trained with: add them to config.json (liuhaotian/llava-v1.6-* list {LLAVA_1_6_PINPOINTS})."
        )
    try:
        pinpoints = ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError):
        pinpoints = None
    if (
        not isinstance(pinpoints, (list, tuple))
        or not pinpoints
        or not all(
            isinstance(pair, (list, tuple))
            and len(pair) == 2
            and all(isinstance(side, int) and not isinstance(side, bool) and side > 0 for side in pair)
            for pair in pinpoints
        )
    ):
        raise ConversionError(
            f"image_grid_pinpoints {value!r} is not a list of (width, height) pairs in pixels such as "
            f"{LLAVA_1_6_PINPOINTS} (the LLaVA-NeXT repository's '(1x1),...,(6x6)' grids are not LLaVA-1.6's)."
        )
    return [list(pair) for pair in pinpoints]


def next_pinpoints(raw: dict, image_size: int) -> list[list[int]]:
    """The pinpoints as transformers reads them, (height, width), from the original (width, height) pairs, in the
    same order (the first of two equally good layouts wins in both codes)."""
    pinpoints = original_pinpoints(raw)
    misfits = [pair for pair in pinpoints if pair[0] % image_size or pair[1] % image_size]
    if misfits:
        raise ConversionError(
            f"image_grid_pinpoints {misfits} are not multiples of the vision tower's image size ({image_size}): each "
            f"tile is one {image_size} px crop of the tower, so the pinpoints and the tower must be those the "
            f"checkpoint was trained with (its config names {raw.get('mm_vision_tower')}; LLaVA-1.6's CLIP-L tiles "
            "are 336 px, Dense Connector's SigLIP-so400m tiles 384 px)."
        )
    return [[height, width] for width, height in pinpoints]


def parse_select_layer(value) -> int | list[int]:
    """`mm_vision_select_layer` as the original code parses it: an int, a list, or a string such as `"-2"` or
    MMFuser's `"list-22/-17/-12/-7/-2"`."""
    if isinstance(value, bool):
        raise ConversionError(f"mm_vision_select_layer {value!r} is not a layer index.")
    if isinstance(value, int) or (isinstance(value, list) and all(isinstance(v, int) for v in value)):
        return value
    if isinstance(value, str):
        try:
            if value.startswith("list"):
                return [int(part) for part in value[4:].split("/")]
            return int(value)
        except ValueError:
            pass
    raise ConversionError(
        f"mm_vision_select_layer {value!r} is neither a layer index such as -2 nor a list such as "
        '"list-22/-17/-12/-7/-2".'
    )


def parse_groups_literal(value) -> list[list[int]]:
    """IGVA's `vit_aggregate_groups`, a Python literal string such as `"[[1,2,3],[4,5,6]]"` (or already a list)."""
    try:
        groups = ast.literal_eval(value) if isinstance(value, str) else value
    except (ValueError, SyntaxError) as error:
        raise ConversionError(f"vit_aggregate_groups {value!r} is not a list of lists of layer indices.") from error
    if not isinstance(groups, (list, tuple)) or not all(
        isinstance(group, (list, tuple)) and group and all(isinstance(layer, int) for layer in group)
        for group in groups
    ):
        raise ConversionError(f"vit_aggregate_groups {value!r} is not a list of non-empty lists of layer indices.")
    return [list(group) for group in groups]


def detect_fusion_variant(raw: dict, keys: set[str]) -> str:
    """Which fusion code (or plain LLaVA) an original checkpoint comes from, from its config and keys."""
    # The IGVA code writes vit_aggregate_groups (None when unused) into every config it saves.
    if raw.get("vit_aggregate_groups") is not None or any(key.startswith("model.vision_aggregator.") for key in keys):
        return "igva-average" if raw.get("aggregate_by_average") else "igva"
    # The Dense Connector code writes mm_dense_connector_type into every config; only these values switch it on.
    if raw.get("mm_dense_connector_type") in DENSE_CONNECTOR_TYPES:
        return "dense-connector"
    layers = parse_select_layer(raw.get("mm_vision_select_layer", -2))
    if isinstance(layers, list) or any(key.startswith("model.mm_projector.0.cross_attn.") for key in keys):
        return "mmfuser"
    return "llava"


def detect_variant(raw: dict, keys: set[str]) -> str:
    """Which of `VARIANTS` an original checkpoint is, from its config and keys."""
    variant = detect_fusion_variant(raw, keys)
    if not is_any_resolution(raw):
        return variant
    if variant not in FUSION_ANY_RESOLUTION:
        raise ConversionError(
            f"The checkpoint is a trained {variant} model ({VARIANTS[variant].origin}) with any-resolution inputs "
            f"(image_aspect_ratio {raw.get('image_aspect_ratio')!r}): only plain LLaVA-1.6 and Dense Connector "
            f"checkpoints import as LLaVA-NeXT; {variant} checkpoints import in the LLaVA-1.5 layout "
            "(image_aspect_ratio 'pad')."
        )
    return FUSION_ANY_RESOLUTION[variant]


def map_original_key(key: str, variant: str) -> str | None:
    """The fused checkpoint name of an original key of `variant`; None for buffers current transformers recompute;
    the key itself (unexpected) when no rename applies."""
    if RECOMPUTED_BUFFER.search(key):
        return None
    for prefix, replacement in VARIANTS[variant].renames:
        if key.startswith(prefix):
            return replacement + key[len(prefix) :]
    return key


def original_key(name: str, variant: str) -> str:
    """The original key a fused parameter name comes from (for error messages)."""
    for prefix, replacement in VARIANTS[variant].renames:
        if name.startswith(replacement):
            return prefix + name[len(replacement) :]
    return name


def text_config_from_original(raw: dict, vocab_size: int, pad_token_id: int):
    """The LLM config inside a flat original config (its `mm_*`, IGVA and trainer keys left out)."""
    config_class = CONFIG_MAPPING[ORIGINAL_MODEL_TYPES[raw["model_type"]]]
    # Legacy spellings that the config classes still convert (rope_theta -> rope_parameters, torch_dtype -> dtype).
    allowed = set(config_class().to_dict()) | {"rope_theta", "rope_scaling", "torch_dtype"}
    allowed -= {"model_type", "architectures", "transformers_version", "_name_or_path", "auto_map"}
    fields = {key: value for key, value in raw.items() if key in allowed}
    fields.update(vocab_size=vocab_size, pad_token_id=pad_token_id)
    return config_class(**fields)


def fused_config_from_original(
    raw: dict,
    variant: str,
    keys: dict[str, list[int]],
    text_config,
    vision_config: CLIPVisionConfig,
    image_token_index: int,
    fuser_type: str,
    encoder: SentenceEncoder | None,
    fuser_kwargs: dict,
) -> FusedLlavaConfig:
    """The fused config of an original checkpoint of `variant`; `keys` maps its keys to shapes."""
    select_feature = raw.get("mm_vision_select_feature", "patch")
    if select_feature not in ("patch", "cls_patch"):
        raise ConversionError(f"mm_vision_select_feature {select_feature!r} is not one of 'patch', 'cls_patch'.")
    strategy = "default" if select_feature == "patch" else "full"
    fuser_kwargs = dict(fuser_kwargs)
    layers = parse_select_layer(raw.get("mm_vision_select_layer", -2))
    if VARIANTS[variant].plain:
        if isinstance(layers, list):
            raise ConversionError(f"A plain LLaVA reads one vision layer, mm_vision_select_layer is {layers}.")
        base_layer = layers
    elif variant == "mmfuser":
        if strategy != "default":
            raise ConversionError("MMFuser needs square patch grids: mm_vision_select_feature must be 'patch'.")
        if not isinstance(layers, list):
            raise ConversionError(
                f"An MMFuser checkpoint selects several layers (mm_vision_select_layer such as "
                f'"list-22/-17/-12/-7/-2"), got {layers!r}.'
            )
        heads = fuser_kwargs.setdefault("fuser_num_heads", MMFUSER_NUM_HEADS)
        points = fuser_kwargs.setdefault("fuser_num_points", MMFUSER_NUM_POINTS)
        shape = keys.get("model.mm_projector.0.cross_attn.attention_weights.weight")
        num_levels = shape[0] // (heads * points) if shape else len(layers) - 1
        if len(layers) < num_levels + 1:
            raise ConversionError(
                f"The MMFuser block reads {num_levels} levels and a query layer, but mm_vision_select_layer lists "
                f"only {len(layers)} layers ({layers})."
            )
        # The official block reads the first num_levels selected layers as levels and the last as the query.
        fuser_kwargs["fuser_layers"] = layers[:num_levels] + [layers[-1]]
        fuser_kwargs.setdefault("fuser_layer_norm_eps", 1e-6)
        base_layer = layers[-1]
    elif VARIANTS[variant].dense_connector:
        base_layer, strategy = dense_connector_feature_selection(raw, layers, strategy, vision_config)
        fuser_kwargs["dense_connector_type"] = raw["mm_dense_connector_type"]
    else:
        # IGVA always drops the CLS token of the base layer and reads the groups' CLS rows itself.
        strategy = "default"
        base_layer = raw.get("vit_base_layer", -2)
        fuser_kwargs["fuser_layer_groups"] = parse_groups_literal(raw.get("vit_aggregate_groups"))
        if variant == "igva":
            for option, name in (
                ("aggregator_hidden_size", "aggregator_hidden_dim"),
                ("aggregator_num_layers", "aggregator_num_transformers"),
                ("aggregator_num_heads", "aggregator_num_heads"),
            ):
                if raw.get(name) is None:
                    raise ConversionError(f"The IGVA config lacks {name}: the aggregator's size cannot be known.")
                fuser_kwargs[option] = raw[name]
            embed_dim = raw.get("sentence_embed_dim")
            if embed_dim is not None and embed_dim != encoder.config.hidden_size:
                raise ConversionError(
                    f"The checkpoint was trained with {embed_dim}-d sentence embeddings (sentence_embed_dim) but "
                    f"--instruction-encoder gives {encoder.config.hidden_size}-d ones: give the sentence "
                    f"encoder it was trained with ({raw.get('sentence_embedder')})."
                )
    if encoder is not None:
        fuser_kwargs = {**encoder.config_fields, **fuser_kwargs}
    num_patches = (vision_config.image_size // vision_config.patch_size) ** 2
    has_class_token = not is_siglip_config(vision_config)
    fields = dict(
        text_config=text_config,
        vision_config=vision_config,
        image_token_index=image_token_index,
        image_seq_length=num_patches + (1 if strategy == "full" and has_class_token else 0),
        vision_feature_layer=base_layer,
        vision_feature_select_strategy=strategy,
        projector_hidden_act="gelu",
        multimodal_projector_bias=True,
    )
    if VARIANTS[variant].any_resolution:
        pinpoints = next_pinpoints(raw, vision_config.image_size)
        llava_config = LlavaNextConfig(**fields, image_grid_pinpoints=pinpoints)
    else:
        llava_config = LlavaConfig(**fields)
    try:
        config = fused_config_from_llava(
            llava_config,
            fuser_type,
            instruction_encoder_config=encoder.config if encoder else None,
            **fuser_kwargs,
        )
    except ValueError as error:
        raise ConversionError(f"The checkpoint's fusion settings do not fit its vision tower: {error}") from error
    config.pad_token_id = text_config.pad_token_id
    return config


def is_siglip_config(vision_config) -> bool:
    return vision_config.model_type in ("siglip", "siglip_vision_model")


def names_siglip_tower(raw: dict) -> bool:
    """Whether the official Dense Connector code builds its SigLIP tower for this config: it tests the tower's name."""
    return "siglip" in str(raw.get("mm_vision_tower", "")).lower()


def dense_connector_feature_selection(raw: dict, layers, strategy: str, vision_config) -> tuple[int, str]:
    """(base layer, select strategy) of a Dense Connector checkpoint, once its variant and tower width are checked.

    The official SigLIP tower deletes its last layer and reads the last one left, whatever `mm_vision_select_layer`
    says, so the base layer is the tower's layer `num_hidden_layers - 1`; a CLIP tower reads `mm_vision_select_layer`
    as in LLaVA."""
    variant = raw["mm_dense_connector_type"]
    if variant == "sti":
        raise ConversionError(
            "The checkpoint uses Dense Connector's sparse token integration (mm_dense_connector_type 'sti'), which "
            "appends pooled tokens to each image's tokens; a fused LLaVA keeps LLaVA's image-token count, so only "
            "'dci' and 'sci' checkpoints (the released ones are 'dci') can be imported."
        )
    width = vision_config.hidden_size
    if raw.get("mm_hidden_size") != 3 * width:
        raise ConversionError(
            f"The checkpoint's projector reads mm_hidden_size={raw.get('mm_hidden_size')} channels, but Dense "
            f"Connector '{variant}' gives three widths of the --vision-tower ({width}), i.e. {3 * width}: give the "
            f"vision tower it was trained with ({raw.get('mm_vision_tower')})."
        )
    if isinstance(layers, list):
        raise ConversionError(f"A Dense Connector checkpoint reads one base layer, mm_vision_select_layer is {layers}.")
    if is_siglip_config(vision_config):
        return vision_config.num_hidden_layers - 1, "full"
    return layers, strategy


def fuser_for_variant(variant: str, fuser_type: str | None) -> str:
    """The fuser of the result: fixed by a trained fusion checkpoint, the user's choice (default none) for LLaVA."""
    if VARIANTS[variant].plain:
        return fuser_type or "none"
    fixed = VARIANTS[variant].fuser
    if fuser_type not in (None, fixed):
        raise ConversionError(
            f"The checkpoint is a trained {variant} model ({VARIANTS[variant].origin}): it converts to fuser {fixed}, "
            f"not {fuser_type}. Drop --fuser."
        )
    return fixed
