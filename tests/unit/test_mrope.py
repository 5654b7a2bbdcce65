"""Qwen2-VL M-RoPE positions computed by the LLM adapter, against transformers' get_rope_index."""

from __future__ import annotations

import pytest
import torch
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2VLConfig,
    Qwen2VLForConditionalGeneration,
)

from llm_service.models.qwen2_vl import mrope_positions
from mmserve.wire import ImageSpan
from tools.checkpoints import decoder_sizes

IMAGE_ID = 7


def _tiny(version: str):
    text = dict(
        vocab_size=32,
        **decoder_sizes(hidden=16, intermediate=32, layers=1, heads=2, kv_heads=1),
        rope_parameters={"rope_type": "default", "mrope_section": [1, 1, 2], "rope_theta": 1e6},
    )
    if version == "qwen2_vl":
        config = Qwen2VLConfig(
            vision_config=dict(depth=1, embed_dim=16, hidden_size=16, num_heads=2, mlp_ratio=2),
            text_config=text,
            image_token_id=IMAGE_ID,
        )
        return Qwen2VLForConditionalGeneration(config)
    config = Qwen2_5_VLConfig(
        vision_config=dict(depth=1, hidden_size=16, out_hidden_size=16, intermediate_size=32, num_heads=2),
        text_config=text,
        image_token_id=IMAGE_ID,
    )
    return Qwen2_5_VLForConditionalGeneration(config)


def _prompt(layout: list) -> tuple[list[int], list[ImageSpan]]:
    """layout: ints = that many text tokens, tuples = an image with that (t, h, w) patch grid."""
    ids: list[int] = []
    spans = []
    for item in layout:
        if isinstance(item, int):
            ids += [3] * item
            continue
        t, h, w = item
        n = t * h * w // 4
        spans.append(ImageSpan(offset=len(ids), embedding=torch.zeros(n, 1), content_hash="x", grid_thw=item))
        ids += [IMAGE_ID] * n
    return ids, spans


LAYOUTS = {
    "one-image": [5, (1, 12, 20), 4],
    "two-images": [3, (1, 4, 8), 2, (1, 10, 6), 6],
    "image-first": [(1, 8, 8), 3],
    "image-last": [2, (1, 6, 14)],
    "vision-end-then-start": [1, (1, 4, 4), 2, (1, 2, 6), 1],  # two images only split by markers
    "no-image": [9],
}


@pytest.mark.parametrize("version", ["qwen2_vl", "qwen2_5_vl"])
@pytest.mark.parametrize("layout", list(LAYOUTS), ids=list(LAYOUTS))
def test_positions_equal_get_rope_index(version, layout):
    model = _tiny(version)
    ids, spans = _prompt(LAYOUTS[layout])
    positions, delta = mrope_positions(len(ids), spans, merge=2)

    input_ids = torch.tensor([ids])
    if spans:
        grids = torch.tensor([span.grid_thw for span in spans])
        expected, deltas = model.model.get_rope_index(
            input_ids,
            mm_token_type_ids=(input_ids == IMAGE_ID).int(),
            image_grid_thw=grids,
            attention_mask=torch.ones_like(input_ids),
        )
        expected_delta = int(deltas[0])
    else:  # HF uses plain 1-D positions for text-only prompts
        expected, expected_delta = torch.arange(len(ids)).expand(3, 1, -1), 0
    assert torch.equal(positions, expected[:, 0])
    assert delta == expected_delta


def test_worked_example():
    """transformers' get_rope_index on a worked example: grid [1,6,10] after 38 text tokens -> positions 38..42, next text 43, delta -10."""
    ids, spans = _prompt([38, (1, 6, 10), 4])
    positions, delta = mrope_positions(len(ids), spans, merge=2)
    image = positions[:, 38 : 38 + 15]  # (6/2) x (10/2) merged tokens
    assert image[0].unique().tolist() == [38]
    assert (image[1].min(), image[1].max()) == (38, 40)
    assert (image[2].min(), image[2].max()) == (38, 42)
    assert positions[:, 53].tolist() == [43, 43, 43]
    assert delta == -10
