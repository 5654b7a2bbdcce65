"""Shared fixtures: tiny random-weight llava-hf checkpoints built on the fly, test images."""

from __future__ import annotations

import pytest

from llm_service.engine import compiled_decode
from tests.helpers import make_image
from tools.checkpoints import LlavaShape, build_llava_checkpoint

# Embeddings of this shape are 576 x 2048 float32 = 4.7 MB per image: over gRPC's 4 MB default.
WIDE_SHAPE = LlavaShape(
    image_size=336,
    vision_hidden=32,
    vision_intermediate=64,
    vision_layers=1,
    text_hidden=2048,
    text_intermediate=64,
    text_layers=1,
    text_heads=4,
    text_kv_heads=4,
)


@pytest.fixture(scope="session", autouse=True)
def eager_decode_unless_asked():
    """The suite's engines decode eagerly (`--compile auto` would compile at every engine start, 20-80 s
    on 2 cores): LLM services started by a test get LLM_COMPILE=off, in-process engines find no C++
    compiler for `auto`. tests/service/test_compiled_decode.py asks for compile="on"."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LLM_COMPILE", "off")
        patch.setattr(compiled_decode, "cxx_compiler", lambda: None)
        yield


@pytest.fixture(scope="session")
def tiny_checkpoint(tmp_path_factory):
    return build_llava_checkpoint(tmp_path_factory.mktemp("ckpt") / "tiny-llava", seed=0)


@pytest.fixture(scope="session")
def wide_checkpoint(tmp_path_factory):
    return build_llava_checkpoint(tmp_path_factory.mktemp("ckpt") / "wide-llava", WIDE_SHAPE, seed=1)


@pytest.fixture(scope="session")
def image_dir(tmp_path_factory):
    """Test images of several sizes and formats (random pixels, so each encodes differently)."""
    folder = tmp_path_factory.mktemp("images")
    (folder / "a.png").write_bytes(make_image(80, 60, seed=1))
    (folder / "b.jpg").write_bytes(make_image(50, 90, seed=2, fmt="JPEG"))
    (folder / "c.png").write_bytes(make_image(120, 120, seed=3))
    (folder / "broken.png").write_bytes(b"\x89PNG\r\n\x1a\nthis is not really a png")
    return folder
