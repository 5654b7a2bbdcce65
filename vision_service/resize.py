"""Resize bounds of dynamic-resolution families (Qwen2-VL): a request's, checked against the server's."""

from __future__ import annotations

import dataclasses
import functools

from mmserve.errors import InvalidInputError
from mmserve.wire import PixelLimits
from vision_service.config import VisionConfig


def resize_options(bounds: PixelLimits) -> dict[str, int]:
    """Bounds as preprocess_one keywords (min_pixels/max_pixels); unset ones are left out."""
    return {name: value for name, value in dataclasses.asdict(bounds).items() if value is not None}


def _bound(name: str, requested: int | None, default: int, ceiling: int) -> int | None:
    """One bound: the request's (at most the server's ceiling), else the server's default (0 = none)."""
    if requested is None:
        return default or None
    if requested < 1:
        raise InvalidInputError(f"{name} must be a positive number of pixels, got {requested}")
    if ceiling and requested > ceiling:
        # A request may narrow the server's bounds, never widen them: the resized area decides the
        # encoder's memory and time.
        raise InvalidInputError(f"{name} ({requested}) is above this server's max_pixels ({ceiling})")
    return int(requested)


class ResizePolicy:
    """Turns a request's PixelLimits into the bounds its images are resized to (and cached under)."""

    def __init__(self, adapter, family: str, config: VisionConfig):
        self.adapter = adapter
        self.family = family
        self.config = config
        if (config.min_pixels or config.max_pixels) and not self.dynamic:
            raise ValueError(f"min_pixels/max_pixels apply to dynamic-resolution families, not {family}")

    @property
    def dynamic(self) -> bool:
        return self.adapter.dynamic_resolution

    @functools.cached_property
    def _checkpoint_max_pixels(self) -> int:
        return self.adapter.max_pixels(self.adapter.load_processor(self.config.checkpoint))

    def ceiling(self) -> int:
        """The largest resized image area this server allows: its --max-pixels, else the checkpoint's."""
        return self.config.max_pixels or self._checkpoint_max_pixels

    def bounds(self, pixels: PixelLimits | None) -> PixelLimits:
        """The request's bounds, else the service's; None = the checkpoint's (raises InvalidInputError)."""
        if not self.dynamic:
            if pixels:
                raise InvalidInputError(
                    f"min_pixels/max_pixels are not supported by the {self.family} family (fixed resolution)"
                )
            return PixelLimits()
        pixels = pixels or PixelLimits()
        ceiling = self.ceiling()
        bounds = PixelLimits(
            min_pixels=_bound("min_pixels", pixels.min_pixels, self.config.min_pixels, ceiling),
            max_pixels=_bound("max_pixels", pixels.max_pixels, self.config.max_pixels, ceiling),
        )
        if (bounds.min_pixels or 0) > (bounds.max_pixels or 1 << 62):
            raise InvalidInputError(
                f"min_pixels ({bounds.min_pixels}) is larger than max_pixels ({bounds.max_pixels})"
            )
        return bounds
