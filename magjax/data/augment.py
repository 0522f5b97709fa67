"""Training-time image decoding and augmentation on the host (NumPy + Pillow).

``none``: decode only. ``flip``: random horizontal flip with p = 0.5 (arcface_torch, MagFace).
``adaface``: flip (drawn first, applied last, which has the same distribution), and AdaFace's
three augmentations, each with probability 0.2, in AdaFace's order (official-losses.md section
6): a random crop box sampled like RandomResizedCrop (scale (0.2, 1), ratio (3/4, 4/3)),
low-resolution down / up-sampling (side ratio U(0.2, 1), random interpolations; Pillow's
NEAREST / BILINEAR / BOX / BICUBIC / LANCZOS stand in for cv2's NEAREST / LINEAR / AREA / CUBIC /
LANCZOS4) and photometric jitter (brightness, contrast and saturation factors U(0.5, 1.5) in
random order, as torchvision's ColorJitter does). The official AdaFace augmenter keeps the crop
in place on a black canvas ("crop with zero padding") rather than resizing it; ``adaface`` does
the same, and ``adaface_resized`` resizes the crop back to the full size instead.

Every random choice comes from the ``np.random.Generator`` passed in, which the pipeline seeds
from (seed, epoch, example index), so the augmented pixels are reproducible.
"""

from __future__ import annotations

import io
import logging
import math

import numpy as np
from PIL import Image, ImageEnhance

from magjax.data.images import to_rgb

log = logging.getLogger(__name__)

AUGMENTATIONS = ("none", "flip", "adaface", "adaface_resized")
# What Pillow raises for corrupt, truncated or unidentifiable data (UnidentifiedImageError is an
# OSError; some plugins raise SyntaxError or ValueError from deep inside a decoder).
DECODE_ERRORS = (OSError, SyntaxError, ValueError)
ADAFACE_PROB = 0.2
_INTERPOLATIONS = (Image.NEAREST, Image.BILINEAR, Image.BOX, Image.BICUBIC, Image.LANCZOS)
_warned_size = False


def decode(data: bytes, image_size: int = 112) -> Image.Image:
    """Decodes encoded image bytes to an RGB Pillow image of image_size x image_size.

    Raises OSError for corrupt or truncated data. Other sizes are resized (bilinear) with a
    one-time warning. Pillow only: prepared data was checked under the stricter policy of
    ``magjax.data.images`` when it was prepared; the picture is read as every reader reads it
    (``magjax.data.images.to_rgb``: EXIF orientation, 16-bit and float images, alpha).
    """
    global _warned_size
    im = Image.open(io.BytesIO(data))
    im.load()
    im = to_rgb(im)
    if im.size != (image_size, image_size):
        if not _warned_size:
            log.warning("image of %dx%d resized to %d (warned once)", *im.size, image_size)
            _warned_size = True
        im = im.resize((image_size, image_size), Image.BILINEAR)
    return im


def random_resized_crop(
    im: Image.Image,
    rng: np.random.Generator,
    scale=(0.2, 1.0),
    ratio=(3 / 4, 4 / 3),
    resize: bool = True,
) -> Image.Image:
    """torchvision RandomResizedCrop's box sampling (10 tries, then a centre crop).

    ``resize=True`` resizes the box to the full size (bilinear); ``resize=False`` keeps it in
    place and blacks out the rest, as AdaFace's augmenter does.
    """
    w, h = im.size
    area = w * h
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw, ch = round(math.sqrt(target * aspect)), round(math.sqrt(target / aspect))
        if 0 < cw <= w and 0 < ch <= h:
            top = int(rng.integers(0, h - ch + 1))
            left = int(rng.integers(0, w - cw + 1))
            break
    else:
        in_ratio = w / h
        if in_ratio < ratio[0]:
            cw, ch = w, round(w / ratio[0])
        elif in_ratio > ratio[1]:
            cw, ch = round(h * ratio[1]), h
        else:
            cw, ch = w, h
        top, left = (h - ch) // 2, (w - cw) // 2
    if resize:
        return im.resize((w, h), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    canvas = np.zeros((h, w, 3), np.uint8)
    canvas[top : top + ch, left : left + cw] = np.asarray(im)[top : top + ch, left : left + cw]
    return Image.fromarray(canvas)


def low_resolution(im: Image.Image, rng: np.random.Generator) -> Image.Image:
    """Down-samples to a side ratio U(0.2, 1) and back up, with random interpolations."""
    w, h = im.size
    r = rng.uniform(0.2, 1.0)
    small = (max(1, int(w * r)), max(1, int(h * r)))
    down = _INTERPOLATIONS[int(rng.integers(len(_INTERPOLATIONS)))]
    up = _INTERPOLATIONS[int(rng.integers(len(_INTERPOLATIONS)))]
    return im.resize(small, down).resize((w, h), up)


def photometric(im: Image.Image, rng: np.random.Generator, strength: float = 0.5) -> Image.Image:
    """Brightness, contrast and saturation jitter, factors U(1-s, 1+s), in random order."""
    enhancers = (ImageEnhance.Brightness, ImageEnhance.Contrast, ImageEnhance.Color)
    for i in rng.permutation(3):
        im = enhancers[i](im).enhance(rng.uniform(1 - strength, 1 + strength))
    return im


def augment_image(
    data: bytes, kind: str, rng: np.random.Generator | None, image_size: int = 112
) -> np.ndarray:
    """Decodes and augments one image: uint8 RGB [image_size, image_size, 3] (maybe a view)."""
    im = decode(data, image_size)
    if kind == "none":
        return np.asarray(im)
    flip = rng.random() < 0.5
    if kind in ("adaface", "adaface_resized"):
        if rng.random() < ADAFACE_PROB:
            im = random_resized_crop(im, rng, resize=kind == "adaface_resized")
        if rng.random() < ADAFACE_PROB:
            im = low_resolution(im, rng)
        if rng.random() < ADAFACE_PROB:
            im = photometric(im, rng)
    elif kind != "flip":
        raise ValueError(f"augment must be one of {AUGMENTATIONS}, not {kind!r}")
    arr = np.asarray(im)
    return arr[:, ::-1] if flip else arr
