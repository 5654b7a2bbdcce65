"""End-to-end fixtures: a module's stack (`served`, which a module overrides to serve another checkpoint
or other flags) and the official openai client on it."""

from __future__ import annotations

import pytest

from tests.helpers import openai_client, serving


@pytest.fixture(scope="module")
def served(tiny_checkpoint, image_dir, tmp_path_factory):
    """(stack, http base url of image_dir): the tiny LLaVA checkpoint, images readable as files and urls."""
    with serving(tiny_checkpoint, image_dir, tmp_path_factory.mktemp("logs")) as stack_and_base:
        yield stack_and_base


@pytest.fixture(scope="module")
def client(served):
    return openai_client(served[0])
