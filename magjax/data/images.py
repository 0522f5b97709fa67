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

A decoded image is read as the 8-bit RGB picture it shows (:func:`to_rgb`, used by every reader:
``prepare``, training, ``.bin`` sets, ``extract``, IJB and clustering):

* EXIF orientation is applied, as ``cv2.imread`` / ``cv2.imdecode`` (what insightface reads
  images with) do by default;
* 16-bit images (Pillow modes ``I;16``, ``I;16B``, ``I``: 16-bit greyscale PNG and TIFF) are
  scaled from [0, 65535] to [0, 255] by ``round(v / 257)`` (the inverse of the usual
  ``v * 257``), not clipped; 16-bit RGB(A) PNGs, which Pillow opens as 8-bit RGB(A), keep their
  high byte;
* 32-bit float images (mode ``F``) are taken to hold [0, 1], the convention of float image files
  (scikit-image, tifffile), and are scaled by 255 and rounded (NaN reads as 0);
* alpha (``LA``, ``RGBA``, ``PA``, palette images with transparency) is dropped: the colour
  under it is kept, as ``cv2.imread`` does without ``IMREAD_UNCHANGED`` (face crops are opaque);
* every other mode (``1``, ``L``, ``P``, ``CMYK``, ``YCbCr``, ``LAB`` ...) goes through Pillow's
  ``convert("RGB")``.

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
from PIL import ExifTags, Image, ImageFile, ImageOps

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
        log.warning(
            "PIL.ImageFile.LOAD_TRUNCATED_IMAGES was on; magjax switched it off so that "
            "truncated images are reported instead of decoded to grey pixels"
        )


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


_SIXTEEN_BIT_MODES = ("I;16", "I;16L", "I;16B", "I;16N", "I")
_ALPHA_MODES = ("LA", "La", "PA", "RGBA", "RGBa", "P")


# Where JPEG, PNG and WebP keep an orientation: Pillow puts EXIF and XMP there in ``info``. For
# an image with neither the costly ``getexif()`` (a fifth of a training image's decode) is
# skipped; other formats (TIFF keeps it among its tags) always ask.
_ORIENTATION_INFO = ("exif", "xmp", "XML:com.adobe.xmp")


def _orientation(im: Image.Image) -> int | None:
    if im.format in ("JPEG", "MPO", "PNG", "WEBP") and not any(
        key in im.info for key in _ORIENTATION_INFO
    ):
        return 1
    return im.getexif().get(ExifTags.Base.Orientation, 1)


def to_rgb(im: Image.Image) -> Image.Image:
    """The 8-bit RGB picture a decoded image shows, under the rules of this module's docstring
    (EXIF orientation applied; 16-bit and float images scaled, not clipped; alpha dropped)."""
    if _orientation(im) not in (1, None):
        im = ImageOps.exif_transpose(im)
    mode = im.mode
    if mode == "RGB":
        return im
    if mode in _SIXTEEN_BIT_MODES:
        # int64: mode I is signed 32-bit; values outside 16 bits are clipped.
        wide = np.clip(np.asarray(im).astype(np.int64), 0, 65535)
        grey = ((wide + 128) // 257).astype(np.uint8)  # round(v / 257)
        return Image.fromarray(grey).convert("RGB")
    if mode == "F":
        unit = np.nan_to_num(np.asarray(im, np.float64), nan=0.0)
        grey = np.rint(np.clip(unit, 0.0, 1.0) * 255).astype(np.uint8)
        return Image.fromarray(grey).convert("RGB")
    if mode in _ALPHA_MODES:
        # Through RGBA: Pillow's P -> RGB warns for transparency given as bytes; the alpha
        # channel is then dropped, keeping the colour under it.
        return im.convert("RGBA").convert("RGB")
    return im.convert("RGB")


def decode_rgb(data: bytes, what: str) -> Image.Image:
    """:func:`open_image` then :func:`to_rgb`: the 8-bit RGB picture of encoded image bytes."""
    return to_rgb(open_image(data, what))


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
    img = to_rgb(read_image(path))  # UnreadableImageError (an OSError) names the path
    if img.size != (size, size):
        img = img.resize((size, size), Image.Resampling.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


def crop_face_box(path: pathlib.Path, columns: dict, row: int) -> np.ndarray:
    """Row ``row`` of a clustering protocol (``columns``: the CSV's columns): the image's face
    box, if the CSV has one, resized to 112x112 RGB."""

    try:
        img = to_rgb(read_image(path))
        if all(c in columns for c in ("FACE_X", "FACE_Y", "FACE_WIDTH", "FACE_HEIGHT")):
            x, y, w, h = (
                float(columns[c][row]) for c in ("FACE_X", "FACE_Y", "FACE_WIDTH", "FACE_HEIGHT")
            )
            img = img.crop((round(x), round(y), round(x + w), round(y + h)))
        return np.asarray(img.resize((FACE_SIZE, FACE_SIZE), Image.Resampling.BILINEAR), np.uint8)
    except UnreadableImageError as e:  # names the path
        raise UnreadableImageError(f"clustering protocol row {row + 2}: {e}") from e
    except ValueError as e:
        raise UserError(f"{path} (clustering protocol row {row + 2}): bad face box: {e}") from e
