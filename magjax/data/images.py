"""Decoding an image completely or not at all: where magjax decides that an image is unreadable.

An image is unreadable, and raises :class:`UnreadableImageError` naming it, when

* Pillow cannot identify or decode it, including a file cut short: Pillow's
  ``ImageFile.LOAD_TRUNCATED_IMAGES`` stays off (it is switched back off, with a warning, if
  another library turned it on), so truncated data is an error rather than grey pixels;
* it declares more pixels than Pillow's decompression-bomb limit (``2 * Image.MAX_IMAGE_PIXELS``,
  about 179 M pixels): it is refused before any pixel is allocated;
* it is a JPEG in which libjpeg finds corrupt data (a bad Huffman code, a marker in the middle of
  the scan, extra bytes before the end marker, a premature end). Pillow ignores libjpeg's
  warnings and returns garbage pixels for such a scan, so JPEGs are also decoded once with
  ``simplejpeg`` in strict mode, which turns every libjpeg warning into an error. Corruption that
  libjpeg cannot notice (bytes changed into other valid codes) stays undetectable.

Where skipping is what the user asked for (``prepare``, ``extract --skip-unreadable``) such an
image is skipped, counted and logged; everywhere else it is an error naming the file.
"""

from __future__ import annotations

import io
import logging

import simplejpeg
from PIL import Image, ImageFile

from magjax.errors import UserError

log = logging.getLogger(__name__)

# What Pillow and simplejpeg raise for unreadable data: UnidentifiedImageError and truncation are
# OSErrors, some plugins raise SyntaxError or ValueError from deep inside a decoder, simplejpeg
# raises ValueError, and DecompressionBombError derives from Exception only.
_DECODER_ERRORS = (OSError, SyntaxError, ValueError, Image.DecompressionBombError)
# JPEG and the JPEG-based MPO (camera multi-picture files, whose first frame Pillow decodes).
_JPEG_FORMATS = ("JPEG", "MPO")


class UnreadableImageError(UserError, OSError):
    """An image that cannot be decoded completely (corrupt, truncated or a decompression bomb).

    Also an ``OSError``, what Pillow raises for unreadable images, so that code skipping
    unreadable images catches it.
    """


def _keep_truncated_images_off() -> None:
    # tensorflow_datasets' thumbnail code, for one, switches this global on.
    if ImageFile.LOAD_TRUNCATED_IMAGES:
        ImageFile.LOAD_TRUNCATED_IMAGES = False
        log.warning("PIL.ImageFile.LOAD_TRUNCATED_IMAGES was on; magjax switched it off so that "
                    "truncated images are reported instead of decoded to grey pixels")


def open_image(data: bytes, what: str) -> Image.Image:
    """Decodes encoded image bytes completely and returns the loaded Pillow image.

    ``what`` names the image in the error (a path, or a file and record). Raises
    :class:`UnreadableImageError` under the policy of this module's docstring.
    """
    _keep_truncated_images_off()
    try:
        im = Image.open(io.BytesIO(data))
        im.load()
        if im.format in _JPEG_FORMATS:
            simplejpeg.decode_jpeg(data, strict=True)
    except Image.UnidentifiedImageError:
        raise UnreadableImageError(
            f"{what} cannot be decoded: not in an image format that Pillow reads"
        ) from None
    except _DECODER_ERRORS as e:
        raise UnreadableImageError(f"{what} cannot be decoded: {e}") from e
    return im


def read_image(path) -> Image.Image:
    """Reads and decodes an image file (see :func:`open_image`); errors name the path."""
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise UnreadableImageError(f"{path}: cannot read image file: {e.strerror or e}") from e
    return open_image(data, str(path))
