"""Vision adapters, one per model family: the registry below is the only place that lists them."""

from __future__ import annotations

from vision_service.models.llava import LlavaVision

VISION_ADAPTERS = {"llava": LlavaVision}
