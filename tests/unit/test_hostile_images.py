"""A corpus of hostile image bytes (decompression bombs, animations, truncations, extreme aspect ratios,
EXIF rotation, EPS and SVG), each refused by the gateway's header probe or the vision service's decode
(mmserve.images) with an InvalidInputError that names what was wrong.
"""

from __future__ import annotations

import io

import pytest
from PIL import Image

from mmserve.errors import InvalidInputError
from mmserve.images import decode_image, probe_image
from tests.helpers import data_url, make_image
from tests.image_bytes import png_header
from tests.media_network import PNG, case, fetch, found, offline_network


@pytest.fixture(autouse=True)
def network(monkeypatch, request):
    yield from offline_network(monkeypatch, request)


def animated(fmt: str) -> bytes:
    frames = [Image.new("RGB", (32, 24), color) for color in ("red", "green", "blue")]
    buffer = io.BytesIO()
    frames[0].save(buffer, fmt, save_all=True, append_images=frames[1:], duration=50, loop=0)
    return buffer.getvalue()


def exif_rotated_jpeg() -> bytes:
    """A 40x20 JPEG whose EXIF says 'rotate 90° clockwise to display' (Orientation 6): shown 20x40."""
    image = Image.new("RGB", (40, 20), "white")
    image.paste((255, 0, 0), (0, 0, 10, 20))  # the stored left edge is red: the displayed top
    exif = Image.Exif()
    exif[0x0112] = 6
    buffer = io.BytesIO()
    image.save(buffer, "JPEG", exif=exif.tobytes())
    return buffer.getvalue()


JPEG = make_image(64, 48, seed=4, fmt="JPEG")
MAX_PIXELS = 40_000_000


@pytest.mark.parametrize(
    "data,reason",
    [
        (b"", "image is empty"),
        (png_header(100_000, 100_000), "too many pixels"),
        (png_header(50_000, 50_000), "too many pixels"),
        (png_header(7000, 7000), "49000000 pixels, over the cap of 40000000"),
        (png_header(4000, 1), "4000x1; its aspect ratio is over 50:1"),
        (png_header(1, 4000), "1x4000; its aspect ratio is over 50:1"),
        (png_header(0, 10), "cannot be decoded"),
        (PNG[:20], "cannot be decoded"),
        (b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>", "cannot be decoded"),
        (b"<?xml version='1.0'?><svg xmlns='http://www.w3.org/2000/svg'/>", "cannot be decoded"),
        (b"PK\x03\x04" + b"\x00" * 100, "cannot be decoded"),  # a zip named .png
        (b"%PDF-1.4\n1 0 obj\n<<>>\nendobj\n", "cannot be decoded"),
        case(
            b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n",
            "not an accepted image format",
            fix="image-formats",
        ),
        (b"\x00" * 64, "cannot be decoded"),
        (b"GIF89a", "cannot be decoded"),
    ],
)
def test_hostile_bytes_fail_the_header_probe(data, reason):
    with pytest.raises(InvalidInputError, match=reason):
        probe_image(data, MAX_PIXELS)
    with pytest.raises(InvalidInputError, match=reason):
        decode_image(data, MAX_PIXELS)


@found("image-formats")
def test_eps_is_not_an_accepted_format():
    """PIL would hand EPS to Ghostscript; only the web's raster formats are opened."""
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 10 10\n%%EndComments\nshowpage\n"
    with pytest.raises(InvalidInputError, match="not an accepted image format"):
        probe_image(eps, MAX_PIXELS)


@pytest.mark.parametrize(
    "data",
    [PNG[: len(PNG) * 2 // 3], JPEG[: len(JPEG) // 2]],
    ids=["truncated-png", "truncated-jpeg"],
)
def test_truncated_images_pass_the_header_probe_but_fail_the_decode(data):
    probe_image(data, MAX_PIXELS)  # the header is intact (the gateway's check)
    with pytest.raises(InvalidInputError, match="cannot be decoded.*(truncated|broken)"):
        decode_image(data, MAX_PIXELS)  # the vision service's decode


@pytest.mark.parametrize("fmt", ["GIF", "WEBP"])
def test_animated_images_decode_their_first_frame(fmt):
    data = animated(fmt)
    assert probe_image(data, MAX_PIXELS) == (32, 24)
    image = decode_image(data, MAX_PIXELS)
    assert image.mode == "RGB" and image.size == (32, 24)
    assert image.getpixel((5, 5))[0] > 200 and image.getpixel((5, 5))[1] < 60  # red: frame 0


@pytest.mark.parametrize("size", [(1, 1), (50, 1), (1, 50)])
def test_tiny_and_boundary_shapes_are_accepted(size):
    data = make_image(*size, seed=5)
    assert probe_image(data, MAX_PIXELS) == size
    assert decode_image(data, MAX_PIXELS).size == size


def test_aspect_ratio_just_over_the_cap():
    with pytest.raises(InvalidInputError, match="51x1; its aspect ratio is over 50:1"):
        probe_image(make_image(51, 1, seed=6), MAX_PIXELS)


@found("exif")
def test_exif_rotation_is_applied_when_decoding():
    data = exif_rotated_jpeg()
    assert probe_image(data, MAX_PIXELS) in {(40, 20), (20, 40)}
    image = decode_image(data, MAX_PIXELS)
    assert image.size == (20, 40)  # as displayed
    assert image.getpixel((10, 2))[1] < 100  # red on top
    assert image.getpixel((10, 37))[1] > 200  # white below


def test_a_data_url_of_a_bomb_is_fetched_then_refused_by_the_probe():
    data = fetch(data_url(png_header(100_000, 100_000)))
    with pytest.raises(InvalidInputError, match="too many pixels"):
        probe_image(data, MAX_PIXELS)


def test_svg_data_url_passes_the_fetch_and_fails_the_probe():
    svg = b"<svg xmlns='http://www.w3.org/2000/svg' width='10' height='10'/>"
    data = fetch(data_url(svg, "image/svg+xml"))
    with pytest.raises(InvalidInputError, match="cannot be decoded"):
        probe_image(data, MAX_PIXELS)
