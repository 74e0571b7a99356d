"""A CLIP-like vision tower in miniature and the layer-wise probe that measures what its layers keep.

The papers' premise is that a contrastively trained tower's deep layers are semantically aligned and have lost fine
detail that its shallow layers still hold. A randomly initialised tower has no reason to lose anything with depth, so
the toy experiment trains its tower the way such a tower is shaped: on a *coarse* objective only. The tower learns to
name the colour and the side of the square of the synthetic images (`hf_fusedvlm.synthetic_vqa`) from its pooled
output, and its top hidden states (its output and LLaVA's layer below it) are asked to be *invariant* to the fine
details: an image and its twin with another handwritten digit and shape in the same places must give the same
features there. That is what caption supervision does to
the details no caption mentions (every image with the same caption is pulled to the same text), and what an
augmentation does in self-supervised training. Nothing is asked of the layers below; how much detail each keeps is
measured, not set.

`layer_probe` is the measurement of the IGVA paper's layer-wise probe curve: per hidden state and detail kind, a
classifier trained on the frozen patch tokens of one image set and scored on another. Since the details sit in a
different patch in every image, the probe pools the tokens with learned attention before its linear (or small MLP)
head, so it finds a detail wherever it is.
"""

import contextlib

import torch
from torch import nn

from .synthetic_vqa import COLOURS, MAX_DOTS, POSITIONS, SHAPES, SyntheticSample


# Detail kind -> (number of classes, the class index of a sample's `details`). The probe kinds are the question kinds.
DETAIL_CLASSES = {
    "colour": (len(COLOURS), lambda details: sorted(COLOURS).index(details["colour"])),
    "count": (MAX_DOTS, lambda details: details["dots"] - 1),
    "digit": (10, lambda details: details["digit"]),
    "position": (len(POSITIONS), lambda details: POSITIONS.index(details["position"])),
    "shape": (len(SHAPES), lambda details: sorted(SHAPES).index(details["shape"])),
}
COARSE_KINDS = ("colour", "position")


def chance(kind: str) -> float:
    """The accuracy of a uniform guess at `kind` (every kind's answers are drawn uniformly)."""
    return 1.0 / DETAIL_CLASSES[kind][0]


def detail_labels(samples: list[SyntheticSample], kind: str) -> torch.Tensor:
    """The class index of each sample's `kind` detail, shape `(num_samples,)`."""
    if kind not in DETAIL_CLASSES:
        raise ValueError(f"Unknown detail kind {kind!r}: choose one of {', '.join(DETAIL_CLASSES)}.")
    to_class = DETAIL_CLASSES[kind][1]
    return torch.tensor([to_class(sample.details) for sample in samples])


def pixel_values(image_processor, samples: list[SyntheticSample]) -> torch.Tensor:
    """The samples' images preprocessed as the LLaVA processor does, shape `(num_samples, 3, height, width)`."""
    return image_processor([sample.image for sample in samples], return_tensors="pt")["pixel_values"]


@contextlib.contextmanager
def trained_in_place(module: nn.Module):
    """Make every parameter of `module` trainable and put it in `train()` mode; afterwards leave it in `eval()` mode
    with each parameter's `requires_grad` as it was."""
    requires_grad = {name: parameter.requires_grad for name, parameter in module.named_parameters()}
    module.requires_grad_(True).train()
    try:
        yield module
    finally:
        module.eval()
        for name, parameter in module.named_parameters():
            parameter.requires_grad_(requires_grad[name])


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
    twin_pixels: torch.Tensor | None = None,
    invariance_weight: float = 1.0,
    invariant_layers: int = 2,
) -> list[float]:
    """Train `vision_tower` (a `CLIPVisionModel`) in place on the coarse objective.

    One linear head per coarse kind reads `pooler_output` (the post-LayerNorm CLS token, what CLIP projects into its
    joint space); the loss is the sum of the heads' cross-entropies. With `twin_pixels` (each image again with other
    fine details, e.g. [`hf_fusedvlm.synthetic_vqa.resample_fine_details`]), `invariance_weight` times the squared
    difference of image and twin in each of the last `invariant_layers` hidden states (every token, relative to the
    batch's variance of that state) is added: the tower's top must not depend on the fine details, as a
    caption-supervised tower's does not. The layers below are left free.

    Args:
        vision_tower: the tower to train; left in `eval()` mode with `requires_grad` unchanged afterwards.
        pixels: preprocessed images `(num_images, 3, height, width)`.
        samples: the images' samples (for their `details`), in the same order.
        coarse_kinds: the detail kinds the heads predict.
        twin_pixels: `(num_images, 3, height, width)`, the twins of `pixels`, or `None` for no invariance term.
    Returns:
        the loss of every step.
    """
    if len(samples) != pixels.shape[0]:
        raise ValueError(f"pixels has {pixels.shape[0]} images but samples {len(samples)}: pass one sample per image.")
    if twin_pixels is not None and twin_pixels.shape != pixels.shape:
        raise ValueError(
            f"twin_pixels {tuple(twin_pixels.shape)} must match pixels {tuple(pixels.shape)}: one twin per image."
        )
    generator = torch.Generator().manual_seed(seed)
    hidden = vision_tower.config.hidden_size
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        heads = nn.ModuleDict({kind: nn.Linear(hidden, DETAIL_CLASSES[kind][0]) for kind in coarse_kinds})
    labels = {kind: detail_labels(samples, kind) for kind in coarse_kinds}
    losses = []
    with trained_in_place(vision_tower):
        optimizer = torch.optim.AdamW(
            [*vision_tower.parameters(), *heads.parameters()], lr=learning_rate, weight_decay=weight_decay
        )
        schedule = torch.optim.lr_scheduler.OneCycleLR(
            optimizer, max_lr=learning_rate, total_steps=steps, pct_start=0.1
        )
        for _ in range(steps):
            rows = torch.randint(0, pixels.shape[0], (batch_size,), generator=generator)
            batch = pixels[rows] if twin_pixels is None else torch.cat([pixels[rows], twin_pixels[rows]])
            output = vision_tower(pixel_values=batch, output_hidden_states=twin_pixels is not None)
            pooled = output.pooler_output[:batch_size]
            loss = sum(nn.functional.cross_entropy(heads[kind](pooled), labels[kind][rows]) for kind in coarse_kinds)
            for state in output.hidden_states[-invariant_layers:] if twin_pixels is not None else ():
                difference = (state[:batch_size] - state[batch_size:]).pow(2).mean()
                loss = loss + invariance_weight * difference / (state.var(dim=(0, 1)).mean().detach() + 1e-6)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            losses.append(loss.item())
    return losses


def pretrain_instruction_encoder(
    encoder: nn.Module,
    tokenizer,
    sentences: list[str],
    steps: int = 100,
    learning_rate: float = 1e-3,
    temperature: float = 0.05,
    seed: int = 0,
) -> list[float]:
    """Train a sentence encoder (a transformers text encoder, e.g. `BertModel`) in place with unsupervised SimCSE.

    Each sentence is encoded twice with dropout on; the two views are a positive pair and every other sentence of the
    batch a negative (InfoNCE on cosine similarity / `temperature`); embeddings are masked means of the last hidden
    state, as the fused model pools them by default. No label is used: the encoder only learns to tell sentences
    apart, as a real sentence encoder trained on paraphrase and contrastive data does. A randomly initialised one
    embeds every sentence of a small vocabulary alike (cosine about 0.9), which no aggregator can route on.

    Returns:
        the loss of every step; the encoder is left in `eval()` mode with `requires_grad` unchanged afterwards.
    """
    from types import SimpleNamespace

    from .modeling_fusion import pool_sentence_embeddings

    if len(set(sentences)) < 2:
        raise ValueError("pretrain_instruction_encoder needs at least two different sentences to contrast.")
    pooling = SimpleNamespace(instruction_pooling="mean", instruction_embedding_normalize=True)
    batch = tokenizer(sorted(set(sentences)), return_tensors="pt", padding=True)
    targets = torch.arange(batch["input_ids"].shape[0])
    losses = []
    with trained_in_place(encoder), torch.random.fork_rng():
        optimizer = torch.optim.AdamW(encoder.parameters(), lr=learning_rate)
        torch.manual_seed(seed)  # the dropout masks
        for _ in range(steps):
            first, second = (
                pool_sentence_embeddings(encoder(**batch).last_hidden_state, batch["attention_mask"], pooling)
                for _ in range(2)
            )
            loss = nn.functional.cross_entropy(first @ second.T / temperature, targets)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses


@torch.no_grad()
def layer_features(vision_tower: nn.Module, pixels: torch.Tensor, batch_size: int = 256) -> list[torch.Tensor]:
    """Every hidden state's patch tokens (CLS dropped, what LLaVA's projector sees): one `(num_images, num_patches,
    hidden)` tensor per entry of `hidden_states` (index 0 = embeddings)."""
    chunks = []
    for start in range(0, pixels.shape[0], batch_size):
        states = vision_tower(pixel_values=pixels[start : start + batch_size], output_hidden_states=True).hidden_states
        chunks.append([state[:, 1:, :] for state in states])
    return [torch.cat(per_layer) for per_layer in zip(*chunks)]


class PooledProbe(nn.Module):
    """Attention pooling over tokens (one learned score per token, softmax over the tokens), then a linear head, or
    a one-hidden-layer MLP head with `mlp_width > 0`: `(num, tokens, hidden) -> (num, num_classes)` logits."""

    def __init__(self, hidden: int, num_classes: int, mlp_width: int = 0):
        super().__init__()
        self.score = nn.Linear(hidden, 1)
        self.head = (
            nn.Sequential(nn.Linear(hidden, mlp_width), nn.GELU(), nn.Linear(mlp_width, num_classes))
            if mlp_width
            else nn.Linear(hidden, num_classes)
        )

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        weights = self.score(tokens).squeeze(-1).softmax(-1)
        return self.head((weights.unsqueeze(-1) * tokens).sum(1))


def probe_accuracy(
    train_tokens: torch.Tensor,
    train_labels: torch.Tensor,
    test_tokens: torch.Tensor,
    test_labels: torch.Tensor,
    num_classes: int,
    steps: int = 200,
    mlp_width: int = 0,
    seed: int = 0,
) -> float:
    """Held-out accuracy of a [`PooledProbe`] trained full-batch (Adam) on standardised tokens `(num, tokens,
    hidden)` (per-channel statistics from the training set)."""
    mean, std = train_tokens.mean((0, 1)), train_tokens.std((0, 1)) + 1e-6
    train_tokens, test_tokens = (train_tokens - mean) / std, (test_tokens - mean) / std
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        probe = PooledProbe(train_tokens.shape[-1], num_classes, mlp_width)
    optimizer = torch.optim.Adam(probe.parameters(), lr=3e-3, weight_decay=1e-4)
    for _ in range(steps):
        loss = nn.functional.cross_entropy(probe(train_tokens), train_labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    with torch.no_grad():
        return (probe(test_tokens).argmax(-1) == test_labels).float().mean().item()


def layer_probe(
    vision_tower: nn.Module,
    train_pixels: torch.Tensor,
    train_samples: list[SyntheticSample],
    test_pixels: torch.Tensor,
    test_samples: list[SyntheticSample],
    kinds: tuple[str, ...] = tuple(DETAIL_CLASSES),
    steps: int = 200,
    mlp_width: int = 0,
) -> dict[str, list[float]]:
    """The layer-wise probe curve: `{kind: [held-out accuracy of a pooled probe on hidden state i, i = 0..L]}`."""
    train_layers, test_layers = layer_features(vision_tower, train_pixels), layer_features(vision_tower, test_pixels)
    curves = {}
    for kind in kinds:
        train_labels, test_labels = detail_labels(train_samples, kind), detail_labels(test_samples, kind)
        curves[kind] = [
            probe_accuracy(train, train_labels, test, test_labels, DETAIL_CLASSES[kind][0], steps, mlp_width)
            for train, test in zip(train_layers, test_layers)
        ]
    return curves


__all__ = [
    "COARSE_KINDS",
    "DETAIL_CLASSES",
    "PooledProbe",
    "chance",
    "detail_labels",
    "layer_features",
    "layer_probe",
    "pixel_values",
    "pretrain_coarse_tower",
    "probe_accuracy",
]
