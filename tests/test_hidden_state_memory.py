"""The fusion step keeps only what the fuser reads: fusers that average layer groups get one running mean per group,
so their layers are not alive together when the fuser runs, and the features equal those from every hidden state."""

import weakref

import pytest
import torch

from hf_fusedvlm.parity import fused_from_llava

from conftest import instruction_inputs


@pytest.mark.parametrize("fuser_type", ["average", "igva", "dense_connector"])
def test_grouped_fusers_do_not_hold_every_layer(fuser_type, tiny_llava, tiny_instruction_encoder):
    encoder, tokenizer = tiny_instruction_encoder
    model = fused_from_llava(tiny_llava[0], fuser_type, instruction_encoder=encoder if fuser_type == "igva" else None)
    model = model.model
    pixel_values = torch.randn(5, 3, 32, 32, generator=torch.Generator().manual_seed(0))  # five crops
    kwargs = instruction_inputs(tokenizer, ["a", "b c", "d", "e f g", "h"]) if fuser_type == "igva" else {}
    outputs, alive = [], []
    layers = model.vision_tower.encoder.layers
    hooks = [layer.register_forward_hook(lambda m, a, out: outputs.append(weakref.ref(out))) for layer in layers]
    hooks.append(model.fuser.register_forward_pre_hook(lambda m, a: alive.append([o() is not None for o in outputs])))
    try:
        with torch.no_grad():
            kept = model.get_image_features(pixel_values, **kwargs)
    finally:
        for hook in hooks:
            hook.remove()
    # Layer outputs alive when the fuser runs: the base layer (hidden state 5, kept whole) and the tower's last
    # hidden state only, although the groups read hidden states 0..6.
    assert alive == [[False, False, False, False, True, True]]
    assert [i for i, state in enumerate(kept.hidden_states) if state is not None] == model.config.vision_layers_kept
    with torch.no_grad():
        every = model.get_image_features(pixel_values, output_hidden_states=True, **kwargs)
    # bit for bit the features computed from every recorded layer
    assert torch.equal(torch.cat(list(kept.pooler_output)), torch.cat(list(every.pooler_output)))
