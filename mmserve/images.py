"""Image decoding with a pixel cap checked before the full decode (decompression bombs)."""

from __future__ import annotations

import hashlib
import io
import warnings

from PIL import Image, ImageOps

from mmserve.errors import InvalidInputError

DEFAULT_MAX_IMAGE_PIXELS = 40_000_000
# Processors resize by the short side (CLIP: to 336 px), so a 4000x1 strip would become a
# 1.3-million-pixel-wide image before cropping: refuse such shapes from the header.
MAX_ASPECT_RATIO = 50
# The web's raster formats ("JPEG" covers MPO, the multi-frame JPEG phone cameras write). Others are
# never opened: PIL would hand EPS to Ghostscript, and exotic decoders are attack surface for no gain.
ACCEPTED_FORMATS = ("PNG", "JPEG", "GIF", "WEBP", "BMP", "TIFF")
Image.init()  # registers every plugin, so that Image.open(formats=...) knows each accepted name


def content_hash(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def probe_image(data: bytes, max_pixels: int, what: str = "image") -> tuple[int, int]:
    """(width, height) read from the header only; raises InvalidInputError if unreadable or too large."""
    if not data:
        raise InvalidInputError(f"{what} is empty")
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("error", Image.DecompressionBombWarning)
            with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
                width, height = image.size
    except InvalidInputError:
        raise
    except Image.UnidentifiedImageError:
        raise InvalidInputError(
            f"{what} cannot be decoded as an image: not an accepted image format "
            f"({', '.join(ACCEPTED_FORMATS)})"
        ) from None
    except (Image.DecompressionBombError, Image.DecompressionBombWarning):
        raise InvalidInputError(f"{what} has too many pixels") from None
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for bad files
        raise InvalidInputError(
            f"{what} cannot be decoded as an image ({type(exc).__name__}: {exc})"
        ) from None
    if width <= 0 or height <= 0:
        raise InvalidInputError(f"{what} has an empty size {width}x{height}")
    if max(width, height) > MAX_ASPECT_RATIO * min(width, height):
        raise InvalidInputError(f"{what} is {width}x{height}; its aspect ratio is over {MAX_ASPECT_RATIO}:1")
    if width * height > max_pixels:
        raise InvalidInputError(
            f"{what} is {width}x{height} = {width * height} pixels, over the cap of {max_pixels}"
        )
    return width, height


def decode_image(data: bytes, max_pixels: int, what: str = "image") -> Image.Image:
    """Fully decode to RGB after the header check (first frame of animations), turned upright as its
    EXIF orientation says (as browsers show it; the pixel count and aspect ratio do not change)."""
    probe_image(data, max_pixels, what)
    try:
        with Image.open(io.BytesIO(data), formats=ACCEPTED_FORMATS) as image:
            image.load()
            return ImageOps.exif_transpose(image).convert("RGB")
    except Exception as exc:  # noqa: BLE001 - truncated/corrupt data surfaces here
        raise InvalidInputError(
            f"{what} cannot be decoded as an image ({type(exc).__name__}: {exc})"
        ) from None
