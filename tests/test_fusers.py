import pytest
import torch

from hf_fusedvlm import FusedLlavaConfig, build_fuser
from hf_fusedvlm.deformable_attention import multi_scale_deformable_sampling

from conftest import randomise
from reference_math import bilinear_sample, igva_reference, mmfuser_reference
from test_configuration import TINY_ENCODER, TINY_VISION


NUM_IMAGES, NUM_TOKENS, WIDTH = 2, 17, 64  # CLS + 4x4 patches


def random_hidden_states(seed: int, num_tokens: int = NUM_TOKENS) -> tuple[torch.Tensor, ...]:
    generator = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(NUM_IMAGES, num_tokens, WIDTH, generator=generator) for _ in range(7))


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.double() - expected).norm() / expected.norm()).item()


def make_fuser(fuser_type, **kwargs):
    config = FusedLlavaConfig(
        vision_config=TINY_VISION,
        fuser_type=fuser_type,
        fuser_num_heads=4,
        fuser_num_points=3,
        aggregator_hidden_size=64,
        aggregator_num_layers=2,
        instruction_encoder_config=TINY_ENCODER if fuser_type == "igva" else None,
        **kwargs,
    )
    return build_fuser(config), config


def test_fresh_mmfuser_is_the_identity_on_its_query_layer():
    fuser, config = make_fuser("mmfuser")
    states = random_hidden_states(0)
    assert torch.equal(fuser.gamma1, torch.zeros(WIDTH)) and torch.equal(fuser.gamma2, torch.zeros(WIDTH))
    assert torch.equal(fuser(states).features, states[config.base_layer][:, 1:])


def test_mmfuser_matches_float64_reference_with_nonzero_gammas():
    fuser, config = make_fuser("mmfuser", fuser_layers=[1, 3, 5])
    randomise(fuser, seed=1)
    states = random_hidden_states(2)
    output = fuser(states).features
    assert output.shape == (NUM_IMAGES, 16, WIDTH)
    for image in range(NUM_IMAGES):
        expected = mmfuser_reference(fuser, [states[layer][image, 1:] for layer in config.fuser_layers])
        assert relative_error(output[image], expected) <= 1e-5
    # The fused result really differs from the query layer once the gammas are non-zero.
    assert not torch.allclose(output, states[5][:, 1:], atol=1e-3)


@pytest.mark.parametrize("offset_init", ["deformable_detr", "from_query"])
def test_mmfuser_offset_init_sets_where_the_sampling_points_start(offset_init):
    """Deformable DETR's ring starts point p of each head p + 1 patches from its query (never on it, so a detail
    one patch wide is not sampled by its own token at the start); `from_query` starts the first point on the query."""
    fuser, config = make_fuser("mmfuser", fuser_offset_init=offset_init)
    first_radius = {"deformable_detr": 1, "from_query": 0}[offset_init]
    states = random_hidden_states(0)
    assert torch.equal(fuser(states).features, states[config.base_layer][:, 1:])  # parity either way
    for attention in (fuser.cross_attn, fuser.self_attn):
        offsets = attention.sampling_offsets.bias.view(attention.num_heads, attention.num_levels, -1, 2)
        radii = offsets.abs().amax(-1)  # the ring is a square: the larger coordinate is the radius
        expected = torch.arange(first_radius, first_radius + config.fuser_num_points, dtype=torch.float32)
        assert torch.equal(radii, expected.expand_as(radii))
    with pytest.raises(ValueError, match="fuser_offset_init='centre': choose one of deformable_detr, from_query"):
        make_fuser("mmfuser", fuser_offset_init="centre")


@pytest.mark.parametrize("shapes", [[(4, 4)] * 3, [(4, 4), (2, 3), (5, 2)]])
def test_deformable_sampling_matches_float64_bilinear_reference(shapes):
    generator = torch.Generator().manual_seed(3)
    batch, heads, head_dim, queries, points = 2, 2, 3, 5, 2
    value = torch.randn(batch, sum(h * w for h, w in shapes), heads, head_dim, generator=generator)
    # Locations partly outside [0, 1] exercise the zero padding.
    locations = torch.rand(batch, queries, heads, len(shapes), points, 2, generator=generator) * 1.4 - 0.2
    weights = torch.rand(batch, queries, heads, len(shapes), points, generator=generator)
    output = multi_scale_deformable_sampling(value, shapes, locations, weights)
    expected = torch.zeros(batch, queries, heads, head_dim, dtype=torch.float64)
    levels = value.double().split([h * w for h, w in shapes], dim=1)
    for b in range(batch):
        for head in range(heads):
            for level, (height, width) in enumerate(shapes):
                feature_map = levels[level][b, :, head].view(height, width, head_dim)
                for point in range(points):
                    x, y = locations[b, :, head, level, point].double().unbind(-1)
                    expected[b, :, head] += weights[b, :, head, level, point, None].double() * bilinear_sample(
                        feature_map, x, y
                    )
    assert relative_error(output, expected.view(batch, queries, heads * head_dim)) <= 1e-6


def test_igva_matches_float64_reference():
    fuser, config = make_fuser("igva")
    randomise(fuser, seed=4)
    states = random_hidden_states(5)
    instructions = torch.randn(NUM_IMAGES, 64, generator=torch.Generator().manual_seed(6))
    output = fuser(states, instructions)
    assert output.features.shape == (NUM_IMAGES, 16, 2 * WIDTH)
    for image in range(NUM_IMAGES):
        weights, features = igva_reference(
            fuser, [s[image] for s in states], instructions[image], config.fuser_layer_groups, config.base_layer
        )
        assert relative_error(output.fusion_weights[image], weights) <= 1e-5
        assert relative_error(output.features[image], features) <= 1e-5


def test_igva_attention_is_multihead_attention_without_reading_linear_weights():
    """The aggregator's attention loads nn.MultiheadAttention's state dict (official key names) and gives bit-equal
    results; it still runs when `out_proj.weight` is unreadable, as under runtimes that pack linear layers."""
    fuser, _ = make_fuser("igva")
    attention = fuser.blocks[0].cross_attention
    official = torch.nn.MultiheadAttention(WIDTH, attention.num_heads, batch_first=True).eval()
    randomise(official, seed=4)
    assert sorted(attention.state_dict()) == sorted(official.state_dict())
    attention.load_state_dict(official.state_dict())
    generator = torch.Generator().manual_seed(5)
    query, key_value = torch.randn(3, 1, WIDTH, generator=generator), torch.randn(3, 4, WIDTH, generator=generator)
    with torch.no_grad():
        expected = official(query, key_value, key_value, need_weights=False)[0]
        assert torch.equal(attention(query, key_value), expected)

        class PackedLinear(torch.nn.Module):  # keeps its weight elsewhere, like vLLM's CPU linears after packing
            def __init__(self, linear):
                super().__init__()
                self.packed = linear.weight.detach().clone()
                self.bias = linear.bias
                self.weight = torch.nn.Parameter(torch.empty(0), requires_grad=False)

            def forward(self, states):
                return torch.nn.functional.linear(states, self.packed, self.bias)

        attention.out_proj = PackedLinear(attention.out_proj)
        assert torch.equal(attention(query, key_value), expected)


def test_igva_weights_are_a_distribution_that_follows_the_instruction():
    fuser, config = make_fuser("igva")
    randomise(fuser, seed=7)
    states = tuple(s[:1].expand(NUM_IMAGES, -1, -1) for s in random_hidden_states(8))  # the same image twice
    instructions = torch.randn(NUM_IMAGES, 64, generator=torch.Generator().manual_seed(9))
    output = fuser(states, instructions)
    weights = output.fusion_weights
    assert weights.shape == (NUM_IMAGES, len(config.fuser_layer_groups))
    torch.testing.assert_close(weights.sum(-1), torch.ones(NUM_IMAGES))
    assert (weights[0] - weights[1]).abs().max() > 1e-3  # different instruction, different weights
    group_patches = [
        torch.stack([states[layer][:, 1:] for layer in group]).mean(0) for group in config.fuser_layer_groups
    ]
    fused = sum(weights[:, k, None, None] * patches for k, patches in enumerate(group_patches))
    torch.testing.assert_close(output.features, torch.cat([states[config.base_layer][:, 1:], fused], -1))
    entropy = -(weights * weights.log()).sum(-1).mean()
    torch.testing.assert_close(output.balance_loss, -config.balance_loss_weight * entropy)


@pytest.mark.parametrize("loss_type", ["sample_entropy", "batch_entropy"])
def test_igva_balance_loss_types(loss_type):
    fuser, config = make_fuser("igva", balance_loss_type=loss_type, balance_loss_weight=0.5)
    randomise(fuser, seed=7)
    states = random_hidden_states(8)
    instructions = torch.randn(NUM_IMAGES, 64, generator=torch.Generator().manual_seed(9))
    output = fuser(states, instructions)
    weights = output.fusion_weights
    sample_entropy = -(weights * weights.log()).sum(-1).mean()
    mean = weights.mean(0)
    batch_entropy = -(mean * mean.log()).sum()
    assert batch_entropy > sample_entropy + 1e-4  # the images' weights differ, so their mean is flatter
    expected = sample_entropy if loss_type == "sample_entropy" else batch_entropy
    torch.testing.assert_close(output.balance_loss, -0.5 * expected)
    # Gradient: the batch loss rewards images that pick different groups, the sample loss pulls each to uniform.
    logits = torch.tensor([[4.0, 0.0, 0.0, 0.0], [0.0, 4.0, 0.0, 0.0]], requires_grad=True)
    fuser.group_weights = lambda groups, instruction_embeds: logits.softmax(-1)
    fuser(states, instructions).balance_loss.backward()
    if loss_type == "sample_entropy":
        assert logits.grad[0, 0] > 0 and logits.grad[1, 1] > 0  # descent lowers each image's peak
    else:
        # Two images on two groups: lowering the loss means spreading to the unused groups 3 and 4, not flattening
        # the peaks towards each other's group.
        assert logits.grad[0, 2] < 0 and logits.grad[0, 3] < 0
        assert logits.grad[0, 1] > 0 and logits.grad[1, 0] > 0


def test_igva_without_cls_token_uses_mean_patch_as_global_feature():
    fuser, config = make_fuser("igva", vision_feature_select_strategy="full")
    randomise(fuser, seed=10)
    states = random_hidden_states(11, num_tokens=16)
    instructions = torch.randn(NUM_IMAGES, 64, generator=torch.Generator().manual_seed(12))
    output = fuser(states, instructions)
    weights, features = igva_reference(
        fuser, [s[0] for s in states], instructions[0], config.fuser_layer_groups, config.base_layer, has_cls=False
    )
    assert relative_error(output.fusion_weights[0], weights) <= 1e-5
    assert relative_error(output.features[0], features) <= 1e-5


def test_igva_without_instruction_says_what_to_pass():
    fuser, _ = make_fuser("igva")
    with pytest.raises(ValueError, match="needs instruction embeddings: pass instruction_input_ids"):
        fuser(random_hidden_states(0))


def test_baseline_fusers():
    states = random_hidden_states(13)
    concat, config = make_fuser("concat", fuser_layers=[2, 5, 4])
    assert concat.output_size == 3 * WIDTH
    torch.testing.assert_close(concat(states).features, torch.cat([states[i][:, 1:] for i in (2, 5, 4)], -1))
    average, config = make_fuser("average", fuser_layer_groups=[[1, 2], [6]])
    output = average(states)
    torch.testing.assert_close(output.fusion_weights, torch.full((NUM_IMAGES, 2), 0.5))
    expected = torch.cat([states[5][:, 1:], ((states[1] + states[2]) / 2 * 0.5 + states[6] * 0.5)[:, 1:]], -1)
    torch.testing.assert_close(output.features, expected)
    single, _ = make_fuser("none")
    assert torch.equal(single(states).features, states[5][:, 1:])


def test_mmfuser_rejects_a_non_square_grid():
    fuser, _ = make_fuser("mmfuser", vision_feature_select_strategy="full")
    with pytest.raises(ValueError, match="square grid of patch tokens, got 17"):
        fuser(random_hidden_states(0))


def train_igva_on_two_question_kinds(answer_states, balance_loss_weight, learning_rate, seed=0):
    """Trains a fresh igva fuser (groups [0, 1], [2, 3], [4, 5], [6], base layer 5) for 300 steps with a linear
    read-out per question kind on the answers alone, the balance loss included; kind k's answer is added to one
    random patch token of the hidden states `answer_states[k]`. The two kinds' instruction embeddings share most of
    their direction (cosine about 0.6, as a sentence encoder embeds two different questions). Returns each kind's
    mean group weights on a fresh batch, shape (2, num_groups)."""
    generator = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    fuser, _ = make_fuser(
        "igva", fuser_layer_groups=[[0, 1], [2, 3], [4, 5], [6]], balance_loss_weight=balance_loss_weight
    )
    shared, own = torch.randn(64, generator=generator), torch.randn(2, 64, generator=generator)
    instructions = torch.nn.functional.normalize(shared + own, dim=-1)
    assert torch.nn.functional.cosine_similarity(instructions[0], instructions[1], dim=0) > 0.5
    num_classes, batch = 4, 64
    patterns = torch.randn(2, num_classes, WIDTH, generator=generator)
    readouts = torch.nn.ModuleList([torch.nn.Linear(2 * WIDTH, num_classes) for _ in range(2)])
    optimizer = torch.optim.AdamW([*fuser.parameters(), *readouts.parameters()], lr=learning_rate)

    def batch_of_questions():
        states = list(torch.randn(7, batch, NUM_TOKENS, WIDTH, generator=generator))
        labels = torch.randint(0, num_classes, (2, batch), generator=generator)
        token = torch.randint(1, NUM_TOKENS, (batch,), generator=generator)
        for kind in range(2):
            for state in answer_states[kind]:
                states[state][torch.arange(batch), token] += 3 * patterns[kind, labels[kind]]
        return states, labels, torch.randint(0, 2, (batch,), generator=generator)

    for _ in range(300):
        states, labels, kind = batch_of_questions()
        output = fuser(states, instructions[kind])
        features = output.features.mean(1)
        loss = output.balance_loss + sum(
            torch.nn.functional.cross_entropy(readouts[k](features[kind == k]), labels[k, kind == k]) for k in (0, 1)
        )
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        states, _, kind = batch_of_questions()
        weights = fuser(states, instructions[kind]).fusion_weights
    return torch.stack([weights[kind == k].mean(0) for k in (0, 1)])


def test_igva_learns_to_route_each_instruction_to_the_group_that_holds_its_answer():
    """The first kind's answer sits in hidden states 0-1 (group 1), the second's in 6 (group 4): each kind ends with
    most of its weight on its own group."""
    weights = train_igva_on_two_question_kinds([(0, 1), (6,)], balance_loss_weight=0.003, learning_rate=2e-4)
    assert weights[0, 0] > 0.8 and weights[1, 3] > 0.8, weights


@pytest.mark.parametrize("seed", [0, 1])
def test_igva_spreads_the_weights_of_a_kind_the_base_layer_answers(seed):
    """A fine kind whose answer only hidden states 0-1 hold, and a coarse kind that every hidden state holds, the base
    layer included (as in a tower trained on coarse labels): the fine kind's weight concentrates on group 1, while the
    coarse kind, which gains nothing from any group, is left to the balance loss and spreads over the groups. Without
    the balance loss, or at 2e-3 on one seed of these two (the softmax saturates before the balance loss acts), the
    coarse kind follows the fine one onto group 1 instead."""
    weights = train_igva_on_two_question_kinds(
        [(0, 1), range(7)], balance_loss_weight=0.01, learning_rate=2e-4, seed=seed
    )
    assert weights[0, 0] > 0.9 and weights[1, 0] < 0.5 and weights[1].max() < 0.5, weights
