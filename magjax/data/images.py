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

Also here: the faces of a folder or list file (:func:`list_images`, :func:`read_face`) and the
face boxes of a clustering protocol (:func:`crop_face_box`), read by extraction and evaluation.
"""

from __future__ import annotations

import io
import logging
import pathlib

import numpy as np
import simplejpeg
from PIL import Image, ImageFile

from magjax.data import FACE_SIZE
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


IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".bmp", ".webp")


def list_images(spec: str | pathlib.Path) -> list[pathlib.Path]:
    """Image paths of a directory (recursive, sorted) or of a list file (one path per line)."""
    spec = pathlib.Path(spec)
    if spec.is_dir():
        paths = sorted(p for p in spec.rglob("*") if p.suffix.lower() in IMAGE_SUFFIXES)
        if not paths:
            raise FileNotFoundError(f"no images ({', '.join(IMAGE_SUFFIXES)}) under {spec}")
        return paths
    if not spec.is_file():
        raise FileNotFoundError(f"--images {spec}: neither a directory nor a list file")
    paths = []
    for line in spec.read_text().splitlines():
        line = line.strip()
        if not line:
            continue
        path = pathlib.Path(line)
        if not path.is_absolute() and not path.exists() and (spec.parent / path).exists():
            path = spec.parent / path
        paths.append(path)
    if not paths:
        raise UserError(f"list file {spec} names no image")
    return paths


def read_face(path: str | pathlib.Path, size: int = FACE_SIZE) -> np.ndarray:
    """An image as uint8 RGB [size, size, 3] (resized bilinearly if it is not that size).

    An unreadable file (``magjax.data.images``: corrupt, truncated, a corrupt JPEG scan, a
    decompression bomb) raises ``UnreadableImageError``, an ``OSError`` naming the path.
    """
    img = read_image(path).convert("RGB")  # UnreadableImageError (an OSError) names the path
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def crop_face_box(path: pathlib.Path, columns: dict, row: int) -> np.ndarray:
    """Row ``row`` of a clustering protocol (``columns``: the CSV's columns): the image's face
    box, if the CSV has one, resized to 112x112 RGB."""

    try:
        img = read_image(path).convert("RGB")
        if all(c in columns for c in ("FACE_X", "FACE_Y", "FACE_WIDTH", "FACE_HEIGHT")):
            x, y, w, h = (float(columns[c][row]) for c in
                          ("FACE_X", "FACE_Y", "FACE_WIDTH", "FACE_HEIGHT"))
            img = img.crop((round(x), round(y), round(x + w), round(y + h)))
        return np.asarray(img.resize((FACE_SIZE, FACE_SIZE), Image.Resampling.BILINEAR), np.uint8)
    except UnreadableImageError as e:  # names the path
        raise UnreadableImageError(f"clustering protocol row {row + 2}: {e}") from e
    except ValueError as e:
        raise UserError(f"{path} (clustering protocol row {row + 2}): bad face box: {e}") from e
