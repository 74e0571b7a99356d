"""The fuser registry: every fuser type, and what it asks of the rest of the package.

A fuser class describes itself with the class attributes and class methods listed on [`FuserSpec`]. The
configuration (its fields, checks and recorded layers), `fusedvlm-convert` (`--fuser` choices, `--fuser-option`
names and help), the processor (whether it needs the instruction tokenizer), parity conversion, model cards, the tests'
and the benchmarks' fuser lists all read [`FUSERS`] and nothing else.

This module imports neither torch nor the fuser modules, so the configuration and the processor read the registry
without building a fuser. The built-in fusers are described here; `fusers.py` defines their modules as subclasses of
these descriptions (`MMFuser(MMFuserSpec, Fuser)`) and registers each under the same name, which replaces the
description with the module. A fuser defined elsewhere is one class: a subclass of `fusers.Fuser` decorated with
[`register_fuser`].
"""

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar


if TYPE_CHECKING:
    from transformers import PreTrainedConfig


@dataclass(frozen=True)
class FuserField:
    """A `FusedLlavaConfig` field that a fuser adds (an entry of its `config_fields`).

    Every config carries the fields of every registered fuser (`default` unless given), so that configs of one fuser
    type keep one set of keys. `fusedvlm-convert --fuser-option NAME=VALUE` sets them.

    default (`int`, `float`, `bool` or `str`):
        The value of a config that does not set the field.
    type (`type` or `tuple[type, ...]`):
        The accepted value types, checked on every assignment (`bool` is not an `int` here).
    help (`str`):
        What the field sets, for the converter's help and the config's documentation.
    minimum (`int` or `float`, *optional*):
        The smallest accepted value, checked for every config whichever fuser it uses.
    """

    default: Any
    type: type | tuple[type, ...]
    help: str
    minimum: int | float | None = None

    @property
    def types(self) -> tuple[type, ...]:
        """The accepted value types, as a tuple."""
        return self.type if isinstance(self.type, tuple) else (self.type,)

    def check_type(self, name: str, value: Any) -> None:
        """Raise a `TypeError` unless `value` has one of the field's types."""
        types = self.types
        if not isinstance(value, types) or (isinstance(value, bool) and bool not in types):
            expected = " | ".join(accepted.__name__ for accepted in types)
            raise TypeError(f"Field '{name}' expected {expected}, got {type(value).__name__} (value: {value!r})")

    def check_value(self, name: str, value: Any) -> None:
        """Raise a `ValueError` when `value` is below the field's `minimum`."""
        if self.minimum is not None and value < self.minimum:
            raise ValueError(f"{name} must be >= {self.minimum}, got {value}.")


class FuserSpec:
    """What a fuser class states, as class attributes and class methods of the config (a `FusedLlavaConfig`):

    - `reads_instruction`: whether it needs the instruction encoder's sentence embedding (the model then builds the
      instruction encoder, the converter asks for one, the processor needs the instruction tokenizer);
    - `layer_fields`: the config fields that name its layers (shown in model cards and converter help);
    - `config_fields`: the config fields it adds, `{name: FuserField}`;
    - `check_config(config)`: raises a `ValueError` for fields it cannot work with;
    - `layers_read(config)`: the hidden-state indices it reads one by one (the fusion step keeps these whole);
    - `layer_means_read(config)`: the groups of hidden-state indices it reads only through their mean over the group
      (`Fuser.layer_mean`); the fusion step adds each group up while the vision tower runs, so the group's layers are
      never held at once (a layer it also reads on its own belongs in `layers_read` too);
    - `projector_slots(config)`: `(base_slot, num_slots)`: its output is `num_slots` vision widths, and at
      initialisation the base layer's features occupy slot `base_slot`, which is where parity conversion puts the
      plain LLaVA projector's columns (the other columns start at zero); `base_slot` is `None` when no slot holds
      them, and such a fuser cannot be converted with parity;
    - `title`, `description`, `parity`: what model cards say of it;
    - `card_rows(config)`: the rows it adds to the model card's table, `(label, value)`; by default each of its
      `config_fields` under its name.
    """

    fuser_type: ClassVar[str]
    reads_instruction: ClassVar[bool] = False
    layer_fields: ClassVar[tuple[str, ...]] = ()
    config_fields: ClassVar[dict[str, FuserField]] = {}
    title: ClassVar[str]
    description: ClassVar[str]
    parity: ClassVar[str]

    @classmethod
    def check_config(cls, config: "PreTrainedConfig") -> None:
        pass

    @classmethod
    def layers_read(cls, config: "PreTrainedConfig") -> set[int]:
        return {config.base_layer}

    @classmethod
    def layer_means_read(cls, config: "PreTrainedConfig") -> list[list[int]]:
        return []

    @classmethod
    def projector_slots(cls, config: "PreTrainedConfig") -> tuple[int | None, int]:
        return 0, 1

    @classmethod
    def card_rows(cls, config: "PreTrainedConfig") -> list[tuple[str, Any]]:
        return [(f"`{name}`", getattr(config, name)) for name in cls.config_fields]


FUSERS: dict[str, type[FuserSpec]] = {}


def register_fuser(name: str):
    """Class decorator: registers a [`FuserSpec`] subclass (in practice a `fusers.Fuser` subclass) as
    `fuser_type=name`, replacing an earlier one of that name. Its `config_fields` may not redefine a field that
    another registered fuser declares differently."""

    def register(fuser_class: type[FuserSpec]) -> type[FuserSpec]:
        declared = fuser_fields(exclude=name)
        for field_name, field in fuser_class.config_fields.items():
            if field_name in declared and declared[field_name] != field:
                raise ValueError(
                    f"Fuser {name!r} declares the config field {field_name!r} differently from another registered "
                    f"fuser ({declared[field_name]}): reuse that field as it is, or give the new one another name."
                )
        fuser_class.fuser_type = name
        FUSERS[name] = fuser_class
        return fuser_class

    return register


def fuser_class(fuser_type: str) -> type[FuserSpec]:
    """The registered fuser class of `fuser_type`."""
    if fuser_type not in FUSERS:
        raise ValueError(
            f"Unknown fuser_type {fuser_type!r}: choose one of {', '.join(FUSERS)} (or register a new one with "
            "hf_fusedvlm.fusers.register_fuser)."
        )
    return FUSERS[fuser_type]


def fuser_fields(exclude: str | None = None) -> dict[str, FuserField]:
    """The config fields the registered fusers add (`config_fields`), in registration order (without those of the
    fuser named `exclude`)."""
    fields = {}
    for name, registered in FUSERS.items():
        if name != exclude:
            fields.update(registered.config_fields)
    return fields


def instruction_fusers() -> list[str]:
    """The registered fuser types that read the user's instruction."""
    return [name for name, registered in FUSERS.items() if registered.reads_instruction]


def check_fuser_layers(config: "PreTrainedConfig", minimum: int) -> None:
    """`fuser_layers` holds at least `minimum` layers, none twice."""
    if len(config.fuser_layers) < minimum:
        count = ("one", "two", "three")[minimum - 1] if minimum <= 3 else str(minimum)
        raise ValueError(
            f"fuser_type={config.fuser_type!r} needs at least {count} fuser_layers, got {config.fuser_layers}."
        )
    if len(set(config.fuser_layers)) != len(config.fuser_layers):
        raise ValueError(f"fuser_layers must not repeat a layer, got {config.fuser_layers}.")


# ------------------------------------------------------------------------------------------------ built-in fusers


@register_fuser("none")
class SingleLayerFuserSpec(FuserSpec):
    """`none`: the base layer alone, i.e. plain LLaVA."""

    title = "a single layer (plain LLaVA)"
    description = (
        "Only the base layer is projected, as in LLaVA: the parity baseline for comparisons with the other fusers."
    )
    parity = "nothing is added"


@register_fuser("concat")
class ConcatFuserSpec(FuserSpec):
    """`concat`: channel concatenation of `fuser_layers`, in order."""

    layer_fields = ("fuser_layers",)
    title = "channel concatenation of several layers"
    description = (
        "The patch features of the chosen layers are concatenated along channels (as transformers' "
        "`vision_feature_layer=[...]` and DenseConnector-SCI do) and projected."
    )
    parity = "the projector's input columns for the layers other than the base layer start at zero"

    @classmethod
    def check_config(cls, config):
        check_fuser_layers(config, minimum=2)

    @classmethod
    def layers_read(cls, config):
        return set(config.fuser_layers)

    @classmethod
    def projector_slots(cls, config):
        layers = config.fuser_layers
        return (layers.index(config.base_layer) if config.base_layer in layers else None), len(layers)


@register_fuser("average")
class AverageFuserSpec(FuserSpec):
    """`average`: uniform mean of the layer groups' patch features, concatenated after the base layer."""

    layer_fields = ("fuser_layer_groups",)
    title = "a uniform average of layer groups"
    description = (
        "The mean of the layer groups' patch features is concatenated after the base layer's patch features and "
        "projected (IGVA's pre-training mode, close to DenseConnector-DCI)."
    )
    parity = "the projector's new input columns, which read the averaged groups, start at zero"

    @classmethod
    def check_config(cls, config):
        groups = config.fuser_layer_groups
        if not groups or any(len(group) == 0 for group in groups):
            raise ValueError(f"fuser_layer_groups must be a non-empty list of non-empty groups, got {groups}.")
        if len({tuple(sorted(group)) for group in groups}) != len(groups):
            raise ValueError(f"fuser_layer_groups must not repeat a group, got {groups}.")

    @classmethod
    def layer_means_read(cls, config):
        return [list(group) for group in config.fuser_layer_groups]

    @classmethod
    def projector_slots(cls, config):
        return 0, 2  # base layer first, then the fused groups


# What IGVA's balance loss maximises (see `balance_loss_type`).
IGVA_BALANCE_LOSS_TYPES = ("sample_entropy", "batch_entropy")


@register_fuser("igva")
class IGVAFuserSpec(AverageFuserSpec):
    """`igva`: the instruction embedding and the groups' global features pick softmax weights over the groups."""

    reads_instruction = True
    config_fields = {
        "aggregator_hidden_size": FuserField(1024, int, "Width of IGVA's aggregator."),
        "aggregator_num_layers": FuserField(4, int, "Query-transformer blocks of IGVA's aggregator."),
        "aggregator_num_heads": FuserField(
            4, int, "Attention heads of IGVA's aggregator; must divide `aggregator_hidden_size`."
        ),
        "balance_loss_weight": FuserField(
            0.02,
            (float, int),
            "Weight of IGVA's balance loss (negative mean entropy of the group weights), added to the LM loss when "
            "`labels` are given. 0 disables it.",
            minimum=0,
        ),
        "balance_loss_type": FuserField(
            "sample_entropy",
            str,
            "What IGVA's balance loss maximises: `sample_entropy` (the official loss: the entropy of each image's "
            "group weights, averaged, which pulls every weight vector towards uniform) or `batch_entropy` (the "
            "entropy of the batch's mean weights, a mixture-of-experts load-balancing loss: every group must be used "
            "across the batch, but each image may pick one, so the weights can differ by instruction).",
        ),
    }
    title = "the instruction-guided vision aggregator of IGVA (Li, Zheng et al., arXiv 2501.08443)"
    description = (
        "A frozen sentence encoder embeds the user's instruction; with the CLS features of K groups of layers it "
        "gives softmax weights over the groups (on towers without a class token, such as SigLIP, each group's mean "
        "patch feature takes the CLS feature's place). The weighted mean of the groups' patch features is "
        "concatenated after the base layer's patch features and projected."
    )
    parity = "the projector's new input columns, which read the fused groups, start at zero"

    @classmethod
    def check_config(cls, config):
        super().check_config(config)
        if len(config.fuser_layer_groups) < 2:
            raise ValueError(
                f"igva weighs layer groups against each other, so it needs at least two fuser_layer_groups, got "
                f"{config.fuser_layer_groups} (a single group always gets weight 1: use fuser_type='average')."
            )
        for field in ("aggregator_hidden_size", "aggregator_num_layers", "aggregator_num_heads"):
            if getattr(config, field) < 1:
                raise ValueError(f"{field} must be at least 1, got {getattr(config, field)}.")
        if config.balance_loss_type not in IGVA_BALANCE_LOSS_TYPES:
            raise ValueError(
                f"balance_loss_type must be one of {', '.join(IGVA_BALANCE_LOSS_TYPES)}, got "
                f"{config.balance_loss_type!r}."
            )
        if config.aggregator_hidden_size % config.aggregator_num_heads:
            raise ValueError(
                f"aggregator_num_heads={config.aggregator_num_heads} must divide "
                f"aggregator_hidden_size={config.aggregator_hidden_size}."
            )


# Where MMFuser's sampling points start, as the ring radius of each head's first point (see `fuser_offset_init`).
MMFUSER_OFFSET_INITS = {"deformable_detr": 1, "from_query": 0}


@register_fuser("mmfuser")
class MMFuserSpec(FuserSpec):
    """`mmfuser`: the deepest selected layer queries the shallower ones through deformable cross-attention, then
    deformable self-attention; layer-scale `gamma1`/`gamma2` start at 0 so the block starts as the identity."""

    layer_fields = ("fuser_layers",)
    config_fields = {
        "fuser_num_heads": FuserField(
            16, int, "Heads of MMFuser's deformable attention; must divide the vision hidden size."
        ),
        "fuser_num_points": FuserField(4, int, "Sampling points per head and level of MMFuser's deformable attention."),
        "fuser_layer_norm_eps": FuserField(1e-6, float, "Epsilon of MMFuser's layer norms."),
        "fuser_offset_init": FuserField(
            "deformable_detr",
            str,
            "Where MMFuser's sampling points start: `deformable_detr` (the official initialisation: point p of a head "
            "p + 1 patches from its query, never on it) or `from_query` (point p at p patches, so every head's first "
            "point samples the query's own patch).",
        ),
    }
    title = "MMFuser (Cao et al., arXiv 2410.11829)"
    description = (
        "The deepest selected layer is the query of a deformable cross-attention that samples the shallower layers, "
        "followed by a deformable self-attention; the result is added to the query through per-channel layer-scale "
        "gammas, and the usual LLaVA MLP projector follows."
    )
    parity = "the layer-scale gammas start at 0, so the block returns its query layer, the base model's layer"

    @classmethod
    def check_config(cls, config):
        check_fuser_layers(config, minimum=2)
        if config.fuser_layers[-1] != config.base_layer:
            raise ValueError(
                f"mmfuser's query is the last of fuser_layers ({config.fuser_layers[-1]}) and must equal "
                f"vision_feature_layer ({config.base_layer}): reorder fuser_layers or set vision_feature_layer."
            )
        vision_size = config.vision_config.hidden_size
        if config.fuser_num_heads < 1 or vision_size % config.fuser_num_heads:
            raise ValueError(
                f"fuser_num_heads={config.fuser_num_heads} must divide the vision hidden size {vision_size}."
            )
        if config.fuser_num_points < 1:
            raise ValueError(f"fuser_num_points must be at least 1, got {config.fuser_num_points}.")
        if not config.fuser_layer_norm_eps > 0:
            raise ValueError(f"fuser_layer_norm_eps must be > 0, got {config.fuser_layer_norm_eps}.")
        if config.fuser_offset_init not in MMFUSER_OFFSET_INITS:
            raise ValueError(
                f"fuser_offset_init={config.fuser_offset_init!r}: choose one of {', '.join(MMFUSER_OFFSET_INITS)}."
            )

    @classmethod
    def layers_read(cls, config):
        return set(config.fuser_layers)


# The Dense Connector variants that keep LLaVA's image-token count; `sti` appends pooled tokens instead.
DENSE_CONNECTOR_TYPES = ("dci", "sci")
# The hidden states that Dense Connector's `sci` variant concatenates, fixed in the official code for every tower.
DENSE_CONNECTOR_SCI_LAYERS = (7, 15)


@register_fuser("dense_connector")
class DenseConnectorSpec(FuserSpec):
    """`dense_connector`: the base layer's patch features concatenated on channels with two more visual features
    (`dense_connector_type`): `dci`, the means of two contiguous ranges of hidden states; `sci`, hidden states 7 and
    15. No weights: the projector reads three vision widths.

    The ranges are those of the official code. It reads the hidden states of the tower it runs: all of CLIP's, but
    only the first `num_hidden_layers - 1` layers of SigLIP's, whose last layer it deletes. `dci` averages the first
    and the second half of that tower's hidden states but its last one (CLIP-L/336, 24 layers: 0..11 and 12..23;
    SigLIP-so400m, 27 layers: 0..12 and 13..25, its base layer being 26, the last layer the official tower runs).
    """

    config_fields = {
        "dense_connector_type": FuserField(
            "dci",
            str,
            "The Dense Connector variant: `dci` (the base layer with the means of the lower and the upper half of the "
            "tower's hidden states, as the released checkpoints) or `sci` (the base layer with hidden states 7 and "
            "15); `sti`, which adds image tokens, is refused.",
        ),
    }
    title = "the Dense Connector (Yao et al., NeurIPS 2024)"
    description = (
        "The base layer's patch features are concatenated along channels with two more visual features and projected: "
        "for `dci` the means of the lower and the upper half of the vision tower's hidden states, for `sci` hidden "
        "states 7 and 15 (Dense Connector's dense channel and sparse channel integration)."
    )
    parity = "the projector's new input columns, which read the two added features, start at zero"

    @staticmethod
    def official_tower_depth(config: "PreTrainedConfig") -> int:
        """The layers the official code runs: SigLIP towers without their last layer (the official SigLIP tower
        deletes it; the code recognises SigLIP by name, as here by model type), every layer of the others."""
        depth = config.vision_config.num_hidden_layers
        return depth - 1 if "siglip" in config.vision_config.model_type else depth

    @classmethod
    def dense_layer_groups(cls, config: "PreTrainedConfig") -> list[list[int]]:
        """The hidden states behind the two added features, per feature (averaged when a group holds several)."""
        if config.dense_connector_type == "sci":
            return [[layer] for layer in DENSE_CONNECTOR_SCI_LAYERS]
        depth = cls.official_tower_depth(config)
        return [list(range(depth // 2)), list(range(depth // 2, depth))]

    @classmethod
    def check_config(cls, config):
        variant = config.dense_connector_type
        if variant == "sti":
            raise ValueError(
                "dense_connector_type='sti' (Dense Connector's sparse token integration) appends pooled tokens of "
                "hidden states 7 and 15 to the image tokens, so an image fills more tokens than the vision tower has "
                "patches; fused LLaVA keeps LLaVA's image-token count and cannot run it: use 'dci' or 'sci'."
            )
        if variant not in DENSE_CONNECTOR_TYPES:
            raise ValueError(
                f"Unknown dense_connector_type {variant!r}: choose one of {', '.join(DENSE_CONNECTOR_TYPES)}."
            )
        has_class_token = config.vision_feature_select_strategy == "default"
        if "siglip" not in config.vision_config.model_type and not has_class_token:
            raise ValueError(
                "dense_connector drops the class token from every layer it reads, as the official code does on CLIP "
                "towers: set vision_feature_select_strategy='default'."
            )
        depth = cls.official_tower_depth(config)
        truncated = depth < config.vision_config.num_hidden_layers
        unused = " (the official code leaves its last layer out)" if truncated else ""
        if variant == "sci" and depth < max(DENSE_CONNECTOR_SCI_LAYERS):
            raise ValueError(
                f"dense_connector_type='sci' reads hidden states {DENSE_CONNECTOR_SCI_LAYERS}, but the vision tower "
                f"runs only {depth} layers{unused}."
            )
        if depth < 2:
            raise ValueError(
                f"dense_connector_type='dci' averages two ranges of hidden states, but the vision tower runs only "
                f"{depth} layer{unused}."
            )

    @classmethod
    def layer_means_read(cls, config):
        return cls.dense_layer_groups(config)

    @classmethod
    def projector_slots(cls, config):
        return 0, 3  # base layer first, then the two added features

    @classmethod
    def card_rows(cls, config):
        # The variant, and the hidden states it reads (which the config names only through the variant).
        return [
            ("variant (`dense_connector_type`)", config.dense_connector_type),
            ("added features (hidden states, each group averaged)", cls.dense_layer_groups(config)),
        ]
