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
"""

from __future__ import annotations

import argparse
import logging
import pathlib
import sys
from collections.abc import Iterator

import numpy as np

from magjax import cli, cpu_runtime
from magjax.data.images import list_images, read_face

log = logging.getLogger("magjax.extract")


def iter_batches(
    paths: list[pathlib.Path], batch_size: int, skip_unreadable: bool, skipped: list[str]
) -> Iterator[tuple[list[str], np.ndarray]]:
    """Yields ``(paths, images [b, 112, 112, 3])``; unreadable files raise or go to ``skipped``."""
    names, images = [], []
    for path in paths:
        try:
            images.append(read_face(path))
        except OSError as e:
            if not skip_unreadable:
                raise
            log.warning("skipped: %s", e)
            skipped.append(str(path))
            continue
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
        raise ValueError("no image could be read")
    return {
        "embeddings": np.concatenate(embeddings).astype(np.float32),
        "quality": np.concatenate(quality).astype(np.float32),
        "paths": np.asarray(names),
        "skipped": np.asarray(skipped, dtype=str),
    }


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m magjax.extract", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True,
                        help="training workdir or inference-model directory")
    parser.add_argument("--images", required=True, help="image directory or list file")
    parser.add_argument("--out", required=True, help="output .npz")
    parser.add_argument("--batch", "--batch-size", type=cli.positive_int, default=64,
                        dest="batch", help="images per forward pass (default 64)")
    parser.add_argument("--skip-unreadable", action="store_true",
                        help="skip (and count) unreadable images instead of stopping")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    cli.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    cpu_runtime.configure()
    return cli.run(lambda: _extract(args), verbose=args.verbose)


def _extract(args: argparse.Namespace) -> int:
    from magjax.encoder import FaceEncoder

    encoder = FaceEncoder.load(args.workdir, batch_size=args.batch)
    paths = list_images(args.images)
    result = extract(encoder, paths, args.batch, args.skip_unreadable, not args.no_progress)
    out = pathlib.Path(args.out)
    if out.suffix != ".npz":  # np.savez would append it
        out = out.with_name(out.name + ".npz")
    out.parent.mkdir(parents=True, exist_ok=True)
    np.savez(out, **result)
    log.info("wrote %s: %d embeddings of dimension %d", out, *result["embeddings"].shape)
    return 0


if __name__ == "__main__":
    cpu_runtime.restart_with_malloc_tunables("magjax.extract")
    sys.exit(main())
