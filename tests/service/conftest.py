"""Fixtures of the service tests."""

from __future__ import annotations

import pytest

from vision_service.config import VisionConfig
from vision_service.encoder import VisionEncoder


@pytest.fixture
def make_encoder(tiny_checkpoint):
    """make(**config overrides) -> a VisionEncoder of the tiny checkpoint, closed after the test."""
    made = []

    def make(**overrides):
        encoder = VisionEncoder(VisionConfig(checkpoint=str(tiny_checkpoint), **overrides))
        made.append(encoder)
        return encoder

    yield make
    for encoder in made:
        encoder.close()
