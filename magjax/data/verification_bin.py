"""insightface verification sets (``lfw.bin``, ``cfp_fp.bin``, ``agedb_30.bin`` ...): read, write.

Format (docs/field.md section 3b): a pickle of ``(bins, issame_list)`` where ``bins``
holds 2P encoded images (py2 ``str`` in the original releases, numpy uint8 arrays from
``cv2.imencode`` in newer ones) and pair i is ``bins[2i], bins[2i+1]``.

A pickle can run arbitrary code, and these files are downloaded from mirrors, so they are read
through :class:`RestrictedUnpickler`, which resolves only the few globals that rebuild uint8
numpy arrays (and bool ones: an ``issame`` saved as a numpy array, which insightface's loader
reads like its list of bools), and the latin-1 bytes helper of protocol-2 pickles written by
Python 3; anything
else is refused with an error naming the file and the global. The check has to be written by
hand: the standard library offers only the ``find_class`` hook for it. A tiny pickle could also
declare huge arrays or reference one image many times; what a ``.bin`` may declare is bounded
by its own size (:func:`read_bin`) before anything is allocated or copied.

The 10-fold protocol needs at least 10 pairs, same- and different-identity pairs both, and the
different ones in more than one fold (:func:`protocol_problem`): evaluation refuses other sets in
one line naming the file, ``inspect`` reports why in ``protocol_problem``.
"""

from __future__ import annotations

import io
import logging
import math
import os
import pathlib
import pickle
import reprlib
from collections.abc import Sequence

import numpy as np
from PIL import Image

from magjax import files
from magjax.data import FACE_SIZE
from magjax.data import images as image_io
from magjax.errors import UserError

log = logging.getLogger(__name__)


class UnsafePickleError(UserError, pickle.UnpicklingError):
    """A ``.bin`` file asked for a global that a verification set never needs, or declared more
    data than the file holds."""


def _ndarray_class(*args):
    # What find_class gives for ``numpy.ndarray``: numpy's pickles only pass the class to
    # _reconstruct; calling it would allocate an array of any declared shape.
    raise UnsafePickleError("numpy.ndarray(...) called directly: refused")


# uint8 for the encoded images, bool for an issame list saved as a numpy array (insightface
# writes a list of bools; a bool array is read the same way by its loader). Both are one byte per
# element, so the bound on a declared array's bytes holds for either.
_DTYPES = {"u1": np.dtype("u1"), "b1": np.dtype("b1")}


def _uint8_dtype(name, *args):
    key = name.decode("ascii", "replace") if isinstance(name, bytes) else name
    if key not in _DTYPES:
        raise UnsafePickleError(
            f"numpy.dtype({name!r}) refused: a verification .bin holds uint8 images ('u1') and "
            "bool issame flags ('b1') only"
        )
    return _DTYPES[key]


def _latin1_encode(text, encoding="utf-8"):
    # Python 3 pickles bytes as _codecs.encode(str, 'latin1') under protocol 2.
    if encoding not in ("latin1", "latin-1"):
        raise UnsafePickleError(f"_codecs.encode with encoding {encoding!r} refused")
    return text.encode("latin1")


# Global -> name of the RestrictedUnpickler method (or plain function) that rebuilds it.
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy._core.multiarray", "_reconstruct"): "_reconstruct",
    ("numpy.core.numeric", "_frombuffer"): "_frombuffer",
    ("numpy._core.numeric", "_frombuffer"): "_frombuffer",
    ("numpy", "ndarray"): _ndarray_class,
    ("numpy", "dtype"): _uint8_dtype,
    ("_codecs", "encode"): _latin1_encode,
}


class RestrictedUnpickler(pickle.Unpickler):
    """Unpickler whose ``find_class`` resolves only the uint8-array globals in ``_ALLOWED``.

    Arrays are bounded before they are allocated: none may declare more than ``max_bytes``
    (the size of the file: an array's data is stored in it).
    """

    def __init__(self, file, *, source: str, max_bytes: int, **kwargs):
        super().__init__(file, **kwargs)
        self.source = source
        self.max_bytes = max_bytes

    def find_class(self, module: str, name: str):
        rebuild = _ALLOWED.get((module, name))
        if rebuild is None:
            raise UnsafePickleError(
                f"{self.source}: refused to load global '{module}.{name}': a verification .bin "
                "may only contain encoded images (bytes or uint8 arrays) and a list of bools"
            )
        return getattr(self, rebuild) if isinstance(rebuild, str) else rebuild

    def _check_size(self, shape) -> tuple[int, ...]:
        shape = (shape,) if isinstance(shape, int) else tuple(shape)
        if not all(isinstance(n, int) and n >= 0 for n in shape):
            raise UnsafePickleError(f"{self.source}: array shape {reprlib.repr(shape)} refused")
        if math.prod(shape) > self.max_bytes:
            raise UnsafePickleError(
                f"{self.source}: declares a uint8 array of {math.prod(shape)} bytes, more than "
                f"the {self.max_bytes} bytes that may hold it: refused"
            )
        return shape

    def _reconstruct(self, cls, shape, dtype, *args):
        # numpy pickles an array as _reconstruct(ndarray, (0,), b'b') and sets its data with
        # __setstate__, which checks the data's length against the declared shape.
        if cls is not _ndarray_class:
            raise UnsafePickleError(
                f"_reconstruct called with {cls!r}, only numpy.ndarray is allowed"
            )
        return np.ndarray.__new__(np.ndarray, self._check_size(shape), _uint8_dtype("u1"))

    def _frombuffer(self, buf, dtype, shape, order):
        if np.dtype(dtype) not in _DTYPES.values():
            raise UnsafePickleError(
                f"array of dtype {dtype} refused: a verification .bin holds "
                "uint8 images and bool issame flags only"
            )
        return np.frombuffer(buf, dtype).reshape(self._check_size(shape), order=order)


def _restricted_load(data: bytes, source: str):
    # Try the default (ASCII) decoding first, as insightface does, then encoding='bytes' for
    # Python 2 pickles whose JPEG ``str`` objects are not ASCII.
    try:
        return RestrictedUnpickler(io.BytesIO(data), source=source, max_bytes=len(data)).load()
    except UnicodeDecodeError:
        return RestrictedUnpickler(
            io.BytesIO(data), source=source, max_bytes=len(data), encoding="bytes"
        ).load()


def read_bin(path: str | os.PathLike) -> tuple[list[bytes], np.ndarray]:
    """Reads a verification ``.bin`` safely: (2P encoded images as bytes, issame bool [P]).

    Bounded by the file: no array may declare more bytes than the file has, and the images
    together may not hold more bytes than the file (a pickle can reference one image many times,
    and each reference would become a copy). Errors name the file.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"{path}: verification .bin not found")
    data = path.read_bytes()
    try:
        obj = _restricted_load(data, str(path))
    except UnsafePickleError as e:
        if str(e).startswith(str(path)):
            raise
        raise UnsafePickleError(f"{path}: {e}") from None
    except Exception as e:  # any other unpickling failure means a damaged or foreign file
        reason = str(e) or type(e).__name__  # MemoryError: a length no file can back
        raise UserError(f"{path}: not a readable verification .bin pickle ({reason})") from e
    if not (isinstance(obj, tuple | list) and len(obj) == 2):
        raise UserError(
            f"{path}: expected a pickled (bins, issame_list) pair, got {type(obj).__name__}"
        )
    bins, issame = obj
    if isinstance(issame, np.ndarray) and issame.dtype == np.bool_ and issame.ndim == 1:
        issame = issame.tolist()  # a bool array: what insightface's loader reads alike
    elif isinstance(issame, np.ndarray):
        raise UserError(
            f"{path}: issame_list is a {issame.dtype} array of shape {issame.shape},"
            " expected a list (or 1-D array) of bools"
        )
    if not (isinstance(bins, list | tuple) and isinstance(issame, list | tuple)):
        raise UserError(
            f"{path}: expected lists of images and of bools, got "
            f"{type(bins).__name__} and {type(issame).__name__}"
        )
    total = 0
    for i, b in enumerate(bins):
        if isinstance(b, bytes | bytearray) or (isinstance(b, np.ndarray) and b.dtype == np.uint8):
            total += len(b) if not isinstance(b, np.ndarray) else b.nbytes
        else:
            kind = f"a {b.dtype} array" if isinstance(b, np.ndarray) else type(b).__name__
            raise UserError(f"{path}: image {i} is {kind}, expected bytes or uint8")
    if total > len(data):
        raise UnsafePickleError(
            f"{path}: its {len(bins)} images hold {total} bytes, more than the file's "
            f"{len(data)}: the same data is referenced several times; refused"
        )
    flags = []
    for i, s in enumerate(issame):
        if not isinstance(s, bool | int) or s not in (0, 1):
            # reprlib: a bounded repr, as the value can be nested 200,000 lists deep.
            raise UserError(f"{path}: issame[{i}] is {reprlib.repr(s)}, expected a bool")
        flags.append(bool(s))
    if not flags:
        raise UserError(f"{path}: holds 0 pairs; a verification set needs at least one")
    if len(bins) != 2 * len(flags):
        raise UserError(
            f"{path}: {len(bins)} images for {len(flags)} pairs, expected 2 images per pair"
        )
    out = [b.tobytes() if isinstance(b, np.ndarray) else bytes(b) for b in bins]
    return out, np.asarray(flags, dtype=bool)


_warned_resize = False


def decode_image(data: bytes, image_size: int = FACE_SIZE, *, what: str = "image") -> np.ndarray:
    """Decodes encoded image bytes to uint8 RGB [image_size, image_size, 3] with Pillow.

    Images of another size are resized (bilinear) with a one-time warning, as insightface's
    evaluation does for non-112 sets. An unreadable image (``magjax.data.images``: corrupt,
    truncated, a corrupt JPEG scan, a decompression bomb) raises ``UnreadableImageError``.
    """
    global _warned_resize
    im = image_io.decode_rgb(data, what)
    if im.size != (image_size, image_size):
        if not _warned_resize:
            log.warning("%s is %dx%d, resizing to %d (warned once)", what, *im.size, image_size)
            _warned_resize = True
        im = im.resize((image_size, image_size), Image.BILINEAR)
    return np.asarray(im)


def load_bin(path: str | os.PathLike, image_size: int = FACE_SIZE) -> tuple[np.ndarray, np.ndarray]:
    """Loads a verification set: (images uint8 [2P, S, S, 3] RGB, issame bool [P]).

    A corrupt image is an error naming the file and the image index: dropping it silently would
    break the pairing and change the protocol.
    """
    bins, issame = read_bin(path)
    images = np.empty((len(bins), image_size, image_size, 3), np.uint8)
    for i, b in enumerate(bins):
        images[i] = decode_image(b, image_size, what=f"{path}: image {i} (pair {i // 2})")
    return images, issame


def write_bin(
    path: str | os.PathLike,
    images_or_jpeg_bytes: np.ndarray | Sequence[bytes],
    issame: Sequence[bool] | np.ndarray,
    *,
    jpeg_quality: int = 95,
) -> pathlib.Path:
    """Writes a verification ``.bin`` that insightface's ``verification.py`` and magjax read.

    ``images_or_jpeg_bytes`` is uint8 RGB [2P, H, W, 3] (JPEG-encoded here) or 2P encoded byte
    strings (stored as they are). The pickle holds ``bytes`` objects (protocol 4), which both
    loaders turn into arrays with ``np.frombuffer``.
    """
    path = pathlib.Path(path)
    if isinstance(images_or_jpeg_bytes, np.ndarray):
        if images_or_jpeg_bytes.dtype != np.uint8 or images_or_jpeg_bytes.ndim != 4:
            raise ValueError("images must be uint8 [2P, H, W, 3] RGB")
        bins = []
        for img in images_or_jpeg_bytes:
            buf = io.BytesIO()
            Image.fromarray(img).save(buf, format="JPEG", quality=jpeg_quality)
            bins.append(buf.getvalue())
    else:
        bins = [bytes(b) for b in images_or_jpeg_bytes]
    flags = [bool(s) for s in np.asarray(issame).reshape(-1)]
    if len(bins) != 2 * len(flags):
        raise ValueError(f"{len(bins)} images for {len(flags)} pairs: need exactly 2 per pair")

    def dump(tmp: str) -> None:
        with open(tmp, "wb") as f:
            pickle.dump((bins, flags), f, protocol=4)

    return files.write_atomically(path, dump)


def protocol_problem(path, issame: np.ndarray, nrof_folds: int = 10) -> str | None:
    """Why the ``nrof_folds``-fold protocol cannot run on ``issame`` (None when it can).

    It needs at least ``nrof_folds`` pairs, same- and different-identity pairs both, and the
    different-identity pairs spread over at least two folds: each fold's threshold is chosen at
    a false-accept rate of the other folds, undefined where they hold no different pair.
    """
    from magjax.eval.verification import fold_bounds

    n, same = len(issame), int(np.count_nonzero(issame))
    if n < nrof_folds:
        return (
            f"{path}: holds {n} pairs; the {nrof_folds}-fold verification protocol needs at "
            f"least {nrof_folds}"
        )
    if same in (0, n):
        kind = "same-identity" if same == 0 else "different-identity"
        return (
            f"{path}: holds no {kind} pair (issame is {bool(same)} for all {n} pairs); the "
            "verification protocol needs both kinds"
        )
    folds = [start for start, stop in fold_bounds(n, nrof_folds) if not issame[start:stop].all()]
    if len(folds) == 1:
        return (
            f"{path}: all its different-identity pairs lie in one of the {nrof_folds} "
            "folds (contiguous blocks of pairs); the other folds then hold none and the "
            "false-accept rate is undefined: interleave the pairs, as insightface's sets do"
        )
    return None


def inspect_bin(path: str | os.PathLike) -> dict:
    """Summary of a verification set for ``python -m magjax.data inspect FILE.bin``.

    ``protocol_problem`` says why the 10-fold protocol cannot run on the set (None when it can;
    evaluation refuses such a set, and this is logged as a warning)."""
    bins, issame = read_bin(path)
    sizes: dict[str, int] = {}
    corrupt = []
    for i, b in enumerate(bins):
        try:
            im = image_io.decode_rgb(b, f"{path}: image {i}")
        except image_io.UnreadableImageError as e:
            log.warning("%s", e)
            corrupt.append(i)
            continue
        key = f"{im.size[0]}x{im.size[1]}"
        sizes[key] = sizes.get(key, 0) + 1
    problem = protocol_problem(path, issame)
    if problem:
        log.warning("%s", problem)
    return {
        "path": str(path),
        "num_pairs": int(len(issame)),
        "num_same": int(issame.sum()),
        "num_images": len(bins),
        "image_sizes": sizes,
        "corrupt_images": corrupt,
        "protocol_problem": problem,
    }
