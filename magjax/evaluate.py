"""``python -m magjax.evaluate``: verification, IJB, quality and clustering of one model.

    python -m magjax.evaluate --workdir runs/demo --bins lfw.bin,cfp_fp.bin,agedb_30.bin
    python -m magjax.evaluate --workdir runs/r100 --ijb /data/IJB_release --target IJBC
    python -m magjax.evaluate --workdir runs/r100 \
        --cluster /data/IJB-B/clustering_protocol/cs3.csv --cluster-root /data/IJB-B

Writes to ``--out`` (default ``WORKDIR/eval``):

* ``eval.json``: every number below, rewritten (atomically) as each part completes; a ``.bin``
  set that fails is recorded under ``failed`` with its error, the other sets are still
  evaluated, and the command exits with status 2;
* per ``.bin`` set NAME: 10-fold accuracy +- std, VAL@FAR=1e-3, XNorm
  (:mod:`magjax.eval.verification`), ``erc_NAME.csv`` and the quality plots
  ``mean_faces_NAME.png``;
* ``erc.png`` (error-versus-reject of all sets) and ``magnitude_hist.png``
  (:mod:`magjax.eval.quality`);
* IJB: TAR@FAR 1e-6 ... 1e-1 for the aggregation modes of :func:`magjax.eval.ijb.default_modes`
  and ``roc_IJBC.png``;
* clustering: BCubed precision / recall / F and NMI of K-means, agglomerative and DBSCAN
  (:mod:`magjax.eval.cluster`). ``--cluster`` is an image folder ``root/<identity>/<img>`` or an
  IJB-B protocol CSV (``TEMPLATE_ID,SUBJECT_ID,FILENAME[,FACE_X,FACE_Y,FACE_WIDTH,FACE_HEIGHT]``,
  files relative to ``--cluster-root``): the face box is cropped (the protocol has no
  landmarks, so this is a box crop resized to 112, not a 5-point alignment) and templates are
  the mean of their unit image embeddings.

A table of the results is printed at the end.
"""

from __future__ import annotations

import argparse
import json
import logging
import pathlib
import sys

import numpy as np

from magjax import cli, files
from magjax.eval import cluster, ijb, quality, verification

log = logging.getLogger("magjax.evaluate")


def _bin_name(path: pathlib.Path) -> str:
    return path.name[: -len(".bin")] if path.name.endswith(".bin") else path.stem


def evaluate_bin(encoder, path: pathlib.Path, batch_size: int, out: pathlib.Path,
                 progress: bool = False) -> dict:
    """Verification + quality of one ``.bin`` set; writes its ERC CSV and mean-face picture."""
    from magjax.data.verification_bin import load_bin

    name = _bin_name(path)
    images, issame = load_bin(path)
    plain, flipped = verification.embed_with_flip(encoder.embed_raw, images, batch_size,
                                                  progress=name if progress else None)
    result = verification.evaluate_embedded(plain, flipped, issame)
    mags = quality.magnitudes(plain)
    fused = verification.l2_normalize(plain.astype(np.float64) + flipped)
    scores = np.sum(fused[0::2] * fused[1::2], axis=1)
    pairs = np.stack([np.arange(0, len(images), 2), np.arange(1, len(images), 2)], axis=1)
    curve = quality.error_versus_reject(mags, pairs, scores, issame)
    quality.write_erc_csv(curve, out / f"erc_{name}.csv")
    faces, edges, counts = quality.mean_faces(images, mags)
    quality.plot_mean_faces(faces, edges, counts, out / f"mean_faces_{name}.png")
    return {
        "name": name,
        "summary": {
            "accuracy": result["accuracy"],
            "std": result["std"],
            "val": result["val"],
            "val_std": result["val_std"],
            "far": result["far"],
            "xnorm": result["xnorm"],
            "best_thresholds": result["best_thresholds"].tolist(),
            "num_pairs": int(len(issame)),
            "magnitude_mean": float(mags.mean()),
            "magnitude_std": float(mags.std()),
            "erc_fnmr": {f"{r:.2f}": float(f) for r, f in
                         zip(curve["reject_fraction"], curve["fnmr"], strict=True)},
        },
        "curve": curve,
        "magnitudes": mags,
    }


def evaluate_ijb(encoder, root: str, target: str, batch_size: int, out: pathlib.Path,
                 progress: bool) -> tuple[dict, np.ndarray]:
    """TAR@FAR of every default aggregation mode; writes ``roc_TARGET.png``."""
    meta = ijb.load_meta(root, target)
    log.info("%s: %d images, %d templates, %d pairs", target, meta.names.size,
             np.unique(meta.templates).size, meta.labels.size)
    plain, flipped = ijb.extract_features(meta, encoder.embed_raw, batch_size, progress)
    results = ijb.evaluate_features(meta, plain, flipped)
    plot_roc(results, out / f"roc_{target.upper()}.png", target.upper())
    summary = {name: {"tar_at_far": r["tar_at_far"]} for name, r in results.items()}
    return summary, quality.magnitudes(plain)


def plot_roc(results: dict, path: pathlib.Path, title: str) -> None:
    """ROC (TAR against log FAR, 1e-6 ... 1) of each IJB aggregation mode, 800x450 pixels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(8.0, 4.5), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    for name, r in results.items():
        keep = r["fpr"] > 0
        ax.plot(r["fpr"][keep], r["tpr"][keep], lw=1, label=name)
    ax.set_xscale("log")
    ax.set_xlim(1e-6, 1.0)
    ax.set_xlabel("False accept rate (FAR)")
    ax.set_ylabel("True accept rate (TAR)")
    ax.set_title(f"ROC on {title} 1:1")
    ax.grid(linestyle="--", linewidth=0.5)
    ax.legend(loc="lower right", fontsize=8)
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _crop_box(path: pathlib.Path, columns: dict, row: int) -> np.ndarray:
    """The protocol row's face box (if the CSV has one) resized to 112x112 RGB."""
    from PIL import Image

    from magjax.data.images import UnreadableImageError, read_image
    from magjax.errors import UserError

    try:
        img = read_image(path).convert("RGB")
        if all(c in columns for c in ("FACE_X", "FACE_Y", "FACE_WIDTH", "FACE_HEIGHT")):
            x, y, w, h = (float(columns[c][row]) for c in
                          ("FACE_X", "FACE_Y", "FACE_WIDTH", "FACE_HEIGHT"))
            img = img.crop((round(x), round(y), round(x + w), round(y + h)))
        return np.asarray(img.resize((112, 112), Image.Resampling.BILINEAR), np.uint8)
    except UnreadableImageError as e:  # names the path
        raise UnreadableImageError(f"clustering protocol row {row + 2}: {e}") from e
    except ValueError as e:
        raise UserError(f"{path} (clustering protocol row {row + 2}): bad face box: {e}") from e


def cluster_inputs(encoder, spec: str, root: str | None, batch_size: int):
    """``(embeddings, labels)`` of the items to cluster for ``--cluster SPEC``."""
    from magjax.extract import list_images, read_face

    spec_path = pathlib.Path(spec)
    if spec_path.is_dir():
        paths = list_images(spec_path)
        labels = np.unique([p.relative_to(spec_path).parts[0] for p in paths],
                           return_inverse=True)[1]
        embs = [encoder.encode(np.stack([read_face(p) for p in paths[i:i + batch_size]]))[0]
                for i in range(0, len(paths), batch_size)]
        return np.concatenate(embs), labels
    columns = cluster.read_protocol(spec_path)
    base = pathlib.Path(root) if root else spec_path.parent
    files = columns["FILENAME"]
    embs = []
    for i in range(0, len(files), batch_size):
        batch = np.stack([_crop_box(base / files[j], columns, j)
                          for j in range(i, min(i + batch_size, len(files)))])
        embs.append(encoder.encode(batch)[0])
    feats, subjects, _ = cluster.template_embeddings(
        np.concatenate(embs), columns["TEMPLATE_ID"], columns["SUBJECT_ID"])
    return feats, subjects


def format_table(report: dict) -> str:
    """The printed summary: one line per set / mode / clustering method."""
    lines = []
    if report.get("verification"):
        lines.append(f"{'set':16s} {'acc':>8s} {'std':>8s} {'VAL@1e-3':>9s} {'XNorm':>8s} "
                     f"{'FNMR@0%':>8s} {'FNMR@20%':>9s}")
        for name, r in report["verification"].items():
            erc = r["erc_fnmr"]
            lines.append(f"{name:16s} {100 * r['accuracy']:8.2f} {100 * r['std']:8.2f} "
                         f"{100 * r['val']:9.2f} {r['xnorm']:8.3f} {erc.get('0.00', np.nan):8.4f} "
                         f"{erc.get('0.20', np.nan):9.4f}")
    if report.get("ijb"):
        target = report["ijb_target"]
        fars = [repr(x) for x in ijb.FAR_TARGETS]
        lines.append(f"{target + ' TAR@FAR':22s} " + " ".join(f"{f:>7s}" for f in fars))
        for mode, r in report["ijb"].items():
            lines.append(f"{mode:22s} " + " ".join(
                f"{100 * r['tar_at_far'][f]:7.2f}" for f in fars))
    if report.get("cluster"):
        lines.append(f"{'clustering':16s} {'P':>7s} {'R':>7s} {'F':>7s} {'NMI':>7s} {'#cl':>6s}")
        for method, r in report["cluster"].items():
            lines.append(f"{method:16s} {r['precision']:7.4f} {r['recall']:7.4f} "
                         f"{r['fmeasure']:7.4f} {r['nmi']:7.4f} {r['num_clusters']:6d}")
    return "\n".join(lines)


def write_report(report: dict, path: pathlib.Path) -> None:
    """Writes ``report`` as JSON to ``path`` through a rename: never a half-written file."""
    files.write_text_atomically(path, json.dumps(report, indent=2, sort_keys=True))


def evaluate_bins(encoder, items: list[str], batch_size: int, out: pathlib.Path, report: dict,
                  mags: dict, progress: bool = False) -> None:
    """Evaluates each ``.bin`` set in turn, saving ``eval.json`` after each one.

    A set that fails with a user error (missing or corrupt file) is recorded in
    ``report["failed"]`` and the next set is evaluated; any other error is recorded, the report
    saved, and the error raised.
    """
    report["verification"] = {}
    curves = {}
    for item in items:
        path = pathlib.Path(item)
        try:
            r = evaluate_bin(encoder, path, batch_size, out, progress)
        except Exception as error:
            message = cli.user_error_message(error)
            report.setdefault("failed", {})[str(path)] = message or (
                f"{type(error).__name__}: {cli.one_line(str(error))}")
            write_report(report, out / "eval.json")
            if message is None:
                raise
            log.warning("%s failed: %s", path, message)
            continue
        report["verification"][r["name"]] = r["summary"]
        curves[r["name"]] = r["curve"]
        mags[r["name"]] = r["magnitudes"]
        write_report(report, out / "eval.json")
    if curves:
        quality.plot_erc(curves, out / "erc.png")


def main(argv: list[str] | None = None) -> int:
    parser = cli.ArgumentParser(
        prog="python -m magjax.evaluate", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--workdir", required=True,
                        help="training workdir or inference-model directory")
    parser.add_argument("--bins", default="", help="comma-separated verification .bin files")
    parser.add_argument("--ijb", default=None, help="IJB root (holding meta/ and loose_crop/)")
    parser.add_argument("--target", default="IJBC", choices=("IJBB", "IJBC"))
    parser.add_argument("--cluster", default=None,
                        help="image folder root/<identity>/<img> or IJB-B clustering CSV")
    parser.add_argument("--cluster-root", default=None,
                        help="directory the FILENAME column of --cluster CSV is relative to")
    parser.add_argument("--cluster-methods", default=",".join(cluster.METHODS))
    parser.add_argument("--dbscan-eps", type=float, default=0.5,
                        help="DBSCAN radius in cosine distance")
    parser.add_argument("--dbscan-min-samples", type=int, default=2)
    parser.add_argument("--out", default=None, help="output directory (default WORKDIR/eval)")
    parser.add_argument("--batch", "--batch-size", type=cli.positive_int, default=64,
                        dest="batch", help="images per forward pass (default 64)")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bars (.bin sets, IJB images)")
    cli.add_verbose_flag(parser)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not (args.bins or args.ijb or args.cluster):
        parser.error("nothing to evaluate: give --bins, --ijb and/or --cluster")
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "eval"
    return cli.run(lambda: _evaluate(args, out), verbose=args.verbose,
                   log_file=out / "evaluate.log")


def _evaluate(args: argparse.Namespace, out: pathlib.Path) -> int:
    from magjax.encoder import FaceEncoder

    encoder = FaceEncoder.load(args.workdir, batch_size=args.batch)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"workdir": str(args.workdir), "arch": encoder.arch}
    mags: dict = {}

    if args.bins:
        items = [item.strip() for item in args.bins.split(",") if item.strip()]
        evaluate_bins(encoder, items, args.batch, out, report, mags, not args.no_progress)

    if args.ijb:
        report["ijb_target"] = args.target
        report["ijb"], mags[args.target] = evaluate_ijb(
            encoder, args.ijb, args.target, args.batch, out, not args.no_progress)
        write_report(report, out / "eval.json")

    if mags:
        quality.plot_magnitude_histograms(mags, out / "magnitude_hist.png")

    if args.cluster:
        feats, labels = cluster_inputs(encoder, args.cluster, args.cluster_root, args.batch)
        methods = tuple(m.strip() for m in args.cluster_methods.split(",") if m.strip())
        report["cluster"] = cluster.evaluate(feats, labels, methods, eps=args.dbscan_eps,
                                             min_samples=args.dbscan_min_samples)
        report["cluster_items"] = int(len(labels))

    write_report(report, out / "eval.json")
    print(format_table(report))
    log.info("wrote %s", out / "eval.json")
    if report.get("failed"):
        return cli.report_user_error(
            f"{len(report['failed'])} of {len(report['failed']) + len(report['verification'])}"
            f" .bin sets failed, the others are in "
            f"{out / 'eval.json'}: " + "; ".join(f"{path}: {message}" for path, message
                                                 in report["failed"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
