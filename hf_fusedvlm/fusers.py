"""Multi-layer visual feature fusers and their registry.

Every fuser is called the same way: `fuser(vision_hidden_states, instruction_embeds=None)` where
`vision_hidden_states` is the vision tower's `hidden_states` tuple (index 0 = embeddings; entries the fuser does not
read may be `None`), each entry of shape `(num_images, num_tokens, vision_hidden_size)`, and `instruction_embeds` is
`(num_images, instruction_hidden_size)` for fusers that read the instruction. It returns a [`FuserOutput`] whose
`features` of shape `(num_images, num_patches, fuser.output_size)` go to the multimodal projector.

A fuser class describes itself to the rest of the package (configuration checks, the layers the vision tower records,
the projector's width, parity conversion, model cards): [`Fuser`] lists what a subclass states, and
[`register_fuser`] adds it to [`FUSERS`], the one table every other part reads.
"""

import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, ClassVar

import torch
import torch.nn.functional as F
from torch import nn
from transformers import initialization as init

from .deformable_attention import MultiScaleDeformableAttention, init_deformable_attention, reference_points


if TYPE_CHECKING:
    from .configuration_fused_llava import FusedLlavaConfig


@dataclass
class FuserOutput:
    """
    features (`torch.Tensor` of shape `(num_images, num_patches, output_size)`):
        Fused visual features, the projector's input.
    fusion_weights (`torch.Tensor` of shape `(num_images, num_groups)`, *optional*):
        Weights over the layer groups (`igva`, and the uniform ones of `average`).
    balance_loss (`torch.Tensor` of shape `()`, *optional*):
        `balance_loss_weight * mean(sum_k w_k log w_k)`, the negative mean entropy of the weights (`igva`).
    """

    features: torch.Tensor
    fusion_weights: torch.Tensor | None = None
    balance_loss: torch.Tensor | None = None


FUSERS: dict[str, type["Fuser"]] = {}


def register_fuser(name: str):
    """Class decorator: registers a [`Fuser`] subclass as `fuser_type=name` (replacing an earlier one of that name)."""

    def register(fuser_class: type[Fuser]) -> type[Fuser]:
        fuser_class.fuser_type = name
        FUSERS[name] = fuser_class
        return fuser_class

    return register


def fuser_class(fuser_type: str) -> type["Fuser"]:
    """The registered fuser class of `fuser_type`."""
    if fuser_type not in FUSERS:
        raise ValueError(
            f"Unknown fuser_type {fuser_type!r}: choose one of {', '.join(FUSERS)} (or register a new one with "
            "hf_fusedvlm.fusers.register_fuser)."
        )
    return FUSERS[fuser_type]


class Fuser(nn.Module):
    """Base class of the fusers: splits the class token from the patch tokens the way the LLaVA config says.

    A subclass states, as class attributes and class methods of the config:
    - `reads_instruction`: whether it needs the instruction encoder's sentence embedding;
    - `layer_fields`: the config fields that name its layers (shown in model cards and converter help);
    - `check_config(config)`: raises a `ValueError` for fields it cannot work with;
    - `layers_read(config)`: the hidden-state indices it reads (the vision tower records only these);
    - `projector_slots(config)`: `(base_slot, num_slots)`: its output is `num_slots` vision widths, and at
      initialisation the base layer's features occupy slot `base_slot`, which is where parity conversion puts the
      plain LLaVA projector's columns (the other columns start at zero); `base_slot` is `None` when no slot holds
      them, and such a fuser cannot be converted with parity;
    - `title`, `description`, `parity`: what model cards say of it.
    """

    fuser_type: ClassVar[str]
    reads_instruction: ClassVar[bool] = False
    layer_fields: ClassVar[tuple[str, ...]] = ()
    title: ClassVar[str]
    description: ClassVar[str]
    parity: ClassVar[str]

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__()
        # LLaVA's "default" strategy drops a leading CLS token; "full" keeps every token (towers without CLS).
        self.num_prefix_tokens = 1 if config.vision_feature_select_strategy == "default" else 0
        self.vision_hidden_size = config.vision_config.hidden_size
        self.output_size = self.vision_hidden_size * self.projector_slots(config)[1]

    @classmethod
    def check_config(cls, config: "FusedLlavaConfig") -> None:
        pass

    @classmethod
    def layers_read(cls, config: "FusedLlavaConfig") -> set[int]:
        return {config.base_layer}

    @classmethod
    def projector_slots(cls, config: "FusedLlavaConfig") -> tuple[int | None, int]:
        return 0, 1

    def patches(self, hidden_state: torch.Tensor) -> torch.Tensor:
        return hidden_state[:, self.num_prefix_tokens :]


def check_fuser_layers(config: "FusedLlavaConfig", minimum: int) -> None:
    """`fuser_layers` holds at least `minimum` layers, none twice."""
    if len(config.fuser_layers) < minimum:
        count = ("one", "two", "three")[minimum - 1] if minimum <= 3 else str(minimum)
        raise ValueError(
            f"fuser_type={config.fuser_type!r} needs at least {count} fuser_layers, got {config.fuser_layers}."
        )
    if len(set(config.fuser_layers)) != len(config.fuser_layers):
        raise ValueError(f"fuser_layers must not repeat a layer, got {config.fuser_layers}.")


@register_fuser("none")
class SingleLayerFuser(Fuser):
    """`none`: the base layer alone, i.e. plain LLaVA."""

    title = "a single layer (plain LLaVA)"
    description = "Only the base layer is projected, as in LLaVA: the parity baseline for comparisons with the other fusers."
    parity = "nothing is added"

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__(config)
        self.layer = config.base_layer

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        return FuserOutput(self.patches(vision_hidden_states[self.layer]))


@register_fuser("concat")
class ConcatFuser(Fuser):
    """`concat`: channel concatenation of `fuser_layers`, in order."""

    layer_fields = ("fuser_layers",)
    title = "channel concatenation of several layers"
    description = (
        "The patch features of the chosen layers are concatenated along channels (as transformers' "
        "`vision_feature_layer=[...]` and DenseConnector-SCI do) and projected."
    )
    parity = "the projector's input columns for the layers other than the base layer start at zero"

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__(config)
        self.layers = list(config.fuser_layers)

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

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        return FuserOutput(torch.cat([self.patches(vision_hidden_states[layer]) for layer in self.layers], dim=-1))


@register_fuser("average")
class AverageFuser(Fuser):
    """`average`: uniform mean of the layer groups' patch features, concatenated after the base layer."""

    layer_fields = ("fuser_layer_groups",)
    title = "a uniform average of layer groups"
    description = (
        "The mean of the layer groups' patch features is concatenated after the base layer's patch features and "
        "projected (IGVA's pre-training mode, close to DenseConnector-DCI)."
    )
    parity = "the projector's new input columns, which read the averaged groups, start at zero"

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__(config)
        self.base_layer = config.base_layer
        self.layer_groups = [list(group) for group in config.fuser_layer_groups]

    @classmethod
    def check_config(cls, config):
        groups = config.fuser_layer_groups
        if not groups or any(len(group) == 0 for group in groups):
            raise ValueError(f"fuser_layer_groups must be a non-empty list of non-empty groups, got {groups}.")
        if len({tuple(sorted(group)) for group in groups}) != len(groups):
            raise ValueError(f"fuser_layer_groups must not repeat a group, got {groups}.")

    @classmethod
    def layers_read(cls, config):
        return {layer for group in config.fuser_layer_groups for layer in group} | {config.base_layer}

    @classmethod
    def projector_slots(cls, config):
        return 0, 2  # base layer first, then the fused groups

    def group_means(self, vision_hidden_states) -> torch.Tensor:
        """Per group, the mean over its layers of the full sequence: `(num_images, num_groups, num_tokens, dim)`."""
        return torch.stack(
            [torch.stack([vision_hidden_states[layer] for layer in group]).mean(0) for group in self.layer_groups],
            dim=1,
        )

    def group_weights(self, groups: torch.Tensor, instruction_embeds) -> torch.Tensor:
        num_images, num_groups = groups.shape[:2]
        return groups.new_full((num_images, num_groups), 1.0 / num_groups)

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        groups = self.group_means(vision_hidden_states)
        weights = self.group_weights(groups, instruction_embeds)
        group_patches = groups[:, :, self.num_prefix_tokens :]
        fused = torch.einsum("bk,bkpd->bpd", weights.to(group_patches.dtype), group_patches)
        base = self.patches(vision_hidden_states[self.base_layer])
        return FuserOutput(torch.cat([base, fused], dim=-1), fusion_weights=weights)


class GroupCrossAttention(nn.Module):
    """Multi-head cross-attention with `nn.MultiheadAttention`'s parameters and math (packed `in_proj_weight` /
    `in_proj_bias`, `out_proj`), so official IGVA weights load unchanged and give the same results.

    Written out because `nn.MultiheadAttention` reads `out_proj.weight` directly, which breaks under runtimes that
    replace linear layers (vLLM packs them and empties `.weight` on CPU): here `out_proj` is only ever called.
    """

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * hidden_size, hidden_size))
        self.in_proj_bias = nn.Parameter(torch.empty(3 * hidden_size))
        self.out_proj = nn.Linear(hidden_size, hidden_size)

    def _reset_parameters(self) -> None:
        """`nn.MultiheadAttention`'s own initialisation (same name, so code that resets modules treats both alike)."""
        init.xavier_uniform_(self.in_proj_weight)
        init.zeros_(self.in_proj_bias)
        init.zeros_(self.out_proj.bias)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        """query `(batch, num_queries, hidden)`, key_value `(batch, num_keys, hidden)` -> `(batch, num_queries, hidden)`."""
        batch, num_queries, hidden = query.shape
        weight_q, weight_k, weight_v = self.in_proj_weight.chunk(3)
        bias_q, bias_k, bias_v = self.in_proj_bias.chunk(3)

        def heads(states: torch.Tensor) -> torch.Tensor:
            return states.view(batch, -1, self.num_heads, hidden // self.num_heads).transpose(1, 2)

        attended = F.scaled_dot_product_attention(
            heads(F.linear(query, weight_q, bias_q)),
            heads(F.linear(key_value, weight_k, bias_k)),
            heads(F.linear(key_value, weight_v, bias_v)),
        )
        return self.out_proj(attended.transpose(1, 2).reshape(batch, num_queries, hidden))


class QueryTransformerBlock(nn.Module):
    """IGVA's block: the instruction token attends to the group tokens; post-norm residuals; ReLU FFN."""

    def __init__(self, hidden_size: int, num_heads: int):
        super().__init__()
        self.cross_attention = GroupCrossAttention(hidden_size, num_heads)
        self.ffn = nn.Sequential(nn.Linear(hidden_size, hidden_size), nn.ReLU(), nn.Linear(hidden_size, hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size)
        self.norm2 = nn.LayerNorm(hidden_size)

    def forward(self, query: torch.Tensor, key_value: torch.Tensor) -> torch.Tensor:
        """query `(batch, 1, hidden)`, key_value `(batch, num_groups, hidden)` -> `(batch, 1, hidden)`."""
        attended = self.cross_attention(query, key_value)
        hidden = self.norm1(attended + query)
        return self.norm2(self.ffn(hidden) + hidden)


@register_fuser("igva")
class IGVAFuser(AverageFuser):
    """`igva`: the instruction embedding and the groups' global features pick softmax weights over the groups."""

    reads_instruction = True
    title = "the instruction-guided vision aggregator of IGVA (Li, Zheng et al., arXiv 2501.08443)"
    description = (
        "A frozen sentence encoder embeds the user's instruction; with the CLS features of K groups of layers it "
        "gives softmax weights over the groups (on towers without a class token, such as SigLIP, each group's mean "
        "patch feature takes the CLS feature's place). The weighted mean of the groups' patch features is "
        "concatenated after the base layer's patch features and projected."
    )
    parity = "the projector's new input columns, which read the fused groups, start at zero"

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__(config)
        hidden_size = config.aggregator_hidden_size
        self.sentence_proj = nn.Linear(config.instruction_encoder_config.hidden_size, hidden_size)
        self.cls_proj = nn.Linear(self.vision_hidden_size, hidden_size)
        self.blocks = nn.ModuleList(
            [QueryTransformerBlock(hidden_size, config.aggregator_num_heads) for _ in range(config.aggregator_num_layers)]
        )
        self.linear = nn.Linear(hidden_size, len(self.layer_groups))
        self.balance_loss_weight = config.balance_loss_weight

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
        if config.aggregator_hidden_size % config.aggregator_num_heads:
            raise ValueError(
                f"aggregator_num_heads={config.aggregator_num_heads} must divide "
                f"aggregator_hidden_size={config.aggregator_hidden_size}."
            )

    def group_weights(self, groups: torch.Tensor, instruction_embeds) -> torch.Tensor:
        if instruction_embeds is None:
            raise ValueError(
                "The igva fuser needs instruction embeddings: pass instruction_input_ids (and "
                "instruction_attention_mask), as FusedLlavaProcessor produces them."
            )
        # Towers without a CLS token (SigLIP) use the mean patch feature as the group's global feature.
        global_features = groups[:, :, 0] if self.num_prefix_tokens else groups.mean(2)
        key_value = self.cls_proj(global_features)
        query = self.sentence_proj(instruction_embeds.to(self.sentence_proj.weight.dtype)).unsqueeze(1)
        for block in self.blocks:
            query = block(query, key_value)
        return self.linear(query.squeeze(1)).softmax(-1)

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        output = super().forward(vision_hidden_states, instruction_embeds)
        weights = output.fusion_weights
        output.balance_loss = self.balance_loss_weight * (weights * weights.clamp_min(1e-12).log()).sum(-1).mean()
        return output


@register_fuser("mmfuser")
class MMFuser(Fuser):
    """`mmfuser`: the deepest selected layer queries the shallower ones through deformable cross-attention, then
    deformable self-attention; layer-scale `gamma1`/`gamma2` start at 0 so the block starts as the identity."""

    layer_fields = ("fuser_layers",)
    title = "MMFuser (Cao et al., arXiv 2410.11829)"
    description = (
        "The deepest selected layer is the query of a deformable cross-attention that samples the shallower layers, "
        "followed by a deformable self-attention; the result is added to the query through per-channel layer-scale "
        "gammas, and the usual LLaVA MLP projector follows."
    )
    parity = "the layer-scale gammas start at 0, so the block returns its query layer, the base model's layer"

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__(config)
        hidden_size, eps = self.vision_hidden_size, config.fuser_layer_norm_eps
        self.layers = list(config.fuser_layers)
        num_levels = len(self.layers) - 1
        self.cross_attn = MultiScaleDeformableAttention(
            hidden_size, config.fuser_num_heads, num_levels, config.fuser_num_points
        )
        self.query_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.feat_norm = nn.LayerNorm(hidden_size, eps=eps)
        self.gamma1 = nn.Parameter(torch.zeros(hidden_size))
        self.norm1 = nn.LayerNorm(hidden_size, eps=eps)
        self.self_attn = MultiScaleDeformableAttention(hidden_size, config.fuser_num_heads, 1, config.fuser_num_points)
        self.gamma2 = nn.Parameter(torch.zeros(hidden_size))

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
            raise ValueError(f"fuser_num_heads={config.fuser_num_heads} must divide the vision hidden size {vision_size}.")
        if config.fuser_num_points < 1:
            raise ValueError(f"fuser_num_points must be at least 1, got {config.fuser_num_points}.")
        if not config.fuser_layer_norm_eps > 0:
            raise ValueError(f"fuser_layer_norm_eps must be > 0, got {config.fuser_layer_norm_eps}.")

    @classmethod
    def layers_read(cls, config):
        return set(config.fuser_layers)

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        *level_layers, query_layer = self.layers
        query = self.patches(vision_hidden_states[query_layer])
        side = math.isqrt(query.shape[1])
        if side * side != query.shape[1]:
            raise ValueError(
                f"mmfuser needs a square grid of patch tokens, got {query.shape[1]} tokens per image: with a CLS token "
                "use vision_feature_select_strategy='default', without one 'full'."
            )
        grid = (side, side)
        levels = torch.cat([self.patches(vision_hidden_states[layer]) for layer in level_layers], dim=1)
        reference = reference_points(side, side, device=query.device)
        attended = self.cross_attn(self.query_norm(query), reference, self.feat_norm(levels), [grid] * len(level_layers))
        normed = self.norm1(attended)
        attended = attended + self.gamma2 * self.self_attn(normed, reference, normed, [grid])
        return FuserOutput(query + self.gamma1 * attended)


# The Dense Connector variants that keep LLaVA's image-token count; `sti` appends pooled tokens instead.
DENSE_CONNECTOR_TYPES = ("dci", "sci")
# The hidden states that Dense Connector's `sci` variant concatenates, fixed in the official code for every tower.
DENSE_CONNECTOR_SCI_LAYERS = (7, 15)


@register_fuser("dense_connector")
class DenseConnectorFuser(Fuser):
    """`dense_connector`: the base layer's patch features concatenated on channels with two more visual features
    (`dense_connector_type`): `dci`, the means of two contiguous ranges of hidden states; `sci`, hidden states 7 and
    15. No weights: the projector reads three vision widths.

    The ranges are those of the official code. It reads the hidden states of the tower it runs: all of CLIP's, but
    only the first `num_hidden_layers - 1` layers of SigLIP's, whose last layer it deletes. `dci` averages the first
    and the second half of that tower's hidden states but its last one (CLIP-L/336, 24 layers: 0..11 and 12..23;
    SigLIP-so400m, 27 layers: 0..12 and 13..25, its base layer being 26, the last layer the official tower runs).
    """

    layer_fields = ("dense_connector_type",)
    title = "the Dense Connector (Yao et al., NeurIPS 2024)"
    description = (
        "The base layer's patch features are concatenated along channels with two more visual features and projected: "
        "for `dci` the means of the lower and the upper half of the vision tower's hidden states, for `sci` hidden "
        "states 7 and 15 (Dense Connector's dense channel and sparse channel integration)."
    )
    parity = "the projector's new input columns, which read the two added features, start at zero"

    def __init__(self, config: "FusedLlavaConfig"):
        super().__init__(config)
        self.base_layer = config.base_layer
        self.layer_groups = self.dense_layer_groups(config)

    @staticmethod
    def official_tower_depth(config: "FusedLlavaConfig") -> int:
        """The layers the official code runs: SigLIP towers without their last layer (the official SigLIP tower
        deletes it; the code recognises SigLIP by name, as here by model type), every layer of the others."""
        depth = config.vision_config.num_hidden_layers
        return depth - 1 if "siglip" in config.vision_config.model_type else depth

    @classmethod
    def dense_layer_groups(cls, config: "FusedLlavaConfig") -> list[list[int]]:
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
    def layers_read(cls, config):
        return {layer for group in cls.dense_layer_groups(config) for layer in group} | {config.base_layer}

    @classmethod
    def projector_slots(cls, config):
        return 0, 3  # base layer first, then the two added features

    def forward(self, vision_hidden_states, instruction_embeds=None) -> FuserOutput:
        added = [
            torch.stack([self.patches(vision_hidden_states[layer]) for layer in group]).mean(0)
            for group in self.layer_groups
        ]
        return FuserOutput(torch.cat([self.patches(vision_hidden_states[self.base_layer]), *added], dim=-1))


def init_fuser_weights(module: nn.Module) -> None:
    """Fuser-specific initialisation of one module (other modules keep the default Linear/LayerNorm init)."""
    if isinstance(module, MultiScaleDeformableAttention):
        init_deformable_attention(module)
    elif isinstance(module, GroupCrossAttention):
        module._reset_parameters()
    elif isinstance(module, MMFuser):
        # Layer scales at 0: a fresh MMFuser returns its query layer unchanged.
        init.zeros_(module.gamma1)
        init.zeros_(module.gamma2)


def build_fuser(config: "FusedLlavaConfig") -> Fuser:
    """The fuser of `config.fuser_type`, with default PyTorch init plus `init_fuser_weights` (gammas 0)."""
    fuser = fuser_class(config.fuser_type)(config)
    fuser.apply(init_fuser_weights)
    return fuser
