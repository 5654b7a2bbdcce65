import io

import pytest
from PIL import Image

from mmserve.errors import InvalidInputError
from mmserve.images import decode_image, probe_image
from tests.helpers import make_image


def test_probe_reads_the_size_and_enforces_the_pixel_cap():
    data = make_image(40, 30, seed=0)
    assert probe_image(data, 10_000) == (40, 30)
    with pytest.raises(InvalidInputError, match="40x30 = 1200 pixels, over the cap of 1000"):
        probe_image(data, 1000)


def test_a_decompression_bomb_is_rejected_from_its_header():
    buffer = io.BytesIO()
    Image.new("1", (20_000, 20_000)).save(buffer, "PNG")  # tiny file, 400 M pixels
    assert len(buffer.getvalue()) < 200_000
    with pytest.raises(InvalidInputError, match="pixels"):
        decode_image(buffer.getvalue(), 40_000_000)


@pytest.mark.parametrize("data", [b"", b"not an image", make_image(10, 10, seed=1)[:60]])
def test_bad_bytes_are_invalid_input(data):
    with pytest.raises(InvalidInputError):
        decode_image(data, 1_000_000)
