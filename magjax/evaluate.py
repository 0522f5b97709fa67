"""``python -m magjax.evaluate``: verification, IJB, quality and clustering of one model, with the
evaluators of :mod:`magjax.evaluators` (those training runs too).

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
* ``--quality-set``: Spearman of the feature norm and the known quality level, the mean norm
  per level (:class:`magjax.evaluators.QualitySet`);
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

from magjax import cpu_runtime

if __name__ == "__main__":  # before the imports below, which take a second
    cpu_runtime.restart_with_malloc_tunables("magjax.evaluate")

import numpy as np  # noqa: E402

from magjax import cli, evaluators, files, logs  # noqa: E402
from magjax.eval import cluster, ijb, quality  # noqa: E402

log = logging.getLogger("magjax.evaluate")


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
    if report.get("quality"):
        q = report["quality"]
        lines.append(f"quality set: Spearman(feature norm, quality level) "
                     f"{q['spearman_norm_vs_quality']:.4f}; recognisability vs level "
                     f"{q['spearman_recognisability_vs_quality']:.4f}; mean norm per level "
                     + " ".join(f"{level}: {norm:.2f}"
                                for level, norm in q["mean_norm_per_level"].items()))
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


def run_sets(workdir: pathlib.Path) -> tuple[str, str | None]:
    """``(--bins, --quality-set)`` of the sets the training run in ``workdir`` evaluated (its
    ``config.json``: the prepared data's held-out sets and ``config.eval``'s), or ``("",
    None)`` when it is no training workdir or names none."""
    saved = workdir / "config.json"
    try:
        config = json.loads(saved.read_text())
        data_dir = pathlib.Path(config["data"]["dir"])
        bins, quality_set = evaluators.configured_sets(config["eval"], data_dir)
    except (OSError, ValueError, KeyError, TypeError):
        return "", None
    bins = [path for path in bins if path.is_file()]
    if quality_set is not None and not quality_set.is_file():
        quality_set = None
    if bins or quality_set:
        log.info("evaluating the sets of the run in %s: %s", workdir,
                 ", ".join(map(str, [*bins, *([quality_set] if quality_set else [])])))
    return ",".join(map(str, bins)), str(quality_set) if quality_set else None


def write_report(report: dict, path: pathlib.Path) -> None:
    """Writes ``report`` as JSON to ``path`` through a rename: never a half-written file."""
    files.write_text_atomically(path, json.dumps(report, indent=2, sort_keys=True))


def _without_path(path, message: str) -> str:
    """``message`` without a leading ``path:`` (most errors name their file), for lines that
    name the set themselves: the path is then printed once."""
    prefix = f"{path}: "
    return message[len(prefix):] if message.startswith(prefix) else message


def evaluate_bins(verifier: evaluators.Verification, encoder, out: pathlib.Path, report: dict,
                  mags: dict) -> None:
    """Evaluates each ``.bin`` set in turn, saving ``eval.json`` after each one.

    A set that fails with a user error (missing or corrupt file) is recorded in
    ``report["failed"]`` and the next set is evaluated; any other error is recorded, the report
    saved, and the error raised.
    """
    report["verification"] = {}
    curves = {}
    for path in verifier.paths:
        try:
            r = verifier.run_set(encoder, path)
        except Exception as error:
            message = cli.user_error_message(error)
            report.setdefault("failed", {})[str(path)] = message or (
                f"{type(error).__name__}: {cli.one_line(str(error))}")
            write_report(report, out / "eval.json")
            if message is None:
                raise
            log.warning("%s failed: %s", path, _without_path(path, message))
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
    parser.add_argument("--quality-set", default=None,
                        help=".npz of images with quality levels and identities (the synthetic "
                             "data's quality.npz): Spearman of the feature norm and the level")
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
    out = pathlib.Path(args.out) if args.out else pathlib.Path(args.workdir) / "eval"
    # The log goes beside the results, unless --out's folder is not there (a mistyped workdir
    # is not created to hold it).
    log_file = out / "evaluate.log" if out.parent.is_dir() else None
    logs.route_logging(log_file, verbose=args.verbose)
    if not (args.bins or args.ijb or args.quality_set or args.cluster):
        # A training workdir: the sets its run evaluated (the data's held-out set, config.eval).
        args.bins, args.quality_set = run_sets(pathlib.Path(args.workdir))
        if not (args.bins or args.quality_set):
            parser.error(f"nothing to evaluate: {args.workdir} names no evaluation set of its "
                         "own; give --bins, --ijb, --quality-set and/or --cluster")
    cpu_runtime.configure()
    return cli.run(lambda: _evaluate(args, out, log_file), verbose=args.verbose,
                   log_file=log_file)


def _evaluate(args: argparse.Namespace, out: pathlib.Path, log_file: pathlib.Path | None
              ) -> int:
    from magjax.encoder import FaceEncoder

    logs.start_jax(log_file, verbose=args.verbose)
    encoder = FaceEncoder.load(args.workdir, batch_size=args.batch)
    out.mkdir(parents=True, exist_ok=True)
    report: dict = {"workdir": str(args.workdir), "arch": encoder.arch}
    mags: dict = {}

    progress = not args.no_progress
    if args.bins:
        paths = [pathlib.Path(item.strip()) for item in args.bins.split(",") if item.strip()]
        verifier = evaluators.Verification(paths, args.batch, out=out, progress=progress)
        evaluate_bins(verifier, encoder, out, report, mags)

    if args.ijb:
        ijb_evaluator = evaluators.IJB(args.ijb, args.target, args.batch, out=out,
                                       progress=progress)
        report.update(ijb_evaluator.run(encoder))
        mags[args.target] = ijb_evaluator.magnitudes
        write_report(report, out / "eval.json")

    if args.quality_set:
        report.update(evaluators.QualitySet(pathlib.Path(args.quality_set)).run(encoder))

    if mags:
        quality.plot_magnitude_histograms(mags, out / "magnitude_hist.png")

    if args.cluster:
        methods = tuple(m.strip() for m in args.cluster_methods.split(",") if m.strip())
        report.update(evaluators.Clustering(
            args.cluster, args.cluster_root, methods, eps=args.dbscan_eps,
            min_samples=args.dbscan_min_samples, batch_size=args.batch).run(encoder))

    write_report(report, out / "eval.json")
    print(format_table(report))
    log.info("wrote %s", out / "eval.json")
    if report.get("failed"):
        return cli.report_user_error(
            f"{len(report['failed'])} of {len(report['failed']) + len(report['verification'])}"
            f" .bin sets failed, the others are in "
            f"{out / 'eval.json'}: " + "; ".join(f"{path}: {_without_path(path, message)}"
                                                 for path, message in report["failed"].items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
