"""Image tags in prompt token ids -> the rows the vision service returned for each image."""

from __future__ import annotations

from mmserve.errors import InvalidInputError
from mmserve.wire import ImageFeatures, ImageSpan


def expand_image_tokens(
    token_ids: list[int], image_token_id: int, features: list[ImageFeatures]
) -> tuple[list[int], list[ImageSpan]]:
    """Replace the i-th image token by features[i].num_tokens copies and record each span.

    N_i comes from the vision service's answer, so the prompt and the embeddings agree by construction.
    """
    tags = sum(1 for t in token_ids if t == image_token_id)
    if tags != len(features):
        raise InvalidInputError(f"the prompt has {tags} image tags but {len(features)} images were given")
    expanded: list[int] = []
    spans: list[ImageSpan] = []
    images = iter(features)
    for token in token_ids:
        if token != image_token_id:
            expanded.append(token)
            continue
        image = next(images)
        spans.append(
            ImageSpan(
                offset=len(expanded),
                embedding=image.embedding,
                content_hash=image.content_hash,
                grid_thw=image.grid_thw,
            )
        )
        expanded.extend([image_token_id] * image.num_tokens)
    return expanded, spans
