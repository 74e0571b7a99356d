import copy
import importlib
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from hf_fusedvlm import FusedLlavaProcessor, interpretability
from hf_fusedvlm.deformable_attention import multi_scale_deformable_sampling
from hf_fusedvlm.interpretability import (
    group_labels,
    igva_group_weights,
    mmfuser_sampling,
    plot_fusion_weights,
    plot_sampling,
)

from conftest import make_image, randomise


INSTRUCTIONS = [
    "How many dots are there?",
    "What colour is the top left corner?",
    "Describe the image.",
    "Is there any text in the picture? Read it out loud, please.",
]


@pytest.fixture(scope="module")
def processor(tiny_llava, tiny_instruction_encoder):
    return FusedLlavaProcessor.from_llava_processor(tiny_llava[1], tiny_instruction_encoder[1])


@pytest.fixture(scope="module")
def igva_model(fused_models):
    """An aggregator that leans on the instruction, as training makes it: PyTorch's default init from a fixed seed,
    then a strong sentence projection, weak group features and sharp logits (at the default init, the tiny model's
    weights hardly depend on the instruction)."""
    model = copy.deepcopy(fused_models["igva"]).eval()
    fuser = model.model.fuser
    with torch.random.fork_rng(), torch.no_grad():
        torch.manual_seed(0)
        for module in fuser.modules():
            reset = getattr(module, "reset_parameters", None) or getattr(module, "_reset_parameters", None)
            if reset is not None:
                reset()
        fuser.sentence_proj.weight.mul_(20)
        fuser.cls_proj.weight.mul_(0.05)
        fuser.linear.weight.mul_(5)
    return model


@pytest.fixture(scope="module")
def mmfuser_model(fused_models):
    model = copy.deepcopy(fused_models["mmfuser"]).eval()
    randomise(model.model.fuser, seed=22)
    return model


@pytest.fixture(scope="module")
def pixel_values(processor):
    images = [make_image(seed) for seed in (1, 2)]
    return processor.image_processor(images, return_tensors="pt")["pixel_values"]


@pytest.fixture(scope="module")
def sampling(mmfuser_model, pixel_values):
    return mmfuser_sampling(mmfuser_model, pixel_values)


def test_igva_group_weights_are_the_models_fusion_weights(igva_model, processor, image):
    weights = igva_group_weights(igva_model, processor, image, INSTRUCTIONS)
    assert weights.shape == (len(INSTRUCTIONS), len(igva_model.config.fuser_layer_groups))
    torch.testing.assert_close(weights.sum(-1), torch.ones(len(INSTRUCTIONS)))
    assert (weights.max(0).values - weights.min(0).values).max() > 0.1  # the instruction matters
    prompts = [f"USER: <image>\n{text} ASSISTANT:" for text in INSTRUCTIONS]
    inputs = processor(images=[image] * len(prompts), text=prompts, padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = igva_model(**inputs).fusion_weights
    torch.testing.assert_close(weights, expected)
    # One image per instruction gives the same rows as one image shared by all.
    per_instruction = igva_group_weights(igva_model, processor, [image] * len(INSTRUCTIONS), INSTRUCTIONS)
    torch.testing.assert_close(per_instruction, weights)


def test_interpretability_rejects_the_wrong_fuser(fused_models, processor, image, pixel_values):
    with pytest.raises(ValueError, match=r"needs a fused LLaVA with fuser_type in \['mmfuser'\].*'igva'"):
        mmfuser_sampling(fused_models["igva"], pixel_values)
    with pytest.raises(ValueError, match=r"fuser_type in \['igva'\].*'concat'"):
        igva_group_weights(fused_models["concat"], processor, image, INSTRUCTIONS)
    with pytest.raises(ValueError, match="Got 2 images for 4 instructions"):
        igva_group_weights(fused_models["igva"], processor, [image, image], INSTRUCTIONS)


def test_mmfuser_sampling_matches_a_direct_computation(mmfuser_model, pixel_values, sampling):
    fuser, config = mmfuser_model.model.fuser, mmfuser_model.config
    attention = fuser.cross_attn
    num_images, side = pixel_values.shape[0], 4
    heads, levels, points = attention.num_heads, attention.num_levels, attention.num_points
    assert sampling.grid_size == (side, side) and sampling.level_layers == config.fuser_layers[:-1]
    assert sampling.locations.shape == (num_images, side * side, heads, levels, points, 2)
    assert sampling.attention_weights.shape == (num_images, side * side, heads, levels, points)

    with torch.no_grad():
        hidden_states = mmfuser_model.model.vision_tower(pixel_values, output_hidden_states=True).hidden_states
        query = fuser.query_norm(hidden_states[config.fuser_layers[-1]][:, 1:])
        offsets = attention.sampling_offsets(query).view(num_images, side * side, heads, levels, points, 2)
        logits = attention.attention_weights(query).view(num_images, side * side, heads, levels * points)
    rows, columns = torch.arange(side * side).div(side, rounding_mode="floor"), torch.arange(side * side) % side
    reference = torch.stack([(columns + 0.5) / side, (rows + 0.5) / side], -1)
    torch.testing.assert_close(sampling.reference, reference)
    torch.testing.assert_close(sampling.locations, reference[None, :, None, None, None] + offsets / side)
    torch.testing.assert_close(sampling.attention_weights, logits.softmax(-1).view_as(sampling.attention_weights))

    torch.testing.assert_close(sampling.level_share.sum(-1), torch.ones(num_images, side * side))
    assert sampling.level_share.std() > 0.01  # the queries do favour different levels
    image, patch, level = 1, 5, 2
    weights = sampling.attention_weights[image, patch, :, level].reshape(-1)
    patch_offsets = offsets[image, patch, :, level].reshape(-1, 2)  # already in patches: one level is side x side
    torch.testing.assert_close(
        sampling.mean_offset[image, patch, level], (weights[:, None] * patch_offsets).sum(0) / weights.sum()
    )
    torch.testing.assert_close(
        sampling.mean_distance[image, patch, level], (weights * patch_offsets.norm(dim=-1)).sum() / weights.sum()
    )
    assert (sampling.mean_distance >= sampling.mean_offset.norm(dim=-1) - 1e-5).all()


def assert_rich_png(path, min_colours: int) -> np.ndarray:
    """A valid PNG that PIL can load, with visible content: not one flat colour."""
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(path) as png:
        png.verify()
    with Image.open(path) as png:
        pixels = np.asarray(png.convert("RGB"))
    assert pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert pixels.std() > 20
    assert len(np.unique(pixels.reshape(-1, 3), axis=0)) >= min_colours
    return pixels


def test_plot_fusion_weights_writes_a_heatmap(igva_model, processor, image, tmp_path):
    weights = igva_group_weights(igva_model, processor, image, INSTRUCTIONS)
    path = plot_fusion_weights(weights, INSTRUCTIONS, tmp_path / "weights.png", group_labels(igva_model.config))
    assert group_labels(igva_model.config) == ["layers 1-2", "layers 3-4", "layer 5", "layer 6"]
    assert_rich_png(path, min_colours=50)
    with pytest.raises(ValueError, match="Got 3 instructions for 4 rows"):
        plot_fusion_weights(weights, INSTRUCTIONS[:3], tmp_path / "bad.png")


def test_plot_sampling_draws_every_level(sampling, pixel_values, tmp_path):
    path = plot_sampling(sampling, pixel_values[0], tmp_path / "sampling.png", query=5)
    pixels = assert_rich_png(path, min_colours=200)
    # Each level's colour (see plot_sampling's palette) appears, alpha-blended, as at least a few pixels.
    for colour in ((228, 26, 28), (55, 126, 184), (77, 175, 74))[: len(sampling.level_layers)]:
        distance = np.abs(pixels.astype(int) - np.array(colour)).sum(-1)
        assert (distance < 90).sum() >= 5, colour
    assert plot_sampling(sampling, make_image(3), tmp_path / "pil.png").exists()  # PIL image, centre query
    with pytest.raises(ValueError, match=r"query must be a patch index in \[0, 16\)"):
        plot_sampling(sampling, pixel_values[0], tmp_path / "bad.png", query=16)


def test_module_imports_without_matplotlib_and_plots_say_what_to_install(monkeypatch, sampling, tmp_path):
    for name in [name for name in sys.modules if name == "matplotlib" or name.startswith("matplotlib.")]:
        monkeypatch.delitem(sys.modules, name)
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # makes `import matplotlib...` raise ImportError
    module = importlib.reload(interpretability)
    try:
        with pytest.raises(ImportError, match=r"plot_fusion_weights needs matplotlib: pip install hf-fusedvlm\[plot\]"):
            module.plot_fusion_weights(torch.ones(1, 2) / 2, ["a"], tmp_path / "w.png")
        with pytest.raises(ImportError, match=r"plot_sampling needs matplotlib: pip install hf-fusedvlm\[plot\]"):
            module.plot_sampling(sampling, torch.zeros(3, 8, 8), tmp_path / "s.png")
        assert not (tmp_path / "w.png").exists()
    finally:
        monkeypatch.undo()
        importlib.reload(interpretability)


def test_deformable_sampling_core_gradients_match_finite_differences():
    """float64 gradcheck of the embedding_bag core w.r.t. value, locations (some outside the levels, which read
    zeros) and attention weights, for levels of different shapes."""
    generator = torch.Generator().manual_seed(0)
    shapes = [(3, 4), (2, 2)]
    value = torch.randn(2, 16, 2, 3, dtype=torch.float64, generator=generator).requires_grad_()
    locations = torch.rand(2, 5, 2, 2, 3, 2, dtype=torch.float64, generator=generator) * 1.4 - 0.2
    weights = torch.rand(2, 5, 2, 2, 3, dtype=torch.float64, generator=generator).requires_grad_()
    assert ((locations < 0) | (locations > 1)).any()
    torch.autograd.gradcheck(
        lambda v, loc, w: multi_scale_deformable_sampling(v, shapes, loc, w),
        (value, locations.requires_grad_(), weights),
    )
