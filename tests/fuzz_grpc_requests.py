"""Hypothesis strategies of hostile gRPC requests, built field by field as any client could:
`GenerateRequest`s for the LLM service (token ids, image spans, embedding tensors, sampling values) and
`EmbedRequest`s for the vision service (decodable, hostile and random image bytes; right, wrong and
cached hashes; pixel bounds)."""

from __future__ import annotations

import io
import math

import torch
from hypothesis import strategies as st
from PIL import Image

from mmserve.images import content_hash
from mmserve.proto import llm_pb2, tensor_pb2, vision_pb2
from mmserve.tensor_codec import tensor_to_pb
from tests.helpers import make_image
from tests.image_bytes import png_header

MAX_MODEL_LEN = 48  # the fuzzed engine's context: keeps every generation short

INT32 = (-(2**31), 2**31 - 1)
INT64 = (-(2**63), 2**63 - 1)
EDGE_INT32 = [0, 1, -1, 2, 63, 64, 65, 399, 400, 401, 1023, 1024, 1025, 2**15, 2**31 - 1, -(2**31)]
EDGE_INT64 = [0, 1, -1, 2, 2**31, 2**32, 2**62, 2**63 - 1, -(2**63)]
FLOATS = st.one_of(
    st.floats(width=32),  # NaN, +-inf, subnormals; float32 as the wire carries them
    st.sampled_from(
        [0.0, -0.0, 1e-6, 1e-5, 0.5, 1.0, 2.0, 2.5, -1.0, 1e30, -1e30, math.nan, math.inf, -math.inf]
    ),
)


def int32s(lo: int = INT32[0], hi: int = INT32[1]):
    return st.one_of(st.integers(lo, hi), st.sampled_from([v for v in EDGE_INT32 if lo <= v <= hi]))


def maybe(draw, valid, hostile, hostile_in: int = 20):
    """A valid value, or (1 time in `hostile_in`) a hostile one."""
    return draw(hostile) if draw(st.integers(0, hostile_in - 1)) == 0 else draw(valid)


# ---- GenerateRequest ----------------------------------------------------------------------------------

DTYPES = ["float32", "float16", "bfloat16", "float64"]
HOSTILE_DTYPES = [
    "int64",
    "int32",
    "uint8",
    "torch.float32",
    "float8_e4m3fn",
    "Float32",
    "",
    "float",
    "bool",
    "complex64",
]
TORCH = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
BAD_VALUES = [math.nan, math.inf, -math.inf, 65504.0, -65504.0, 65505.0, 1e30, -1e38, 5e-324, -0.0]


@st.composite
def embedding(draw, rows: int, hidden: int) -> tensor_pb2.Tensor:
    """An embedding tensor for `rows` rows: mostly valid (values, dtype, shape, bytes), else one thing off."""
    dtype = draw(st.sampled_from(DTYPES))
    seed = draw(st.integers(0, 2**16))
    tensor = torch.randn(rows, hidden, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)
    if draw(st.integers(0, 5)) == 0:  # a few bad values (the cast below may turn them into inf)
        for _ in range(draw(st.integers(1, 3))):
            value = draw(st.one_of(st.sampled_from(BAD_VALUES), st.floats()))
            tensor.view(-1)[draw(st.integers(0, tensor.numel() - 1))] = value
    message = tensor_to_pb(tensor.to(TORCH[dtype]))
    flaw = draw(st.sampled_from(["none"] * 10 + ["dtype", "shape", "tensor shape", "bytes", "random bytes"]))
    if flaw == "tensor shape":  # a tensor of another shape, its bytes consistent with it
        dim = st.sampled_from([0, 1, rows - 1, rows, rows + 1, hidden - 1, hidden, hidden + 1, 2 * hidden])
        shape = draw(st.lists(dim, max_size=3).filter(lambda shape: shape != [rows, hidden]))
        message = tensor_to_pb(torch.zeros(shape, dtype=TORCH[dtype]))
    elif flaw == "dtype":
        message.dtype = draw(st.one_of(st.sampled_from(HOSTILE_DTYPES + DTYPES), st.text(max_size=12)))
    elif flaw == "shape":
        shape = st.one_of(st.integers(*INT64), st.sampled_from(EDGE_INT64 + [rows, hidden, rows * hidden]))
        message.shape[:] = draw(st.lists(shape, max_size=4))
    elif flaw == "bytes":
        size = len(message.data)
        cut = draw(st.sampled_from([0, 1, size - 1, size + 1, size + 2, size // 2, size * 2]))
        message.data = (message.data * 3)[: max(cut, 0)]
    elif flaw == "random bytes":  # the right length, any bit patterns (NaN and inf included)
        message.data = draw(st.binary(min_size=len(message.data), max_size=len(message.data)))
    return message


@st.composite
def generate_request(draw, vocab: int, image_id: int, hidden: int) -> llm_pb2.GenerateRequest:
    text_id = st.integers(0, vocab - 1).filter(lambda t: t != image_id)
    ids, spans = _draw_prompt(draw, text_id, image_id, hidden)
    ids = _draw_structural_flaw(draw, ids, spans, text_id, hidden)
    sampling = _draw_sampling(draw, vocab)
    request_id = maybe(
        draw,
        st.just("fuzz"),
        st.one_of(st.sampled_from(["", "a\nb", "x" * 257, "\x00", "\u202e"]), st.text(max_size=20)),
    )
    return llm_pb2.GenerateRequest(request_id=request_id, token_ids=ids, images=spans, sampling=sampling)


# The helpers below take `draw` from generate_request (plain functions, not strategies of their own, so
# the examples drawn are the ones one function drew before).


def _draw_prompt(draw, text_id, image_id: int, hidden: int) -> tuple[list[int], list[llm_pb2.ImageSpan]]:
    """Text, then up to two images: each a run of placeholders, its span and its embedding."""
    ids: list[int] = []
    spans: list[llm_pb2.ImageSpan] = []
    for k in range(draw(st.integers(0, 2)) + 1):
        if k:  # an image: a run of placeholders, its span and its embedding
            rows = draw(st.integers(1, 4))
            spans.append(
                llm_pb2.ImageSpan(
                    offset=len(ids),
                    length=rows,
                    embedding=draw(embedding(rows, hidden)),
                    content_hash=maybe(draw, st.just("h"), st.text(max_size=300)),
                    grid_thw=maybe(draw, st.just([]), st.lists(st.integers(*INT64), max_size=4)),
                )
            )
            ids += [image_id] * rows
        ids += draw(st.lists(text_id, max_size=5))
    return ids or [1], spans


def _draw_structural_flaw(
    draw, ids: list[int], spans: list[llm_pb2.ImageSpan], text_id, hidden: int
) -> list[int]:
    """Now and then, one structural flaw: the token ids returned, `spans` changed in place."""
    flaw = draw(
        st.sampled_from(["none"] * 12 + ["id", "no ids", "long", "offset", "length", "order", "span"])
    )
    if flaw == "id":
        ids[draw(st.integers(0, len(ids) - 1))] = draw(int32s())
    elif flaw == "no ids":
        ids = []
    elif flaw == "long":  # at or over the context
        ids = draw(st.lists(text_id, min_size=MAX_MODEL_LEN - 1, max_size=MAX_MODEL_LEN + 2))
    elif flaw in ("offset", "length") and spans:
        span = spans[draw(st.integers(0, len(spans) - 1))]
        setattr(span, flaw, draw(int32s()))
    elif flaw == "order" and len(spans) > 1:
        spans.reverse()
    elif flaw == "span":  # a span too many, or one dropped
        if spans and draw(st.booleans()):
            spans.pop(draw(st.integers(0, len(spans) - 1)))
        else:
            rows = draw(st.integers(0, 3))
            spans.append(
                llm_pb2.ImageSpan(
                    offset=draw(int32s()),
                    length=draw(int32s()),
                    embedding=draw(embedding(max(rows, 1), hidden)),
                )
            )
    return ids


def _draw_sampling(draw, vocab: int) -> llm_pb2.SamplingParams:
    sampling = llm_pb2.SamplingParams(
        temperature=maybe(draw, st.sampled_from([0.0, 0.0, 0.7, 1.0, 2.0]), FLOATS),
        top_p=maybe(draw, st.sampled_from([0.0, 0.5, 0.9, 1.0]), FLOATS),  # 0: unset (1)
        top_k=maybe(draw, st.sampled_from([0, 1, 5, 50, -1]), int32s()),
        max_new_tokens=maybe(draw, st.integers(1, 6), int32s()),
        min_new_tokens=maybe(draw, st.integers(0, 3), int32s()),
        ignore_eos=draw(st.booleans()),
        stop_token_ids=maybe(
            draw,
            st.lists(st.integers(0, vocab - 1), max_size=3),
            st.one_of(
                st.lists(int32s(), max_size=4),
                st.lists(st.integers(0, vocab - 1), min_size=1025, max_size=1030),
            ),
        ),
        repetition_penalty=maybe(draw, st.sampled_from([0.0, 1.0, 1.2, 0.8]), FLOATS),  # 0: unset (1)
        min_p=maybe(draw, st.sampled_from([0.0, 0.1, 1.0]), FLOATS),
        presence_penalty=maybe(draw, st.sampled_from([0.0, 0.5, -2.0, 2.0]), FLOATS),
        frequency_penalty=maybe(draw, st.sampled_from([0.0, -0.5, 2.0]), FLOATS),
    )
    if draw(st.booleans()):
        sampling.seed = draw(st.integers(0, 2**64 - 1))
    if draw(st.booleans()):  # logprobs show NaN or inf logits, which tokens alone may not
        sampling.logprobs = maybe(draw, st.integers(0, 20), int32s())
    return sampling


# ---- EmbedRequest -------------------------------------------------------------------------------------


def encoded(mode: str, size: tuple[int, int], fmt: str) -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, size, color=7 if mode in ("L", "P", "1", "I;16", "I", "F") else (7,) * len(mode)).save(
        buffer, fmt
    )
    return buffer.getvalue()


GOOD = make_image(20, 12, seed=3)
DECODABLE = [
    GOOD,
    make_image(1, 1, seed=1),
    make_image(60, 2, seed=2),  # aspect ratio 30
    make_image(9, 9, seed=4, fmt="JPEG"),
    encoded("RGBA", (5, 5), "PNG"),
    encoded("L", (5, 5), "PNG"),
    encoded("P", (5, 5), "GIF"),
    encoded("1", (5, 5), "BMP"),
    encoded("I;16", (5, 5), "PNG"),
    encoded("F", (5, 5), "TIFF"),
    encoded("CMYK", (5, 5), "JPEG"),
    encoded("RGB", (5, 5), "WEBP"),
    encoded("RGB", (5, 5), "ICO"),
]
HOSTILE = [
    make_image(200, 2, seed=2),  # aspect ratio 100: refused
    png_header(100_000, 100_000),
    png_header(0, 5),
    png_header(2**31 - 1, 1),
    GOOD[:40],
    GOOD[:-20],
    b"",
    b"\x89PNG\r\n\x1a\n",
    b"GIF89a",
    b"<svg xmlns='http://www.w3.org/2000/svg'/>",
]
IMAGE_BYTES = st.one_of(
    st.sampled_from(DECODABLE), st.sampled_from(DECODABLE), st.sampled_from(HOSTILE), st.binary(max_size=64)
)


@st.composite
def embed_request(draw) -> vision_pb2.EmbedRequest:
    images = []
    for _ in range(draw(st.integers(1, 3)) if draw(st.integers(0, 9)) else 0):
        data = draw(IMAGE_BYTES)
        # known: a hash the cache may hold, with or without its bytes
        digest = draw(st.sampled_from(["", "", "", "right", "right", "right", "wrong", "text", "known"]))
        if digest == "right":
            digest = content_hash(data)
        elif digest == "wrong":
            digest = content_hash(data + b"x")
        elif digest == "text":
            digest = draw(st.text(max_size=70))
        elif digest == "known":
            digest = content_hash(GOOD)
            data = data if draw(st.booleans()) else b""
        images.append(vision_pb2.ImageInput(data=data, content_hash=digest))
    message = vision_pb2.EmbedRequest(request_id=draw(st.text(max_size=10)), images=images)
    pixels = st.one_of(st.integers(*INT64), st.sampled_from(EDGE_INT64))
    if draw(st.integers(0, 7)) == 0:
        message.min_pixels = draw(pixels)
    if draw(st.integers(0, 7)) == 0:
        message.max_pixels = draw(pixels)
    return message
