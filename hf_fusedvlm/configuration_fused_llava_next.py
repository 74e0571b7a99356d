"""FusedLlavaNext model configuration."""

from huggingface_hub.dataclasses import strict

from .configuration_fused_llava import FusedLlavaConfig


# LLaVA-NeXT's crop layouts, (height, width) in pixels, as `LlavaNextConfig` defaults them (CLIP-L/336 tiles).
DEFAULT_IMAGE_GRID_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]


@strict
class FusedLlavaNextConfig(FusedLlavaConfig):
    r"""
    Configuration of a LLaVA-NeXT (any-resolution) model whose visual tokens are a fusion of several vision-encoder
    layers: [`FusedLlavaConfig`]'s fields (the fuser runs on every crop, the base view and the tiles, and its features
    are packed as LLaVA-NeXT packs them) plus [`LlavaNextConfig`]'s `image_grid_pinpoints`.

    image_grid_pinpoints (`list[list[int]]`, *optional*):
        The resolutions `(height, width)` an image may be tiled to, each a multiple of the tower's image size.
        Defaults to LLaVA-NeXT's `[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]`.

    Example:

    ```python
    >>> from hf_fusedvlm import FusedLlavaNextConfig

    >>> config = FusedLlavaNextConfig(fuser_type="igva", instruction_encoder_config={"model_type": "mpnet"})
    >>> config.image_grid_pinpoints[0]
    [336, 672]
    ```"""

    model_type = "fused_llava_next"

    image_grid_pinpoints: list | None = None

    def __post_init__(self, **kwargs):
        super().__post_init__(**kwargs)
        if self.image_grid_pinpoints is None:
            self.image_grid_pinpoints = [list(pinpoint) for pinpoint in DEFAULT_IMAGE_GRID_PINPOINTS]
        image_size = self.vision_config.image_size
        for pinpoint in self.image_grid_pinpoints:
            if (
                not isinstance(pinpoint, (list, tuple))
                or len(pinpoint) != 2
                or any(not isinstance(side, int) or side <= 0 or side % image_size for side in pinpoint)
            ):
                raise ValueError(
                    f"image_grid_pinpoints holds {pinpoint!r}: each entry is a (height, width) pair of positive "
                    f"multiples of the vision tower's image size ({image_size}), e.g. [{image_size}, "
                    f"{2 * image_size}]."
                )


__all__ = ["FusedLlavaNextConfig"]
