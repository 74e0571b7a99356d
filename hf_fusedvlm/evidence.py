"""A CLIP-like vision tower in miniature and the layer-wise linear probe that measures what its layers keep.

The papers' premise is that a contrastively trained tower's deep layers are semantically aligned and have lost fine
detail that its shallow layers still hold. A randomly initialised tower has no reason to lose anything with depth, so
the toy experiment needs a tower trained the same way in spirit: on a *coarse* objective only. Here the tower of the
tiny LLaVA (`hf_fusedvlm.tiny`) learns to name the colour and the side of the small square of the synthetic images
(`hf_fusedvlm.synthetic_vqa`) from its pooled output, with the other details (dot count, digit) left as nuisance.

`layer_probe` is the measurement of the IGVA paper's layer-wise probe curve: one linear classifier per hidden state
and detail kind, trained on frozen features of one image set and scored on another.
"""

import torch
from torch import nn

from .synthetic_vqa import COLOURS, MAX_DOTS, POSITIONS, SyntheticSample


# Detail kind -> (number of classes, the class index of a sample's `details`). The probe kinds are the question kinds.
DETAIL_CLASSES = {
    "colour": (len(COLOURS), lambda details: sorted(COLOURS).index(details["colour"])),
    "count": (MAX_DOTS, lambda details: details["dots"] - 1),
    "digit": (10, lambda details: details["digit"]),
    "position": (len(POSITIONS), lambda details: POSITIONS.index(details["position"])),
}
COARSE_KINDS = ("colour", "position")


def detail_labels(samples: list[SyntheticSample], kind: str) -> torch.Tensor:
    """The class index of each sample's `kind` detail, shape `(num_samples,)`."""
    if kind not in DETAIL_CLASSES:
        raise ValueError(f"Unknown detail kind {kind!r}: choose one of {', '.join(DETAIL_CLASSES)}.")
    to_class = DETAIL_CLASSES[kind][1]
    return torch.tensor([to_class(sample.details) for sample in samples])


def pixel_values(image_processor, samples: list[SyntheticSample]) -> torch.Tensor:
    """The samples' images preprocessed as the LLaVA processor does, shape `(num_samples, 3, height, width)`."""
    return image_processor([sample.image for sample in samples], return_tensors="pt")["pixel_values"]


def pretrain_coarse_tower(
    vision_tower: nn.Module,
    pixels: torch.Tensor,
    samples: list[SyntheticSample],
    coarse_kinds: tuple[str, ...] = COARSE_KINDS,
    steps: int = 400,
    batch_size: int = 64,
    learning_rate: float = 2e-3,
    weight_decay: float = 0.05,
    seed: int = 0,
) -> list[float]:
    """Train `vision_tower` (a `CLIPVisionModel`) in place to classify the coarse details from its pooled output.

    One linear head per coarse kind reads `pooler_output` (the post-LayerNorm CLS token, what CLIP projects into its
    joint space); the loss is the sum of the heads' cross-entropies. Nothing asks the tower to keep the other
    details, as a contrastive tower is never asked to keep what captions do not mention.

    Args:
        vision_tower: the tower to train; left in `eval()` mode with `requires_grad` unchanged afterwards.
        pixels: preprocessed images `(num_images, 3, height, width)`.
        samples: the images' samples (for their `details`), in the same order.
        coarse_kinds: the detail kinds the heads predict.
    Returns:
        the loss of every step.
    """
    if len(samples) != pixels.shape[0]:
        raise ValueError(f"pixels has {pixels.shape[0]} images but samples {len(samples)}: pass one sample per image.")
    generator = torch.Generator().manual_seed(seed)
    hidden = vision_tower.config.hidden_size
    heads = nn.ModuleDict({kind: nn.Linear(hidden, DETAIL_CLASSES[kind][0]) for kind in coarse_kinds})
    labels = {kind: detail_labels(samples, kind) for kind in coarse_kinds}
    requires_grad = {name: parameter.requires_grad for name, parameter in vision_tower.named_parameters()}
    vision_tower.requires_grad_(True).train()
    optimizer = torch.optim.AdamW(
        [*vision_tower.parameters(), *heads.parameters()], lr=learning_rate, weight_decay=weight_decay
    )
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1)
    losses = []
    for _ in range(steps):
        rows = torch.randint(0, pixels.shape[0], (batch_size,), generator=generator)
        pooled = vision_tower(pixel_values=pixels[rows]).pooler_output
        loss = sum(nn.functional.cross_entropy(heads[kind](pooled), labels[kind][rows]) for kind in coarse_kinds)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        schedule.step()
        losses.append(loss.item())
    vision_tower.eval()
    for name, parameter in vision_tower.named_parameters():
        parameter.requires_grad_(requires_grad[name])
    return losses


@torch.no_grad()
def layer_features(vision_tower: nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """Every hidden state's patch tokens (CLS dropped, what LLaVA's projector sees) flattened per image: one
    `(num_images, num_patches * hidden)` tensor per entry of `hidden_states` (index 0 = embeddings)."""
    per_layer = None
    for start in range(0, pixels.shape[0], batch_size):
        states = vision_tower(pixel_values=pixels[start : start + batch_size], output_hidden_states=True).hidden_states
        flat = [state[:, 1:, :].flatten(1) for state in states]
        per_layer = flat if per_layer is None else [torch.cat([old, new]) for old, new in zip(per_layer, flat)]
    return per_layer


def linear_probe_accuracy(
    train_features: torch.Tensor,
    train_labels: torch.Tensor,
    test_features: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    steps: int = 300,
    weight_decay: float = 1e-3,
) -> float:
    """Held-out accuracy of a multinomial logistic regression `(num, features) -> num_classes` trained full-batch
    on standardised features (statistics from the training set)."""
    mean, std = train_features.mean(0), train_features.std(0) + 1e-6
    train_features, test_features = (train_features - mean) / std, (test_features - mean) / std
    probe = nn.Linear(train_features.shape[1], num_classes)
    optimizer = torch.optim.Adam(probe.parameters(), lr=1e-2, weight_decay=weight_decay)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(probe(train_features), train_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(test_features).argmax(-1) == test_labels).float().mean().item()


def layer_probe(
    vision_tower: nn.Module,
    train_pixels: torch.Tensor,
    train_samples: list[SyntheticSample],
    test_pixels: torch.Tensor,
    test_samples: list[SyntheticSample],
    kinds: tuple[str, ...] = tuple(DETAIL_CLASSES),
    steps: int = 300,
) -> dict[str, list[float]]:
    """The layer-wise probe curve: `{kind: [held-out accuracy of a linear probe on hidden state i, i = 0..L]}`."""
    train_layers, test_layers = layer_features(vision_tower, train_pixels), layer_features(vision_tower, test_pixels)
    curves = {}
    for kind in kinds:
        train_labels, test_labels = detail_labels(train_samples, kind), detail_labels(test_samples, kind)
        curves[kind] = [
            linear_probe_accuracy(train, train_labels, test, test_labels, DETAIL_CLASSES[kind][0], steps)
            for train, test in zip(train_layers, test_layers)
        ]
    return curves


__all__ = [
    "COARSE_KINDS",
    "DETAIL_CLASSES",
    "detail_labels",
    "layer_features",
    "layer_probe",
    "linear_probe_accuracy",
    "pixel_values",
    "pretrain_coarse_tower",
]
