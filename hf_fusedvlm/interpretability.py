"""Where the fusers look: IGVA's layer-group weights per instruction and MMFuser's deformable sampling, with plots.

The functions take a fused model (`FusedLlavaForConditionalGeneration` or `FusedLlavaModel`, installed or loaded
with `trust_remote_code=True`) and run it as `generate()` would; they change nothing in it. The plots need
matplotlib (`pip install hf-fusedvlm[plot]`); the rest of the module does not.
"""

import inspect
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch


@dataclass
class MMFuserSampling:
    """Where MMFuser's cross-attention samples the shallower layers ("levels") for each query patch.

    locations (`torch.Tensor` of shape `(num_images, num_queries, num_heads, num_levels, num_points, 2)`):
        Sampling points, (x, y) in [0, 1] over the patch grid.
    attention_weights (`torch.Tensor` of shape `(num_images, num_queries, num_heads, num_levels, num_points)`):
        Weight of each sampling point; per head a softmax over levels and points.
    reference (`torch.Tensor` of shape `(num_queries, 2)`):
        Each query's own patch centre, (x, y) in [0, 1]; queries are the patches in row-major order.
    grid_size (`tuple[int, int]`):
        The patch grid `(height, width)`.
    level_layers (`list[int]`):
        The vision hidden-state index of each level (the query layer is the last of `fuser_layers`).
    level_share (`torch.Tensor` of shape `(num_images, num_queries, num_levels)`):
        Each level's share of the query's attention, averaged over heads (sums to 1 over levels).
    mean_offset (`torch.Tensor` of shape `(num_images, num_queries, num_levels, 2)`):
        Attention-weighted mean (dx, dy) from the query's patch to its sampling points on each level, in patches.
    mean_distance (`torch.Tensor` of shape `(num_images, num_queries, num_levels)`):
        Attention-weighted mean distance from the query's patch to its sampling points on each level, in patches.
    """

    locations: torch.Tensor
    attention_weights: torch.Tensor
    reference: torch.Tensor
    grid_size: tuple[int, int]
    level_layers: list[int]
    level_share: torch.Tensor
    mean_offset: torch.Tensor
    mean_distance: torch.Tensor


def _fused_model(model, fuser_types: tuple[str, ...], function: str):
    """The `FusedLlavaModel` inside `model`, after checking its fuser type."""
    base = getattr(model, "model", model)
    fuser_type = getattr(base.config, "fuser_type", None)
    if fuser_type not in fuser_types or not hasattr(base, "fuser"):
        raise ValueError(
            f"{function} needs a fused LLaVA with fuser_type in {list(fuser_types)}, got "
            f"{type(model).__name__} with fuser_type={fuser_type!r}."
        )
    return base


@torch.no_grad()
def igva_group_weights(model, processor, images, instructions: list[str]) -> torch.Tensor:
    """IGVA's weights over the layer groups, one row per instruction.

    Args:
        model: an `igva` fused LLaVA.
        processor: its `FusedLlavaProcessor`, with the instruction tokenizer.
        images: one image, used with every instruction, or a list of one image per instruction.
        instructions: the instructions, as the user would ask them.

    Returns:
        `(len(instructions), num_groups)` float32 weights on the CPU; each row sums to 1. The groups are
        `model.config.fuser_layer_groups`, in order.
    """
    base = _fused_model(model, ("igva",), "igva_group_weights")
    instructions = list(instructions)
    images = list(images) if isinstance(images, (list, tuple)) else [images] * len(instructions)
    if len(images) != len(instructions):
        raise ValueError(
            f"Got {len(images)} images for {len(instructions)} instructions: pass one image, or one per instruction."
        )
    inputs = processor(
        images=images, text=[processor.image_token] * len(instructions), instructions=instructions, return_tensors="pt"
    )
    device = next(base.parameters()).device
    features = base.get_image_features(
        inputs["pixel_values"].to(device, base.vision_tower.dtype),
        instruction_input_ids=inputs["instruction_input_ids"].to(device),
        instruction_attention_mask=inputs["instruction_attention_mask"].to(device),
        return_dict=True,
    )
    return features.fusion_weights.float().cpu()


@torch.no_grad()
def mmfuser_sampling(model, pixel_values: torch.Tensor) -> MMFuserSampling:
    """Where each query patch of an `mmfuser` model samples the shallower layers.

    The vision tower and fuser run as in `generate()`; the cross-attention's own inputs are captured on the way and
    its `sampling` method (the one its forward uses) gives the locations and weights.

    Args:
        model: an `mmfuser` fused LLaVA.
        pixel_values: `(num_images, channels, height, width)`, as the processor returns them.

    Returns:
        [`MMFuserSampling`] on the CPU, in float32.
    """
    base = _fused_model(model, ("mmfuser",), "mmfuser_sampling")
    attention = base.fuser.cross_attn
    captured = {}

    def keep_inputs(module, args, kwargs):
        captured.update(inspect.signature(module.forward).bind(*args, **kwargs).arguments)

    handle = attention.register_forward_pre_hook(keep_inputs, with_kwargs=True)
    try:
        base.get_image_features(pixel_values.to(next(base.parameters()).device, base.vision_tower.dtype))
    finally:
        handle.remove()
    locations, weights = attention.sampling(captured["query"], captured["reference"], captured["spatial_shapes"])
    height, width = captured["spatial_shapes"][0]
    reference = captured["reference"].float().cpu()
    locations, weights = locations.cpu(), weights.cpu()
    offsets = (locations - reference[None, :, None, None, None]) * torch.tensor([width, height])
    mass = weights.sum(dim=(2, 4))  # (images, queries, levels)
    return MMFuserSampling(
        locations=locations,
        attention_weights=weights,
        reference=reference,
        grid_size=(height, width),
        level_layers=list(base.config.fuser_layers[:-1]),
        level_share=mass / attention.num_heads,
        mean_offset=(weights.unsqueeze(-1) * offsets).sum(dim=(2, 4)) / mass.unsqueeze(-1),
        mean_distance=(weights * offsets.norm(dim=-1)).sum(dim=(2, 4)) / mass,
    )


def group_labels(config) -> list[str]:
    """Readable names of `config.fuser_layer_groups`, e.g. `"layers 1-6"`."""
    return [
        f"layers {group[0]}-{group[-1]}" if len(group) > 1 else f"layer {group[0]}"
        for group in config.fuser_layer_groups
    ]


def _figure(function: str, **kwargs):
    try:
        from matplotlib.figure import Figure
    except ImportError as error:
        raise ImportError(f"{function} needs matplotlib: pip install hf-fusedvlm[plot]") from error
    # A bare Figure draws with the Agg canvas: no pyplot state and no display needed.
    return Figure(**kwargs)


def plot_fusion_weights(weights, instructions: list[str], path, group_labels: list[str] | None = None) -> Path:
    """Writes a PNG heatmap of layer-group weights, one row per instruction, each cell annotated.

    Args:
        weights: `(num_instructions, num_groups)`, e.g. from [`igva_group_weights`].
        instructions: the row labels (long ones are shortened).
        path: where to write the PNG.
        group_labels: the column labels, e.g. `group_labels(model.config)`; default "group 1", "group 2", ...

    Returns:
        The path written.
    """
    weights = torch.as_tensor(weights, dtype=torch.float32).cpu().numpy()
    num_rows, num_groups = weights.shape
    if len(instructions) != num_rows:
        raise ValueError(f"Got {len(instructions)} instructions for {num_rows} rows of weights.")
    group_labels = group_labels or [f"group {index + 1}" for index in range(num_groups)]
    figure = _figure(
        "plot_fusion_weights", figsize=(2.0 + 1.1 * num_groups, 1.2 + 0.45 * num_rows), layout="constrained"
    )
    axes = figure.add_subplot()
    image = axes.imshow(weights, cmap="viridis", vmin=0.0, vmax=max(float(weights.max()), 1e-6), aspect="auto")
    for row in range(num_rows):
        for column in range(num_groups):
            value = weights[row, column]
            axes.text(
                column,
                row,
                f"{value:.2f}",
                ha="center",
                va="center",
                color="black" if value > 0.6 * weights.max() else "white",
                fontsize=8,
            )
    axes.set_xticks(range(num_groups), group_labels, rotation=30, ha="right")
    axes.set_yticks(range(num_rows), [text if len(text) <= 48 else text[:45] + "..." for text in instructions])
    axes.set_title("IGVA layer-group weights per instruction", fontsize=10)
    figure.colorbar(image, ax=axes, label="weight")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return Path(path)


def _as_picture(image) -> np.ndarray:
    """A PIL image, an `(H, W[, 3])` array or a `(3, H, W)` tensor (e.g. normalised `pixel_values[0]`) as an
    `(H, W, 3)` float array in [0, 1]."""
    if isinstance(image, torch.Tensor):
        image = image.detach().float().cpu()
        if image.ndim == 3 and image.shape[0] in (1, 3):
            image = image.permute(1, 2, 0)
        image = image.numpy()
    picture = np.asarray(image, dtype=np.float32)
    if picture.ndim == 2:
        picture = np.repeat(picture[..., None], 3, axis=-1)
    low, high = picture.min(), picture.max()
    return (picture - low) / (high - low) if high > low else np.zeros_like(picture)


def plot_sampling(sampling: MMFuserSampling, image, path, query: int | None = None, image_index: int = 0) -> Path:
    """Writes a PNG of one query's sampling points over the image: a colour per level, dot area proportional to the
    point's attention weight, the query's own patch starred and the patch grid drawn.

    Args:
        sampling: from [`mmfuser_sampling`].
        image: the image the model saw, stretched over the patch grid (pass `pixel_values[image_index]` for an exact
            match with what the tower saw; a PIL image or an array works too).
        path: where to write the PNG.
        query: the query patch (row-major index); default the centre patch.
        image_index: which image of the batch.

    Returns:
        The path written.
    """
    height, width = sampling.grid_size
    num_queries = sampling.reference.shape[0]
    query = (height // 2) * width + width // 2 if query is None else query
    if not 0 <= query < num_queries:
        raise ValueError(f"query must be a patch index in [0, {num_queries}), got {query}.")
    figure = _figure("plot_sampling", figsize=(6.4, 5.6), layout="constrained")
    axes = figure.add_subplot()
    axes.imshow(_as_picture(image), extent=(0, width, height, 0), interpolation="bilinear")
    axes.set_xticks(range(width + 1), minor=True)
    axes.set_yticks(range(height + 1), minor=True)
    axes.grid(which="minor", color="white", linewidth=0.4, alpha=0.5)
    colours = ["#e41a1c", "#377eb8", "#4daf4a", "#ff7f00", "#984ea3", "#a65628", "#f781bf", "#999999"]
    locations = sampling.locations[image_index, query] * torch.tensor([width, height])  # (heads, levels, points, 2)
    weights = sampling.attention_weights[image_index, query]
    scale = 600.0 / weights.max().clamp_min(1e-12)
    for level, layer in enumerate(sampling.level_layers):
        points = locations[:, level].reshape(-1, 2)
        share = sampling.level_share[image_index, query, level]
        axes.scatter(
            points[:, 0],
            points[:, 1],
            s=(weights[:, level].reshape(-1) * scale).clamp_min(4),
            color=colours[level % len(colours)],
            alpha=0.75,
            edgecolors="black",
            linewidths=0.4,
            label=f"layer {layer}: {100 * share:.0f} %, "
            f"{sampling.mean_distance[image_index, query, level]:.1f} patches",
        )
    centre = sampling.reference[query] * torch.tensor([width, height])
    axes.scatter([centre[0]], [centre[1]], marker="*", s=260, color="yellow", edgecolors="black", label="query patch")
    # Points may fall outside the grid (they read zeros there): widen the view to show them.
    low = torch.minimum(locations.reshape(-1, 2).min(0).values - 0.5, torch.zeros(2))
    high = torch.maximum(locations.reshape(-1, 2).max(0).values + 0.5, torch.tensor([width, height]))
    axes.set_xlim(float(low[0]), float(high[0]))
    axes.set_ylim(float(high[1]), float(low[1]))
    axes.set_title(f"MMFuser sampling, query patch {query} (row {query // width}, column {query % width})", fontsize=10)
    axes.set_xlabel("x (patches)")
    axes.set_ylabel("y (patches)")
    axes.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8, title="level: share, mean distance")
    figure.savefig(path, dpi=100, bbox_inches="tight")
    return Path(path)
